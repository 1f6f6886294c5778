"""The execute-point hooks: PREPARE_JOB boots the job's VM, JOB_EXIT tears it down.

Both run as the job owner in the scratch directory with the starter's copy of the job ad on
stdin (docs/condor.md has the measured facts). What they share with the launcher (the service's
client, chirp, stop signals, bounded calls) is in :mod:`glite_vm.condor.under_starter`.

PREPARE_JOB (no timeout of its own in HTCondor, so it bounds itself with :func:`prepare_timeout`)
prints ad updates that make the starter run our launcher instead of the job's executable::

    Cmd = "<hooks>/launcher"
    Arguments = "'--socket=...' '--' '<vm>' '<input>' ..."   # V2 syntax
    TransferExecutable = false
    GliteVmDomain = ..., GliteVmBootLogPath = ..., ...

The launcher's arguments name the sandbox's inputs: the entries of the scratch directory when
PREPARE_JOB runs (after input transfer), less HTCondor's own files. Later the starter adds more
of its own (``_condor_stdout``, ``var/`` for ``MOUNT_UNDER_SCRATCH``, ...), which must neither
go into the guest nor be overwritten by files coming back.

Because PREPARE_JOB's stdout never reaches the schedd, the ``GliteVm*`` attributes are also
chirped (that needs ``+WantIOProxy = true`` in the submit file). On failure it prints
``HookStatusCode``/``HookStatusMessage`` (hold 1-299, requeue >= 300, hold after
``GLITE_VM_MAX_HOST_FAILURES`` host failures with the reasons accumulated in
``GliteVmHostFailures``) and makes sure no VM of this attempt is left behind.

JOB_EXIT (argument ``exit`` or ``evict``) tears the VM down, idempotently, within
``GLITE_VM_HOOK_JOB_EXIT_TIMEOUT``; on ``exit`` it chirps the teardown's attributes (snapshot
path, teardown time). It never chirps on ``evict``: the chirp server is gone by then and a chirp
would only wait for a TCP timeout.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Final

import classad2

from glite_vm.condor.config import HOOK_KEYWORD, LAUNCHER_FILE
from glite_vm.condor.jobad import (
    HOST_FAILURES_ATTR,
    AdValue,
    append_host_failure,
    format_ad_updates,
    hook_status_lines,
    host_failure_count,
    host_failure_history,
    request_from_job_ad,
    status_code,
    v2_quote,
)
from glite_vm.condor.under_starter import (
    CLEANUP_MARGIN,
    Chirp,
    DeadlineExceeded,
    HTChirpSender,
    ServiceFactory,
    Stopped,
    call_with_deadline,
    connect,
    parse_old_ad,
    raise_on_stop_signals,
)
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, HostError, RequestError
from glite_vm.service.api import PrepareResult, TeardownOutcome
from glite_vm.vm.record import ad_attributes

#: Files of HTCondor's in the scratch directory when PREPARE_JOB runs (measured on 25.0.13:
#: exactly these four; ``.update.ad`` is rewritten while the job runs). Never job inputs.
HTCONDOR_PREPARE_FILES: Final = frozenset({".chirp.config", ".job.ad", ".machine.ad", ".update.ad"})
#: Margin on top of the service's own bounds (connecting, reading the ad, printing).
PREPARE_MARGIN: Final = 60.0
#: Attributes PREPARE_JOB writes into the starter's copy only, never into the schedd's ad: a
#: requeued job must run its own executable again, and its next PREPARE_JOB rewrites these.
STARTER_ONLY: Final = frozenset({"Cmd", "Arguments", "TransferExecutable"})


# --- the hook's surroundings ----------------------------------------------------------------


def _stderr_warning(text: str) -> None:
    print(f"glite-vm: warning: {text}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class HookContext:
    """Everything a hook reads from or does to the outside world, so tests can supply it."""

    settings: Settings
    environ: Mapping[str, str]
    stdout: IO[str]
    connect: ServiceFactory = connect
    chirp: Chirp = dataclasses.field(default_factory=lambda: HTChirpSender(_stderr_warning))
    warn: Callable[[str], None] = _stderr_warning
    hooks_dir: Path | None = None  # where the running hook lives (the launcher is beside it)
    starter_pid: int | None = None
    param: Callable[[str], str | None] = lambda _name: None  # HTCondor configuration

    @property
    def scratch_dir(self) -> Path:
        return Path(self.environ.get("_CONDOR_SCRATCH_DIR") or os.getcwd())


# --- reading ads -----------------------------------------------------------------------------


def _string_attr(ad: Mapping[str, object], name: str) -> str | None:
    try:
        value = ad.get(name)
    except Exception:
        return None
    return value if isinstance(value, str) else None


def _int_attr(ad: Mapping[str, object], name: str) -> int | None:
    try:
        value = ad.get(name)
    except Exception:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def job_id_of(ad: Mapping[str, object]) -> str | None:
    cluster, proc = _int_attr(ad, "ClusterId"), _int_attr(ad, "ProcId")
    return None if cluster is None or proc is None else f"{cluster}.{proc}"


# --- bounds and the starter ------------------------------------------------------------------


def prepare_timeout(settings: Settings) -> float:
    """PREPARE_JOB's own bound: waiting for another job's download, then booting, plus margin.

    HTCondor gives PREPARE_JOB no timeout; a hook that hangs would hold the slot forever.
    """
    return settings.lock_timeout + settings.boot_timeout + PREPARE_MARGIN


def find_starter_pid(
    parent: int | None = None, proc: Path = Path("/proc"), max_hops: int = 3
) -> int | None:
    """The condor_starter that runs this hook: normally the parent (measured); a shell
    wrapper in between is skipped. ``None`` when no ancestor is a starter."""
    pid = os.getppid() if parent is None else parent
    for _ in range(max_hops):
        if pid <= 1:
            return None
        try:
            comm = (proc / str(pid) / "comm").read_text().strip()
            stat = (proc / str(pid) / "stat").read_text()
        except OSError:
            return None
        if comm == "condor_starter":
            return pid
        try:
            pid = int(stat.rpartition(")")[2].split()[1])  # field 4: the parent's pid
        except (IndexError, ValueError):
            return None
    return None


# --- PREPARE_JOB -----------------------------------------------------------------------------


def input_names(scratch: Path) -> list[str]:
    """The sandbox's inputs: what the scratch directory holds besides HTCondor's own files."""
    try:
        names = os.listdir(scratch)
    except OSError as exc:
        raise HostError(f"cannot list the scratch directory {scratch}: {exc.strerror}") from None
    inputs = sorted(n for n in names if n not in HTCONDOR_PREPARE_FILES)
    for name in inputs:
        if "\n" in name or "\r" in name:
            raise RequestError(
                "TransferInput",
                f"the input {name!r} has a line break in its name, which the job ad cannot "
                "carry; rename it",
            )
    return inputs


def launcher_arguments(socket_path: Path, vm: str, inputs: Sequence[str]) -> list[str]:
    """What the launcher is called with (see :func:`glite_vm.condor.payload.parse_arguments`).

    The socket path travels along because the job's environment has no ``CONDOR_CONFIG``: the
    launcher may not see the knob that set it.
    """
    return [f"--socket={socket_path}", "--", vm, *inputs]


def launcher_path(ctx: HookContext) -> Path:
    """``GLITE_VM_LAUNCHER`` from the configuration, else the launcher beside this hook."""
    configured = ctx.param("GLITE_VM_LAUNCHER")
    if configured:
        return Path(configured)
    if ctx.hooks_dir is None:
        raise HostError(
            "GLITE_VM_LAUNCHER is not configured and the hooks directory is unknown; "
            "regenerate the configuration with `glite-vm config`"
        )
    return ctx.hooks_dir / LAUNCHER_FILE


def _ad_attributes(raw: Mapping[str, object], warn: Callable[[str], None]) -> dict[str, AdValue]:
    """The service's attributes that the job ad can hold (``GliteVm*`` names, plain values)."""
    out: dict[str, AdValue] = {}
    for name, value in raw.items():
        if not name.startswith("GliteVm") or value is None:
            continue
        if isinstance(value, str | bool | int | float | Path):
            out[name] = value
        else:
            warn(f"attribute {name} has a value the job ad cannot hold: {value!r}")
    return out


