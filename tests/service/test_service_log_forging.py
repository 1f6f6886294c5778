"""Attack on the root service's log and event log through a name a local user chooses: her
job's scratch directory, named with a line break, a forged log line and terminal escapes. Its
name reaches the log when the reaper tears her VM down (``its scratch directory ... is
gone``). A real service, a real user, a real guest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.service.svc_support import (
    Account,
    ServiceProcess,
    call,
    job_ad,
    make_scratch,
    our_domains,
    wait_for,
)

pytestmark = pytest.mark.vm
FORGED = "2026-12-05 12:00:00 INFO glite_vm.service: all VMs of uid 0 torn down"


@pytest.mark.parametrize(
    "name",
    [
        f"forge\n{FORGED}\n",  # before: a VM, and the forged line in the log at its reaping
        f"escape\n{FORGED}\n\x1b]0;owned\x07\x1b[2J\x9b31m",  # before: requeued, host blamed
    ],
    ids=["line-breaks", "escapes"],
)
def test_a_scratch_directory_named_to_forge_log_lines_is_refused(
    service: ServiceProcess, svc_root: Path, alice: Account, name: str
) -> None:
    scratch = make_scratch(svc_root, alice, name)
    before = len(service.log())
    try:
        answer = call(service, alice, "prepare", job_ad=job_ad(), scratch_dir=str(scratch))
        if answer["ok"]:  # the attack goes on: the reaper names the directory once it is gone
            vm = answer["result"]["vm"]
            shutil.rmtree(scratch)
            wait_for("the reaper", lambda: vm not in our_domains((alice.name,)), 120)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logged = service.log()[before:]
    assert f"\n{FORGED}" not in logged, logged[-3000:]
    assert "\x1b" not in logged and "\x9b" not in logged and "\x07" not in logged
    assert not answer["ok"], answer
    assert answer["type"] == "RequestError" and answer["disposition"] == "hold", answer
    assert "control characters" in answer["message"]
    assert "\n" not in answer["message"] and "\x1b" not in answer["message"]
