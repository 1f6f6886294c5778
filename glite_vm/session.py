"""One job in one VM, start to finish, on this host: the path `glite-vm run` and the API share.

``run_job`` checks everything it can before a VM exists (the request, the time limit, the
input directory, that the output directory can be written), resolves the image through the
cache, boots a VM (again, up to ``GLITE_VM_BOOT_ATTEMPTS`` times, when a boot fails in a way
that need not recur; a boot that fails leaves its boot log and no disk), copies the input
directory in, runs the command with its output streamed, copies new and changed files out, and
tears the VM down whatever happens (an exception, Ctrl-C, a cancel event), keeping the snapshot
by policy. A :class:`RunReport` passed in is filled as the run goes, so a caller can still name
the VM, its boot log, the payload's status and the snapshot when a later step fails.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import libvirt

from glite_vm.config import Settings, parse_timeout
from glite_vm.errors import HypervisorError, RequestError
from glite_vm.request import KeepSnapshot, VMRequest
from glite_vm.vm import libvirt_events
from glite_vm.vm.boot_attempts import boot_with_retries
from glite_vm.vm.hypervisor import HYPERVISOR_CACHE, HypervisorInfo, detect_cached
from glite_vm.vm.lifecycle import ExecResult, OutputSink, TeardownResult, Timings, Vm, VmHost

Progress = Callable[[int, int | None], None]


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A command to run in a fresh VM of ``image``."""

    image: str
    argv: Sequence[str]
    image_sha256: str | None = None
    root: bool = False
    cpus: int | None = None
    memory_mib: int | None = None
    disk: int | str | None = None
    keep_snapshot: KeepSnapshot | str = KeepSnapshot.ON_FAILURE
    input_dir: Path | None = None
    output_dir: Path | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    timeout: float | None = None  # seconds the payload may run; more than zero
    job_id: str | None = None
    owner: str | None = None
    network: str | None = None  # None: the host's default (GLITE_VM_NETWORK)


@dataclasses.dataclass
class RunReport:
    """What is known of a run so far (filled by :func:`run_job` as it goes)."""

    domain: str | None = None
    boot_log_path: Path | None = None
    payload: ExecResult | None = None  # set once the payload has ended
    teardown: TeardownResult | None = None  # set once the VM is gone


@dataclasses.dataclass(frozen=True)
class JobResult:
    """What happened, with everything a user needs to look at afterwards."""

    domain: str
    exit_code: int | None
    signal: int | None
    shell_status: int
    snapshot_path: Path | None
    boot_log_path: Path
    record_path: Path
    hypervisor: str
    image_digest: str
    cache_hit: bool
    outputs: list[str]
    timings: Timings
    boot_attempts: int = 1  # boots it took (transient failures are retried, docs/vm.md)


def hypervisor_for(settings: Settings, *, reprobe: bool = False) -> HypervisorInfo:
    """The accelerator, from the remembered probe when it still holds (else probed, ~10 s)."""
    return detect_cached(
        settings.hypervisor, settings.state_dir / HYPERVISOR_CACHE, reprobe=reprobe
    )


def open_host(settings: Settings, hypervisor: HypervisorInfo | None = None) -> VmHost:
    """Connect to libvirt and pick the accelerator (probe remembered across runs)."""
    hv = hypervisor or hypervisor_for(settings)
    # libvirt's default error handler prints every error to stderr; ours are raised instead.
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    # Before connecting: only connections opened after it carry domain events.
    libvirt_events.start()
    try:
        conn = libvirt.open(settings.effective_libvirt_uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"cannot connect to libvirt at {settings.effective_libvirt_uri}: {exc}; "
            "is libvirtd running?"
        ) from exc
    return VmHost(conn, settings, hv)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None


