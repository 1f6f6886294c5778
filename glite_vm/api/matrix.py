"""The same job on many images: :func:`matrix`, on a pool or one image after the other on this
host, each image's files in a directory of its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, overload

from glite_vm.api.jobdir import base_directory, image_slug
from glite_vm.api.local import run_local
from glite_vm.api.pool import schedd_for, submit_one
from glite_vm.api.results import JobHandle, LocalResult
from glite_vm.api.vmjob import VmJob
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, RequestError

if TYPE_CHECKING:
    from glite_vm.images.download import Progress

#: What a local matrix gives for one image: its result, or the glite-vm error it failed with.
MatrixOutcome = LocalResult | GliteVmError


@overload
def matrix(
    images: Iterable[str],
    job: VmJob,
    *,
    local: Literal[False] = False,
    directory: str | os.PathLike[str] | None = None,
    schedd: Any = None,
) -> dict[str, JobHandle]: ...


@overload
def matrix(
    images: Iterable[str],
    job: VmJob,
    *,
    local: Literal[True],
    directory: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    download_progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, MatrixOutcome]: ...


def matrix(
    images: Iterable[str],
    job: VmJob,
    *,
    local: bool = False,
    directory: str | os.PathLike[str] | None = None,
    schedd: Any = None,
    settings: Settings | None = None,
    download_progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, JobHandle] | dict[str, MatrixOutcome]:
    """The same job on every image; results kept apart in ``<directory>/<image slug>/``.

    ``job``'s own image is replaced by each of ``images`` (every variant is validated first,
    so a bad image name fails before anything runs). The slug is the catalogue name itself, or
    a sanitised name with a hash for URLs and paths (:func:`~glite_vm.api.jobdir.image_slug`);
    those directories must not exist yet.

    Pooled (default): submits one cluster per image and returns ``{image: JobHandle}`` at once;
    pass the handles to :func:`~glite_vm.api.pool.wait`. Local (``local=True``): runs the
    images one after the other on this host with :func:`~glite_vm.api.local.run_local` over one
    libvirt connection and returns ``{image: LocalResult}``; an image that fails with a
    glite-vm error (unknown image, boot failure, ...) gets that error as its value and the
    others still run. Once ``cancel`` is set, the running image stops and the ones not started
    get a "cancelled" error.
    """
    if not isinstance(job, VmJob):
        raise RequestError("job", f"must be a VmJob, got {type(job).__name__}")
    if isinstance(images, str):
        raise RequestError("images", "must be a list of images, not one string")
    image_list = list(images)
    if not image_list:
        raise RequestError("images", "is empty")
    if len(set(image_list)) != len(image_list):
        twice = sorted({i for i in image_list if image_list.count(i) > 1})
        raise RequestError("images", f"lists {', '.join(twice)} more than once")
    variants = {image: job.with_image(image) for image in image_list}
    base = base_directory(directory, "glite-vm-matrix-")
    dirs = {image: base / image_slug(image) for image in image_list}
    for path in dirs.values():
        if os.path.lexists(path):
            raise RequestError("directory", f"{path} exists already; give a fresh directory")
    if not local:
        the_schedd = schedd_for(None, schedd)
        handles: dict[str, JobHandle] = {}
        for image, variant in variants.items():
            dirs[image].mkdir(mode=0o755)
            handles[image] = submit_one(the_schedd, variant, dirs[image], list(handles.values()))
        return handles

    from glite_vm.vm.connect import open_host  # noqa: PLC0415 - needs libvirt

    the_settings = settings if settings is not None else Settings.load()
    host = open_host(the_settings)
    outcomes: dict[str, MatrixOutcome] = {}
    try:
        for image, variant in variants.items():
            if cancel is not None and cancel.is_set():
                outcomes[image] = GliteVmError("cancelled before this image started")
                continue
            dirs[image].mkdir(mode=0o755)
            try:
                outcomes[image] = run_local(
                    variant,
                    the_settings,
                    directory=dirs[image],
                    host=host,
                    download_progress=download_progress,
                    cancel=cancel,
                )
            except GliteVmError as exc:
                outcomes[image] = exc
    finally:
        host.conn.close()
    return outcomes
