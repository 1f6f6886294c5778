"""The bootstrapper's socket server: who is calling (peer credentials), one call per
connection, heartbeats and streamed output, and the reaper thread.

The socket (mode 0666 in a 0755 directory: every local user may connect) is the only way in.
Each connection's caller is identified by ``SO_PEERCRED`` (pid, uid, gid) and ``SO_PEERGROUPS``
as the kernel recorded them at ``connect()``; nothing the client sends can change who it is.
The call then runs as :class:`~glite_vm.service.local.LocalService` for that caller, over the
one :class:`~glite_vm.service.registry.VmRegistry` of the process.

While a call runs, a watcher thread sends a heartbeat every few seconds and notices the client
hanging up: an ``exec`` whose client is gone stops waiting for the payload, and a ``prepare``
whose result cannot be delivered tears its new VM down again (no one would know its name).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, HostError, ServiceUnavailableError
from glite_vm.request import JobRequest
from glite_vm.service import events, protocol
from glite_vm.service.caller import account_name
from glite_vm.service.claims import Claim, find_claim, process_uids
from glite_vm.service.local import LocalService
from glite_vm.service.registry import VmRegistry
from glite_vm.service.vm_state import VmRecord
from glite_vm.slots import SlotFacts
from glite_vm.vm.lifecycle import VmHost

log = logging.getLogger(__name__)

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13; Python 3.11 lacks the name
REQUEST_TIMEOUT = 10.0  # seconds a client has to send its whole request line, however slowly
SEND_TIMEOUT = 120.0  # seconds one reply line may wait for a client that does not read
SHUTDOWN_GRACE = 10.0  # seconds running calls get to finish when the service stops
MAX_PEER_GROUPS = 256  # what fits the 1024-byte getsockopt buffer Python allows
MAX_CONNECTIONS = 512  # calls served at once; beyond that a caller is told the service is busy
# and each local user but root has at most settings.max_calls_per_user of them, so that one
# user's flood of connections cannot make the service refuse another user's job

T = TypeVar("T")


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


class ServiceServer:
    """Serves :class:`LocalService` calls on a Unix socket until asked to stop."""

    def __init__(
        self,
        settings: Settings,
        host: VmHost,
        registry: VmRegistry,
        socket_path: Path,
    ) -> None:
        self.settings = settings
        self.host = host
        self.registry = registry
        self.socket_path = socket_path
        self._listener: socket.socket | None = None
        self._calls: set[_Call] = set()
        self._calls_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._per_uid: dict[int, int] = {}  # calls running, by caller (guarded by _calls_lock)
        self._stopping = threading.Event()

    # -- socket ------------------------------------------------------------------------------

    def bind(self) -> None:
        """Create the socket (refusing to take over from a service that still answers)."""
        path = self.socket_path
        parent = path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o755)
            parent.chmod(0o755)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise HostError(f"{path} exists and is not a socket; remove it or pick another")
            if _answers(path):
                raise HostError(f"another glite-vm service is already serving at {path}")
            path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(str(path))
            # Every local user may ask; the peer's uid decides what for.
            os.chmod(path, 0o666)  # noqa: S103
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise HostError(f"cannot listen on {path}: {exc}") from exc
        self._listener = listener

    def serve(self, stop: threading.Event) -> None:
        """Accept calls and run the reaper until ``stop`` is set; then close the socket, let
        running calls finish briefly and return. VMs are left running for the next start."""
        if self._listener is None:
            self.bind()
        listener = self._listener
        assert listener is not None
        reaper = threading.Thread(target=self._reap_loop, args=(stop,), name="reaper", daemon=True)
        reaper.start()
        listener.settimeout(0.5)
        log.info("serving on %s", self.socket_path)
        try:
            while not stop.is_set():
                try:
                    conn, _addr = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if stop.is_set():
                        break
                    log.error("accept failed: %s", exc)
                    time.sleep(0.1)
                    continue
                self._threads = [t for t in self._threads if t.is_alive()]
                try:
                    peer = peer_of(conn)
                except OSError as exc:
                    log.warning("cannot identify a caller: %s", exc)
                    conn.close()
                    continue
                refusal = self._admit(peer)
                if refusal is not None:
                    _refuse(conn, refusal)
                    continue
                thread = threading.Thread(target=self._handle, args=(conn, peer), daemon=True)
                thread.start()
                self._threads.append(thread)
        finally:
            self.close()
            self._wind_down()
            reaper.join(timeout=SHUTDOWN_GRACE)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    def _wind_down(self) -> None:
        self._stopping.set()
        with self._calls_lock:
            calls = list(self._calls)
        for call in calls:
            call.cancel.set()  # exec calls stop waiting; their payloads live on with the VMs
        deadline = time.monotonic() + SHUTDOWN_GRACE
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        log.info("stopped; %d VMs left running for the next start", len(self.registry.active()))

    def _reap_loop(self, stop: threading.Event) -> None:
        interval = max(1.0, self.settings.reap_interval)
        while not stop.wait(interval):
            try:
                self.registry.reap_once()
            except GliteVmError as exc:
                # libvirtd down or restarting (noticed at once: the event loop watches the
                # connection); the next pass reconnects
                log.warning("reaper pass failed: %s", exc)
            except Exception:
                log.exception("reaper pass failed")

    # -- one call ----------------------------------------------------------------------------

    def _admit(self, peer: Peer) -> str | None:
        """Count a new call of ``peer``; why it is refused, or ``None``."""
        if len(self._threads) >= MAX_CONNECTIONS:
            return f"the glite-vm service is busy ({MAX_CONNECTIONS} calls)"
        limit = self.settings.max_calls_per_user
        with self._calls_lock:
            running = self._per_uid.get(peer.uid, 0)
            if peer.uid != 0 and running >= limit:
                return (
                    f"uid {peer.uid} already has {running} calls running, the most one user may "
                    f"have at once (GLITE_VM_MAX_CALLS_PER_USER = {limit}); try again later"
                )
            self._per_uid[peer.uid] = running + 1
        return None

    def _handle(self, conn: socket.socket, peer: Peer) -> None:
        try:
            self._handle_call(conn, peer)
        finally:
            with self._calls_lock:
                left = self._per_uid.get(peer.uid, 1) - 1
                if left > 0:
                    self._per_uid[peer.uid] = left
                else:
                    self._per_uid.pop(peer.uid, None)

    def _handle_call(self, conn: socket.socket, peer: Peer) -> None:
        with conn:
            try:
                op, args = _read_request(conn, time.monotonic() + REQUEST_TIMEOUT)
            except (GliteVmError, OSError) as exc:
                if not isinstance(exc, GliteVmError):
                    exc = protocol.ProtocolError(f"no valid request: {exc}")
                conn.settimeout(1.0)  # the answer is small; a client that does not read loses it
                with contextlib.suppress(OSError):
                    conn.sendall(
                        protocol.encode({"ok": False, "error": protocol.error_to_wire(exc)})
                    )
                return
            conn.settimeout(SEND_TIMEOUT)
            call = _Call(conn)
            name = account_name(peer.uid)
            groups = peer.groups
            if groups is None:  # the kernel could not say: the user database's groups
                groups = tuple(os.getgrouplist(name, peer.gid))
            service = LocalService(
                self.settings,
                self.host,
                caller_uid=peer.uid,
                caller_name=name,
                caller_gid=peer.gid,
                caller_groups=groups,
                registry=self.registry,
                over_socket=True,
                claim=_claim_of(peer) if op == "prepare" else None,
            )
            with self._calls_lock:
                self._calls.add(call)
            if self._stopping.is_set():
                call.cancel.set()
            watcher = threading.Thread(target=call.watch, daemon=True)
            watcher.start()
            started = time.monotonic()
            try:
                result = _dispatch(service, op, args, call)
                reply: dict[str, Any] = {"ok": True, "result": result}
            except Exception as exc:
                if not isinstance(exc, GliteVmError):
                    log.exception("%s for uid %d failed unexpectedly", op, peer.uid)
                if self._stopping.is_set() and op == "exec":
                    exc = ServiceUnavailableError(
                        "the glite-vm service is stopping; the payload may still be running "
                        "in the VM, which the service adopts when it starts again"
                    )
                reply = {"ok": False, "error": protocol.error_to_wire(exc)}
                result = None
            finally:
                call.finish()
                with self._calls_lock:
                    self._calls.discard(call)
            watcher.join()  # before the socket closes: its descriptor number could be reused
            call.close()
            delivered = call.send(reply)
            log.debug(
                "%s by uid %d (pid %d): %s in %.2f s",
                op,
                peer.uid,
                peer.pid,
                "ok" if reply["ok"] else reply["error"]["type"],
                time.monotonic() - started,
            )
            if op == "prepare" and result is not None and not delivered:
                self._undo_prepare(str(result["vm"]))

    def _undo_prepare(self, name: str) -> None:
        entry = self.registry.get(name)
        if isinstance(entry, VmRecord):
            log.warning(
                "the caller of prepare hung up before learning of %s; tearing it down", name
            )
            self.registry.teardown(
                entry,
                failed=True,
                keep_override=False,
                reason="the caller of prepare hung up before learning of it",
                event=events.ABANDONED,
            )


class _Call:
    """One connection's replies (thread-safe) and the watch on its client."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
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


