"""One ``shell`` session: the user's terminal joined to a terminal in their job's guest.

The guest's side is :mod:`glite_vm.vm.guest_shell` (a session on the VM's second serial port,
started, resized and ended through the agent); the host's side of that port is a Unix socket
in a directory only the service can enter (:mod:`glite_vm.vm.shell_port`), which the service
connects to itself. :func:`run_shell` moves the bytes between that socket and the user's
:class:`~glite_vm.service.api.ShellTerminal` until the session ends.

Invariants. One session per VM at a time (:data:`SESSIONS` is taken without waiting): a second
is refused at once, never queued. What the user sends is bounded per message
(:mod:`glite_vm.service.protocol`) and written to the guest before the next message is read,
so a user who types faster than the guest reads waits (and still notices a hang-up, a stop or
a teardown meanwhile). Window sizes are applied at most every :data:`RESIZE_INTERVAL` seconds
(the last one wins). A teardown never waits for a shell: :meth:`_Sessions.end` only shuts the
session's socket down, and the session ends with an error that says its VM was torn down.
However else the session ends (the command exits, the user hangs up, the service stops), the
guest's terminal is hung up before the call returns, so nothing of the session keeps reading
keys meant for the next one.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import libvirt

from glite_vm.errors import AgentError, HostError, RequestError, ServiceUnavailableError
from glite_vm.service.api import ShellOutcome, ShellTerminal
from glite_vm.vm import guest_shell, shell_port
from glite_vm.vm.guest_text import guest_text
from glite_vm.vm.lifecycle import Vm

log = logging.getLogger(__name__)

STATUS_INTERVAL = 0.5  # seconds between looks at whether the session's process ended
RESIZE_INTERVAL = 0.2  # seconds between two window-size changes applied to the guest
DRAIN_SECONDS = 1.0  # at most this long for the last output after the session ended
STOP_WAIT = 10.0  # seconds an agent failure may take to turn out to be the VM stopping
OUTPUT_CHUNK = 16 << 10  # bytes of the guest's output read (and sent on) at once


class _Slot:
    """One VM's open session, as a teardown sees it: its connection, once made."""

    def __init__(self) -> None:
        self.ended = threading.Event()  # the VM is being torn down: the session must go
        self.why: str | None = None  # why, when the service tore it down unasked (reaped)
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None

    def attach(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
        if self.ended.is_set():
            self.end()

    def end(self, why: str | None = None) -> None:
        """End the session without waiting for it: its socket is shut down (the output
        reader sees end-of-file, a blocked write fails) and the session raises, saying ``why``
        when the service tears the VM down unasked."""
        if why is not None and self.why is None:
            self.why = why
        self.ended.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _Sessions:
    """The VMs that have a shell open (one each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, _Slot] = {}

    @contextlib.contextmanager
    def hold(self, vm: str) -> Iterator[_Slot]:
        slot = _Slot()
        with self._lock:
            if vm in self._open:
                raise RequestError(
                    "vm",
                    f"{vm} already has a shell open; a VM has one at a time (end that one "
                    "first, or run several in it with tmux or screen where the image has them)",
                )
            self._open[vm] = slot
        try:
            yield slot
        finally:
            with self._lock:
                self._open.pop(vm, None)

    def end(self, vm: str, why: str | None = None) -> bool:
        """End ``vm``'s session, if it has one, without waiting (a teardown calls this before
        it destroys the domain, with ``why`` when it reaps the VM); whether there was one."""
        with self._lock:
            slot = self._open.get(vm)
        if slot is not None:
            slot.end(why)
        return slot is not None


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
    with SESSIONS.hold(vm.name) as slot:
        path = vm.shell_socket or shell_port.socket_of_domain(vm.host.settings, vm.domain)
        if path is None:
            raise HostError(
                f"{vm.name} has no shell port; it was started by a glite-vm without one"
            )
        sock = shell_port.connect(path, vm.name)
        slot.attach(sock)
        pump = _OutputPump(sock, terminal)
        pump.start()
        agent = vm.agent
        started = time.monotonic()
        exit_code: int | None = None
        try:
            pid = guest_shell.start_session(
                agent, user, argv, term=term, rows=rows, cols=cols, interactive=interactive
            )
            terminal.ready()
            exit_code = _relay(vm, pid, sock, terminal, pump, slot=slot, cancel=cancel)
        except (AgentError, HostError) as exc:
            if slot.ended.is_set():
                raise _torn_down(vm, slot) from exc
            raise
        finally:
            if exit_code is None and not slot.ended.is_set():
                # the user or the service ended it: so must the guest
                with contextlib.suppress(AgentError):
                    guest_shell.hang_up(agent)
            elif exit_code is not None:
                pump.drained(DRAIN_SECONDS)
            pump.stop()
            sock.close()
        if exit_code is None and cancel is not None and cancel.is_set():
            raise ServiceUnavailableError(
                "the glite-vm service is stopping: the shell session was ended (the VM runs "
                "on; open a new shell once the service is back)"
            )
        return ShellOutcome(exit_code=exit_code, seconds=round(time.monotonic() - started, 3))


def _torn_down(vm: Vm, slot: _Slot) -> HostError:
    if slot.why is not None:  # the reaper's reason: the user learns why, not just that
        return HostError(f"the VM {vm.name} was torn down during the shell session: {slot.why}")
    return HostError(f"the VM {vm.name} was torn down during the shell session (its job ended)")


def _stopped(vm: Vm) -> HostError:
    return HostError(f"the VM {vm.name} stopped during the shell session")


def _relay(
    vm: Vm,
    pid: int,
    sock: socket.socket,
    terminal: ShellTerminal,
    pump: _OutputPump,
    *,
    slot: _Slot,
    cancel: threading.Event | None,
) -> int | None:
    """Keys to the guest until the session's process exits (its status) or the user or
    ``cancel`` ends it (``None``); raises when the VM stops or is torn down meanwhile."""
    agent = vm.agent
    next_status = time.monotonic() + STATUS_INTERVAL
    size: tuple[int, int] | None = None
    next_resize = 0.0

    def stopped() -> bool:
        return slot.ended.is_set() or pump.ended.is_set() or bool(cancel and cancel.is_set())

    while cancel is None or not cancel.is_set():
        if slot.ended.is_set():
            raise _torn_down(vm, slot)
        events = terminal.events(0.1)
        if events is None or pump.gone.is_set():
            return None  # the user hung up
        for kind, value in events:
            if kind == "in" and isinstance(value, bytes):
                _send_all(sock, value, vm.name, stopped)
            elif kind == "size" and isinstance(value, tuple):
                guest_shell.check_size(*value)
                size = value
        now = time.monotonic()
        if size is not None and now >= next_resize:
            guest_shell.resize(agent, *size)
            size, next_resize = None, now + RESIZE_INTERVAL
        if pump.ended.is_set() or now >= next_status:
            next_status = now + STATUS_INTERVAL
            if pump.ended.is_set() and not _active(vm):  # its port closed: QEMU is gone
                raise _stopped(vm)
            try:
                status = agent.status(pid)
            except AgentError as exc:
                if _going(vm):  # stopped before its port's end was seen
                    raise _stopped(vm) from exc
                raise
            if status.exited:
                if status.stderr.strip():  # the start script's complaint; the session's
                    # own stderr went to its terminal
                    raise AgentError(
                        "the shell could not start in the guest: " + guest_text(status.stderr)
                    )
                if status.signal is not None:
                    return 128 + status.signal
                return status.exitcode
    return None


def _send_all(sock: socket.socket, data: bytes, name: str, stopped: Callable[[], bool]) -> None:
    """Write ``data`` to the shell port as the guest takes it, until ``stopped()``."""
    view = memoryview(data)
    poller = select.poll()  # not select: descriptors of a busy service pass 1024
    poller.register(sock.fileno(), select.POLLOUT)
    while view and not stopped():
        if not poller.poll(200):
            continue
        try:
            sent = sock.send(view, socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError as exc:
            raise HostError(f"the shell port of {name} closed: {exc}") from exc
        view = view[sent:]


def _going(vm: Vm, wait: float = STOP_WAIT) -> bool:
    """Whether ``vm`` stops within ``wait`` seconds (libvirt refuses agent commands as soon as
    a destroy begins, and calls the domain inactive only once it ended)."""
    deadline = time.monotonic() + wait
    while _active(vm):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


def _active(vm: Vm) -> bool:
    try:
        return vm.domain is not None and bool(vm.domain.isActive())
    except libvirt.libvirtError:
        return False


class _OutputPump:
    """The guest terminal's output, read from the shell port by a thread of its own and
    handed to the user as it comes."""

    def __init__(self, sock: socket.socket, terminal: ShellTerminal) -> None:
        self.sock = sock
        self.terminal = terminal
        self.ended = threading.Event()  # the port closed (the VM stopped, or it was shut down)
        self.gone = threading.Event()  # the user can no longer be told anything
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="shell-output", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                data = self.sock.recv(OUTPUT_CHUNK)
                if not data:
                    return
                self._last = time.monotonic()
                if not self.terminal.output(data):
                    self.gone.set()
                    return
        except OSError:
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
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(timeout=5)


__all__ = ["SESSIONS", "run_shell"]
