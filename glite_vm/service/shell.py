"""One ``shell`` session: the user's terminal joined to a terminal in their job's guest.

The guest's side is :mod:`glite_vm.vm.guest_shell` (a session on the VM's second serial port,
started, resized and ended through the agent); the host's side of that port is a pty that
libvirt's console stream attaches to (``virDomainOpenConsole``, what ``virsh console`` uses,
:data:`~glite_vm.vm.domain_xml.SHELL_SERIAL`). :func:`run_shell` moves the bytes between that
stream and the user's :class:`~glite_vm.service.api.ShellTerminal` until the session ends.

Invariants. One session per VM at a time (:data:`SESSIONS` is taken without waiting; libvirt's
console stream is exclusive too): a second is refused at once, never queued. What the user
sends is bounded per message (:mod:`glite_vm.service.protocol`) and written to the guest before
the next message is read, so a user who types faster than the guest reads waits. Window sizes
are applied at most every :data:`RESIZE_INTERVAL` seconds (the last one wins). However the
session ends (the command exits, the user hangs up, the VM stops, the service stops), the
guest's terminal is hung up before the call returns, so nothing of the session keeps reading
keys meant for the next one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence

import libvirt

from glite_vm.errors import AgentError, HostError, RequestError
from glite_vm.service.api import ShellOutcome, ShellTerminal
from glite_vm.vm import guest_shell
from glite_vm.vm.domain_xml import SHELL_SERIAL
from glite_vm.vm.lifecycle import Vm

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.5  # seconds between looks at whether the session's process ended
RESIZE_INTERVAL = 0.2  # seconds between two window-size changes applied to the guest
DRAIN_SECONDS = 1.0  # at most this long for the last output after the session ended
OUTPUT_CHUNK = 16 << 10  # bytes of the guest's output read (and sent on) at once


class _Sessions:
    """The VMs that have a shell open (one each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: set[str] = set()

    @contextlib.contextmanager
    def hold(self, vm: str) -> Iterator[None]:
        with self._lock:
            if vm in self._open:
                raise RequestError(
                    "vm",
                    f"{vm} already has a shell open; a VM has one at a time (end that one "
                    "first, or run several in it with tmux or screen where the image has them)",
                )
            self._open.add(vm)
        try:
            yield None
        finally:
            with self._lock:
                self._open.discard(vm)


SESSIONS = _Sessions()


def run_shell(
    vm: Vm,
    user: str,
    argv: Sequence[str] | None,
    terminal: ShellTerminal,
    *,
    term: str,
    rows: int,
    cols: int,
    interactive: bool,
    cancel: threading.Event | None = None,
) -> ShellOutcome:
    """A session as ``user`` in ``vm`` (``argv``: one command, else the login shell), joined
    to ``terminal`` until it ends; ``cancel`` ends it early (the service stops)."""
    guest_shell.check_terminal(term, rows, cols)
    if vm.domain is None:
        raise HostError(f"{vm.name} has no domain")
    with SESSIONS.hold(vm.name):
        stream = _open_console(vm)
        pump = _OutputPump(stream, terminal)
        pump.start()
        agent = vm.agent
        started = time.monotonic()
        pid: int | None = None
        exit_code: int | None = None
        try:
            pid = guest_shell.start_session(
                agent, user, argv, term=term, rows=rows, cols=cols, interactive=interactive
            )
            terminal.ready()
            exit_code = _relay(vm, pid, stream, terminal, pump, cancel=cancel)
        finally:
            if exit_code is None:  # the user, the VM or the service ended it: so must the guest
                with contextlib.suppress(AgentError):
                    guest_shell.hang_up(agent)
            else:
                pump.drained(DRAIN_SECONDS)
            pump.stop()
        return ShellOutcome(exit_code=exit_code, seconds=round(time.monotonic() - started, 3))


def _open_console(vm: Vm) -> libvirt.virStream:
    assert vm.domain is not None
    stream = vm.host.conn.newStream(0)
    try:
        vm.domain.openConsole(SHELL_SERIAL, stream, 0)
    except libvirt.libvirtError as exc:
        with contextlib.suppress(libvirt.libvirtError):
            stream.abort()
        message = str(exc)
        if "Active console session" in message:
            raise RequestError("vm", f"{vm.name} already has a shell open") from None
        raise HostError(
            f"{vm.name} has no shell port ({message}); it was started by a glite-vm "
            "without `glite-vm shell`"
        ) from exc
    return stream


def _relay(
    vm: Vm,
    pid: int,
    stream: libvirt.virStream,
    terminal: ShellTerminal,
    pump: _OutputPump,
    *,
    cancel: threading.Event | None,
) -> int | None:
    """Keys to the guest until the session's process exits (its status) or the user, the VM
    or ``cancel`` ends it (``None``)."""
    agent = vm.agent
    next_status = time.monotonic() + STATUS_INTERVAL
    size: tuple[int, int] | None = None
    next_resize = 0.0
    while cancel is None or not cancel.is_set():
        events = terminal.events(0.1)
        if events is None or pump.gone.is_set():
            return None  # the user hung up
        for kind, value in events:
            if kind == "in" and isinstance(value, bytes):
                _send_all(stream, value, vm.name)
            elif kind == "size" and isinstance(value, tuple):
                guest_shell.check_size(*value)
                size = value
        now = time.monotonic()
        if size is not None and now >= next_resize:
            guest_shell.resize(agent, *size)
            size, next_resize = None, now + RESIZE_INTERVAL
        if pump.ended.is_set() or now >= next_status:
            next_status = now + STATUS_INTERVAL
            status = agent.status(pid)
            if status.exited:
                if status.stderr.strip():  # the start script's complaint; the session's
                    # own stderr went to its terminal
                    raise AgentError(
                        "the shell could not start in the guest: "
                        + status.stderr.decode(errors="replace").strip()[:500]
                    )
                if status.signal is not None:
                    return 128 + status.signal
                return status.exitcode
            if pump.ended.is_set() and not _active(vm):
                raise HostError(f"the VM {vm.name} stopped during the shell session")
    return None


def _send_all(stream: libvirt.virStream, data: bytes, name: str) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = stream.send(bytes(view))
        except libvirt.libvirtError as exc:
            raise HostError(f"the shell port of {name} closed: {exc}") from exc
        if not isinstance(sent, int) or sent <= 0:
            raise HostError(f"the shell port of {name} closed")
        view = view[sent:]


def _active(vm: Vm) -> bool:
    try:
        return vm.domain is not None and bool(vm.domain.isActive())
    except libvirt.libvirtError:
        return False


class _OutputPump:
    """The guest terminal's output, read from the console stream by a thread of its own and
    handed to the user as it comes."""

    def __init__(self, stream: libvirt.virStream, terminal: ShellTerminal) -> None:
        self.stream = stream
        self.terminal = terminal
        self.ended = threading.Event()  # the stream ended (the VM stopped, or it was aborted)
        self.gone = threading.Event()  # the user can no longer be told anything
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="shell-output", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self.stream.recv(OUTPUT_CHUNK)
                if not isinstance(data, bytes) or not data:
                    return
                self._last = time.monotonic()
                if not self.terminal.output(data):
                    self.gone.set()
                    return
        except libvirt.libvirtError:
            return
        finally:
            self.ended.set()

    def drained(self, limit: float) -> None:
        """Wait (at most ``limit`` seconds) until the output has been quiet for a moment."""
        now = time.monotonic()
        deadline = now + limit
        while now < deadline and not self.ended.is_set():
            if now - max(self._last, deadline - limit) > 0.2:
                return
            time.sleep(0.05)
            now = time.monotonic()

    def stop(self) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self.stream.abort()
        self._thread.join(timeout=5)


__all__ = ["SESSIONS", "run_shell"]
