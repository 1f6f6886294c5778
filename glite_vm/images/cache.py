"""The local image cache: content-addressed, locked per file, leased, bounded, crash-safe.

Layout under ``GLITE_VM_CACHE_DIR``::

    blobs/<sha256>          verified files, read-only (0444; a custom image's 0440: its bytes
                            are its owner's business); the only paths handed out
    blobs/<sha256>.json     what we know about a blob (size, format, virtual size, sources);
                            its mtime is the blob's last use (for LRU)
    partial/<key>.part      a download in progress or interrupted (never handed out)
    partial/<key>.part.json its sidecar: URL, validators, size (for resuming with Range)
    partial/<key>.reserve   bytes reserved by a running download, and its pid
    leases/<sha256>/<id>.json   one file per lease
    urls/<key>.json         custom URL without digest -> digest it had, validators
    locks/<key>.lock        per-file locks (kept: deleting lock files races with waiters)
    locks/budget.lock       serialises reservations and eviction
    catalogue/              local copies of catalogues

``key`` is the sha256 when it is known in advance, else ``url-`` plus a hash of the URL.

Invariants. A blob appears only by ``rename`` of a complete, fsynced, hashed (and for disk
images inspected) part, after its metadata, so a reader never sees a partial or unverified file.
A lease is written and a blob removed only under that blob's lock, so eviction can never remove
a file between a reader's check and its lease. Eviction takes other files' locks without
waiting, so it cannot deadlock with downloads; it skips files with live leases. A file someone
named as a custom image is readable by no other local user (owner and group only; the VM layer
gives the group to QEMU's user, :mod:`glite_vm.vm.qemu_user`) until a catalogue entry with the
same digest makes it public.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import filelock
import requests

from glite_vm.config import Settings, format_size
from glite_vm.errors import (
    CacheFullError,
    ChecksumMismatchError,
    DownloadError,
    ImageNotFoundError,
    ImageRefusedError,
    LockTimeoutError,
)
from glite_vm.images import leases as lease_files
from glite_vm.images._fsutil import (
    atomic_write_json,
    fsync_dir,
    is_disk_full,
    read_json_object,
    unlink_quietly,
)
from glite_vm.images._transport import (
    CHUNK,
    FileAccess,
    NotFound,
    Redirected,
    Refused,
    Stream,
    Validators,
    open_url,
)
from glite_vm.images.download import (
    Downloaded,
    Fetch,
    Progress,
    discard_part,
    download,
    sidecar_path,
)
from glite_vm.images.inspect import Limits, inspect_image
from glite_vm.images.leases import LeaseRecord

log = logging.getLogger(__name__)

_BLOB_RE = re.compile(r"^[0-9a-f]{64}$")
_BUDGET = "budget"
PUBLIC_MODE = 0o444  # a catalogue's file: everyone may read what the repository publishes
PRIVATE_MODE = 0o440  # a custom image: its bytes are none of the other local users' business


@dataclasses.dataclass(frozen=True)
class Source:
    """One file to bring into the cache."""

    url: str
    label: str  # catalogue name or what the user wrote; used in messages
    sha256: str | None = None
    size: int | None = None
    kind: Literal["disk", "file"] = "disk"  # disk images are inspected; kernels/initrds are not
    declared_format: str | None = None
    custom: bool = False  # the user named it (404 is their error, not the repository's)
    follow_redirects: bool = True  # False for a job's URL: a redirect could leave the allowed
    # sources, so it is refused rather than followed
    # a job's file:// URL: opened with its owner's rights, and only where the sources allow
    file_access: FileAccess = dataclasses.field(default_factory=FileAccess)

    @property
    def key(self) -> str:
        if self.sha256:
            return self.sha256
        return "url-" + hashlib.sha256(self.url.encode()).hexdigest()[:40]


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    sha256: str
    path: Path
    size: int
    kind: str
    format: str | None
    virtual_size: int | None
    sources: tuple[str, ...]
    created: float
    last_used: float


@dataclasses.dataclass(frozen=True)
class Acquired:
    entry: CacheEntry
    lease: LeaseRecord
    hit: bool  # the file was complete in the cache when the call started


@dataclasses.dataclass(frozen=True)
class EntryStatus:
    entry: CacheEntry
    leases: tuple[LeaseRecord, ...]  # live leases


@dataclasses.dataclass(frozen=True)
class CacheStatus:
    root: Path
    budget: int
    used_bytes: int  # verified files
    partial_bytes: int  # downloads in progress or interrupted
    free_bytes: int  # free space on the cache's file system
    entries: tuple[EntryStatus, ...]
    dead_leases: int

    @property
    def live_leases(self) -> int:
        return sum(len(e.leases) for e in self.entries)


@dataclasses.dataclass(frozen=True)
class PruneReport:
    removed: tuple[CacheEntry, ...]
    freed_bytes: int
    partials_removed: int
    dead_leases_removed: int
    kept_in_use: int  # entries that would have gone but are leased


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """What :meth:`ImageCache.prune` would remove if it ran now (shown before it runs)."""

    target_bytes: int
    used_bytes: int
    evict: tuple[CacheEntry, ...]  # least recently used first
    partial_downloads: int  # interrupted downloads (no running download owns them)
    partial_bytes: int
    dead_leases: int
    in_use_above_target: bool  # leased images keep the cache above the target

    @property
    def evict_bytes(self) -> int:
        return sum(e.size for e in self.evict)

    @property
    def removes_anything(self) -> bool:
        return bool(self.evict or self.partial_downloads or self.dead_leases)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    sha256: str
    path: Path
    ok: bool
    detail: str


@dataclasses.dataclass(frozen=True)
class _Usage:
    used: int  # bytes counted against the budget
    pending: int  # bytes other running downloads will still write


class ImageCache:
    """The cache at ``settings.effective_cache_dir``. Cheap to construct; safe across processes."""

    def __init__(self, settings: Settings, *, session: requests.Session | None = None) -> None:
        self.settings = settings
        self.root = settings.effective_cache_dir
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.leases = self.root / "leases"
        self.urls = self.root / "urls"
        self.locks = self.root / "locks"
        self._session = session
        self._dirs_made = False

    # --- plumbing ----------------------------------------------------------------------------

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def _make_dirs(self) -> None:
        if self._dirs_made:
            return
        try:
            for d in (self.blobs, self.partial, self.leases, self.urls, self.locks):
                d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            if is_disk_full(exc):
                raise CacheFullError(f"the disk under the image cache {self.root} is full") from exc
            raise
        self._dirs_made = True

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def _meta_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.json"

    def _reservation_path(self, key: str) -> Path:
        return self.partial / f"{key}.reserve"

    @contextlib.contextmanager
    def _locked(self, key: str, *, what: str, timeout: float | None = None) -> Iterator[None]:
        wait = self.settings.lock_timeout if timeout is None else timeout
        lock = filelock.FileLock(self.locks / f"{key}.lock", timeout=wait)
        try:
            lock.acquire()
        except filelock.Timeout:
            raise LockTimeoutError(
                f"waited {wait:.0f}s for {what}; another process still holds it"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def _try_lock(self, key: str) -> filelock.FileLock | None:
        lock = filelock.FileLock(self.locks / f"{key}.lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            return None
        return lock

    # --- entries -----------------------------------------------------------------------------

    def entry(self, sha256: str) -> CacheEntry | None:
        """The verified file with this digest, or None. No lock: a snapshot answer."""
        meta = read_json_object(self._meta_path(sha256))
        if meta is None:
            return None
        try:
            st = self.blob_path(sha256).stat()
            mst = self._meta_path(sha256).stat()
        except FileNotFoundError:
            return None
        if st.st_size != meta.get("size"):
            return None
        sources = meta.get("sources")
        fmt, vsize = meta.get("format"), meta.get("virtual_size")
        return CacheEntry(
            sha256=sha256,
            path=self.blob_path(sha256),
            size=st.st_size,
            kind=str(meta.get("kind", "disk")),
            format=fmt if isinstance(fmt, str) else None,
            virtual_size=vsize if isinstance(vsize, int) else None,
            sources=tuple(str(s) for s in sources) if isinstance(sources, list) else (),
            created=float(meta.get("created", 0.0)),
            last_used=mst.st_mtime,
        )

    def entries(self) -> list[CacheEntry]:
        out = []
        for sha in self._blob_names():
            e = self.entry(sha)
            if e is not None:
                out.append(e)
        return out

    def _blob_names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.blobs) if _BLOB_RE.match(n))
        except FileNotFoundError:
            return []

    # --- acquire -----------------------------------------------------------------------------

    def acquire(
        self,
        source: Source,
        *,
        job_id: str,
        owner_pid: int | None = None,
        progress: Progress | None = None,
    ) -> Acquired:
        """Make ``source`` present and verified; return it with a lease for ``job_id``."""
        self._make_dirs()
        if source.sha256 is None:
            return self._acquire_by_url(source, job_id, owner_pid, progress)
        sha = source.sha256
        present = self.entry(sha) is not None
        with self._locked(sha, what=f"the download of {source.label}"):
            entry = self.entry(sha)
            hit = present and entry is not None
            if entry is None:
                entry = self._fetch_verified(source, progress)
            lease = self._lease_locked(entry, source, job_id, owner_pid)
        return Acquired(entry, lease, hit)

    def _acquire_by_url(
        self, source: Source, job_id: str, owner_pid: int | None, progress: Progress | None
    ) -> Acquired:
        """A custom URL without a digest: revalidate what it gave last time, else fetch it."""
        key = source.key
        index_path = self.urls / f"{key}.json"
        with self._locked(key, what=f"the download of {source.label}"):
            first: Stream | None = None
            index = read_json_object(index_path)
            known = index.get("sha256") if index and index.get("url") == source.url else None
            if isinstance(known, str) and self.entry(known) is not None:
                assert index is not None
                first = self._revalidate(source, index)
                if first is None:
                    with self._locked(known, what=f"the cached copy of {source.label}"):
                        entry = self.entry(known)
                        if entry is not None:
                            lease = self._lease_locked(entry, source, job_id, owner_pid)
                            return Acquired(entry, lease, hit=True)
            part = self.partial / f"{key}.part"
            dl = self._download(source, part, progress, first=first)
            entry, lease = self._install(source, part, dl, job_id, owner_pid)
            index_doc = {
                "url": source.url,
                "sha256": dl.sha256,
                "etag": dl.validators.etag,
                "last_modified": dl.validators.last_modified,
            }
            try:
                atomic_write_json(index_path, index_doc, durable=False)
            except OSError as exc:
                log.warning("cannot remember the digest of %s: %s", source.url, exc)
            return Acquired(entry, lease, hit=False)

    def _revalidate(self, source: Source, index: dict[str, object]) -> Stream | None:
        """None when the cached copy is current (or the source is unreachable), else the new
        content as an open stream."""
        etag, modified = index.get("etag"), index.get("last_modified")
        validators = Validators(
            etag if isinstance(etag, str) else None,
            modified if isinstance(modified, str) else None,
        )
        try:
            stream = open_url(
                self.session,
                source.url,
                conditional=validators,
                timeout=self.settings.download_timeout,
                follow_redirects=source.follow_redirects,
                file_access=source.file_access,
            )
        except NotFound as exc:
            raise ImageNotFoundError(source.label, str(exc)) from None
        except Redirected as exc:
            raise _redirect_refused(source, exc) from None
        except Refused as exc:
            raise ImageRefusedError(source.label, str(exc)) from None
        except DownloadError as exc:
            log.warning("%s: %s; using the cached copy", source.label, exc)
            return None
        if stream.status == 200:
            return stream
        stream.close()  # 304 Not Modified (or an odd answer): keep using the cached copy
        return None

    def _fetch_verified(self, source: Source, progress: Progress | None) -> CacheEntry:
        """Download, check the digest, inspect, install. The source's lock is held."""
        assert source.sha256 is not None
        part = self.partial / f"{source.key}.part"
        dl = self._download(source, part, progress)
        if dl.sha256 != source.sha256 and dl.resumed_from > 0:
            # The kept bytes may be what went wrong (e.g. lost in a power cut): once more, whole.
            log.warning("%s: digest mismatch after a resumed download; downloading again", source)
            discard_part(part)
            dl = self._download(source, part, progress, resume=False)
        if dl.sha256 != source.sha256:
            discard_part(part)
            raise ChecksumMismatchError(source.label, source.sha256, dl.sha256)
        info = self._inspect(source, part)
        return self._install_locked(source, part, dl, info)

    def _download(
        self,
        source: Source,
        part: Path,
        progress: Progress | None,
        *,
        first: Stream | None = None,
        resume: bool = True,
    ) -> Downloaded:
        key = source.key
        reserved: list[int] = []

        def reserve(total: int | None) -> None:
            if total is not None and total not in reserved:
                self._reserve(key, total, part, source.label)
                reserved.append(total)

        fetch = Fetch(
            url=source.url,
            part=part,
            label=source.label,
            expected_sha256=source.sha256,
            expected_size=source.size,
            max_bytes=self.settings.max_image_file_bytes,
            timeout=self.settings.download_timeout,
            follow_redirects=source.follow_redirects,
            file_access=source.file_access,
        )
        try:
            if source.size is not None:
                reserve(source.size)  # before any request: a hopeless download never starts
            return download(
                self.session, fetch, reserve=reserve, progress=progress, first=first, resume=resume
            )
        except NotFound as exc:
            discard_part(part)
            if source.custom:
                raise ImageNotFoundError(source.label, str(exc)) from None
            raise DownloadError(
                f"the repository lacks {source.label} ({exc}); the catalogue is out of date"
            ) from None
        except Redirected as exc:
            discard_part(part)
            raise _redirect_refused(source, exc) from None
        except Refused as exc:
            discard_part(part)
            raise ImageRefusedError(source.label, str(exc)) from None
        finally:
            unlink_quietly(self._reservation_path(key))

    def _inspect(self, source: Source, part: Path) -> dict[str, object]:
        if source.kind != "disk":
            return {}
        limits = Limits(
            max_virtual_bytes=self.settings.max_image_virtual_bytes,
            max_file_bytes=self.settings.max_image_file_bytes,
        )
        try:
            info = inspect_image(
                part, source=source.label, limits=limits, declared_format=source.declared_format
            )
        except BaseException:
            discard_part(part)
            raise
        return {"format": info.format, "virtual_size": info.virtual_size}

    def _install(
        self,
        source: Source,
        part: Path,
        dl: Downloaded,
        job_id: str,
        owner_pid: int | None,
    ) -> tuple[CacheEntry, LeaseRecord]:
        """Install a part whose digest was not known in advance: its digest's lock is taken."""
        info = self._inspect(source, part)
        with self._locked(dl.sha256, what=f"the cached copy of {source.label}"):
            entry = self._install_locked(source, part, dl, info)
            return entry, self._lease_locked(entry, source, job_id, owner_pid)

    def _install_locked(
        self, source: Source, part: Path, dl: Downloaded, info: dict[str, object]
    ) -> CacheEntry:
        sha = dl.sha256
        existing = self.entry(sha)
        if existing is not None:  # the same bytes arrived under another name meanwhile
            discard_part(part)
            return existing
        meta = {
            "sha256": sha,
            "size": dl.size,
            "kind": source.kind,
            "sources": [source.label],
            "created": time.time(),
            **info,
        }
        try:
            atomic_write_json(self._meta_path(sha), meta)
            os.chmod(part, PRIVATE_MODE if source.custom else PUBLIC_MODE)
            os.rename(part, self.blob_path(sha))
            fsync_dir(self.blobs)
        except OSError as exc:
            unlink_quietly(self._meta_path(sha))
            discard_part(part)
            if is_disk_full(exc):
                raise CacheFullError(
                    f"the disk under the image cache filled up installing {source.label}"
                ) from exc
            raise
        unlink_quietly(sidecar_path(part))
        entry = self.entry(sha)
        if entry is None:
            raise DownloadError(f"{source.label} vanished from the cache right after install")
        log.info("cached %s as %s (%s)", source.label, sha, format_size(dl.size))
        return entry

    def _lease_locked(
        self, entry: CacheEntry, source: Source, job_id: str, owner_pid: int | None
    ) -> LeaseRecord:
        record = lease_files.write_lease(self.leases, entry.sha256, job_id, owner_pid)
        meta_path = self._meta_path(entry.sha256)
        if source.label not in entry.sources:
            meta = read_json_object(meta_path) or {}
            meta["sources"] = [*entry.sources, source.label][-20:]
            with contextlib.suppress(OSError):
                atomic_write_json(meta_path, meta, durable=False)
        with contextlib.suppress(OSError):
            os.utime(meta_path)  # last use, for LRU
            if not source.custom and not os.stat(entry.path).st_mode & 0o004:
                os.chmod(entry.path, PUBLIC_MODE)  # a catalogue publishes these bytes anyway
        return record

    # --- budget and eviction -----------------------------------------------------------------

    def _reserve(self, key: str, total: int, part: Path, label: str) -> None:
        """Reserve room for ``total`` bytes of ``key``, evicting unused files when needed."""
        budget = self.settings.cache_max_bytes
        if total > budget:
            raise CacheFullError(
                f"{label} ({format_size(total)}) is larger than the whole cache budget "
                f"{format_size(budget)} (GLITE_VM_CACHE_MAX_BYTES)"
            )
        try:
            have = part.stat().st_size
        except FileNotFoundError:
            have = 0
        need = max(0, total - have)
        with self._locked(_BUDGET, what="the cache budget"):
            for first_pass in (True, False):
                usage = self._usage(exclude=key)
                over = usage.used + total - budget
                room = self._free_bytes() - usage.pending - self.settings.cache_min_free_bytes
                short = need - room
                if over <= 0 and short <= 0:
                    self._write_reservation(key, total)
                    return
                if first_pass:
                    self._evict(max(over, short), exclude=key)
            in_use = sum(1 for e in self.entries() if self._live(e.sha256))
        if over > 0:
            raise CacheFullError(
                f"no room for {label} ({format_size(total)}) in the cache budget "
                f"{format_size(budget)}: {format_size(usage.used)} are in use by "
                f"{in_use} leased image(s) or running downloads"
            )
        raise CacheFullError(
            f"not enough free disk space for {label}: {format_size(need)} needed, "
            f"{format_size(max(0, room))} available beyond the "
            f"{format_size(self.settings.cache_min_free_bytes)} kept free "
            "(GLITE_VM_CACHE_MIN_FREE_BYTES)"
        )

    def _free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _write_reservation(self, key: str, total: int) -> None:
        pid = os.getpid()
        doc = {"total": total, "pid": pid, "pid_start": lease_files.process_start_time(pid)}
        try:
            atomic_write_json(self._reservation_path(key), doc, durable=False)
        except OSError as exc:
            if is_disk_full(exc):
                raise CacheFullError("the disk under the image cache is full") from exc
            raise

    def _live_reservation(self, key: str) -> int | None:
        doc = read_json_object(self._reservation_path(key))
        if doc is None:
            return None
        try:
            total, pid = int(doc["total"]), int(doc["pid"])
            start = doc.get("pid_start")
            alive = lease_files.process_alive(pid, int(start) if start is not None else None)
        except (KeyError, TypeError, ValueError):
            return None
        return total if alive else None

    def _partial_keys(self) -> list[str]:
        keys = set()
        try:
            names = os.listdir(self.partial)
        except FileNotFoundError:
            return []
        for name in names:
            for suffix in (".part", ".reserve"):
                if name.endswith(suffix) and not name.startswith("."):
                    keys.add(name[: -len(suffix)])
        return sorted(keys)

    def _part_size(self, key: str) -> int:
        try:
            return (self.partial / f"{key}.part").stat().st_size
        except FileNotFoundError:
            return 0

    def _usage(self, exclude: str | None = None) -> _Usage:
        used = sum(e.size for e in self.entries())
        pending = 0
        for key in self._partial_keys():
            if key == exclude:
                continue
            size = self._part_size(key)
            reserved = self._live_reservation(key)
            if reserved is None:
                used += size
            else:
                used += max(size, reserved)
                pending += max(0, reserved - size)
        return _Usage(used, pending)

    def _live(self, sha256: str) -> bool:
        return bool(lease_files.live_leases(self.leases, sha256, reap=False))

    def _evict(self, amount: int, *, exclude: str | None = None) -> tuple[int, list[CacheEntry]]:
        """Free at least ``amount`` bytes if possible: interrupted downloads first, then the
        least recently used files without live leases. Budget lock held."""
        freed = 0
        removed: list[CacheEntry] = []
        stale = [
            k for k in self._partial_keys() if k != exclude and self._live_reservation(k) is None
        ]
        stale.sort(key=lambda k: _mtime(self.partial / f"{k}.part"))
        for key in stale:
            if freed >= amount:
                return freed, removed
            freed += self._drop_partial(key) or 0
        for entry in sorted(self.entries(), key=lambda e: e.last_used):
            if freed >= amount:
                break
            if entry.sha256 == exclude:
                continue
            gone = self._drop_entry(entry)
            if gone is not None:
                freed += gone.size
                removed.append(gone)
        return freed, removed

    def _drop_partial(self, key: str) -> int | None:
        """Remove an interrupted download; its size, or None when it is in use."""
        lock = self._try_lock(key)
        if lock is None:
            return None  # being downloaded right now
        try:
            if self._live_reservation(key) is not None:
                return None
            size = self._part_size(key)
            discard_part(self.partial / f"{key}.part")
            unlink_quietly(self._reservation_path(key))
            log.info("removed interrupted download %s (%s)", key, format_size(size))
            return size
        finally:
            lock.release()

    def _drop_entry(self, entry: CacheEntry) -> CacheEntry | None:
        """Remove an entry unless it is leased or locked by someone; the removed entry or None."""
        lock = self._try_lock(entry.sha256)
        if lock is None:
            return None
        try:
            current = self.entry(entry.sha256)
            if current is None:
                return None
            if lease_files.live_leases(self.leases, entry.sha256):
                return None
            unlink_quietly(self._meta_path(entry.sha256), self.blob_path(entry.sha256))
            with contextlib.suppress(OSError):
                shutil.rmtree(self.leases / entry.sha256)
            log.info(
                "evicted %s (%s)",
                ", ".join(current.sources) or current.sha256,
                format_size(current.size),
            )
            return current
        finally:
            lock.release()

    # --- administration ----------------------------------------------------------------------

    def status(self) -> CacheStatus:
        entries = []
        dead = 0
        for e in self.entries():
            records = lease_files.read_leases(self.leases, e.sha256)
            live = tuple(r for r in records if r.alive)
            dead += len(records) - len(live)
            entries.append(EntryStatus(e, live))
        partial = sum(self._part_size(k) for k in self._partial_keys())
        try:
            free = self._free_bytes()
        except FileNotFoundError:
            free = 0
        return CacheStatus(
            root=self.root,
            budget=self.settings.cache_max_bytes,
            used_bytes=sum(e.entry.size for e in entries),
            partial_bytes=partial,
            free_bytes=free,
            entries=tuple(entries),
            dead_leases=dead,
        )

    def prune_plan(self, target_bytes: int | None = None) -> PrunePlan:
        """What :meth:`prune` with the same target would remove now. Changes nothing; a
        download or a lease taken meanwhile can make the real prune remove less."""
        target = self.settings.cache_max_bytes if target_bytes is None else target_bytes
        stale = [k for k in self._partial_keys() if self._live_reservation(k) is None]
        dead = sum(
            1
            for sha in lease_files.all_lease_keys(self.leases)
            for record in lease_files.read_leases(self.leases, sha)
            if not record.alive
        )
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        used = sum(e.size for e in entries)
        evict: list[CacheEntry] = []
        left = used
        for entry in entries:
            if left <= target:
                break
            if self._live(entry.sha256):
                continue
            evict.append(entry)
            left -= entry.size
        return PrunePlan(
            target_bytes=target,
            used_bytes=used,
            evict=tuple(evict),
            partial_downloads=len(stale),
            partial_bytes=sum(self._part_size(k) for k in stale),
            dead_leases=dead,
            in_use_above_target=left > target,
        )

    def prune(self, target_bytes: int | None = None) -> PruneReport:
        """Drop dead leases and interrupted downloads, then evict least recently used unleased
        files until the cache holds at most ``target_bytes`` (default: the budget)."""
        self._make_dirs()
        target = self.settings.cache_max_bytes if target_bytes is None else target_bytes
        dead = self.drop_dead_leases()
        with self._locked(_BUDGET, what="the cache budget"):
            partials = sum(1 for key in self._partial_keys() if self._drop_partial(key) is not None)
            used = sum(e.size for e in self.entries())
            freed, removed = self._evict(used - target) if used > target else (0, [])
            kept = 0
            if used - freed > target:
                kept = sum(1 for e in self.entries() if self._live(e.sha256))
        self._forget_dangling_urls()
        return PruneReport(tuple(removed), freed, partials, dead, kept)

    def _forget_dangling_urls(self) -> None:
        try:
            names = os.listdir(self.urls)
        except FileNotFoundError:
            return
        for name in names:
            doc = read_json_object(self.urls / name)
            sha = doc.get("sha256") if doc else None
            if not isinstance(sha, str) or self.entry(sha) is None:
                unlink_quietly(self.urls / name)

    def verify(self, *, remove_bad: bool = True) -> list[VerifyResult]:
        """Re-hash every cached file; remove (by default) those whose bytes changed.

        Hashing runs without the file's lock (a blob is never rewritten, only replaced), so
        jobs acquiring it meanwhile are not held up; the lock is taken only to remove it.
        """
        results = []
        for sha in self._blob_names():
            path = self.blob_path(sha)
            try:
                before = path.stat()
                orphan = not self._meta_path(sha).exists()
                actual = None if orphan else _hash_file(path)
            except FileNotFoundError:
                continue  # evicted meanwhile
            if actual == sha:
                results.append(VerifyResult(sha, path, True, "ok"))
                continue
            detail = "no metadata" if orphan else f"content changed (sha256 now {actual})"
            if remove_bad or orphan:
                with self._locked(sha, what=f"cached file {sha}"):
                    try:
                        same = path.stat().st_ino == before.st_ino
                    except FileNotFoundError:
                        same = False
                    if same:
                        unlink_quietly(self._meta_path(sha), path)
                        detail += "; removed"
            log.warning("cached file %s: %s", sha, detail)
            results.append(VerifyResult(sha, path, False, detail))
        return results

    def drop_dead_leases(self) -> int:
        """Remove the leases whose holder process is gone (a crash); how many were removed."""
        dead = 0
        for sha in lease_files.all_lease_keys(self.leases):
            for record in lease_files.read_leases(self.leases, sha):
                if not record.alive and lease_files.remove_lease(record):
                    dead += 1
        return dead

    def release_job(self, job_id: str) -> int:
        """Release every lease held for ``job_id`` (e.g. by a reaper); the number released."""
        released = 0
        for sha in lease_files.all_lease_keys(self.leases):
            for record in lease_files.read_leases(self.leases, sha):
                if record.job_id == job_id and lease_files.remove_lease(record):
                    released += 1
        return released


def _redirect_refused(source: Source, exc: Redirected) -> ImageRefusedError:
    return ImageRefusedError(
        source.label,
        f"the server redirects to {exc.location or '(no location)'}; redirects are not "
        "followed for a job's custom image (they could leave the allowed sources): "
        "give the final URL",
    )


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


__all__ = [
    "Acquired",
    "CacheEntry",
    "CacheStatus",
    "EntryStatus",
    "ImageCache",
    "PrunePlan",
    "PruneReport",
    "Source",
    "VerifyResult",
]
