"""The local image cache: content-addressed, locked per file, leased, bounded, crash-safe.

:class:`ImageCache` is the one object the rest of glite-vm uses. Its parts, each with the
invariants it keeps next to the code that keeps them:

- :mod:`glite_vm.images.cache_store`: the layout under ``GLITE_VM_CACHE_DIR``, the per-file
  locks, reading entries (a reader never takes a partial or vanishing file for a cached one);
- :mod:`glite_vm.images.cache_fill`: download, verify, inspect, install, lease (a blob appears
  only by ``rename`` of a complete, fsynced, hashed, inspected part after its metadata; a lease
  is written only under its blob's lock; a custom image is readable by no other local user
  until a catalogue entry with the same digest makes it public);
- :mod:`glite_vm.images.cache_budget`: reservations and eviction by size (under the budget
  lock; other files' locks taken without waiting, so no deadlock with downloads; a leased file
  is never evicted, and a blob is removed only under its lock);
- :mod:`glite_vm.images.leases`: one file per lease, dead leases recognised by pid and start
  time;
- :mod:`glite_vm.images.templates`: warm-start templates (a frozen disk layer and a saved
  memory state per key), complete or invisible, counted in the budget, evicted LRU.

Here: the facade, and the administration of the whole cache (status, prune, verify, releasing
leases). Verification removes a changed blob only under its lock, and only if it is still the
file that was hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import requests

from glite_vm.config import Settings
from glite_vm.images import leases as lease_files
from glite_vm.images._fsutil import unlink_quietly
from glite_vm.images._transport import CHUNK
from glite_vm.images.cache_budget import (
    PrunePlan,
    free_bytes,
    part_size,
    partial_keys,
    plan_prune,
    shrink,
)
from glite_vm.images.cache_fill import Acquired, CacheFill, forget_dangling_urls
from glite_vm.images.cache_observer import CacheObserver
from glite_vm.images.cache_store import CacheEntry, CacheStore, Source
from glite_vm.images.download import Progress
from glite_vm.images.leases import LeaseRecord

log = logging.getLogger(__name__)


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
class CachePruneReport:
    """What one pass of :meth:`ImageCache.prune` removed (images by size; the snapshot store's
    retention report is another thing: :class:`glite_vm.snapshots.store.SnapshotPruneReport`)."""

    removed: tuple[CacheEntry, ...]
    freed_bytes: int
    partials_removed: int
    dead_leases_removed: int
    kept_in_use: int  # entries that would have gone but are leased


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    sha256: str
    path: Path
    ok: bool
    detail: str


class ImageCache(CacheStore):
    """The cache at ``settings.effective_cache_dir``. Cheap to construct; safe across processes."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: requests.Session | None = None,
        observer: CacheObserver | None = None,
    ) -> None:
        super().__init__(settings, observer)
        self._session = session

    @property
    def session(self) -> requests.Session:
        if self._session is None:
            self._session = requests.Session()
        return self._session

    def acquire(
        self,
        source: Source,
        *,
        job_id: str,
        owner_pid: int | None = None,
        progress: Progress | None = None,
    ) -> Acquired:
        """Make ``source`` present and verified; return it with a lease for ``job_id``."""
        fill = CacheFill(self, lambda: self.session)
        return fill.acquire(source, job_id=job_id, owner_pid=owner_pid, progress=progress)

    # --- administration ----------------------------------------------------------------------

    def status(self) -> CacheStatus:
        entries = []
        dead = 0
        for e in self.entries():
            records = lease_files.read_leases(self.leases, e.sha256)
            live = tuple(r for r in records if r.alive)
            dead += len(records) - len(live)
            entries.append(EntryStatus(e, live))
        partial = sum(part_size(self, k) for k in partial_keys(self))
        try:
            free = free_bytes(self)
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
        return plan_prune(self, target)

    def prune(self, target_bytes: int | None = None) -> CachePruneReport:
        """Drop dead leases and interrupted downloads, then evict least recently used unleased
        files until the cache holds at most ``target_bytes`` (default: the budget)."""
        self.make_dirs()
        target = self.settings.cache_max_bytes if target_bytes is None else target_bytes
        dead = self.drop_dead_leases()
        done = shrink(self, target)
        forget_dangling_urls(self)
        return CachePruneReport(
            done.removed, done.freed_bytes, done.partials_removed, dead, done.kept_in_use
        )

    def verify(self, *, remove_bad: bool = True) -> list[VerifyResult]:
        """Re-hash every cached file; remove (by default) those whose bytes changed.

        Hashing runs without the file's lock (a blob is never rewritten, only replaced), so
        jobs acquiring it meanwhile are not held up; the lock is taken only to remove it.
        """
        results = []
        for sha in self.blob_names():
            path = self.blob_path(sha)
            try:
                before = path.stat()
                orphan = not self.meta_path(sha).exists()
                actual = None if orphan else _hash_file(path)
            except FileNotFoundError:
                continue  # evicted meanwhile
            if actual == sha:
                results.append(VerifyResult(sha, path, True, "ok"))
                continue
            detail = "no metadata" if orphan else f"content changed (sha256 now {actual})"
            if remove_bad or orphan:
                with self.locked(sha, what=f"cached file {sha}"):
                    try:
                        same = path.stat().st_ino == before.st_ino
                    except FileNotFoundError:
                        same = False
                    if same:
                        unlink_quietly(self.meta_path(sha), path)
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


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()
