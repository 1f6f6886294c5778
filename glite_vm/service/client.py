"""The client side of the glite-vm service: what hooks, the launcher, the CLI and the API use.

:class:`ServiceClient` implements :class:`~glite_vm.service.api.VmService` over the service's
Unix socket (protocol in :mod:`glite_vm.service.protocol`, documented in docs/service.md). Every
wait is bounded: connecting (``connect_timeout``), silence from the service (``idle_timeout``;
the service sends a heartbeat every few seconds while a call runs) and each call as a whole
(``deadlines``, by operation; ``exec`` has none, a payload may run for days). A service that is
missing, dead, hung or too slow raises :class:`~glite_vm.errors.ServiceUnavailableError`, a
requeue-class error; errors the service raised arrive as the same :mod:`glite_vm.errors` class
with the same disposition and message.

Cheap to import (no libvirt, no ClassAd bindings): hooks start it for every job.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import socket
import struct
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from glite_vm.errors import ServiceUnavailableError

if TYPE_CHECKING:
    from glite_vm.request import JobRequest
    from glite_vm.slots import SlotFacts
from glite_vm.service import protocol
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
    TeardownOutcome,
    VmSummary,
)

#: Seconds a whole call may take, by operation (``None``: no bound but the idle timeout).
DEFAULT_DEADLINES: Mapping[str, float | None] = {
    "ping": 30.0,
    "list_vms": 30.0,
    "reap": 300.0,
    # A download may wait for another job's (GLITE_VM_LOCK_TIMEOUT) and then the boot.
    "prepare": 2400.0,
    "push": 3600.0,
    "pull": 3600.0,
    "teardown": 300.0,
    "exec": None,
    "debug_hold": 30.0,
    "debug_release": 30.0,
    "debug_wait": None,  # as long as the hold: bounded by the service (GLITE_VM_MAX_DEBUG_HOLD)
    "console": 30.0,
    "shell": None,  # a session lasts as long as its user likes
}
#: Seconds a shell may take to start in the guest (the agent runs the start script).
SHELL_START_TIMEOUT = 120.0


class ServiceClient:
    """Calls into the glite-vm service. One connection per call; safe to share between threads.

    ``idle_timeout`` must exceed the service's heartbeat interval
    (:data:`~glite_vm.service.protocol.HEARTBEAT_SECONDS`, 5 s) for calls that may run longer
    than it: it bounds how long the client waits without hearing anything.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        connect_timeout: float = 5.0,
        idle_timeout: float = 30.0,
        deadlines: Mapping[str, float | None] | None = None,
    ) -> None:
        self.socket_path = os.fspath(socket_path or protocol.default_socket_path())
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.deadlines = {**DEFAULT_DEADLINES, **(deadlines or {})}

    @classmethod
    def from_settings(cls, settings: Any) -> ServiceClient:
        """A client configured by :class:`glite_vm.config.Settings` (socket path, timeouts)."""
        return cls(
            settings.socket_path,
            connect_timeout=settings.service_connect_timeout,
            idle_timeout=settings.service_idle_timeout,
        )

    # -- the VmService calls -----------------------------------------------------------------

    def ping(self) -> ServiceInfo:
        return protocol.result_from_wire(ServiceInfo, self._call("ping", {}))

    def prepare(
        self,
        job: JobRequest,
        *,
        scratch_dir: str,
        starter_pid: int | None,
        slot: SlotFacts | None = None,
    ) -> PrepareResult:
        """Start ``job``'s VM. ``slot`` counts only when this process is root's: the service
        learns anyone else's slot from the condor_starter it runs under."""
        args = {
            "request": job.to_wire(),
            "scratch_dir": os.fspath(scratch_dir),
            "starter_pid": starter_pid,
            "slot": None if slot is None else dataclasses.asdict(slot),
        }
        return protocol.result_from_wire(PrepareResult, self._call("prepare", args))

    def push(self, vm: str, src_dir: str) -> int:
        result = self._call("push", {"vm": vm, "src_dir": _absolute(src_dir)})
        return int(result["bytes"])

    def exec(
        self,
        vm: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
    ) -> ExecOutcome:
        args = {"vm": vm, "argv": list(argv), "env": dict(env) if env is not None else None}
        sinks = {"stdout": stdout, "stderr": stderr}
        return protocol.result_from_wire(ExecOutcome, self._call("exec", args, sinks=sinks))

    def pull(self, vm: str, dest_dir: str, *, unchanged_from: str | None = None) -> list[str]:
        args = {
            "vm": vm,
            "dest_dir": _absolute(dest_dir),
            "unchanged_from": _absolute(unchanged_from) if unchanged_from else None,
        }
        files = self._call("pull", args)["files"]
        if not isinstance(files, list):
            raise protocol.ProtocolError("malformed pull result from the glite-vm service")
        return [str(f) for f in files]

    def teardown(self, vm: str, *, failed: bool) -> TeardownOutcome:
        result = self._call("teardown", {"vm": vm, "failed": bool(failed)})
        return protocol.result_from_wire(TeardownOutcome, result)

    def debug_hold(self, vm: str) -> DebugHold:
        return protocol.result_from_wire(DebugHold, self._call("debug_hold", {"vm": vm}))

    def debug_wait(self, vm: str) -> DebugHoldEnd:
        """Wait (heartbeats keep the call alive) until the VM's debug hold ends."""
        return protocol.result_from_wire(DebugHoldEnd, self._call("debug_wait", {"vm": vm}))

    def debug_release(self, vm: str) -> DebugHoldEnd:
        return protocol.result_from_wire(DebugHoldEnd, self._call("debug_release", {"vm": vm}))

    def list_vms(self) -> list[VmSummary]:
        vms = self._call("list_vms", {})["vms"]
        return [protocol.result_from_wire(VmSummary, v) for v in vms]

    def reap(self) -> list[ReapedVm]:
        """Ask the service to run one reaper pass now; the VMs it tore down (yours, or all
        for root)."""
        reaped = self._call("reap", {})["reaped"]
        return [protocol.result_from_wire(ReapedVm, r) for r in reaped]

    def console(self, vm: str) -> ConsoleInfo:
        """Where ``vm``'s serial console is recorded (its boot log, which you may read)."""
        return protocol.result_from_wire(ConsoleInfo, self._call("console", {"vm": vm}))

    def open_shell(
        self,
        vm: str,
        *,
        argv: Sequence[str] | None = None,
        term: str = "vt100",
        rows: int = 24,
        cols: int = 80,
        interactive: bool = True,
    ) -> ShellSession:
        """Start a terminal session in ``vm`` (``argv``: one command, else the login shell);
        returns once it runs in the guest. Feed it keys and read its screen with the
        :class:`ShellSession`; the terminal on this side is the caller's business."""
        args = {
            "vm": vm,
            "argv": list(argv) if argv is not None else None,
            "term": term,
            "rows": rows,
            "cols": cols,
            "interactive": interactive,
        }
        request = protocol.encode({"op": "shell", "args": args})
        if len(request) > protocol.MAX_REQUEST:
            raise protocol.ProtocolError("the shell request is larger than the protocol allows")
        sock = self._connect()
        try:
            try:
                sock.sendall(request)
            except OSError as exc:
                raise self._unavailable(f"could not send the shell request: {exc}") from exc
            session = ShellSession(self, sock)
            session._wait_ready(SHELL_START_TIMEOUT)
        except BaseException:
            sock.close()
            raise
        return session

    # -- plumbing ----------------------------------------------------------------------------

    def _call(
        self,
        op: str,
        args: Mapping[str, Any],
        *,
        sinks: Mapping[str, OutputSink | None] | None = None,
    ) -> dict[str, Any]:
        request = protocol.encode({"op": op, "args": args})
        if len(request) > protocol.MAX_LINE:
            raise protocol.ProtocolError(f"the {op} request is larger than the protocol allows")
        bound = self.deadlines.get(op)
        deadline = None if bound is None else time.monotonic() + bound
        sock = self._connect()
        try:
            try:
                sock.settimeout(self.connect_timeout)
                sock.sendall(request)
            except OSError as exc:
                raise self._unavailable(f"could not send the {op} request: {exc}") from exc
            lines = _Lines(sock)
            while True:
                wait = self.idle_timeout
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        raise self._unavailable(f"no result for {op} within {bound:g} s")
                try:
                    line = lines.next(wait)
                except TimeoutError:
                    if deadline is not None and time.monotonic() >= deadline:
                        raise self._unavailable(f"no result for {op} within {bound:g} s") from None
                    raise self._unavailable(
                        f"the service went silent for {wait:.0f} s during {op}"
                    ) from None
                except OSError as exc:
                    raise self._unavailable(f"connection lost during {op}: {exc}") from exc
                if line is None:
                    raise self._unavailable(f"the service closed the connection during {op}")
                message = protocol.decode(line)
                if message.get("beat"):
                    continue
                stream = message.get("out")
                if stream is not None:
                    _deliver(sinks, stream, message.get("data"))
                    continue
                if message.get("ok") is True:
                    result = message.get("result")
                    if not isinstance(result, dict):
                        raise protocol.ProtocolError(f"malformed {op} result from the service")
                    return result
                if message.get("ok") is False:
                    raise protocol.error_from_wire(message.get("error"))
                raise protocol.ProtocolError(f"unexpected message during {op}: {sorted(message)}")
        finally:
            sock.close()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # A blocking connect, bounded by SO_SNDTIMEO: when the service's queue of connections
        # not yet accepted is full (another local user may keep it so), the kernel queues this
        # caller until the service accepts one, instead of failing at once with EAGAIN as a
        # socket with a Python timeout (non-blocking underneath) would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.connect_timeout))
        try:
            sock.connect(self.socket_path)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(0))
            sock.settimeout(self.connect_timeout)
        except BlockingIOError as exc:  # EAGAIN: still full when SO_SNDTIMEO ran out
            sock.close()
            raise self._unavailable(
                f"its queue of connections stayed full for {self.connect_timeout:g} s"
            ) from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise self._unavailable(f"it is not running ({exc.strerror})") from exc
        except TimeoutError as exc:
            sock.close()
            raise self._unavailable(
                f"it did not accept a connection within {self.connect_timeout:g} s"
            ) from exc
        except OSError as exc:
            sock.close()
            raise self._unavailable(f"cannot connect: {exc}") from exc
        return sock

    def _unavailable(self, detail: str) -> ServiceUnavailableError:
        return ServiceUnavailableError(f"glite-vm service at {self.socket_path}: {detail}")


