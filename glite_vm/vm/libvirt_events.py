"""libvirt's event loop, so that a boot watcher is woken by its domain's events.

libvirt delivers domain events only to a process that registered an event implementation
*before* it opened its connections, and that keeps running that implementation in a loop.
Both are process-wide by libvirt's design (there is no per-connection loop and no way to
unregister), so this module is the one place that owns them:

* :func:`start` registers libvirt's default implementation (once per process) and runs it in
  a daemon thread. :func:`glite_vm.session.open_host` calls it before it connects, so every
  connection this library opens carries events.
* :func:`stop` ends the thread (an orderly exit of a long-running process, after its
  connections are closed): once an implementation is registered, libvirt keeps connections
  alive with keepalive messages that only a running loop answers, and libvirtd drops a
  connection whose keepalives go unanswered for about 30 s.
* :class:`DomainEvents` subscribes to one domain's lifecycle events (started, stopped, crashed,
  shut down) and, where libvirt offers it, its guest agent's lifecycle events (the agent's
  channel connected or disconnected), while a ``with`` block runs.

Events only *wake* a waiter early; they never decide anything on their own, so a connection
opened without the loop (one injected by a caller) works the same, only by polling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from types import TracebackType
from typing import Any

import libvirt

log = logging.getLogger(__name__)


class _Loop:
    """The process's one event loop thread (libvirt allows one implementation per process)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.registered = False
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                libvirt.virEventRunDefaultImpl()
            except libvirt.libvirtError as exc:  # libvirt's own failure: keep serving
                log.warning("libvirt event loop: %s", exc)
                time.sleep(0.1)


_LOOP = _Loop()


def start() -> bool:
    """Register libvirt's default event implementation (once per process) and make sure its
    loop runs in a daemon thread. False if libvirt refused (events then stay off)."""
    with _LOOP.lock:
        if _LOOP.thread is not None and _LOOP.thread.is_alive():
            return True
        if not _LOOP.registered:
            try:
                libvirt.virEventRegisterDefaultImpl()
            except libvirt.libvirtError as exc:
                log.debug("no libvirt event loop: %s", exc)
                return False
            _LOOP.registered = True
        _LOOP.stopping.clear()
        _LOOP.thread = threading.Thread(target=_LOOP.run, name="libvirt-events", daemon=True)
        _LOOP.thread.start()
        return True


def stop(timeout: float = 5.0) -> None:
    """End the loop's thread and wait for it (up to ``timeout`` seconds)."""
    with _LOOP.lock:
        thread = _LOOP.thread
        if thread is None:
            return
        _LOOP.stopping.set()
        # A timeout that fires at once wakes the loop from its poll() so it sees the flag.
        timer = libvirt.virEventAddTimeout(0, _noop_timer, None)
        try:
            thread.join(timeout)
        finally:
            libvirt.virEventRemoveTimeout(timer)
        if thread.is_alive():
            log.warning("the libvirt event loop did not stop within %.0f s", timeout)
        else:
            _LOOP.thread = None


def running() -> bool:
    thread = _LOOP.thread
    return thread is not None and thread.is_alive()


def _noop_timer(_timer: int, _opaque: object) -> None:
    return None


@dataclasses.dataclass(frozen=True)
class DomainEvent:
    """One event: ``kind`` "lifecycle" (``event``/``detail``: ``VIR_DOMAIN_EVENT_*``) or
    "agent" (``VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_*`` / ``..._REASON_*``)."""

    kind: str
    event: int
    detail: int
    at: float


class DomainEvents:
    """The events of one domain while the ``with`` block runs.

    :meth:`wait` sleeps until an event arrives or the time is up. Without a running loop
    (:func:`running`) nothing is subscribed and :meth:`wait` simply sleeps.
    """

    def __init__(self, domain: libvirt.virDomain) -> None:
        self.domain = domain
        self.received: list[DomainEvent] = []
        self._wake = threading.Event()
        self._callbacks: list[int] = []
        self._conn: libvirt.virConnect | None = None

    @property
    def subscribed(self) -> bool:
        return bool(self._callbacks)

    def __enter__(self) -> DomainEvents:
        if not running():
            return self
        try:
            self._conn = self.domain.connect()
            self._subscribe(libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, "lifecycle")
            agent_event = getattr(libvirt, "VIR_DOMAIN_EVENT_ID_AGENT_LIFECYCLE", None)
            if agent_event is not None:  # libvirt >= 1.2.11
                self._subscribe(agent_event, "agent")
        except libvirt.libvirtError as exc:
            log.debug("no events for %s: %s", _name(self.domain), exc)
            self._unsubscribe()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._unsubscribe()

    @property
    def agent_connected(self) -> bool:
        """Did the last agent-lifecycle event say the guest opened the agent's channel?"""
        states = [e.event for e in self.received if e.kind == "agent"]
        connected = getattr(libvirt, "VIR_CONNECT_DOMAIN_EVENT_AGENT_LIFECYCLE_STATE_CONNECTED", 1)
        return bool(states) and states[-1] == connected

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True if an event arrived (since the last wait)."""
        woken = self._wake.wait(seconds)
        self._wake.clear()
        return woken

    def _subscribe(self, event_id: int, kind: str) -> None:
        assert self._conn is not None

        def callback(_conn: Any, _dom: Any, event: int, detail: int, _opaque: Any) -> None:
            self.received.append(DomainEvent(kind, event, detail, time.monotonic()))
            self._wake.set()

        self._callbacks.append(
            self._conn.domainEventRegisterAny(self.domain, event_id, callback, None)
        )

    def _unsubscribe(self) -> None:
        while self._callbacks:
            callback_id = self._callbacks.pop()
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.domainEventDeregisterAny(callback_id)


def _name(domain: libvirt.virDomain) -> str:
    try:
        return str(domain.name())
    except libvirt.libvirtError:
        return "?"