def run_job(
    host: VmHost,
    spec: JobSpec,
    *,
    stdout: OutputSink | None = None,
    stderr: OutputSink | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    allow_local: bool = True,
    report: RunReport | None = None,
) -> JobResult:
    """Run ``spec`` in a fresh VM (see the module docstring).

    Raises :class:`~glite_vm.errors.RequestError` naming ``timeout``, ``input_dir`` or
    ``output_dir`` (or the job-ad attribute of a bad VM field) before anything boots;
    :class:`~glite_vm.errors.PayloadTimeoutError` when the payload outlives ``spec.timeout``.
    """
    from glite_vm.images.acquire import acquire_image  # noqa: PLC0415 - keeps this module light

    settings = host.settings
    report = report if report is not None else RunReport()
    job_id = spec.job_id or f"local-{int(time.time())}-{os.getpid()}"
    request = VMRequest.create(
        settings,
        image=spec.image,
        job_id=job_id,
        owner=spec.owner or getpass.getuser(),
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        disk=spec.disk,
        root=spec.root,
        keep_snapshot=spec.keep_snapshot,
        image_sha256=spec.image_sha256,
        network=spec.network,
    )
    timeout = None if spec.timeout is None else parse_timeout(spec.timeout, "timeout")
    if spec.input_dir is not None and not spec.input_dir.is_dir():
        raise RequestError("input_dir", f"{spec.input_dir} is not a directory")
    if spec.output_dir is not None:
        check_output_dir(spec.output_dir)
    with acquire_image(
        settings,
        spec.image,
        sha256=spec.image_sha256,
        job_id=job_id,
        progress=progress,
        allow_local=allow_local,
    ) as lease:
        image = lease.image

        def boot(_attempt: int, seconds_left: float) -> Vm:
            vm = host.start(request, image, fetch_seconds=image.fetch_seconds)
            report.domain, report.boot_log_path = vm.name, vm.boot_log
            try:
                vm.wait_ready(seconds_left, cancel=cancel)
            except BaseException:
                # A guest that never became ready leaves its boot log, not its disk.
                vm.teardown(failed=True, keep_override=False)
                raise
            return vm

        vm, attempts = boot_with_retries(
            boot, attempts=settings.boot_attempts, budget=settings.boot_timeout
        )
        outputs: list[str] = []
        try:
            with vm:
                if spec.input_dir is not None:
                    vm.push(spec.input_dir)
                result = vm.run(
                    spec.argv,
                    env=spec.env,
                    stdout=stdout,
                    stderr=stderr,
                    timeout=timeout,
                    cancel=cancel,
                )
                report.payload = result
                if spec.output_dir is not None:
                    outputs = _pull(vm, spec.output_dir, spec.input_dir)
        finally:
            report.teardown = vm.torn_down
        done = vm.torn_down
        assert done is not None  # the with-block always tears down
        return JobResult(
            domain=vm.name,
            exit_code=result.exit_code,
            signal=result.signal,
            shell_status=result.shell_status,
            snapshot_path=done.snapshot_path,
            boot_log_path=done.boot_log_path,
            record_path=done.record_path,
            hypervisor=host.hypervisor.kind,
            image_digest=image.sha256,
            cache_hit=image.cache_hit,
            outputs=outputs,
            timings=vm.timings,
            boot_attempts=attempts,
        )


def check_output_dir(path: Path) -> None:
    """Make ``path`` (and its parents) if needed and prove a file can be written in it.

    Done before the VM boots, so a job's results never die on an unwritable destination.
    """
    if path.exists() and not path.is_dir():
        raise RequestError("output_dir", f"{path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".glite-vm-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RequestError(
            "output_dir", f"cannot write into {path}: {exc.strerror or exc}"
        ) from None


def _pull(vm: Vm, output_dir: Path, unchanged_from: Path | None) -> list[str]:
    try:
        return vm.pull(output_dir, unchanged_from=unchanged_from)
    except OSError as exc:
        # e.g. the disk under output_dir filled up after the check
        where = exc.filename or output_dir
        raise RequestError(
            "output_dir",
            f"copying the outputs into {output_dir} failed at {where}: {exc.strerror or exc}",
        ) from None