def prepare_job(ctx: HookContext, stdin_text: str) -> int:
    """The PREPARE_JOB hook. Returns its exit status; prints the ad lines to ``ctx.stdout``."""
    started = time.monotonic()
    job_ad: classad2.ClassAd | None = None
    try:
        job_ad = parse_old_ad(stdin_text, "job ad")
        # The hook turns the ad into a request (the service never parses an ad); the service
        # applies the site's rules with its own settings (the hook may not see all of them:
        # the service's environment, say) and sizes it for the slot it learns from the
        # starter this hook runs under.
        request = request_from_job_ad(job_ad, ctx.settings, site_policy=False)
        scratch = ctx.scratch_dir
        inputs = input_names(scratch)
        launcher = launcher_path(ctx)

        def prepare() -> PrepareResult:
            return ctx.connect(ctx.settings).prepare(
                request, scratch_dir=str(scratch), starter_pid=ctx.starter_pid
            )

        result = call_with_deadline(prepare, prepare_timeout(ctx.settings), "preparing the VM")
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        return _prepare_failed(ctx, job_ad, exc, time.monotonic() - started)

    attributes: dict[str, AdValue] = {
        **ad_attributes(domain=result.vm, boot_log=result.boot_log_path or None),
        **_ad_attributes(result.ad_attributes, ctx.warn),  # the service's, where it says
        **ad_attributes(timings={"prepare": time.monotonic() - started}),
    }
    arguments = launcher_arguments(ctx.settings.socket_path, result.vm, inputs)
    try:
        lines = format_ad_updates(
            {
                "Cmd": launcher,
                "Arguments": v2_quote(arguments),
                "TransferExecutable": False,
                **attributes,
            }
        )
    except ValueError as exc:  # a value with a line break: nothing the job can use
        unusable = HostError(f"the service returned what a job ad cannot hold: {exc}")
        _discard(ctx, [result.vm])
        return _prepare_failed(ctx, job_ad, unusable, time.monotonic() - started)
    ctx.chirp.set_attributes(attributes)
    ctx.stdout.write(lines)
    ctx.stdout.flush()
    return 0


