"""Who hears what the image cache does: bytes received, each download's end, each eviction.

The cache reports to a :class:`CacheObserver` given to :class:`~glite_vm.images.cache.ImageCache`
(or :func:`~glite_vm.images.acquire.acquire_image`); the service counts these for its metrics
(:mod:`glite_vm.service.metrics`). Everyone else passes nothing and :data:`QUIET` hears it.
An observer must not raise and must not block: it is called with the cache's locks held.
"""

from __future__ import annotations

from typing import Protocol


class CacheObserver(Protocol):
    def received(self, transferred: int) -> None:
        """A download finished receiving: ``transferred`` bytes came over the wire for it
        (bytes kept from an interrupted download are not counted again)."""

    def download_ended(self, error: BaseException | None) -> None:
        """A file was fetched into the cache (``None``: downloaded, verified and installed), or
        fetching it failed with ``error``."""

    def evicted(self, size: int) -> None:
        """A cached file of ``size`` bytes was removed to make room."""


class _Quiet:
    def received(self, transferred: int) -> None:
        pass

    def download_ended(self, error: BaseException | None) -> None:
        pass

    def evicted(self, size: int) -> None:
        pass


#: The observer of a cache nobody watches.
QUIET: CacheObserver = _Quiet()

__all__ = ["QUIET", "CacheObserver"]