class ShellSession:
    """A running ``shell`` session: keys in (:meth:`send`), the window size (:meth:`resize`),
    the guest terminal's output and the end (:meth:`read`). Select on :meth:`fileno` to wait
    for output. Close it to hang up (the service then ends the session in the guest)."""

    def __init__(self, client: ServiceClient, sock: socket.socket) -> None:
        self._client = client
        self._sock = sock
        self._lines = _Lines(sock)
        self._heard = time.monotonic()
        self.outcome: ShellOutcome | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, keys: bytes) -> None:
        for start in range(0, len(keys), protocol.SHELL_INPUT_CHUNK):
            chunk = keys[start : start + protocol.SHELL_INPUT_CHUNK]
            self._send_line({"in": base64.b64encode(chunk).decode()})

    def resize(self, rows: int, cols: int) -> None:
        self._send_line({"size": [rows, cols]})

    def read(self, timeout: float) -> bytes:
        """The output that arrived within ``timeout`` seconds (``b""``: none yet). Once the
        session ended, :attr:`outcome` is set; an error of the service is raised as its class,
        a vanished or silent service as ServiceUnavailableError."""
        out = bytearray()
        wait = timeout
        while self.outcome is None:
            try:
                line = self._next_line(wait)
            except TimeoutError:
                break
            wait = 0.0
            self._heard = time.monotonic()
            message = protocol.decode(line)
            if message.get("beat") or message.get("ready"):
                continue
            if message.get("out") == "tty":
                out += _chunk(message.get("data"))
                continue
            if message.get("ok") is True:
                self.outcome = protocol.result_from_wire(ShellOutcome, message.get("result"))
            elif message.get("ok") is False:
                raise protocol.error_from_wire(message.get("error"))
            else:
                raise protocol.ProtocolError(f"unexpected message during shell: {sorted(message)}")
        if self.outcome is None and time.monotonic() - self._heard > self._client.idle_timeout:
            raise self._client._unavailable(
                f"the service went silent for {self._client.idle_timeout:.0f} s during shell"
            )
        return bytes(out)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> ShellSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _next_line(self, wait: float) -> bytes:
        """The service's next line within ``wait`` seconds (TimeoutError: none yet); a lost or
        closed connection is ServiceUnavailableError."""
        try:
            line = self._lines.next(wait)
        except TimeoutError:  # an OSError too, but only a quiet moment
            raise
        except OSError as exc:
            raise self._client._unavailable(f"connection lost during shell: {exc}") from exc
        if line is None:
            raise self._client._unavailable("the service closed the connection during shell")
        return line

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = min(deadline - time.monotonic(), self._client.idle_timeout)
            if left <= 0:
                raise self._client._unavailable(f"the shell did not start within {timeout:g} s")
            try:
                line = self._next_line(left)
            except TimeoutError:
                continue
            message = protocol.decode(line)
            if message.get("ready"):
                self._heard = time.monotonic()
                return
            if message.get("beat"):
                continue
            if message.get("ok") is False:
                raise protocol.error_from_wire(message.get("error"))
            raise protocol.ProtocolError(
                f"unexpected message before the shell started: {sorted(message)}"
            )

    def _send_line(self, message: Mapping[str, Any]) -> None:
        try:
            self._sock.settimeout(self._client.idle_timeout)
            self._sock.sendall(protocol.encode(message))
        except OSError as exc:
            raise self._client._unavailable(f"could not send to the shell: {exc}") from exc