def _prepare_failed(
    ctx: HookContext, job_ad: classad2.ClassAd | None, error: BaseException, elapsed: float
) -> int:
    """Report ``error`` the way HTCondor understands; leave no VM of this attempt behind."""
    if isinstance(error, Stopped | DeadlineExceeded) and job_ad is not None:
        # the service may still be booting the VM for us: ask it to drop what it made
        job_id = job_id_of(job_ad)
        if job_id is not None:
            _discard_job_vms(ctx, job_id, max_age=elapsed + 5.0)
    if isinstance(error, Stopped):
        error = HostError(f"PREPARE_JOB was {error}")
    previous = host_failure_count(job_ad) if job_ad is not None else 0
    earlier = host_failure_history(job_ad) if job_ad is not None else ""
    attributes: dict[str, AdValue] = {}
    boot_log = getattr(error, "boot_log", None)  # BootError, ImageBootError
    if isinstance(error, GliteVmError) and isinstance(boot_log, str | Path):
        attributes.update(ad_attributes(boot_log=boot_log))
    if status_code(error) >= 300:
        reason = f"{socket.gethostname()}: {_message(error)}"
        attributes[HOST_FAILURES_ATTR] = append_host_failure(earlier, reason)
    ctx.chirp.set_attributes(attributes)
    max_failures = ctx.settings.max_host_failures
    ctx.stdout.write("\n".join(hook_status_lines(error, previous, max_failures, earlier)) + "\n")
    ctx.stdout.flush()
    ctx.warn(f"PREPARE_JOB failed: {_message(error)}")
    return 1


