"""The debug hold's rules, without a VM: what a job may ask (``GliteVmDebugHold``), what the
site grants (``GLITE_VM_MAX_DEBUG_HOLD``), and when a VM is held and how its hold ends."""

from __future__ import annotations

import threading

import pytest

from glite_vm.config import Settings
from glite_vm.errors import Disposition, RequestError
from glite_vm.request import (
    MAX_DEBUG_HOLD_ASKED,
    DebugHoldGrant,
    JobRequest,
    check_debug_hold,
    grant_debug_hold,
)
from glite_vm.service import debug_hold
from glite_vm.service.debug_hold import DebugHoldState


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (-5, "must not be negative"),
        (1.5, "whole number of seconds"),
        ("600", "whole number of seconds"),
        (True, "whole number of seconds"),
        (MAX_DEBUG_HOLD_ASKED + 1, "a week"),
    ],
)
def test_a_debug_hold_that_makes_no_sense_holds_the_job_with_what_to_write(
    value: object, problem: str
) -> None:
    with pytest.raises(RequestError) as info:
        check_debug_hold(value)
    assert info.value.field == "GliteVmDebugHold"
    assert problem in str(info.value)
    assert info.value.disposition is Disposition.HOLD


def test_no_hold_zero_and_a_week_are_fine() -> None:
    assert check_debug_hold(None) is None
    assert check_debug_hold(0) is None
    assert check_debug_hold(MAX_DEBUG_HOLD_ASKED) == MAX_DEBUG_HOLD_ASKED


def test_the_service_refuses_a_mistyped_hold_sent_past_the_hook() -> None:
    wire = {"image": "x", "job_id": "1.0", "owner": "alice", "debug_hold": "forever"}
    with pytest.raises(RequestError, match="GliteVmDebugHold"):
        JobRequest.from_wire(wire, Settings())


def test_the_site_grants_at_most_its_maximum_and_says_so() -> None:
    site = Settings(max_debug_hold=600.0)
    assert grant_debug_hold(None, site) == DebugHoldGrant(0, "")
    assert grant_debug_hold(300, site) == DebugHoldGrant(300, "")
    assert grant_debug_hold(600, site) == DebugHoldGrant(600, "")
    capped = grant_debug_hold(3600, site)
    assert capped.seconds == 600
    assert "cut to 600 s" in capped.note and "GLITE_VM_MAX_DEBUG_HOLD" in capped.note


def test_where_holds_are_off_a_job_that_asks_gets_a_note_not_a_hold() -> None:
    off = grant_debug_hold(600, Settings())  # the default: off
    assert off.seconds == 0
    assert "off on this host" in off.note and "GLITE_VM_MAX_DEBUG_HOLD = 0" in off.note


def test_the_site_maximum_is_a_duration_setting() -> None:
    assert Settings.load({"GLITE_VM_MAX_DEBUG_HOLD": "30m"}).max_debug_hold == 1800.0
    assert Settings.load({"GLITE_VM_MAX_DEBUG_HOLD": "0"}).max_debug_hold == 0.0
    with pytest.raises(ValueError, match="MAX_DEBUG_HOLD"):
        Settings.load({"GLITE_VM_MAX_DEBUG_HOLD": "-1h"})


def _failed(seconds: int = 60, note: str = "") -> DebugHoldState:
    state = DebugHoldState(DebugHoldGrant(seconds, note))
    state.payload_failed = True
    return state


def test_only_a_failed_payload_with_a_grant_is_held() -> None:
    succeeded = DebugHoldState(DebugHoldGrant(60))
    succeeded.payload_failed = False
    until, note, started = succeeded.start(1000.0)
    assert (until, started) == (None, False)
    assert "did not fail" in note
    not_run = DebugHoldState(DebugHoldGrant(60))
    assert not_run.start(1000.0)[0] is None
    refused = DebugHoldState(DebugHoldGrant(0, "off on this host"))
    refused.payload_failed = True
    assert refused.start(1000.0) == (None, "off on this host", False)
    assert _failed(60).start(1000.0) == (1060.0, "", True)


def test_a_vm_is_held_once_and_the_first_end_is_kept() -> None:
    state = _failed(60)
    state.start(1000.0)
    assert state.start(1010.0) == (1060.0, "", False)  # asked again: the same hold
    assert state.end(debug_hold.RELEASED) is True
    assert state.end(debug_hold.TORN_DOWN) is False
    assert state.ended == debug_hold.RELEASED and not state.held
    until, note, started = state.start(1020.0)  # no second hold after the first ended
    assert (until, started) == (None, False)
    assert "already ended" in note


def test_a_teardown_before_the_hold_prevents_it() -> None:
    state = _failed(60)
    state.end(debug_hold.TORN_DOWN)
    assert state.start(1000.0)[0] is None


def test_a_wait_ends_when_the_time_runs_out() -> None:
    now = [1000.0]
    state = _failed(30)
    state.start(now[0])
    now[0] = 1031.0
    assert state.wait(None, clock=lambda: now[0]) == debug_hold.EXPIRED
    assert not state.held


def test_a_wait_ends_at_a_release_from_another_thread() -> None:
    state = _failed(3600)
    state.start(1000.0)
    answer: list[str] = []
    waiter = threading.Thread(target=lambda: answer.append(state.wait(None, clock=lambda: 1000.0)))
    waiter.start()
    state.end(debug_hold.RELEASED)
    waiter.join(timeout=30)
    assert answer == [debug_hold.RELEASED]


def test_a_wait_whose_caller_went_ends_the_hold() -> None:
    state = _failed(3600)
    state.start(1000.0)
    gone = threading.Event()
    gone.set()
    assert state.wait(gone, clock=lambda: 1000.0) == debug_hold.STOPPED
    assert not state.held


def test_waiting_for_a_vm_that_is_not_held_answers_at_once() -> None:
    assert DebugHoldState().wait(None) == debug_hold.NOT_HELD
