"""`acquire_image`: from what a job (or the CLI) names to a verified, leased file in the cache."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import requests

from glite_vm.config import Settings
from glite_vm.errors import ChecksumMismatchError, RequestError, UnknownImageError
from glite_vm.images import leases as lease_files
from glite_vm.images._open_as import Reader
from glite_vm.images._transport import FileAccess
from glite_vm.images.cache import ImageCache
from glite_vm.images.cache_fill import Acquired
from glite_vm.images.cache_observer import CacheObserver
from glite_vm.images.cache_store import Source
from glite_vm.images.catalogue import CatalogueEntry, FileRef, load_catalogue
from glite_vm.images.download import Progress
from glite_vm.images.leases import LeaseRecord
from glite_vm.images.sources import check_sha256, classify_ref, file_prefixes
from glite_vm.images.usage import record_use

log = logging.getLogger(__name__)

MAX_JOB_ID = 256


@dataclasses.dataclass(frozen=True)
class ResolvedImage:
    """A verified image in the cache, ready to be the read-only base of an overlay."""

    name: str  # catalogue name, or the URL / absolute path of a custom image
    path: Path  # verified base image file inside the cache; never written by anyone
    format: str  # "qcow2" or "raw", pinned by inspection; boot with exactly this
    sha256: str
    virtual_size: int
    cache_hit: bool  # True when everything was complete in the cache when the call started
    fetch_seconds: float  # wall time of acquire_image, waiting for other downloads included
    kernel: Path | None = None  # direct-kernel-boot catalogue entries
    initrd: Path | None = None
    cmdline: str | None = None
    guest_user: str | None = None


class ImageLease:
    """The right to use an image's cached files until :meth:`release`.

    While any lease on a file exists and its holder process lives, eviction leaves the file
    alone. ``release()`` may be called any number of times, from any thread.
    """

    def __init__(self, image: ResolvedImage, records: Sequence[LeaseRecord]) -> None:
        self._image = image
        self._records = list(records)
        self._released = False
        self._guard = threading.Lock()

    @property
    def image(self) -> ResolvedImage:
        return self._image

    @property
    def lease_ids(self) -> tuple[str, ...]:
        return tuple(r.lease_id for r in self._records)

    @property
    def released(self) -> bool:
        return self._released

    def rebind(self, pid: int) -> None:
        """Make process ``pid`` (e.g. the VM's QEMU) the holder, so the lease lives exactly as
        long as that process even if the caller restarts."""
        with self._guard:
            if self._released:
                return
            self._records = [lease_files.rebind_lease(r, pid) for r in self._records]

    def release(self) -> None:
        with self._guard:
            if self._released:
                return
            self._released = True
            for record in self._records:
                lease_files.remove_lease(record)

    def __enter__(self) -> ImageLease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else "held"
        return f"<ImageLease {self._image.name} {self._image.sha256[:12]} {state}>"


def acquire_image(
    settings: Settings,
    ref: str,
    *,
    sha256: str | None = None,
    job_id: str,
    progress: Progress | None = None,
    allow_local: bool = False,
    owner_pid: int | None = None,
    session: requests.Session | None = None,
    reader: Reader | None = None,
    observer: CacheObserver | None = None,
    count_use: bool = True,
) -> ImageLease:
    """Resolve ``ref`` to a verified, leased image in the local cache, fetching it if needed.

    ``ref``: a catalogue name, an http(s) URL under ``settings.custom_image_sources``, or (only
    with ``allow_local=True``, meaning the caller is the person at the keyboard rather than a
    job's ad) an absolute path, a ``file://`` URL or any http(s) URL. ``sha256`` pins the
    content (for a catalogue name it must equal the catalogue's digest). ``progress(done,
    total)`` is called while bytes arrive. ``owner_pid`` is the process whose life bounds the
    lease (default: this one). ``reader``: whose rights open a ``file://`` image (the service's
    caller: uid, gid, groups; default this process's): a job gets no file its owner could not
    read, and only a file that, opened, really lies under an allowed ``file://`` prefix.
    ``observer`` hears of the downloads and evictions this makes
    (:mod:`glite_vm.images.cache_observer`). A catalogue image's use is counted
    (:mod:`glite_vm.images.usage`, what pre-staging's ``top:N`` reads) unless ``count_use`` is
    false (pre-staging itself).

    Raises hold-class errors (RequestError, UnknownImageError, ChecksumMismatchError,
    ImageRefusedError, ImageNotFoundError) when the request must change, requeue-class errors
    (DownloadError, CacheFullError, LockTimeoutError, CatalogueError, HypervisorError) when
    this host failed.
    """
    started = time.monotonic()
    if not isinstance(job_id, str) or not job_id.strip() or len(job_id) > MAX_JOB_ID:
        raise RequestError("job_id", f"must be a non-empty string of at most {MAX_JOB_ID} chars")
    digest = check_sha256(sha256)
    parsed = classify_ref(ref, sources=settings.custom_image_sources, allow_local=allow_local)
    own_session = session is None
    session = session or requests.Session()
    try:
        entry: CatalogueEntry | None = None
        if parsed.kind == "name":
            entry = _catalogue_entry(settings, parsed.value, session)
            if digest is not None and digest != entry.sha256:
                raise ChecksumMismatchError(entry.name, digest, entry.sha256)
            sources = _catalogue_sources(entry)
        else:
            custom = Source(
                url=parsed.value,
                label=parsed.label,
                sha256=digest,
                custom=True,
                follow_redirects=allow_local,
                file_access=FileAccess(
                    within=None if allow_local else file_prefixes(settings.custom_image_sources),
                    reader=reader,
                ),
            )
            sources = [custom]
        cache = ImageCache(settings, session=session, observer=observer)
        acquired: list[Acquired] = []
        try:
            for source in sources:
                acquired.append(
                    cache.acquire(source, job_id=job_id, owner_pid=owner_pid, progress=progress)
                )
        except BaseException:
            for done in acquired:
                lease_files.remove_lease(done.lease)
            raise
    finally:
        if own_session:
            session.close()
    if entry is not None and count_use:
        record_use(cache, entry.name)
    disk = acquired[0].entry
    image = ResolvedImage(
        name=parsed.label,
        path=disk.path,
        format=disk.format or "raw",
        sha256=disk.sha256,
        virtual_size=disk.virtual_size if disk.virtual_size is not None else disk.size,
        cache_hit=all(a.hit for a in acquired),
        fetch_seconds=time.monotonic() - started,
        kernel=acquired[1].entry.path if len(acquired) > 1 else None,
        initrd=acquired[2].entry.path if len(acquired) > 2 else None,
        cmdline=entry.cmdline if entry is not None else None,
        guest_user=entry.guest_user if entry is not None else None,
    )
    log.debug("acquired %s (%s) in %.3fs", image.name, image.sha256, image.fetch_seconds)
    return ImageLease(image, [a.lease for a in acquired])


def _catalogue_entry(settings: Settings, name: str, session: requests.Session) -> CatalogueEntry:
    catalogue = load_catalogue(settings, session=session)
    try:
        return catalogue.get(name)
    except UnknownImageError:
        if catalogue.stale or catalogue.age() < 1.0:
            raise
    # The local copy may predate the image: ask the repository before holding the job.
    return load_catalogue(settings, session=session, max_age=0).get(name)


def _catalogue_sources(entry: CatalogueEntry) -> list[Source]:
    sources = [
        Source(
            url=entry.url,
            label=entry.name,
            sha256=entry.sha256,
            size=entry.size,
            kind="disk",
            declared_format=entry.format,
        )
    ]
    if entry.boot == "kernel" and entry.kernel is not None:
        sources.append(_file_source(entry.kernel, f"{entry.name} kernel"))
        if entry.initrd is not None:
            sources.append(_file_source(entry.initrd, f"{entry.name} initrd"))
    return sources


def _file_source(ref: FileRef, label: str) -> Source:
    return Source(url=ref.url, label=label, sha256=ref.sha256, size=ref.size, kind="file")


def release_job_leases(settings: Settings, job_id: str) -> int:
    """Release every cache lease held for ``job_id`` (for a reaper or a JOB_EXIT hook in a
    process other than the one that acquired); returns how many were released."""
    return ImageCache(settings).release_job(job_id)