def _message(error: BaseException) -> str:
    if isinstance(error, GliteVmError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _discard(ctx: HookContext, vms: Sequence[str]) -> None:
    """Tear down ``vms`` (as failed), bounded; problems are only reported."""
    if not vms:
        return

    def run() -> None:
        service = ctx.connect(ctx.settings)
        for vm in vms:
            service.teardown(vm, failed=True)

    try:
        call_with_deadline(
            run, ctx.settings.teardown_timeout + CLEANUP_MARGIN, "tearing down the VM"
        )
    except Exception as exc:
        ctx.warn(f"could not tear down {', '.join(vms)}: {_message(exc)}")


def _discard_job_vms(ctx: HookContext, job_id: str, max_age: float) -> None:
    """Tear down this job's VMs that were created during this attempt."""

    def find() -> list[str]:
        return [
            vm.vm
            for vm in ctx.connect(ctx.settings).list_vms()
            if vm.job_id == job_id and vm.age_seconds <= max_age
        ]

    try:
        vms = call_with_deadline(find, CLEANUP_MARGIN, "listing the job's VMs")
    except Exception as exc:
        ctx.warn(f"could not look for VMs of job {job_id} to tear down: {_message(exc)}")
        return
    _discard(ctx, vms)


# --- JOB_EXIT --------------------------------------------------------------------------------


def job_failed(job_ad: Mapping[str, object], reason: str) -> bool:
    """Did the job fail, for the snapshot policy? Evicted, killed by a signal, or non-zero.

    The starter's copy that JOB_EXIT reads carries ``ExitCode``/``ExitBySignal`` (measured).
    """
    if reason != "exit":
        return True
    try:
        by_signal = job_ad.get("ExitBySignal")
    except Exception:
        by_signal = None
    if by_signal is True:
        return True
    code = _int_attr(job_ad, "ExitCode")
    return code is None or code != 0


def job_exit_timeout(ctx: HookContext) -> float:
    """What the starter grants JOB_EXIT (``GLITE_VM_HOOK_JOB_EXIT_TIMEOUT``), less a margin."""
    configured = ctx.param(f"{HOOK_KEYWORD}_HOOK_JOB_EXIT_TIMEOUT")
    try:
        granted = float(configured) if configured else 30.0  # HTCondor's default
    except ValueError:
        granted = 30.0
    return max(granted - 3.0, 1.0)


def job_exit(ctx: HookContext, reason: str, stdin_text: str) -> int:
    """The JOB_EXIT hook (``reason`` is ``exit`` or ``evict``). Its exit status is ignored."""
    try:
        job_ad = parse_old_ad(stdin_text, "job ad")
    except HostError as exc:
        ctx.warn(f"JOB_EXIT: {exc}")
        return 1
    vm = _string_attr(job_ad, "GliteVmDomain")
    if vm is None:
        return 0  # PREPARE_JOB failed before there was a VM, and cleaned up itself
    failed = job_failed(job_ad, reason)

    def teardown() -> TeardownOutcome:
        return ctx.connect(ctx.settings).teardown(vm, failed=failed)

    try:
        outcome = call_with_deadline(teardown, job_exit_timeout(ctx), f"tearing down {vm}")
    except Exception as exc:
        ctx.warn(f"JOB_EXIT ({reason}): {_message(exc)}")
        return 1
    if reason == "exit":
        attributes = {
            **ad_attributes(
                snapshot=outcome.snapshot_path or None, record=outcome.record_path or None
            ),
            **_ad_attributes(outcome.ad_attributes, ctx.warn),
        }
        ctx.chirp.set_attributes(attributes)
    return 0


# --- entry point -----------------------------------------------------------------------------


def _condor_param(name: str) -> str | None:
    try:
        import htcondor2  # noqa: PLC0415 - Settings.load(use_condor=True) imported it already
    except ImportError:
        return None
    value = htcondor2.param.get(name)
    return None if value is None else str(value)


def main(hook: str, argv: Sequence[str], *, hooks_dir: Path | None = None) -> int:
    """Run ``hook`` (``prepare_job`` or ``job_exit``) as HTCondor calls it."""
    if hooks_dir is None and sys.argv and sys.argv[0]:
        hooks_dir = Path(sys.argv[0]).resolve().parent
    stdin_text = sys.stdin.read()
    try:
        settings = Settings.load(use_condor=True)
    except ValueError as exc:
        settings_error: BaseException = HostError(f"glite-vm settings on this host: {exc}")
        if hook == "prepare_job":
            print("\n".join(hook_status_lines(settings_error, 0, 0)), flush=True)
        print(f"glite-vm: {settings_error}", file=sys.stderr)
        return 1
    ctx = HookContext(
        settings=settings,
        environ=os.environ,
        stdout=sys.stdout,
        hooks_dir=hooks_dir,
        starter_pid=find_starter_pid(),
        param=_condor_param,
    )
    if hook == "prepare_job":
        raise_on_stop_signals()
        return prepare_job(ctx, stdin_text)
    if hook == "job_exit":
        reason = argv[0] if argv else "exit"
        return job_exit(ctx, reason, stdin_text)
    print(f"glite-vm: unknown hook {hook!r}", file=sys.stderr)
    return 2
