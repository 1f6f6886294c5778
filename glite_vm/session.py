"""One job in one VM on this host, start to finish, for the user at the keyboard: what
`glite-vm run`, the API's ``run_local`` and the benchmarks share.

It drives the host service's own engine (:class:`~glite_vm.service.local.LocalService`), in
this process and for this user: the same prepare (boot attempts, the job's account, guest
identity and hostname), sandbox copies, payload and teardown. ``run_job`` checks everything it
can before a VM exists (the request, the time limit, the input directory, that the output
directory can be written), then boots the VM, copies the input directory in, runs the command
with its output streamed, copies new and changed files out, and tears the VM down whatever
happens (an exception, Ctrl-C, a cancel event), keeping the snapshot by policy. A
:class:`RunReport` passed in is filled as the run goes, so a caller can still name the VM, its
boot log, the payload's status and the snapshot when a later step fails.

Each run registers its VM, with this process as its owner, in the state directory as the
service does: a run killed with SIGKILL leaves its VM only until the next run (which reaps the
VMs of dead runs first), ``glite-vm reap``, or the service where one runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from glite_vm.config import Settings
from glite_vm.errors import RequestError
from glite_vm.images.download import Progress
from glite_vm.images.leases import process_alive
from glite_vm.request import JobRequest, KeepSnapshot
from glite_vm.service.api import ExecOutcome, TeardownOutcome
from glite_vm.service.local import LocalService
from glite_vm.service.registry import VmRegistry
from glite_vm.service.vm_state import VmRecord
from glite_vm.slots import SlotFacts
from glite_vm.units import parse_timeout
from glite_vm.vm.guest_run import OutputSink
from glite_vm.vm.lifecycle import VmHost
from glite_vm.vm.record import AdFacts, Timings


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
    hostname: str | None = None  # for the guest, when the site allows jobs to choose one


@dataclasses.dataclass
class RunReport:
    """What is known of a run so far (filled by :func:`run_job` as it goes)."""

    domain: str | None = None
    boot_log_path: Path | None = None
    payload: ExecOutcome | None = None  # set once the payload has ended
    teardown: TeardownOutcome | None = None  # set once the VM is gone


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


def run_job(
    host: VmHost,
    spec: JobSpec,
    *,
    stdout: OutputSink | None = None,
    stderr: OutputSink | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    report: RunReport | None = None,
) -> JobResult:
    """Run ``spec`` in a fresh VM (see the module docstring).

    Raises :class:`~glite_vm.errors.RequestError` naming ``timeout``, ``input_dir`` or
    ``output_dir`` (or the job-ad attribute of a bad VM field) before anything boots;
    :class:`~glite_vm.errors.PayloadTimeoutError` when the payload outlives ``spec.timeout``.
    """
    # The VM is the user's own: the site's policy on job-chosen host names does not apply.
    settings = dataclasses.replace(host.settings, allow_job_hostname=True, job_hostname_domains=())
    report = report if report is not None else RunReport()
    job = JobRequest.create(
        settings,
        image=spec.image,
        job_id=spec.job_id or f"local-{int(time.time())}-{os.getpid()}",
        owner=spec.owner or getpass.getuser(),
        cpus=spec.cpus,
        memory_mib=spec.memory_mib,
        disk=spec.disk,
        root=spec.root,
        keep_snapshot=spec.keep_snapshot,
        image_sha256=spec.image_sha256,
        hostname=spec.hostname,
        network=spec.network,
    )
    timeout = None if spec.timeout is None else parse_timeout(spec.timeout, "timeout")
    if spec.input_dir is not None and not spec.input_dir.is_dir():
        raise RequestError("input_dir", f"{spec.input_dir} is not a directory")
    if spec.output_dir is not None:
        check_output_dir(spec.output_dir)
    registry = VmRegistry(settings, host)
    registry.reap_orphans()  # the VMs of earlier runs that were killed
    sweep_run_dirs(settings)
    service = LocalService.for_this_user(settings, host, registry=registry)

    def started(name: str, boot_log: Path) -> None:
        report.domain, report.boot_log_path = name, boot_log

    with _run_dir(settings) as scratch:
        prepared = service.prepare(
            job,
            scratch_dir=str(scratch),
            starter_pid=os.getpid(),  # a run killed with SIGKILL is reaped by the next one
            slot=SlotFacts.own_vm(),
            cancel=cancel,
            progress=progress,
            started=started,
        )
        name = prepared.vm
        record = registry.get(name)
        assert isinstance(record, VmRecord)  # prepared just now, by this process
        failed = True
        outputs: list[str] = []
        try:
            if spec.input_dir is not None:
                service.push(name, str(spec.input_dir.absolute()))
            outcome = service.exec(
                name,
                spec.argv,
                env=spec.env,
                stdout=stdout,
                stderr=stderr,
                cancel=cancel,
                timeout=timeout,
            )
            report.payload = outcome
            if spec.output_dir is not None:
                outputs = _pull(service, name, spec.output_dir, spec.input_dir)
            failed = outcome.exit_code != 0  # the run failed unless all of it went well
        finally:
            report.teardown = service.teardown(name, failed=failed)
    done = report.teardown
    facts = AdFacts.from_ad(prepared.ad_attributes)
    status = 128 + outcome.signal if outcome.signal is not None else outcome.exit_code
    return JobResult(
        domain=name,
        exit_code=outcome.exit_code,
        signal=outcome.signal,
        shell_status=255 if status is None else status,
        snapshot_path=Path(done.snapshot_path) if done.snapshot_path else None,
        boot_log_path=Path(done.boot_log_path),
        record_path=Path(done.record_path),
        hypervisor=host.hypervisor.kind,
        image_digest=facts.image_digest or "",
        cache_hit=facts.cache_hit is True,
        outputs=outputs,
        timings=record.vm.timings,
        boot_attempts=facts.boot_attempts or 1,
    )


RUNS_DIR = "runs"  # under the state directory: each run's private scratch directory


@contextlib.contextmanager
def _run_dir(settings: Settings) -> Iterator[Path]:
    """A private directory for this run (the engine's "scratch directory": its VM is reaped
    when it goes), named after this process, removed afterwards."""
    parent = settings.state_dir / RUNS_DIR
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sweep_run_dirs(settings: Settings) -> None:
    """Run directories of processes that are gone (a run killed with SIGKILL left its own)."""
    parent = settings.state_dir / RUNS_DIR
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name.partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid), None):
            shutil.rmtree(parent / name, ignore_errors=True)


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


def _pull(
    service: LocalService, name: str, output_dir: Path, unchanged_from: Path | None
) -> list[str]:
    try:
        return service.pull(
            name,
            str(output_dir.absolute()),
            unchanged_from=str(unchanged_from.absolute()) if unchanged_from else None,
        )
    except OSError as exc:
        # e.g. the disk under output_dir filled up after the check
        where = exc.filename or output_dir
        raise RequestError(
            "output_dir",
            f"copying the outputs into {output_dir} failed at {where}: {exc.strerror or exc}",
        ) from None
