"""How often this host's jobs used each catalogue image: what ``GLITE_VM_PREFETCH = top:N``
pre-stages. Kept in ``<cache>/usage.json`` (name -> uses), beside the cache rather than in a
blob's metadata, so that an image keeps its count after eviction and is fetched back.

Invariants: the file is rewritten whole under ``locks/usage.lock`` (atomically, so a reader
never sees half of it); it holds at most :data:`MAX_NAMES` names (the least used go); a
damaged file counts as empty and is replaced by the next use. Custom images (URLs) are never
counted: they are their owners', not the site's warm set.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Final

import filelock

from glite_vm.images._fsutil import atomic_write_json, read_json_object
from glite_vm.images.cache_store import CacheStore

log = logging.getLogger(__name__)

MAX_NAMES: Final = 1000
USAGE_FILE: Final = "usage.json"
_LOCK_WAIT: Final = 5.0  # seconds; a count is not worth holding a job up for


def record_use(store: CacheStore, name: str) -> None:
    """Count one use of catalogue image ``name``; never raises (a lost count costs nothing)."""
    try:
        with filelock.FileLock(store.locks / "usage.lock", timeout=_LOCK_WAIT):
            counts = read_counts(store)
            counts[name] = counts.get(name, 0) + 1
            if len(counts) > MAX_NAMES:
                keep = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_NAMES]
                counts = dict(keep)
            atomic_write_json(store.root / USAGE_FILE, counts, durable=False)
    except (OSError, filelock.Timeout) as exc:
        log.warning("cannot count a use of %s: %s", name, exc)


def read_counts(store: CacheStore) -> dict[str, int]:
    data = read_json_object(store.root / USAGE_FILE) or {}
    return {str(k): v for k, v in data.items() if isinstance(v, int) and not isinstance(v, bool)}


def most_used(store: CacheStore, n: int) -> list[str]:
    """The ``n`` most used names, most used first (ties by name)."""
    with contextlib.suppress(OSError):
        counts = read_counts(store)
        return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
    return []
