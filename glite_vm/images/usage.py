"""How often this host's jobs used each catalogue image: what ``GLITE_VM_PREFETCH = top:N``
pre-stages. Kept in ``<cache>/usage.json`` (name -> uses), beside the cache rather than in a
blob's metadata, so that an image keeps its count after eviction and is fetched back.

Invariants: the file is rewritten whole under ``locks/usage.lock`` (atomically, so a reader
never sees half of it); it holds at most :data:`MAX_NAMES` names (the least used go); a
damaged file counts as empty and is replaced by the next use. Custom images (URLs) are never
counted: they are their owners', not the site's warm set.

What is read is bounded and checked, whoever wrote the file: at most :data:`MAX_FILE_BYTES`
(a larger file counts as empty), nesting of any depth is a damaged file, and only a name a
catalogue could list (:data:`~glite_vm.images.sources.NAME_RE`) with a count of 0 to
:data:`MAX_COUNT` is taken; anything else is dropped at the next rewrite. So a count never
makes pre-staging ask for anything but a catalogue name, never puts a path, URL or control
character into a log line, and never fails a job's acquire.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Final

import filelock

from glite_vm.images._fsutil import atomic_write_json
from glite_vm.images.cache_store import CacheStore
from glite_vm.images.sources import NAME_RE

log = logging.getLogger(__name__)

MAX_NAMES: Final = 1000
#: A file of MAX_NAMES names of the longest kind, indented, is about 140 KiB.
MAX_FILE_BYTES: Final = 1 << 20
MAX_COUNT: Final = 1 << 53  # beyond a double's integers: a count no host reaches
USAGE_FILE: Final = "usage.json"
_LOCK_WAIT: Final = 5.0  # seconds; a count is not worth holding a job up for


def record_use(store: CacheStore, name: str) -> None:
    """Count one use of catalogue image ``name``; never raises (a lost count costs nothing)."""
    try:
        with filelock.FileLock(store.locks / "usage.lock", timeout=_LOCK_WAIT):
            # every writer holds this lock: a temporary file here is one whose writer died
            for stale in store.root.glob(f".{USAGE_FILE}.*.tmp"):
                stale.unlink(missing_ok=True)
            counts = read_counts(store)
            counts[name] = counts.get(name, 0) + 1
            if len(counts) > MAX_NAMES:
                keep = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_NAMES]
                counts = dict(keep)
            atomic_write_json(store.root / USAGE_FILE, counts, durable=False)
    except (OSError, filelock.Timeout) as exc:
        log.warning("cannot count a use of %s: %s", name, exc)


def read_counts(store: CacheStore) -> dict[str, int]:
    """The counts in the usage file, bounded and checked (see the module docstring)."""
    data = _read_object(store)
    return {
        k: v
        for k, v in data.items()
        if NAME_RE.fullmatch(k) and type(v) is int and 0 <= v <= MAX_COUNT
    }


def _read_object(store: CacheStore) -> dict[str, Any]:
    try:
        fd = os.open(store.root / USAGE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        with os.fdopen(fd, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError:
        return {}
    if len(raw) > MAX_FILE_BYTES:
        log.warning("%s is larger than %d bytes: counted as empty", USAGE_FILE, MAX_FILE_BYTES)
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        return {}
    return data if isinstance(data, dict) else {}


def most_used(store: CacheStore, n: int) -> list[str]:
    """The ``n`` most used names, most used first (ties by name)."""
    with contextlib.suppress(OSError):
        counts = read_counts(store)
        return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]
    return []
