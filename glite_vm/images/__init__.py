"""Images: the central catalogue, the local cache, and the safety checks on image files.

The VM layer needs one call::

    with acquire_image(settings, "debian-12", job_id=job_id) as lease:
        base = lease.image.path      # verified, read-only, format in lease.image.format

Everything else here serves the CLI (``glite-vm images|cache|catalogue``), the advertiser
(:class:`ImageCache` status) and the central repository's admin (:func:`build_catalogue`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glite_vm._lazy import lazy_exports

if TYPE_CHECKING:
    from glite_vm.images.acquire import (
        ImageLease,
        ResolvedImage,
        acquire_image,
        release_job_leases,
    )
    from glite_vm.images.build import (
        build_catalogue,
        write_catalogue,
    )
    from glite_vm.images.cache import (
        CacheEntry,
        CacheStatus,
        EntryStatus,
        ImageCache,
        PruneReport,
        Source,
        VerifyResult,
    )
    from glite_vm.images.catalogue import (
        Catalogue,
        CatalogueEntry,
        FileRef,
        catalogue_url,
        load_catalogue,
        parse_catalogue,
    )
    from glite_vm.images.inspect import (
        ImageInfo,
        Limits,
        inspect_image,
    )
    from glite_vm.images.sources import (
        ImageRef,
        classify_ref,
    )

# Imported on first use: see glite_vm._lazy.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "glite_vm.images.acquire": (
        "ImageLease",
        "ResolvedImage",
        "acquire_image",
        "release_job_leases",
    ),
    "glite_vm.images.build": ("build_catalogue", "write_catalogue"),
    "glite_vm.images.cache": (
        "CacheEntry",
        "CacheStatus",
        "EntryStatus",
        "ImageCache",
        "PruneReport",
        "Source",
        "VerifyResult",
    ),
    "glite_vm.images.catalogue": (
        "Catalogue",
        "CatalogueEntry",
        "FileRef",
        "catalogue_url",
        "load_catalogue",
        "parse_catalogue",
    ),
    "glite_vm.images.inspect": ("ImageInfo", "Limits", "inspect_image"),
    "glite_vm.images.sources": ("ImageRef", "classify_ref"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "CacheEntry",
    "CacheStatus",
    "Catalogue",
    "CatalogueEntry",
    "EntryStatus",
    "FileRef",
    "ImageCache",
    "ImageInfo",
    "ImageLease",
    "ImageRef",
    "Limits",
    "PruneReport",
    "ResolvedImage",
    "Source",
    "VerifyResult",
    "acquire_image",
    "build_catalogue",
    "catalogue_url",
    "classify_ref",
    "inspect_image",
    "load_catalogue",
    "parse_catalogue",
    "release_job_leases",
    "write_catalogue",
]
