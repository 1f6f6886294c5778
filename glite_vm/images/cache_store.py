"""The image cache on disk: its layout, its per-file locks, and reading what it holds.

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

Invariants kept here: an entry is reported only when its metadata exists and the blob's size is
the one recorded, so a reader never takes a file being removed or replaced for a cached one;
``blobs/`` holds nothing but installed files (downloads live in ``partial/``, see
:mod:`glite_vm.images.cache_fill`); lock files are never deleted. Reading takes no lock: an
answer is a snapshot, and whoever acts on it takes the file's lock and looks again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import filelock

from glite_vm.config import Settings
from glite_vm.errors import CacheFullError, LockTimeoutError
from glite_vm.images._fsutil import is_disk_full, read_json_object
from glite_vm.images._transport import FileAccess
from glite_vm.images.cache_observer import QUIET, CacheObserver

_BLOB_RE = re.compile(r"^[0-9a-f]{64}$")


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


class CacheStore:
    """The directories of the cache at ``settings.effective_cache_dir``, its locks and entries.

    Cheap to construct; safe across processes. ``observer`` hears of downloads and evictions
    made through this object (:mod:`glite_vm.images.cache_observer`).
    """

    def __init__(self, settings: Settings, observer: CacheObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer if observer is not None else QUIET
        self.root = settings.effective_cache_dir
        self.blobs = self.root / "blobs"
        self.partial = self.root / "partial"
        self.leases = self.root / "leases"
        self.urls = self.root / "urls"
        self.locks = self.root / "locks"
        self._dirs_made = False

    def make_dirs(self) -> None:
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

    # --- paths -------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        return self.blobs / sha256

    def meta_path(self, sha256: str) -> Path:
        return self.blobs / f"{sha256}.json"

    def part_path(self, key: str) -> Path:
        return self.partial / f"{key}.part"

    def reservation_path(self, key: str) -> Path:
        return self.partial / f"{key}.reserve"

    # --- locks -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, key: str, *, what: str, timeout: float | None = None) -> Iterator[None]:
        """Hold ``key``'s lock, waiting up to ``settings.lock_timeout`` (LockTimeoutError)."""
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

    def try_lock(self, key: str) -> filelock.FileLock | None:
        """``key``'s lock, taken now, or None when someone holds it (never waits)."""
        lock = filelock.FileLock(self.locks / f"{key}.lock", timeout=0)
        try:
            lock.acquire()
        except filelock.Timeout:
            return None
        return lock

    # --- entries -----------------------------------------------------------------------------

    def entry(self, sha256: str) -> CacheEntry | None:
        """The verified file with this digest, or None. No lock: a snapshot answer."""
        meta = read_json_object(self.meta_path(sha256))
        if meta is None:
            return None
        try:
            st = self.blob_path(sha256).stat()
            mst = self.meta_path(sha256).stat()
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
        for sha in self.blob_names():
            e = self.entry(sha)
            if e is not None:
                out.append(e)
        return out

    def blob_names(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.blobs) if _BLOB_RE.match(n))
        except FileNotFoundError:
            return []
