"""The API on this host: :func:`run_local` runs a :class:`~glite_vm.api.vmjob.VmJob` without
HTCondor, through the engine ``glite-vm run`` uses (:func:`glite_vm.session.run_job`).

Nothing here needs an HTCondor configuration; libvirt is imported only when a job runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glite_vm.api.jobdir import (
    RESERVED_NAMES,
    SCRIPT_NAME,
    STDERR_NAME,
    STDOUT_NAME,
    base_directory,
    outputs_in,
    path_name,
)
from glite_vm.api.results import LocalResult
from glite_vm.api.vmjob import PARAMETER_NAMES, VmJob
from glite_vm.config import Settings
from glite_vm.errors import RequestError
from glite_vm.request import KeepSnapshot, with_field_names
from glite_vm.units import parse_timeout

if TYPE_CHECKING:
    from glite_vm.images.download import Progress
    from glite_vm.vm.lifecycle import VmHost


def run_local(
    job: VmJob,
    settings: Settings | None = None,
    *,
    directory: str | os.PathLike[str] | None = None,
    host: VmHost | None = None,
    download_progress: Progress | None = None,
    cancel: threading.Event | None = None,
    timeout: float | None = None,
) -> LocalResult:
    """Run ``job`` on this host, without HTCondor, through :func:`glite_vm.session.run_job`.

    That is the engine ``glite-vm run`` uses: same image cache, same VM life cycle, same
    snapshot policy. The job's directory (``directory``, default a new temporary directory)
    receives its stdout and stderr (written as they arrive), its outputs by the same rule as on
    a pool, and the script. ``settings`` default to :meth:`Settings.load` (read once);
    ``host`` lets several runs share one libvirt connection (:func:`glite_vm.vm.connect.open_host`).
    ``timeout`` (seconds, more than zero; checked before anything boots) bounds the payload:
    one that outlives it ends in :class:`~glite_vm.errors.PayloadTimeoutError` (hold-class: the
    job's own limit). ``cancel`` stops it with :class:`~glite_vm.errors.AgentError`. Both come
    after the VM is torn down. A request the host refuses (memory above its maximum, a network
    it does not offer) raises :class:`~glite_vm.errors.RequestError` naming the parameter.

    Differences from a pool, on purpose: the image may be a local path; a declared output the
    job did not make is listed in ``missing_outputs`` (HTCondor holds such a job); the VM is
    the caller's own, so its ``hostname`` is set whatever the site's policy on job-chosen names.
    Raises the library's errors (hold-class for the job's faults, requeue-class for this
    host's); a temporary directory of its own (no ``directory`` given) goes with the error,
    since the caller never learns its path.
    """
    if not isinstance(job, VmJob):
        raise RequestError("job", f"must be a VmJob, got {type(job).__name__}")
    if directory is not None and os.path.isdir(directory) and os.listdir(directory):
        raise RequestError(
            "directory", f"{os.fspath(directory)} is not empty; give a new or empty directory"
        )
    limit = None if timeout is None else parse_timeout(timeout, "timeout")
    the_settings = settings if settings is not None else Settings.load()
    job_dir = job.write_files(base_directory(directory, "glite-vm-local-"))
    try:
        return _run_in(
            job,
            job_dir,
            the_settings=the_settings,
            host=host,
            download_progress=download_progress,
            cancel=cancel,
            limit=limit,
        )
    except BaseException:
        if directory is None:  # a directory of ours whose path the caller never learns
            shutil.rmtree(job_dir, ignore_errors=True)
        raise


def _run_in(
    job: VmJob,
    job_dir: Path,
    *,
    the_settings: Settings,
    host: VmHost | None,
    download_progress: Progress | None,
    cancel: threading.Event | None,
    limit: float | None,
) -> LocalResult:
    from glite_vm.session import JobSpec, run_job  # noqa: PLC0415 - needs libvirt
    from glite_vm.vm.connect import open_host  # noqa: PLC0415 - needs libvirt

    staging = Path(tempfile.mkdtemp(prefix=".glite-vm-in-", dir=job_dir))
    pulled = Path(tempfile.mkdtemp(prefix=".glite-vm-out-", dir=job_dir))
    own_host = host is None
    try:
        argv = _stage_inputs(job, job_dir, staging)
        spec = JobSpec(
            image=job.image,
            argv=argv,
            image_sha256=job.image_sha256,
            root=job.root,
            cpus=job.cpus,
            memory_mib=job.memory_mib,
            disk=job.disk_bytes,
            keep_snapshot=KeepSnapshot(job.keep_snapshot),
            input_dir=staging,
            output_dir=pulled,
            env=dict(job.env),
            timeout=limit,
            network=job.network,
            hostname=job.hostname,
        )
        the_host = host if host is not None else open_host(the_settings)
        try:
            with (
                (job_dir / STDOUT_NAME).open("wb") as out,
                (job_dir / STDERR_NAME).open("wb") as err,
            ):
                try:
                    done = run_job(
                        the_host,
                        spec,
                        stdout=_sink(out),
                        stderr=_sink(err),
                        progress=download_progress,
                        cancel=cancel,
                    )
                except RequestError as exc:
                    raise with_field_names(exc, PARAMETER_NAMES) from None
        finally:
            if own_host:
                the_host.conn.close()
        _adopt_outputs(job, pulled, job_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(pulled, ignore_errors=True)
    outputs, missing = outputs_in(job_dir, job.outputs)
    return LocalResult(
        image=job.image,
        directory=job_dir,
        exit_code=done.exit_code,
        signal=done.signal,
        stdout_path=job_dir / STDOUT_NAME,
        stderr_path=job_dir / STDERR_NAME,
        outputs=outputs,
        missing_outputs=missing,
        snapshot_path=done.snapshot_path,
        boot_log_path=done.boot_log_path,
        record_path=done.record_path,
        domain=done.domain,
        hypervisor=done.hypervisor,
        image_digest=done.image_digest,
        cache_hit=done.cache_hit,
        timings={k: v for k, v in done.timings.as_dict().items() if v is not None},
        boot_attempts=done.boot_attempts,
    )


def _sink(f: Any) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        f.write(data)
        f.flush()

    return write


def _stage_inputs(job: VmJob, job_dir: Path, staging: Path) -> list[str]:
    """Copy the payload and the inputs where the guest's working directory is made from.

    Returns the command line in the guest. Symlinks are copied as links (the transfer layer
    decides what a link may point at).
    """
    if job.script is not None:
        shutil.copy2(job_dir / SCRIPT_NAME, staging / SCRIPT_NAME)
        program = f"./{SCRIPT_NAME}"
    elif job.transfer_executable:
        exe = str(job.executable)
        name = path_name(exe)
        shutil.copy2(exe, staging / name)
        (staging / name).chmod((staging / name).stat().st_mode | 0o755)
        program = f"./{name}"
    else:
        program = str(job.executable)
    for item in (str(i) for i in job.inputs):
        src = Path(item)
        if item.endswith("/"):
            for child in sorted(src.iterdir()):
                _copy_entry(child, staging / child.name)
        else:
            _copy_entry(src, staging / src.name)
    return [program, *job.arguments]


def _copy_entry(src: Path, dest: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dest, symlinks=True)
    else:
        shutil.copy2(src, dest, follow_symlinks=False)


def _adopt_outputs(job: VmJob, pulled: Path, job_dir: Path) -> None:
    """Move what came back into the job's directory by HTCondor's rule (see :class:`VmJob`)."""
    if job.outputs:
        wanted = list(job.outputs)
    else:
        wanted = [
            p.name
            for p in sorted(pulled.iterdir())
            if p.is_file() and not p.is_symlink() and p.name not in RESERVED_NAMES
        ]
    for rel in wanted:
        src, dest = pulled / rel, job_dir / rel
        if not os.path.lexists(src):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(src, dest)
