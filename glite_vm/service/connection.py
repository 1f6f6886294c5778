"""One connection to the service: who is at the other end, its request, its replies, and the
watch on its client.

Invariants. The caller is who ``SO_PEERCRED`` (pid, uid, gid) and ``SO_PEERGROUPS`` say, as the
kernel recorded them at ``connect()`` (:func:`peer_of`); nothing the client sends can change who
it is. A request is one line that must arrive whole within :data:`REQUEST_TIMEOUT` seconds,
however slowly it trickles in, and within :data:`~glite_vm.service.protocol.MAX_REQUEST` bytes
(:func:`read_request`). While a call runs, :meth:`Call.watch` sends a heartbeat every
:data:`~glite_vm.service.protocol.HEARTBEAT_SECONDS` and notices the client hanging up, which
sets :attr:`Call.cancel`; replies are sent whole, one at a time, and none after the client went.
A ``shell`` call has no watch: its :class:`ShellLink` reads what the client sends after the
request (bounded lines, :func:`~glite_vm.service.protocol.shell_input`) and sends the heartbeats.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from glite_vm.errors import ServiceUnavailableError
from glite_vm.service import protocol

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python 3.11 lacks the name
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its whole request line, however slowly
MAX_PEER_GROUPS = 256  # what fits the 1024-byte getsockopt buffer Python allows


@dataclasses.dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it at connect()."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None  # None: the kernel could not say


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    groups: tuple[int, ...] | None
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_PEER_GROUPS)
        groups = struct.unpack(f"{len(data) // 4}I", data[: len(data) // 4 * 4])
    except OSError:
        groups = None  # too many groups, or an old kernel: the user database will say
    return Peer(pid, uid, gid, groups)


class Call:
    """One connection's replies (thread-safe) and the watch on its client. ``rest``: what
    the client sent after its request line (only a ``shell`` client may send more)."""

    def __init__(self, conn: socket.socket, rest: bytes = b"") -> None:
        self.conn = conn
        self.rest = rest
        self.cancel = threading.Event()
        self.gone = False
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def finish(self) -> None:
        """The call returned: stop the watcher at once."""
        self._done.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def send(self, message: Mapping[str, Any]) -> bool:
        data = protocol.encode(message)
        with self._lock:
            if self.gone:
                return False
            try:
                self.conn.sendall(data)
            except OSError:
                self._hung_up()
                return False
        return True

    def sink(self, stream: str) -> Callable[[bytes], None]:
        def deliver(data: bytes) -> None:
            self.send({"out": stream, "data": base64.b64encode(data).decode()})

        return deliver

    def watch(self) -> None:
        """Heartbeats while the call runs; notice a client that hung up."""
        last_beat = time.monotonic()
        # poll, not select: with hundreds of calls the descriptors pass select's limit of 1024
        poller = select.poll()
        try:
            poller.register(self.conn.fileno(), select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
        except (OSError, ValueError):
            return
        while not self._done.is_set():
            wait = max(0.0, last_beat + protocol.HEARTBEAT_SECONDS - time.monotonic())
            try:
                events_ready = poller.poll(wait * 1000)
            except OSError:
                return
            if self._done.is_set():
                return
            if any(fd == self.conn.fileno() for fd, _mask in events_ready):
                try:
                    data = self.conn.recv(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    data = b"?"
                except OSError:
                    data = b""
                if not data:
                    self._hung_up()
                    return
                # Bytes after the request mean nothing in this protocol version: dropped.
            if time.monotonic() - last_beat >= protocol.HEARTBEAT_SECONDS:
                last_beat = time.monotonic()
                if not self.send({"beat": True}):
                    return

    def _hung_up(self) -> None:
        self.gone = True
        self.cancel.set()


class ShellLink:
    """The user's end of a ``shell`` session: a :class:`~glite_vm.service.api.ShellTerminal`
    over a call's connection (the protocol's ``ready``, ``out`` and input lines)."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self._buffer = bytearray(call.rest)
        self._eof = False
        self._last_beat = time.monotonic()

    def ready(self) -> None:
        self.call.send({"ready": True})

    def output(self, data: bytes) -> bool:
        return self.call.send({"out": "tty", "data": base64.b64encode(data).decode()})

    def events(self, timeout: float) -> list[tuple[str, bytes | tuple[int, int]]] | None:
        if self.call.gone or self.call.cancel.is_set():
            return None
        if time.monotonic() - self._last_beat >= protocol.HEARTBEAT_SECONDS:
            self._last_beat = time.monotonic()
            if not self.call.send({"beat": True}):
                return None
        if b"\n" not in self._buffer and not self._eof:
            self._receive(timeout)
        found: list[tuple[str, bytes | tuple[int, int]]] = []
        while b"\n" in self._buffer:
            end = self._buffer.index(b"\n")
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            found.append(protocol.shell_input(line))
        if len(self._buffer) > protocol.MAX_SHELL_LINE:
            raise protocol.ProtocolError(
                f"a shell input line is longer than {protocol.MAX_SHELL_LINE} bytes"
            )
        if self._eof and not found:
            self.call.gone = True
            return None
        return found

    def _receive(self, timeout: float) -> None:
        poller = select.poll()  # not select: descriptors of a busy service pass 1024
        try:
            poller.register(self.call.conn.fileno(), select.POLLIN)
            ready = poller.poll(timeout * 1000)
        except (OSError, ValueError):
            self._eof = True
            return
        if not ready:
            return
        try:
            data = self.call.conn.recv(protocol.MAX_SHELL_LINE, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._eof = True
        self._buffer += data


def read_request(conn: socket.socket) -> tuple[str, dict[str, Any], bytes]:
    """The request line (its operation and arguments), which must arrive whole within
    :data:`REQUEST_TIMEOUT` seconds from now (however it trickles in) and within
    :data:`~glite_vm.service.protocol.MAX_REQUEST` bytes; and what came after it."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    buffer = bytearray()
    while b"\n" not in buffer:
        if len(buffer) > protocol.MAX_REQUEST:
            raise protocol.ProtocolError(
                f"the request is longer than the protocol allows ({protocol.MAX_REQUEST} bytes)"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise protocol.ProtocolError(
                f"no whole request arrived within {REQUEST_TIMEOUT:g} s; the call is dropped"
            )
        conn.settimeout(left)
        try:
            data = conn.recv(1 << 20)
        except TimeoutError:
            continue
        if not data:
            raise protocol.ProtocolError("the connection closed before a whole request arrived")
        buffer += data
    end = buffer.index(b"\n")
    line = bytes(buffer[:end])
    rest = bytes(buffer[end + 1 :])
    message = protocol.decode_request(line)
    op = message.get("op")
    args = message.get("args", {})
    if op not in protocol.OPS:
        raise protocol.ProtocolError(f"unknown operation {op!r}")
    if not isinstance(args, dict):
        raise protocol.ProtocolError("the request's args must be an object")
    return str(op), args, rest


def refuse(conn: socket.socket, message: str) -> None:
    """Answer a call the service will not take (busy) with ``message``, and close it."""
    with conn:
        conn.settimeout(1.0)
        error = protocol.error_to_wire(ServiceUnavailableError(message))
        with contextlib.suppress(OSError):
            conn.sendall(protocol.encode({"ok": False, "error": error}))


__all__ = ["REQUEST_TIMEOUT", "Call", "Peer", "ShellLink", "peer_of", "read_request", "refuse"]
