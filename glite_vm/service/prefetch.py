"""Pre-staging: the service keeps the site's warm set in its image cache (``GLITE_VM_PREFETCH``,
docs/images.md), so that the first job of a pre-staged image pays no download.

What it fetches: the catalogue names the setting lists, then (``top:N``) the N images this
host's jobs used most (:mod:`glite_vm.images.usage`). When: at the service's start and every
``GLITE_VM_PREFETCH_INTERVAL``, on a thread of its own, one image at a time, each download held
to ``GLITE_VM_PREFETCH_RATE`` (:class:`~glite_vm.images.throttle.RateLimit`). Within the
budget: an image is fetched only when the cache has room for its missing files *without
evicting anything* (pre-staging never pushes out what jobs use; an image that does not fit is
skipped and logged). Jobs that need the same image meanwhile wait on the cache's per-file
lock, as for any other download, and then find it cached. A failed fetch is logged and tried
again at the next pass; nothing it leaves is held (its lease is released at once, so the
image is evicted like any other when jobs need the room).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Final

import requests

from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, UnknownImageError
from glite_vm.images.acquire import acquire_image
from glite_vm.images.cache import ImageCache
from glite_vm.images.cache_observer import CacheObserver
from glite_vm.images.catalogue import Catalogue, CatalogueEntry, FileRef, load_catalogue
from glite_vm.images.throttle import RateLimit
from glite_vm.images.usage import most_used
from glite_vm.units import format_size

log = logging.getLogger(__name__)

#: The job id of pre-staging's (momentary) cache leases.
PREFETCH_JOB_ID: Final = "glite-vm-prefetch"


@dataclasses.dataclass(frozen=True)
class Prefetched:
    """What one pass did about one image: ``fetched``, ``cached`` (nothing to do),
    ``skipped`` (not in the catalogue, or no room without eviction) or ``failed``."""

    name: str
    outcome: str
    detail: str = ""


def warm_set(settings: Settings, cache: ImageCache) -> list[str]:
    """The names to keep cached, in order: those listed, then the most used."""
    plan = settings.prefetch
    names = list(plan.names)
    if plan.top:
        names += most_used(cache, plan.top)
    return list(dict.fromkeys(names))


def _files(entry: CatalogueEntry) -> list[FileRef]:
    return [f for f in (entry.image, entry.kernel, entry.initrd) if f is not None]


def prefetch_once(
    settings: Settings,
    stop: threading.Event | None = None,
    observer: CacheObserver | None = None,
) -> list[Prefetched]:
    """One pass over the warm set; never raises for one image's trouble. ``observer`` hears of
    its downloads (the service's metrics count them with the jobs')."""
    stop = stop or threading.Event()
    cache = ImageCache(settings)
    names = warm_set(settings, cache)
    if not names:
        return []
    done: list[Prefetched] = []
    with requests.Session() as session:
        try:
            catalogue = load_catalogue(settings, session=session)
        except GliteVmError as exc:
            return [Prefetched(name, "failed", f"no catalogue: {exc}") for name in names]
        for name in names:
            if stop.is_set():
                break
            done.append(_prefetch(settings, catalogue, name, session, stop, observer))
    for result in done:
        level = logging.WARNING if result.outcome in ("failed", "skipped") else logging.INFO
        log.log(level, "pre-staging %s: %s%s", result.name, result.outcome, _sep(result.detail))
    return done


def _sep(detail: str) -> str:
    return f" ({detail})" if detail else ""


def _prefetch(  # noqa: PLR0917 - one call site, all of them needed
    settings: Settings,
    catalogue: Catalogue,
    name: str,
    session: requests.Session,
    stop: threading.Event,
    observer: CacheObserver | None,
) -> Prefetched:
    cache = ImageCache(settings)
    try:
        entry = catalogue.get(name)
    except UnknownImageError:
        return Prefetched(name, "skipped", "the catalogue does not list it")
    missing = [f for f in _files(entry) if cache.entry(f.sha256) is None]
    if not missing:
        return Prefetched(name, "cached")
    need = sum(f.size or 0 for f in missing)
    status = cache.status()
    room = min(
        status.budget - status.used_bytes - status.partial_bytes,
        status.free_bytes - settings.cache_min_free_bytes,
    )
    if need > room:
        return Prefetched(
            name,
            "skipped",
            f"needs {format_size(need)}, the cache has {format_size(max(room, 0))} free "
            "without evicting (GLITE_VM_CACHE_MAX_BYTES)",
        )
    rate = settings.prefetch_rate
    limit = RateLimit(rate, stop=stop) if rate is not None else None
    try:
        lease = acquire_image(
            settings,
            name,
            job_id=PREFETCH_JOB_ID,
            progress=limit,
            session=session,
            observer=observer,
            count_use=False,
        )
    except GliteVmError as exc:
        return Prefetched(name, "failed", str(exc))
    lease.release()
    if limit is None:
        return Prefetched(name, "fetched", f"{format_size(need)}, rate unlimited")
    return Prefetched(
        name,
        "fetched",
        f"{format_size(limit.received)} at most {_rate(rate)}, held back {limit.held_back:.1f} s",
    )


def _rate(rate: int | None) -> str:
    return "unlimited" if rate is None else f"{format_size(rate)}/s"


class Prefetcher:
    """The service's pre-staging thread: a pass at start, then every interval, until stopped."""

    def __init__(self, settings: Settings, observer: CacheObserver | None = None) -> None:
        self.settings = settings
        self.observer = observer
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def start(self) -> None:
        if self.settings.prefetch:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                prefetch_once(self.settings, self._stop, self.observer)
            except Exception:  # a pass must never end the thread (or the service)
                log.exception("pre-staging pass failed")
            self._stop.wait(self.settings.prefetch_interval)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