def _read_request(conn: socket.socket, deadline: float) -> tuple[str, dict[str, Any]]:
    """The request line, which must arrive whole by ``deadline`` (however it trickles in) and
    within :data:`~glite_vm.service.protocol.MAX_REQUEST` bytes."""
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
    line = bytes(buffer[: buffer.index(b"\n")])
    message = protocol.decode_request(line)
    op = message.get("op")
    args = message.get("args", {})
    if op not in protocol.OPS:
        raise protocol.ProtocolError(f"unknown operation {op!r}")
    if not isinstance(args, dict):
        raise protocol.ProtocolError("the request's args must be an object")
    return str(op), args


def _dispatch(service: LocalService, op: str, args: dict[str, Any], call: _Call) -> dict[str, Any]:
    if op == "ping":
        return protocol.result_to_wire(service.ping())
    if op == "prepare":
        job = JobRequest.from_wire(_arg(args, "request", dict), service.settings)
        prepared = service.prepare(
            job,
            scratch_dir=_arg(args, "scratch_dir", str),
            starter_pid=_optional(args, "starter_pid", int),
            slot=_slot(args.get("slot")) if service.trusted else None,  # no one else's word
            cancel=call.cancel,
        )
        return protocol.result_to_wire(prepared)
    if op == "push":
        return {"bytes": service.push(_arg(args, "vm", str), _arg(args, "src_dir", str))}
    if op == "exec":
        argv = _arg(args, "argv", list)
        env = _optional(args, "env", dict)
        outcome = service.exec(
            _arg(args, "vm", str),
            argv,
            env=env,
            stdout=call.sink("stdout"),
            stderr=call.sink("stderr"),
            cancel=call.cancel,
        )
        return protocol.result_to_wire(outcome)
    if op == "pull":
        files = service.pull(
            _arg(args, "vm", str),
            _arg(args, "dest_dir", str),
            unchanged_from=_optional(args, "unchanged_from", str),
        )
        return {"files": files}
    if op == "teardown":
        done = service.teardown(_arg(args, "vm", str), failed=bool(args.get("failed", True)))
        return protocol.result_to_wire(done)
    if op == "list_vms":
        return {"vms": [protocol.result_to_wire(v) for v in service.list_vms()]}
    if op == "reap":
        return {"reaped": [protocol.result_to_wire(r) for r in service.reap()]}
    raise protocol.ProtocolError(f"unknown operation {op!r}")


def _slot(data: object) -> SlotFacts | None:
    if data is None:
        return None
    try:
        return SlotFacts.from_wire(data)
    except ValueError as exc:
        raise protocol.ProtocolError(f"argument 'slot': {exc}") from None


def _arg(args: Mapping[str, Any], name: str, kind: type[T]) -> T:
    value = args.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise protocol.ProtocolError(f"argument {name!r} must be a {kind.__name__}")
    return value


def _optional(args: Mapping[str, Any], name: str, kind: type[T]) -> T | None:
    return None if args.get(name) is None else _arg(args, name, kind)


def _claim_of(peer: Peer) -> Claim | None:
    """The HTCondor claim ``peer`` acts for; ``None`` when none, or when its pid no longer
    belongs to it (it exited, and the number may have been given to someone else)."""
    if process_uids(peer.pid)[:1] != (peer.uid,):
        return None
    return find_claim(peer.pid)


def _refuse(conn: socket.socket, message: str) -> None:
    with conn:
        conn.settimeout(1.0)
        error = protocol.error_to_wire(ServiceUnavailableError(message))
        with contextlib.suppress(OSError):
            conn.sendall(protocol.encode({"ok": False, "error": error}))


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


__all__ = ["Peer", "ServiceServer", "peer_of"]
