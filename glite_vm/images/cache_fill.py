"""Filling the image cache: download a source into ``partial/``, verify it, install it, lease it.

A source with a digest is fetched under that digest's lock; a custom URL without one is fetched
under its URL key's lock, revalidated (ETag, Last-Modified) against what it gave last time
(``urls/<key>.json``), and installed under the digest it turned out to have.

Invariants kept here. A blob appears only by ``rename`` of a complete, fsynced, hashed (and for
disk images inspected) part, after its metadata, so a reader never sees a partial or unverified
file. A lease is written only under that blob's lock (eviction removes a blob only under the
same lock, :mod:`glite_vm.images.cache_budget`), so no file goes between a reader's check and
its lease. A file someone named as a custom image is installed readable by no other local user
(owner and group only; the VM layer gives the group to QEMU's user,
:mod:`glite_vm.vm.qemu_user`) until a catalogue entry with the same digest makes it public.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import requests

from glite_vm.errors import (
    CacheFullError,
    ChecksumMismatchError,
    DownloadError,
    ImageNotFoundError,
    ImageRefusedError,
)
from glite_vm.images import leases as lease_files
from glite_vm.images._fsutil import (
    atomic_write_json,
    fsync_dir,
    is_disk_full,
    read_json_object,
    unlink_quietly,
)
from glite_vm.images._transport import NotFound, Redirected, Refused, Stream, Validators, open_url
from glite_vm.images.cache_budget import release_reservation, reserve
from glite_vm.images.cache_observer import CacheObserver
from glite_vm.images.cache_store import CacheEntry, CacheStore, Source
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
from glite_vm.units import format_size

log = logging.getLogger(__name__)

PUBLIC_MODE = 0o444  # a catalogue's file: everyone may read what the repository publishes
PRIVATE_MODE = 0o440  # a custom image: its bytes are none of the other local users' business


@dataclasses.dataclass(frozen=True)
class Acquired:
    entry: CacheEntry
    lease: LeaseRecord
    hit: bool  # the file was complete in the cache when the call started


class CacheFill:
    """Brings sources into ``store``; ``session`` gives the HTTP session when one is needed."""

    def __init__(self, store: CacheStore, session: Callable[[], requests.Session]) -> None:
        self.store = store
        self.settings = store.settings
        self._session = session

    def acquire(
        self,
        source: Source,
        *,
        job_id: str,
        owner_pid: int | None = None,
        progress: Progress | None = None,
    ) -> Acquired:
        """Make ``source`` present and verified; return it with a lease for ``job_id``."""
        store = self.store
        store.make_dirs()
        if source.sha256 is None:
            return self._acquire_by_url(source, job_id, owner_pid, progress)
        sha = source.sha256
        present = store.entry(sha) is not None
        with store.locked(sha, what=f"the download of {source.label}"):
            entry = store.entry(sha)
            hit = present and entry is not None
            if entry is None:
                entry = self._fetch_verified(source, progress)
            lease = self._lease_locked(entry, source, job_id, owner_pid)
        return Acquired(entry, lease, hit)

    def _acquire_by_url(
        self, source: Source, job_id: str, owner_pid: int | None, progress: Progress | None
    ) -> Acquired:
        """A custom URL without a digest: revalidate what it gave last time, else fetch it."""
        store = self.store
        key = source.key
        index_path = store.urls / f"{key}.json"
        with store.locked(key, what=f"the download of {source.label}"):
            first: Stream | None = None
            index = read_json_object(index_path)
            known = index.get("sha256") if index and index.get("url") == source.url else None
            if isinstance(known, str) and store.entry(known) is not None:
                assert index is not None
                first = self._revalidate(source, index)
                if first is None:
                    with store.locked(known, what=f"the cached copy of {source.label}"):
                        entry = store.entry(known)
                        if entry is not None:
                            lease = self._lease_locked(entry, source, job_id, owner_pid)
                            return Acquired(entry, lease, hit=True)
            part = store.part_path(key)
            with _reported(store.observer):
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
                self._session(),
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
        with _reported(self.store.observer):
            return self._fetch_verified_unreported(source, progress)

    def _fetch_verified_unreported(self, source: Source, progress: Progress | None) -> CacheEntry:
        assert source.sha256 is not None
        part = self.store.part_path(source.key)
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

        def reserve_room(total: int | None) -> None:
            if total is not None and total not in reserved:
                reserve(self.store, key, total, part, source.label)
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
                reserve_room(source.size)  # before any request: a hopeless download never starts
            done = download(
                self._session(),
                fetch,
                reserve=reserve_room,
                progress=progress,
                first=first,
                resume=resume,
            )
            self.store.observer.received(done.transferred)
            return done
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
            release_reservation(self.store, key)

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
        with self.store.locked(dl.sha256, what=f"the cached copy of {source.label}"):
            entry = self._install_locked(source, part, dl, info)
            return entry, self._lease_locked(entry, source, job_id, owner_pid)

    def _install_locked(
        self, source: Source, part: Path, dl: Downloaded, info: dict[str, object]
    ) -> CacheEntry:
        store = self.store
        sha = dl.sha256
        existing = store.entry(sha)
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
            atomic_write_json(store.meta_path(sha), meta)
            os.chmod(part, PRIVATE_MODE if source.custom else PUBLIC_MODE)
            os.rename(part, store.blob_path(sha))
            fsync_dir(store.blobs)
        except OSError as exc:
            unlink_quietly(store.meta_path(sha))
            discard_part(part)
            if is_disk_full(exc):
                raise CacheFullError(
                    f"the disk under the image cache filled up installing {source.label}"
                ) from exc
            raise
        unlink_quietly(sidecar_path(part))
        entry = store.entry(sha)
        if entry is None:
            raise DownloadError(f"{source.label} vanished from the cache right after install")
        log.info("cached %s as %s (%s)", source.label, sha, format_size(dl.size))
        return entry

    def _lease_locked(
        self, entry: CacheEntry, source: Source, job_id: str, owner_pid: int | None
    ) -> LeaseRecord:
        store = self.store
        record = lease_files.write_lease(store.leases, entry.sha256, job_id, owner_pid)
        meta_path = store.meta_path(entry.sha256)
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


@contextlib.contextmanager
def _reported(observer: CacheObserver) -> Iterator[None]:
    """Tell ``observer`` how the fetch in the ``with`` block ended."""
    try:
        yield
    except BaseException as exc:
        observer.download_ended(exc)
        raise
    observer.download_ended(None)


def forget_dangling_urls(store: CacheStore) -> None:
    """Drop the remembered digests of custom URLs whose file is no longer cached."""
    try:
        names = os.listdir(store.urls)
    except FileNotFoundError:
        return
    for name in names:
        doc = read_json_object(store.urls / name)
        sha = doc.get("sha256") if doc else None
        if not isinstance(sha, str) or store.entry(sha) is None:
            unlink_quietly(store.urls / name)


def _redirect_refused(source: Source, exc: Redirected) -> ImageRefusedError:
    return ImageRefusedError(
        source.label,
        f"the server redirects to {exc.location or '(no location)'}; redirects are not "
        "followed for a job's custom image (they could leave the allowed sources): "
        "give the final URL",
    )
