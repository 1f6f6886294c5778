"""A job's debug hold: its VM kept running after its payload failed, for its owner to look in.

The job asks with ``+GliteVmDebugHold = SECONDS``; the service grants at most
``GLITE_VM_MAX_DEBUG_HOLD`` (:func:`glite_vm.request.grant_debug_hold`, applied when the VM is
prepared). After the payload, the launcher asks for the hold (``debug_hold``), puts its end into
the job ad (``GliteVmDebugUntil``) and waits (``debug_wait``) while the job stays running in
HTCondor. The hold ends when its time runs out, when its owner releases it (``debug_release``,
``glite-vm vms release``), when the VM is torn down (``condor_rm`` and ``condor_vacate_job``
reach the launcher, which tears it down; the reaper when the job is gone), or when the service
stops waiting for it. The launcher then ends as it would have without the hold.

Invariants (:class:`DebugHoldState`): a VM is held at most once, and only after a payload that
failed (a non-zero exit or a signal) with a grant above zero; ``until`` is set only while it is
held; the first end wins and its reason is kept; every wait is bounded by ``until``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from glite_vm.request import DebugHoldGrant
from glite_vm.service.api import DEBUG_HOLD_ENDS

#: Why a hold ended (the contract's names: :data:`glite_vm.service.api.DEBUG_HOLD_ENDS`).
EXPIRED, RELEASED, TORN_DOWN, STOPPED, NOT_HELD = DEBUG_HOLD_ENDS
#: Seconds between looks at a waiting caller's connection.
_POLL = 1.0


class DebugHoldState:
    """The debug hold of one VM (see the module docstring for its invariants)."""

    def __init__(self, grant: DebugHoldGrant | None = None) -> None:
        self.grant = grant or DebugHoldGrant()
        self.payload_failed: bool | None = None  # the last payload's outcome, once one ran
        self.until: float | None = None
        self.ended: str | None = None
        self._started = False
        self._lock = threading.Lock()
        self._end = threading.Event()

    @property
    def held(self) -> bool:
        return self.until is not None

    def start(self, now: float) -> tuple[float | None, str, bool]:
        """Hold the VM if the rules say so: ``(until, note, started_now)``; ``until`` is
        ``None`` when it is not held, and ``note`` says why (empty: the job asked nothing)."""
        with self._lock:
            if self.until is not None:
                return self.until, self.grant.note, False
            if self._started:
                return None, f"the VM's debug hold has already ended ({self.ended})", False
            if not self.grant.seconds:
                return None, self.grant.note, False
            if self.payload_failed is not True:
                return None, "the payload did not fail: the VM is not held", False
            self._started = True
            self.until = now + self.grant.seconds
            return self.until, self.grant.note, True

    def end(self, reason: str) -> bool:
        """End the hold for ``reason``; ``True`` when this call ended a hold."""
        with self._lock:
            self._started = True  # a VM torn down or released before its hold is never held
            if self.until is None:
                return False
            self.until = None
            self.ended = reason
            self._end.set()
            return True

    def wait(self, cancel: threading.Event | None, clock: Callable[[], float] = time.time) -> str:
        """Wait while the VM is held; the reason it ended. A hold that is not (or no longer)
        there answers at once; ``cancel`` (the caller went) ends the hold as ``stopped``."""
        while True:
            until = self.until
            if until is None:
                return self.ended or NOT_HELD
            remaining = until - clock()
            if remaining <= 0:
                self.end(EXPIRED)
            elif cancel is not None and cancel.is_set():
                self.end(STOPPED)
            else:
                self._end.wait(min(remaining, _POLL))


__all__ = ["EXPIRED", "NOT_HELD", "RELEASED", "STOPPED", "TORN_DOWN", "DebugHoldState"]