def _chunk(data: object) -> bytes:
    if not isinstance(data, str):
        raise protocol.ProtocolError("malformed output message from the service")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise protocol.ProtocolError("malformed output chunk from the service") from None


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _Lines:
    """Lines from a socket, each wait bounded, each line bounded by ``protocol.MAX_LINE``."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()
        self._eof = False

    def next(self, timeout: float) -> bytes | None:
        """The next line without its ``\\n``; ``None`` at the end; TimeoutError when none
        arrives within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > protocol.MAX_LINE:
                raise protocol.ProtocolError("a message from the service is too long")
            if self._eof:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            self._sock.settimeout(remaining)
            data = self._sock.recv(1 << 20)
            if not data:
                self._eof = True
            self._buffer += data


def _deliver(sinks: Mapping[str, OutputSink | None] | None, stream: object, data: object) -> None:
    if stream not in ("stdout", "stderr") or not isinstance(data, str):
        raise protocol.ProtocolError("malformed output message from the service")
    try:
        chunk = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise protocol.ProtocolError("malformed output chunk from the service") from None
    sink = (sinks or {}).get(stream)
    if sink is not None:
        sink(chunk)


def _absolute(path: str | os.PathLike[str]) -> str:
    """The service's working directory is not the caller's: relative paths are made absolute
    here, in the caller's."""
    return os.path.abspath(os.fspath(path))


__all__ = ["DEFAULT_DEADLINES", "ServiceClient", "ShellSession"]
