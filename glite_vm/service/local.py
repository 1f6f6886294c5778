"""`LocalService`: the bootstrapper's calls, in-process, on behalf of one caller.

This is the engine behind the socket server (one instance per connection, sharing one
:class:`~glite_vm.service.registry.VmRegistry`) and what a single user can call directly
against ``qemu:///session`` (``glite-vm run``, which states its own VM's slot,
:meth:`~glite_vm.slots.SlotFacts.own_vm`). It implements :class:`~glite_vm.service.api.VmService`:

* ``prepare`` is :class:`~glite_vm.service.prepare.VmPreparer`'s: request -> image -> VM ->
  agent ready, for the slot the caller may have (the rules are in :mod:`glite_vm.service.prepare`).
* every other call (here: push, exec, pull, teardown, list, reap, ping, shell, console) acts
  only on the
  caller's own VMs (root: on all; someone else's VM gets the same answer as none at all), and
  moves files with the caller's rights (:mod:`glite_vm.service.sandbox`). Push, exec and pull
  of one VM take turns (they share its transfer disk); a shell runs beside them (it has a
  byte path of its own, :mod:`glite_vm.service.shell`), one per VM. A VM the service adopted
  without its state, or one already torn down, is refused for them with the reason.

Who the caller is, and how far its word is taken, is :class:`~glite_vm.service.caller.Caller`'s
business.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from glite_vm import __version__
from glite_vm.config import Settings
from glite_vm.errors import AccessDeniedError, HostError, RequestError
from glite_vm.images.download import Progress
from glite_vm.request import JobRequest
from glite_vm.service import debug_hold, events, protocol, sandbox
from glite_vm.service.api import (
    ConsoleInfo,
    DebugHold,
    DebugHoldEnd,
    ExecOutcome,
    OutputSink,
    PrepareResult,
    ReapedVm,
    ServiceInfo,
    ShellOutcome,
    ShellTerminal,
    TeardownOutcome,
    VmSummary,
)
from glite_vm.service.caller import Caller, account_name
from glite_vm.service.children import Identity
from glite_vm.service.claims import Claim
from glite_vm.service.prepare import VmPreparer
from glite_vm.service.registry import VmRegistry
from glite_vm.service.shell import run_shell
from glite_vm.service.vm_state import FinishedVm, VmRecord
from glite_vm.slots import SlotFacts
from glite_vm.vm.guest_shell import DEFAULT_TERM
from glite_vm.vm.lifecycle import VmHost

log = logging.getLogger(__name__)

MAX_ARGV_BYTES = 1 << 20


class LocalService:
    """The service's calls for one caller (``caller_uid``), in this process."""

    def __init__(
        self,
        settings: Settings,
        host: VmHost,
        *,
        caller_uid: int,
        caller_name: str,
        caller_gid: int | None = None,
        caller_groups: Sequence[int] | None = None,
        registry: VmRegistry | None = None,
        over_socket: bool = False,
        claim: Claim | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        if caller_gid is None:
            identity = Identity.of_user(caller_uid)
        else:
            groups = tuple(caller_groups) if caller_groups is not None else ()
            identity = Identity(caller_uid, caller_gid, groups)
        # Over the socket a caller other than root states nothing about its slot: ``claim``
        # (from the kernel's view of its process, see claims.find_claim) says which it is.
        self.caller = Caller(caller_uid, caller_name, identity, over_socket, claim)
        self.registry = registry if registry is not None else VmRegistry(settings, host)

    @classmethod
    def for_this_user(
        cls, settings: Settings, host: VmHost, *, registry: VmRegistry | None = None
    ) -> LocalService:
        """The service for whoever runs this process (a single user's in-process use)."""
        uid = os.getuid()
        return cls(
            settings,
            host,
            caller_uid=uid,
            caller_name=account_name(uid),
            caller_gid=os.getgid(),
            caller_groups=os.getgroups(),
            registry=registry,
        )

    @property
    def trusted(self) -> bool:
        """May this caller state its slot (root, or a caller in this process)?"""
        return self.caller.trusted

    # -- prepare -----------------------------------------------------------------------------

    def prepare(
        self,
        job: JobRequest,
        *,
        scratch_dir: str,
        starter_pid: int | None,
        slot: SlotFacts | None = None,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        started: Callable[[str, Path], None] | None = None,
    ) -> PrepareResult:
        """Fetch the image, start the job's VM and wait for its agent. Setting ``cancel``
        (the caller hung up) stops the wait and removes the VM again; ``progress(done, total)``
        hears of a download's bytes, ``started(name, boot_log)`` of each VM as it starts (a boot
        attempt that fails leaves its boot log).

        ``job`` has been validated against this service's settings (:meth:`JobRequest.from_wire`
        on the socket); its owner becomes the caller's account (root's is taken as it is).
        ``slot`` is heeded only from a trusted caller (:attr:`trusted`); anyone else's slot is
        the one its claim names (see :mod:`glite_vm.service.prepare`)."""
        preparer = VmPreparer(self.settings, self.host, self.registry, self.caller)
        return preparer.prepare(
            job,
            scratch_dir=scratch_dir,
            starter_pid=starter_pid,
            slot=slot,
            cancel=cancel,
            progress=progress,
            started=started,
        )

    # -- the other calls ---------------------------------------------------------------------

    def push(self, vm: str, src_dir: str) -> int:
        record = self._usable(vm)
        src = _absolute("src_dir", src_dir)
        with record.io_lock:
            written = sandbox.pack_as(self.caller.identity, record.vm.xfer, src)
            record.vm.unpack_pushed(written)
        return written

    def exec(
        self,
        vm: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> ExecOutcome:
        """Run ``argv`` in the guest as the guest user; ``cancel`` and ``timeout`` stop waiting
        (the VM's teardown stops the payload)."""
        record = self._usable(vm)
        _check_command(argv, env)
        with record.io_lock:
            result = record.vm.run(
                list(argv),
                env=dict(env) if env else None,
                stdout=stdout,
                stderr=stderr,
                cancel=cancel,
                timeout=timeout,
            )
        self.registry.persist(record)
        record.debug.payload_failed = result.exit_code != 0 or result.signal is not None
        return ExecOutcome(result.exit_code, result.signal, result.seconds)

    def pull(self, vm: str, dest_dir: str, *, unchanged_from: str | None = None) -> list[str]:
        record = self._usable(vm)
        dest = _absolute("dest_dir", dest_dir)
        before = _absolute("unchanged_from", unchanged_from) if unchanged_from else None
        with record.io_lock:
            record.vm.pack_for_pull()
            files, refused = sandbox.unpack_as(self.caller.identity, record.vm.xfer, dest, before)
        for problem in refused:
            log.info("%s: not copied out: %s", vm, problem)
        return files

    def shell(
        self,
        vm: str,
        terminal: ShellTerminal,
        *,
        argv: Sequence[str] | None = None,
        term: str = DEFAULT_TERM,
        rows: int = 24,
        cols: int = 80,
        interactive: bool = True,
        cancel: threading.Event | None = None,
    ) -> ShellOutcome:
        """A terminal in the guest as the job's guest user (root only for a root job), joined
        to ``terminal`` until the session ends: the login shell in the job's working
        directory, or the one command ``argv``. ``interactive``: a person types (echo, CR
        before LF); else input comes from a pipe and output goes out as written."""
        record = self._usable(vm)
        if argv is not None:
            _check_command(argv, None)
        return run_shell(
            record.vm,
            record.vm.guest_user,
            list(argv) if argv is not None else None,
            terminal,
            term=term,
            rows=rows,
            cols=cols,
            interactive=interactive,
            cancel=cancel,
        )

    def console(self, vm: str) -> ConsoleInfo:
        """Where the running VM's serial console is recorded, for its owner to follow."""
        record = self._usable(vm, booting=True)
        return ConsoleInfo(
            vm=record.name, boot_log_path=str(record.vm.boot_log), running=record.running()
        )

    def teardown(self, vm: str, *, failed: bool) -> TeardownOutcome:
        self.registry.ensure_connection()
        entry = self._own(vm)
        if isinstance(entry, FinishedVm):
            return entry.outcome
        outcome = self.registry.teardown(entry, failed=failed)
        log.info("tore down %s of uid %d (failed=%s)", vm, entry.owner_uid, failed)
        return outcome

    # -- the debug hold (glite_vm.service.debug_hold) ------------------------------------------

    def debug_hold(self, vm: str) -> DebugHold:
        """Keep ``vm`` running after its payload failed, as long as the site granted its job's
        ``GliteVmDebugHold``; the answer says until when, or why not."""
        record = self._usable(vm)
        until, note, started = record.debug.start(time.time())
        job, uid = record.vm.request.job_id, record.owner_uid
        if started:
            seconds = record.debug.grant.seconds
            reason = f"its payload failed; kept running for {seconds} s" + (
                f" ({note})" if note else ""
            )
            log.info("%s of uid %d: %s", vm, uid, reason)
            self.registry.events.record(events.DEBUG_HELD, vm, job=job, uid=uid, reason=reason)
        elif until is None and record.debug.grant.note and record.debug.payload_failed:
            self.registry.events.record(events.DEBUG_NOT_HELD, vm, job=job, uid=uid, reason=note)
        return DebugHold(vm=vm, until=until, note=note)

    def debug_wait(self, vm: str, *, cancel: threading.Event | None = None) -> DebugHoldEnd:
        """Wait while ``vm`` is held (at once when it is not); why the hold ended."""
        entry = self._own(vm)
        if isinstance(entry, FinishedVm):
            return DebugHoldEnd(vm=vm, reason=debug_hold.TORN_DOWN)
        was_held = entry.debug.held
        reason = entry.debug.wait(cancel)
        if was_held and reason in (debug_hold.EXPIRED, debug_hold.STOPPED):
            self._note_hold_ended(entry, reason)
        return DebugHoldEnd(vm=vm, reason=reason)

    def debug_release(self, vm: str) -> DebugHoldEnd:
        """End ``vm``'s debug hold now (the VM's owner or root): its job then ends as it would
        have without the hold."""
        entry = self._own(vm)
        if isinstance(entry, FinishedVm) or not entry.debug.end(debug_hold.RELEASED):
            raise RequestError(
                "vm", f"{vm} is not held for debugging (its job asked for no hold, or it ended)"
            )
        self._note_hold_ended(entry, debug_hold.RELEASED)
        return DebugHoldEnd(vm=vm, reason=debug_hold.RELEASED)

    def _note_hold_ended(self, record: VmRecord, reason: str) -> None:
        log.info("the debug hold of %s ended: %s", record.name, reason)
        self.registry.events.record(
            events.DEBUG_HOLD_ENDED,
            record.name,
            job=record.vm.request.job_id,
            uid=record.owner_uid,
            reason=reason,
        )

    def list_vms(self) -> list[VmSummary]:
        now = time.time()
        return [
            VmSummary(
                vm=r.name,
                owner=r.owner,
                owner_uid=r.owner_uid,
                job_id=r.vm.request.job_id,
                image=r.vm.image.name,
                age_seconds=round(max(0.0, now - r.created), 3),
                running=r.running(),
                scratch_dir=r.scratch_dir,
            )
            for r in sorted(self.registry.active(), key=lambda r: r.created)
            if self.caller.sees(r.owner_uid)
        ]

    def reap(self) -> list[ReapedVm]:
        """One reaper pass now (anyone may ask: it only applies the reaper's rules)."""
        return [r for r in self.registry.reap_once() if self.caller.sees(r.owner_uid)]

    def ping(self) -> ServiceInfo:
        return ServiceInfo(
            protocol=protocol.VERSION,
            version=__version__,
            pid=os.getpid(),
            uptime_seconds=round(time.monotonic() - self.registry.started, 3),
            caller_uid=self.caller.uid,
            vms=sum(1 for r in self.registry.active() if self.caller.sees(r.owner_uid)),
        )

    # -- ownership ---------------------------------------------------------------------------

    def _own(self, name: str) -> VmRecord | FinishedVm:
        if not isinstance(name, str) or not name:
            raise RequestError("vm", "must name a VM")
        entry = self.registry.get(name)
        if entry is None or not self.caller.sees(entry.owner_uid):
            # The same answer for someone else's VM and for none at all: names are not probed.
            raise AccessDeniedError(
                f"no VM named {name!r} belongs to uid {self.caller.uid}: a VM can only be "
                "used by the user whose job it serves"
            )
        return entry

    def _usable(self, name: str, *, booting: bool = False) -> VmRecord:
        """The caller's live VM ``name``, ready for use (``booting``: or still being prepared,
        for the console that shows its boot)."""
        self.registry.ensure_connection()
        entry = self._own(name)
        if isinstance(entry, FinishedVm):
            why = f" ({entry.reason})" if entry.reason else ""
            raise HostError(f"the VM {name} was already torn down{why}")
        if entry.state_lost:
            raise HostError(
                f"the service restarted without the state of {name}, or before {name} was "
                "ready; it can only be torn down"
            )
        if entry.booting and not booting:
            # Nothing of the owner's runs before the guest is set up: a warm-started clone is
            # not yet refreshed (the template's clock, machine id and RNG), the account may
            # not exist yet.
            raise HostError(
                f"the VM {name} is still being prepared; use it once its prepare has returned"
            )
        return entry


# -- helpers ---------------------------------------------------------------------------------


def _check_command(argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    if isinstance(argv, str) or not argv:
        raise RequestError("command", "must be a non-empty list of arguments")
    size = 0
    for arg in argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise RequestError("command", "arguments must be strings without NUL characters")
        size += len(arg)
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise RequestError("environment", "names and values must be strings")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise RequestError("environment", f"{key!r} is not a valid variable name")
        size += len(key) + len(value)
    if size > MAX_ARGV_BYTES:
        raise RequestError("command", f"arguments and environment exceed {MAX_ARGV_BYTES} bytes")


def _absolute(field: str, path: str) -> Path:
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise RequestError(field, f"{path!r} is not an absolute path")
    return Path(path)
