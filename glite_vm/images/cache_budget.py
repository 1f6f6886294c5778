"""Room in the image cache: reservations by running downloads, and eviction by size.

A download reserves its total size (``partial/<key>.reserve``, with its pid) before it writes;
the cache counts verified files, interrupted downloads and live reservations against
``GLITE_VM_CACHE_MAX_BYTES``, and keeps ``GLITE_VM_CACHE_MIN_FREE_BYTES`` free on the disk.
When room is short, interrupted downloads go first, then the least recently used files and
warm-start templates (:mod:`glite_vm.images.templates`; never leased: a template goes whenever
its lock is free).

Invariants kept here. Reservations and eviction run under ``locks/budget.lock``. Eviction takes
other files' locks without waiting, so it cannot deadlock with downloads (which hold their
file's lock and then wait for the budget); it skips files with live leases, and removes a blob
only under that blob's lock after looking at its leases again, so it can never remove a file
between a reader's check and its lease (leases are written under the same lock,
:mod:`glite_vm.images.cache_fill`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path

from glite_vm.errors import CacheFullError
from glite_vm.images import leases as lease_files
from glite_vm.images._fsutil import (
    atomic_write_json,
    is_disk_full,
    read_json_object,
    unlink_quietly,
)
from glite_vm.images.cache_store import CacheEntry, CacheStore
from glite_vm.images.download import discard_part
from glite_vm.images.templates import TemplateStore
from glite_vm.units import format_size

log = logging.getLogger(__name__)

BUDGET_LOCK = "budget"  # the lock key of the budget (a digest or url- key never spells it)


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
class Shrunk:
    """What :func:`shrink` removed."""

    partials_removed: int
    freed_bytes: int
    removed: tuple[CacheEntry, ...]
    kept_in_use: int  # entries that would have gone but are leased


@dataclasses.dataclass(frozen=True)
class _Usage:
    used: int  # bytes counted against the budget
    pending: int  # bytes other running downloads will still write


def reserve(store: CacheStore, key: str, total: int, part: Path, label: str) -> None:
    """Reserve room for ``total`` bytes of ``key``, evicting unused files when needed."""
    settings = store.settings
    budget = settings.cache_max_bytes
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
    with store.locked(BUDGET_LOCK, what="the cache budget"):
        for first_pass in (True, False):
            usage = _usage(store, exclude=key)
            over = usage.used + total - budget
            room = free_bytes(store) - usage.pending - settings.cache_min_free_bytes
            short = need - room
            if over <= 0 and short <= 0:
                _write_reservation(store, key, total)
                return
            if first_pass:
                evict(store, max(over, short), exclude=key)
        in_use = sum(1 for e in store.entries() if is_leased(store, e.sha256))
    if over > 0:
        raise CacheFullError(
            f"no room for {label} ({format_size(total)}) in the cache budget "
            f"{format_size(budget)}: {format_size(usage.used)} are in use by "
            f"{in_use} leased image(s) or running downloads"
        )
    raise CacheFullError(
        f"not enough free disk space for {label}: {format_size(need)} needed, "
        f"{format_size(max(0, room))} available beyond the "
        f"{format_size(settings.cache_min_free_bytes)} kept free "
        "(GLITE_VM_CACHE_MIN_FREE_BYTES)"
    )


def release_reservation(store: CacheStore, key: str) -> None:
    unlink_quietly(store.reservation_path(key))


def free_bytes(store: CacheStore) -> int:
    return shutil.disk_usage(store.root).free


def _write_reservation(store: CacheStore, key: str, total: int) -> None:
    pid = os.getpid()
    doc = {"total": total, "pid": pid, "pid_start": lease_files.process_start_time(pid)}
    try:
        atomic_write_json(store.reservation_path(key), doc, durable=False)
    except OSError as exc:
        if is_disk_full(exc):
            raise CacheFullError("the disk under the image cache is full") from exc
        raise


def _live_reservation(store: CacheStore, key: str) -> int | None:
    doc = read_json_object(store.reservation_path(key))
    if doc is None:
        return None
    try:
        total, pid = int(doc["total"]), int(doc["pid"])
        start = doc.get("pid_start")
        alive = lease_files.process_alive(pid, int(start) if start is not None else None)
    except (KeyError, TypeError, ValueError):
        return None
    return total if alive else None


def partial_keys(store: CacheStore) -> list[str]:
    """The keys of every download in ``partial/``, running or interrupted."""
    keys = set()
    try:
        names = os.listdir(store.partial)
    except FileNotFoundError:
        return []
    for name in names:
        for suffix in (".part", ".reserve"):
            if name.endswith(suffix) and not name.startswith("."):
                keys.add(name[: -len(suffix)])
    return sorted(keys)


def part_size(store: CacheStore, key: str) -> int:
    try:
        return store.part_path(key).stat().st_size
    except FileNotFoundError:
        return 0


def budgeted(store: CacheStore) -> list[CacheEntry]:
    """Everything the budget counts and eviction may take: images and warm-start templates."""
    return [*store.entries(), *TemplateStore(store).entries()]


def _usage(store: CacheStore, exclude: str | None = None) -> _Usage:
    used = sum(e.size for e in budgeted(store))
    pending = 0
    for key in partial_keys(store):
        if key == exclude:
            continue
        size = part_size(store, key)
        reserved = _live_reservation(store, key)
        if reserved is None:
            used += size
        else:
            used += max(size, reserved)
            pending += max(0, reserved - size)
    return _Usage(used, pending)


def is_leased(store: CacheStore, sha256: str) -> bool:
    return bool(lease_files.live_leases(store.leases, sha256, reap=False))


def evict(
    store: CacheStore, amount: int, *, exclude: str | None = None
) -> tuple[int, list[CacheEntry]]:
    """Free at least ``amount`` bytes if possible: interrupted downloads first, then the
    least recently used files without live leases. Budget lock held."""
    freed = 0
    removed: list[CacheEntry] = []
    stale = [k for k in partial_keys(store) if k != exclude and _live_reservation(store, k) is None]
    stale.sort(key=lambda k: _mtime(store.part_path(k)))
    for key in stale:
        if freed >= amount:
            return freed, removed
        freed += _drop_partial(store, key) or 0
    for entry in sorted(budgeted(store), key=lambda e: e.last_used):
        if freed >= amount:
            break
        if entry.sha256 == exclude:
            continue
        gone = _drop_entry(store, entry)
        if gone is not None:
            freed += gone.size
            removed.append(gone)
            store.observer.evicted(gone.size)
    return freed, removed


def _drop_partial(store: CacheStore, key: str) -> int | None:
    """Remove an interrupted download; its size, or None when it is in use."""
    lock = store.try_lock(key)
    if lock is None:
        return None  # being downloaded right now
    try:
        if _live_reservation(store, key) is not None:
            return None
        size = part_size(store, key)
        discard_part(store.part_path(key))
        unlink_quietly(store.reservation_path(key))
        log.info("removed interrupted download %s (%s)", key, format_size(size))
        return size
    finally:
        lock.release()


def _drop_entry(store: CacheStore, entry: CacheEntry) -> CacheEntry | None:
    """Remove an entry unless it is leased or locked by someone; the removed entry or None."""
    if entry.kind == "template":  # never leased: a restored VM holds links of its own
        return entry if TemplateStore(store).remove(entry.sha256, "evicted") else None
    lock = store.try_lock(entry.sha256)
    if lock is None:
        return None
    try:
        current = store.entry(entry.sha256)
        if current is None:
            return None
        if lease_files.live_leases(store.leases, entry.sha256):
            return None
        unlink_quietly(store.meta_path(entry.sha256), store.blob_path(entry.sha256))
        with contextlib.suppress(OSError):
            shutil.rmtree(store.leases / entry.sha256)
        log.info(
            "evicted %s (%s)",
            ", ".join(current.sources) or current.sha256,
            format_size(current.size),
        )
        return current
    finally:
        lock.release()


def plan_prune(store: CacheStore, target: int) -> PrunePlan:
    """What :func:`shrink` to ``target`` (after dropping dead leases) would remove now."""
    stale = [k for k in partial_keys(store) if _live_reservation(store, k) is None]
    dead = sum(
        1
        for sha in lease_files.all_lease_keys(store.leases)
        for record in lease_files.read_leases(store.leases, sha)
        if not record.alive
    )
    entries = sorted(budgeted(store), key=lambda e: e.last_used)
    used = sum(e.size for e in entries)
    evicted: list[CacheEntry] = []
    left = used
    for entry in entries:
        if left <= target:
            break
        if is_leased(store, entry.sha256):
            continue
        evicted.append(entry)
        left -= entry.size
    return PrunePlan(
        target_bytes=target,
        used_bytes=used,
        evict=tuple(evicted),
        partial_downloads=len(stale),
        partial_bytes=sum(part_size(store, k) for k in stale),
        dead_leases=dead,
        in_use_above_target=left > target,
    )


def shrink(store: CacheStore, target: int) -> Shrunk:
    """Drop interrupted downloads, then evict least recently used unleased files until the
    cache holds at most ``target`` bytes."""
    with store.locked(BUDGET_LOCK, what="the cache budget"):
        partials = sum(1 for key in partial_keys(store) if _drop_partial(store, key) is not None)
        used = sum(e.size for e in budgeted(store))
        freed, removed = evict(store, used - target) if used > target else (0, [])
        kept = 0
        if used - freed > target:
            kept = sum(1 for e in store.entries() if is_leased(store, e.sha256))
    return Shrunk(partials, freed, tuple(removed), kept)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
