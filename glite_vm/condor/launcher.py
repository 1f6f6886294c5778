"""The launcher: what the starter runs as the job once PREPARE_JOB has booted its VM.

PREPARE_JOB rewrote ``Cmd``/``Arguments`` in the starter's copy of the job ad, so the starter runs
``launcher --socket=PATH -- VM INPUT...`` (see :func:`glite_vm.condor.hooks.launcher_arguments`)
as the job owner in the scratch directory. The launcher

1. reads the job as submitted from ``$_CONDOR_JOB_AD`` (HTCondor keeps the original ``Cmd``,
   ``Args``/``Arguments``, ``Environment``/``Env`` there): :func:`payload_from_job_ad`;
2. copies the inputs into the guest's working directory (``service.push`` of a staging directory
   the inputs are *renamed* into and back out of, so HTCondor's own files stay out);
3. runs the payload there as the guest user (root on root slots), with the job's environment,
   streaming its stdout/stderr into its own as they arrive;
4. copies new and changed files back into the scratch directory, where HTCondor's output
   transfer finds them (never over HTCondor's own files);
5. chirps its timings; after a payload that failed, keeps the job running while the service
   holds its VM for debugging (``+GliteVmDebugHold``, :func:`debug_hold`);
6. exits with the payload's exit code, or kills itself with the payload's signal, so that
   ``ExitCode``/``ExitSignal`` are the payload's (with or without a debug hold).

``condor_rm``, hold and vacate reach it as SIGTERM (measured; SIGQUIT, SIGINT, SIGHUP are
treated alike): it asks the service to tear the VM down at once (``failed=True``, so the
snapshot policy ``on_failure`` keeps it) and dies by that signal. JOB_EXIT runs right after and
finds the VM gone, which is fine: teardown is idempotent.

When glite-vm itself fails (service gone, guest dead) the launcher writes the reason to the
job's stderr, chirps it into ``GliteVmLauncherError`` and exits with status
:data:`LAUNCHER_FAILURE_EXIT`, like ``env``/``timeout`` do when they cannot run a command.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from glite_vm.condor.jobad import AdValue, ad_safe_text
from glite_vm.condor.payload import payload_from_job_ad
from glite_vm.condor.under_starter import (
    CLEANUP_MARGIN,
    Chirp,
    HTChirpSender,
    ServiceFactory,
    Stopped,
    call_with_deadline,
    connect,
    parse_old_ad,
    raise_on_stop_signals,
)
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, HostError
from glite_vm.request import DEBUG_HOLD_FIELD
from glite_vm.service.api import ExecOutcome, TeardownOutcome, VmService
from glite_vm.vm.record import (
    DEBUG_HOLD_NOTE,
    DEBUG_UNTIL,
    LAUNCHER_ERROR,
    NAMES,
    PAYLOAD_SIGNAL,
    ad_attributes,
)

#: Exit status when glite-vm (not the payload) failed; 125 as env(1) and timeout(1) use it.
LAUNCHER_FAILURE_EXIT: Final = 125
#: Staging directories inside the scratch directory (same file system: renames are free).
STAGE_IN: Final = ".glite-vm-in"
STAGE_OUT: Final = ".glite-vm-out"
#: Seconds a chirp may take while the starter waits for the job to stop.
STOP_CHIRP_TIMEOUT: Final = 2.0


# --- the launcher's own arguments ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LauncherArgs:
    vm: str
    inputs: tuple[str, ...]
    socket_path: Path | None


def parse_launcher_arguments(argv: Sequence[str]) -> LauncherArgs:
    parser = argparse.ArgumentParser(prog="launcher", add_help=False, allow_abbrev=False)
    parser.add_argument("--socket", type=Path, default=None)
    parser.add_argument("vm")
    parser.add_argument("inputs", nargs="*")
    try:
        ns = parser.parse_args(argv)
    except SystemExit:
        raise HostError(f"the launcher was called with unusable arguments: {list(argv)}") from None
    for name in ns.inputs:
        if name in ("", ".", "..") or "/" in name:
            raise HostError(f"the launcher was given {name!r} as an input name")
    return LauncherArgs(vm=ns.vm, inputs=tuple(ns.inputs), socket_path=ns.socket)


# --- moving the sandbox ----------------------------------------------------------------------


def stage_inputs(scratch: Path, inputs: Sequence[str]) -> tuple[Path, list[str]]:
    """Rename the inputs into a fresh staging directory; return it and what was moved."""
    stage = Path(tempfile.mkdtemp(prefix=STAGE_IN + "-", dir=scratch))
    moved: list[str] = []
    try:
        for name in inputs:
            src = scratch / name
            if not src.exists() and not src.is_symlink():
                continue
            os.rename(src, stage / name)
            moved.append(name)
    except BaseException:
        unstage_inputs(scratch, stage, moved)
        raise
    return stage, moved


def unstage_inputs(scratch: Path, stage: Path, moved: Sequence[str]) -> None:
    for name in moved:
        with contextlib.suppress(FileNotFoundError):
            os.rename(stage / name, scratch / name)
    shutil.rmtree(stage, ignore_errors=True)


def adopt_outputs(
    scratch: Path, stage: Path, files: Sequence[str], reserved: frozenset[str]
) -> tuple[list[str], list[str]]:
    """Move pulled ``files`` (relative paths) from ``stage`` into ``scratch``.

    A path under a ``reserved`` top-level name (HTCondor's own files and directories) is
    skipped: the guest must not overwrite the job's stdout or the chirp cookie. Returns what was
    moved and what was skipped.
    """
    moved: list[str] = []
    skipped: list[str] = []
    for rel in files:
        parts = Path(rel).parts
        if not parts or parts[0] in reserved or ".." in parts or Path(rel).is_absolute():
            skipped.append(rel)
            continue
        src, dest = stage / rel, scratch / rel
        if not src.exists() and not src.is_symlink():
            skipped.append(rel)
            continue
        try:
            _make_parents(scratch, parts[:-1])
            if dest.is_dir() and not dest.is_symlink() and not src.is_dir():
                shutil.rmtree(dest)
            os.replace(src, dest)
        except OSError:
            skipped.append(rel)
            continue
        moved.append(rel)
    return moved, skipped


def _make_parents(root: Path, parts: Sequence[str]) -> None:
    """Create ``root/parts...`` as directories, replacing files or symlinks in the way."""
    current = root
    for part in parts:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            current.unlink()
        current.mkdir(exist_ok=True)


# --- exit -----------------------------------------------------------------------------------


def die_like(outcome: ExecOutcome) -> int:
    """Make the launcher's end look like the payload's: its exit code, or its signal.

    For a signal, the default action is restored and the signal sent to ourselves (no core
    file: it would land in the sandbox). Returns an exit status only when that did not end the
    process (a signal whose default is to be ignored): 128 + the signal, as shells report it.
    """
    if outcome.signal is not None:
        sig = outcome.signal
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(ValueError, OSError):  # SIGKILL and SIGSTOP have no handler
            signal.signal(sig, signal.SIG_DFL)
        with contextlib.suppress(ValueError, OSError):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), sig)
            time.sleep(0.1)
        return 128 + sig
    if outcome.exit_code is None:
        return LAUNCHER_FAILURE_EXIT
    return outcome.exit_code & 0xFF


def die_by_signal(signum: int) -> int:
    return die_like(ExecOutcome(exit_code=None, signal=signum, seconds=0.0))


def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to ``fd`` completely (the job's stdout/stderr files)."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BrokenPipeError:
            return
        view = view[written:]


# --- the run --------------------------------------------------------------------------------


@dataclasses.dataclass
class LauncherContext:
    settings: Settings
    environ: Mapping[str, str]
    connect: ServiceFactory = connect
    chirp: Chirp | None = None
    stdout: Callable[[bytes], None] = lambda data: write_all(1, data)
    stderr: Callable[[bytes], None] = lambda data: write_all(2, data)

    def say(self, text: str) -> None:
        self.stderr(f"glite-vm: {text}\n".encode())

    @property
    def scratch_dir(self) -> Path:
        return Path(self.environ.get("_CONDOR_SCRATCH_DIR") or os.getcwd())


def run(ctx: LauncherContext, args: LauncherArgs) -> int:
    """Steps 1-5 of the module docstring. Returns the exit status (or dies by a signal)."""
    chirp = ctx.chirp or HTChirpSender(ctx.say)
    scratch = ctx.scratch_dir
    # everything here now that is not an input belongs to HTCondor (its stdout/stderr files,
    # the ads, MOUNT_UNDER_SCRATCH directories): never sent to the guest, never overwritten
    try:
        present = frozenset(os.listdir(scratch))
    except OSError as exc:
        ctx.say(f"cannot list the scratch directory {scratch}: {exc.strerror}")
        return LAUNCHER_FAILURE_EXIT
    inputs = [n for n in args.inputs if n in present]
    reserved = (present - set(inputs)) | {STAGE_IN, STAGE_OUT}
    timings: dict[str, AdValue] = {}
    try:
        job_ad_path = ctx.environ.get("_CONDOR_JOB_AD") or str(scratch / ".job.ad")
        try:
            job_ad = parse_old_ad(Path(job_ad_path).read_text(errors="replace"), "job ad")
        except OSError as exc:
            raise HostError(f"cannot read the job ad {job_ad_path}: {exc.strerror}") from None
        payload = payload_from_job_ad(job_ad, inputs)
        if payload.executable:
            exe = scratch / payload.executable
            with contextlib.suppress(OSError):
                if exe.is_file() and not exe.is_symlink():
                    exe.chmod(exe.stat().st_mode | 0o100)
        service: VmService = ctx.connect(ctx.settings)

        t0 = time.monotonic()
        stage, moved = stage_inputs(scratch, inputs)
        try:
            service.push(args.vm, str(stage))
        finally:
            unstage_inputs(scratch, stage, moved)
        timings.update(ad_attributes(timings={"transfer_in": time.monotonic() - t0}))

        outcome = service.exec(
            args.vm, payload.argv, env=payload.env, stdout=ctx.stdout, stderr=ctx.stderr
        )
        timings.update(ad_attributes(timings={"payload": outcome.seconds}))

        t0 = time.monotonic()
        out_stage = Path(tempfile.mkdtemp(prefix=STAGE_OUT + "-", dir=scratch))
        try:
            files = service.pull(args.vm, str(out_stage), unchanged_from=str(scratch))
            _moved, skipped = adopt_outputs(scratch, out_stage, files, frozenset(reserved))
        finally:
            shutil.rmtree(out_stage, ignore_errors=True)
        if skipped:
            shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
            ctx.say(f"not copied back (names HTCondor uses, or unusable): {shown}")
        timings.update(ad_attributes(timings={"transfer_out": time.monotonic() - t0}))
        if outcome.signal is not None:
            timings[PAYLOAD_SIGNAL] = outcome.signal
        chirp.set_attributes(timings)
        if (outcome.exit_code != 0 or outcome.signal is not None) and asks_debug_hold(job_ad):
            debug_hold(service, args.vm, chirp)
    except Stopped as stop:
        stop_chirp = ctx.chirp or HTChirpSender(ctx.say, timeout=STOP_CHIRP_TIMEOUT)
        _stop_vm(ctx, args.vm, stop, stop_chirp)
        return die_by_signal(stop.signum)
    except Exception as exc:
        message = str(exc) if isinstance(exc, GliteVmError) else f"{type(exc).__name__}: {exc}"
        ctx.say(f"the job could not run in its VM: {message}")
        timings[LAUNCHER_ERROR] = message
        try:
            chirp.set_attributes(timings)
        except Stopped as stop:
            return die_by_signal(stop.signum)
        return LAUNCHER_FAILURE_EXIT
    return die_like(outcome)


def asks_debug_hold(job_ad: Mapping[str, object]) -> bool:
    """Whether the job asked for a debug hold (the hook held a malformed ask; how long it
    gets is the service's to say)."""
    try:
        value = job_ad.get(DEBUG_HOLD_FIELD)
    except Exception:
        return False
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def debug_hold(service: VmService, vm: str, chirp: Chirp) -> None:
    """After a payload that failed: if the service holds the VM for debugging, put the hold's
    end into the job ad (``GliteVmDebugUntil``) and wait until it ends (its time, the owner's
    ``glite-vm vms release``, or ``condor_rm``/``condor_vacate_job``, which arrive as
    :class:`Stopped` and tear the VM down as ever). Whatever happens here goes to the job ad
    only: the job's output files and exit status stay what they would have been without it."""
    try:
        hold = service.debug_hold(vm)
    except Exception as exc:
        chirp.set_attributes({DEBUG_HOLD_NOTE: ad_safe_text(f"no debug hold: {exc}")})
        return
    if hold.until is None:
        if hold.note:
            chirp.set_attributes({DEBUG_HOLD_NOTE: ad_safe_text(hold.note)})
        return
    held: dict[str, AdValue] = {DEBUG_UNTIL: int(hold.until)}
    if hold.note:
        held[DEBUG_HOLD_NOTE] = ad_safe_text(hold.note)
    chirp.set_attributes(held)
    try:
        ended = f"the debug hold ended: {service.debug_wait(vm).reason}"
    except Exception as exc:
        ended = f"the debug hold ended: {exc}"
    chirp.set_attributes({DEBUG_UNTIL: int(time.time()), DEBUG_HOLD_NOTE: ad_safe_text(ended)})


def _stop_vm(ctx: LauncherContext, vm: str, stop: Stopped, chirp: Chirp) -> None:
    """Stop promptly: the VM goes now (a fresh connection; the old one was mid-call).

    The job is still running while this runs, so its chirp server still answers (JOB_EXIT
    on ``evict`` comes too late for that): the snapshot path reaches the job ad from here.
    """
    ctx.say(f"{stop}: tearing down the VM {vm}")

    def teardown() -> TeardownOutcome:
        return ctx.connect(ctx.settings).teardown(vm, failed=True)

    try:
        outcome = call_with_deadline(
            teardown, ctx.settings.teardown_timeout + CLEANUP_MARGIN, f"tearing down {vm}"
        )
    except Exception as exc:
        ctx.say(f"tearing down {vm} failed (JOB_EXIT will try again): {exc}")
        return
    attributes: dict[str, AdValue] = {
        **ad_attributes(snapshot=outcome.snapshot_path or None),
        **{
            k: v
            for k, v in outcome.ad_attributes.items()
            if k in NAMES and isinstance(v, str | bool | int | float)
        },
    }
    chirp.set_attributes(attributes)


def main(argv: Sequence[str]) -> int:
    """The launcher as the starter runs it (``hooks/launcher``)."""
    raise_on_stop_signals()
    ctx_environ = os.environ
    try:
        args = parse_launcher_arguments(argv)
        overrides = {"socket_path": args.socket_path} if args.socket_path else None
        # environ={}: this process has the *job's* environment, which must not configure us
        settings = Settings.load({}, use_condor=True, overrides=overrides)
    except (HostError, ValueError) as exc:
        print(f"glite-vm: the launcher cannot start: {exc}", file=sys.stderr, flush=True)
        return LAUNCHER_FAILURE_EXIT
    except Stopped as stop:
        return die_by_signal(stop.signum)
    return run(LauncherContext(settings=settings, environ=ctx_environ), args)
