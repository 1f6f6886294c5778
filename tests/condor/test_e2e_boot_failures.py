"""Broken images through a real pool: the image's fault is held at once with a reason that says
what to fix; a transient failure is booted again on the same host, and only when that keeps
failing is the job requeued (then held after ``GLITE_VM_MAX_HOST_FAILURES``, as every host
failure is).

The same set-up as test_e2e.py (real service as root, the pool's hooks from ``glite-vm hook
install``, jobs from the unprivileged ``glitevm-test``), with a catalogue of the test guests
broken the ways tests/support.py's BROKEN_GUESTS are, the boot timeout at 300 s and
``GLITE_VM_BOOT_ATTEMPTS = 2``. QEMU is killed on purpose by tests/pressure.py's Meddler, which
picks a job's VMs by the cluster id in their names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.condor.jobad import HOST_FAILURES_ATTR, HOST_FAILURES_HOLD_CODE
from glite_vm.slots import SlotLayout
from glite_vm.units import GIB
from tests.condor.pool import (
    PersonalPool,
    glite_vm_pool,
    pool_service,
    submit_with_files,
    vm_job_description,
)
from tests.pressure import Meddler
from tests.service.svc_support import ServiceProcess
from tests.support import BROKEN_GUESTS, domains_under

pytestmark = [pytest.mark.condor, pytest.mark.vm]

LAYOUT = SlotLayout(slots=3, root_slots=0, cpus=1, memory_mib=512, disk_bytes=2 * GIB)
MAX_HOST_FAILURES = 2
BOOT_ATTEMPTS = 2
BOOT_TIMEOUT = 300
JOB_TIMEOUT = 300.0
#: From submission to the hold of a panicking image: matchmaking plus a few seconds of boot,
#: far below the boot timeout it used to take.
FAST_HOLD = 120.0


@pytest.fixture(scope="module")
def service(root: Path, guest_dir: Path) -> Iterator[ServiceProcess]:
    extra = {
        "GLITE_VM_REAP_INTERVAL": "5",
        "GLITE_VM_BOOT_TIMEOUT": str(BOOT_TIMEOUT),
        "GLITE_VM_BOOT_ATTEMPTS": str(BOOT_ATTEMPTS),
    }
    with pool_service(root, guest_dir, LAYOUT, extra, variants=BROKEN_GUESTS) as svc:
        yield svc


@pytest.fixture(scope="module")
def pool(
    root: Path, service: ServiceProcess, test_user: pwd.struct_passwd
) -> Iterator[PersonalPool]:
    with glite_vm_pool(
        root,
        service,
        test_user,
        layout=LAYOUT,
        max_host_failures=MAX_HOST_FAILURES,
        advertise_period=5,
        reap_period=30,
    ) as p:
        yield p


def submit(pool: PersonalPool, name: str, image: str) -> int:
    payload = "#!/bin/sh\necho ran in $(uname -n)\n"
    return submit_with_files(pool, name, vm_job_description(image=image), {"payload.sh": payload})


@dataclasses.dataclass(frozen=True)
class Jobs:
    panic: int
    panic_submitted: float
    retried: int
    crashing: int
    killed_once: Meddler
    killed_always: Meddler


@pytest.fixture(scope="module")
def jobs(pool: PersonalPool, service: ServiceProcess) -> Iterator[Jobs]:
    """All jobs at once; each test waits for its own. A job's VMs are recognised by the
    cluster id in their domain names (glite-vm-<owner>-<cluster>.<proc>-<token>)."""
    state = Path(service.env["GLITE_VM_STATE_DIR"])
    with contextlib.ExitStack() as stack:
        submitted = time.monotonic()
        panic = submit(pool, "panic", "test-panic")
        retried = submit(pool, "retried", "test-direct")
        killed_once = stack.enter_context(Meddler(state, "kill", 1, match=f"-{retried}.0-"))
        crashing = submit(pool, "crashing", "test-direct")
        killed_always = stack.enter_context(Meddler(state, "kill", 99, match=f"-{crashing}.0-"))
        yield Jobs(panic, submitted, retried, crashing, killed_once, killed_always)


def test_a_panicking_image_is_held_at_once_saying_what_to_fix(
    pool: PersonalPool, jobs: Jobs
) -> None:
    ad = pool.wait_for_status(jobs.panic, 5, FAST_HOLD)
    held_after = time.monotonic() - jobs.panic_submitted
    assert held_after < FAST_HOLD, held_after
    assert ad["HoldReasonCode"] == 19
    assert ad["HoldReasonSubCode"] == 16  # ImageBootError
    reason = ad["HoldReason"]
    assert "the image cannot boot: its kernel panicked (Attempted to kill init!" in reason
    assert "its init program exited" in reason
    assert "Run /bin/false as init process" in reason  # the boot log, quoted on one line
    assert ad["NumJobStarts"] == 0
    assert ad.get("NumVacatesByReason", {}).get("StarterError", 0) == 0  # never requeued
    boot_log = Path(ad["GliteVmBootLogPath"])  # chirped by PREPARE_JOB as it failed
    assert "Kernel panic - not syncing" in boot_log.read_text(errors="replace")


def test_a_qemu_that_died_once_is_booted_again_on_the_same_host(
    pool: PersonalPool, jobs: Jobs
) -> None:
    ad = pool.wait_for_history(jobs.retried, JOB_TIMEOUT)
    assert ad["ExitCode"] == 0, (pool.job_dir("retried") / "err").read_text()
    assert (pool.job_dir("retried") / "out").read_text().startswith("ran in ")
    assert len(jobs.killed_once.done) == 1
    assert ad["GliteVmBootAttempts"] == 2
    assert ad.get("NumVacatesByReason", {}).get("StarterError", 0) == 0  # not requeued
    assert ad["GliteVmDomain"] != jobs.killed_once.done[0]


def test_a_boot_that_keeps_crashing_is_requeued_then_held(pool: PersonalPool, jobs: Jobs) -> None:
    ad = pool.wait_for_status(jobs.crashing, 5, 2 * JOB_TIMEOUT)
    # each PREPARE_JOB booted twice before giving up: a requeue, then the host-failure hold
    assert len(jobs.killed_always.done) == BOOT_ATTEMPTS * MAX_HOST_FAILURES
    assert ad["HoldReasonCode"] == 19
    assert ad["HoldReasonSubCode"] == HOST_FAILURES_HOLD_CODE
    assert ad["NumVacatesByReason"]["StarterError"] == MAX_HOST_FAILURES - 1
    reason = ad["HoldReason"]
    assert f"held after {MAX_HOST_FAILURES} host failures" in reason
    assert "QEMU stopped unexpectedly" in reason
    assert f"(boot attempt {BOOT_ATTEMPTS} of at most {BOOT_ATTEMPTS} on this host)" in reason
    assert ad[HOST_FAILURES_ATTR].count("QEMU stopped unexpectedly") == MAX_HOST_FAILURES
    assert ad["NumJobStarts"] == 0


def test_nothing_is_left_behind(pool: PersonalPool, service: ServiceProcess, jobs: Jobs) -> None:
    pool.wait_for_history(jobs.retried, JOB_TIMEOUT)
    pool.wait_for_status(jobs.crashing, 5, 2 * JOB_TIMEOUT)
    pool.wait_for_status(jobs.panic, 5, FAST_HOLD)
    client = service.client()
    assert client.list_vms() == []
    state = Path(service.env["GLITE_VM_STATE_DIR"])
    assert domains_under(state) == []
    assert not list((state / "snapshots").glob("*/overlay.qcow2"))
    assert not list((state / "cache" / "leases").rglob("*.json"))
    assert jobs.killed_once.errors == [] and jobs.killed_always.errors == []
