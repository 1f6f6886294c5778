"""The bootstrapper's socket server: the socket, one thread per call, limits on calls, the
reaper thread and an orderly stop.

The socket (mode 0666 in a 0755 directory: every local user may connect) is the only way in.
Each connection's caller is who the kernel says it is
(:func:`~glite_vm.service.connection.peer_of`); the call then runs as
:class:`~glite_vm.service.local.LocalService` for that caller, over the one
:class:`~glite_vm.service.registry.VmRegistry` of the process
(:func:`~glite_vm.service.dispatch.dispatch`). At most :data:`MAX_CONNECTIONS` calls run at
once, and each local user but root has at most ``max_calls_per_user`` of them.

While a call runs, its :class:`~glite_vm.service.connection.Call` sends heartbeats and notices
the client hanging up: an ``exec`` whose client is gone stops waiting for the payload, and a
``prepare`` whose result cannot be delivered tears its new VM down again (no one would know its
name). Stopping closes the socket and leaves the VMs running for the next start.

Every call is counted in the registry's metrics (:mod:`glite_vm.service.metrics`); where the
settings ask, they are exported (:mod:`glite_vm.service.metrics_export`): the endpoint is bound
with the socket (a service that cannot serve the metrics it was asked for does not start), the
textfile is rewritten at start, after every reaper pass and at stop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any

from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, HostError, ServiceUnavailableError
from glite_vm.service import events, protocol, warm_start
from glite_vm.service.caller import account_name
from glite_vm.service.claims import Claim, find_claim, process_uids
from glite_vm.service.connection import Call, Peer, peer_of, read_request, refuse
from glite_vm.service.dispatch import dispatch
from glite_vm.service.local import LocalService
from glite_vm.service.metrics_export import MetricsExport
from glite_vm.service.registry import VmRegistry
from glite_vm.service.vm_state import VmRecord
from glite_vm.vm.lifecycle import VmHost

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0  # seconds running calls get to finish when the service stops
MAX_CONNECTIONS = 512  # calls served at once; beyond that a caller is told the service is busy
# and each local user but root has at most settings.max_calls_per_user of them, so that one
# user's flood of connections cannot make the service refuse another user's job


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
        self._calls: set[Call] = set()
        self._calls_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._per_uid: dict[int, int] = {}  # calls running, by caller (guarded by _calls_lock)
        self._stopping = threading.Event()
        self.exports = MetricsExport(settings, registry.metrics)

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
        try:
            self.exports.start()  # the admin asked for metrics: no start without them
        except BaseException:
            self.close()
            raise

    def serve(self, stop: threading.Event) -> None:
        """Accept calls and run the reaper until ``stop`` is set; then close the socket, let
        running calls finish briefly and return. VMs are left running for the next start."""
        if self._listener is None:
            self.bind()
        listener = self._listener
        assert listener is not None
        self.exports.write()  # what adoption found, at once
        reaper = threading.Thread(target=self._reap_loop, args=(stop,), name="reaper", daemon=True)
        reaper.start()
        warm_start.build_ahead(self.settings, self.host)  # GLITE_VM_WARM_IMAGES, in the background
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
                    refuse(conn, refusal)
                    continue
                thread = threading.Thread(target=self._handle, args=(conn, peer), daemon=True)
                thread.start()
                self._threads.append(thread)
        finally:
            self.close()
            self._wind_down()
            warm_start.stop_builds()  # a template's VM is nobody's: it does not outlive us
            reaper.join(timeout=SHUTDOWN_GRACE)
            self.exports.write()  # the last word: what the calls that finished did

    def close(self) -> None:
        self.exports.stop()
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
            self.exports.write()

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
                op, args, rest = read_request(conn)
            except (GliteVmError, OSError) as exc:
                if not isinstance(exc, GliteVmError):
                    exc = protocol.ProtocolError(f"no valid request: {exc}")
                self.registry.metrics.note_call("", exc)
                conn.settimeout(1.0)  # the answer is small; a client that does not read loses it
                with contextlib.suppress(OSError):
                    conn.sendall(
                        protocol.encode({"ok": False, "error": protocol.error_to_wire(exc)})
                    )
                return
            conn.settimeout(self.settings.service_send_timeout)
            call = Call(conn, rest)
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
            # A shell's client keeps talking: its link reads the connection and sends the beats.
            watcher = None if op == "shell" else threading.Thread(target=call.watch, daemon=True)
            if watcher is not None:
                watcher.start()
            started = time.monotonic()
            try:
                result = dispatch(service, op, args, call)
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
                self.registry.metrics.note_call(op, exc)
            else:
                self.registry.metrics.note_call(op, None)
            finally:
                call.finish()
                with self._calls_lock:
                    self._calls.discard(call)
            if watcher is not None:
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


def _claim_of(peer: Peer) -> Claim | None:
    """The HTCondor claim ``peer`` acts for; ``None`` when none, or when its pid no longer
    belongs to it (it exited, and the number may have been given to someone else)."""
    if process_uids(peer.pid)[:1] != (peer.uid,):
        return None
    return find_claim(peer.pid)


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


__all__ = ["ServiceServer"]
