"""Debug holds through a real pool: ``+GliteVmDebugHold`` as a user submits it.

A personal pool with glite-vm's hooks, the real service (holds of up to :data:`MAX_HOLD`
seconds, in its settings and in the snippet ``glite-vm config`` writes) and real VMs. Two jobs
whose payload fails run side by side: one asks for more than the host grants and is removed
while held (``condor_q`` shows ``GliteVmDebugUntil`` meanwhile); the other asks for a few
seconds and ends by itself, with the payload's exit code and output.
"""

from __future__ import annotations

import pwd
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.slots import SlotLayout
from glite_vm.units import GIB
from tests.condor.pool import (
    JobAd,
    PersonalPool,
    glite_vm_pool,
    pool_service,
    submit_with_files,
    vm_job_description,
    wait_until,
)
from tests.service.svc_support import ServiceProcess, domain_running
from tests.support import domains_under

pytestmark = [pytest.mark.condor, pytest.mark.vm]

LAYOUT = SlotLayout(slots=3, root_slots=1, cpus=1, memory_mib=512, disk_bytes=2 * GIB)
MAX_HOLD = 300  # long enough that only condor_rm ends the first job's hold within the test
SHORT_HOLD = 5
JOB_TIMEOUT = 300.0
PAYLOAD = """#!/bin/sh
echo "made in the guest" > result.txt
echo partial
exit 3
"""


@pytest.fixture(scope="module")
def service(root: Path, guest_dir: Path) -> Iterator[ServiceProcess]:
    with pool_service(root, guest_dir, LAYOUT, {"GLITE_VM_MAX_DEBUG_HOLD": str(MAX_HOLD)}) as svc:
        yield svc


@pytest.fixture(scope="module")
def pool(
    root: Path, service: ServiceProcess, test_user: pwd.struct_passwd
) -> Iterator[PersonalPool]:
    with glite_vm_pool(
        root, service, test_user, layout=LAYOUT, max_debug_hold=MAX_HOLD, advertise_period=5
    ) as pool:
        yield pool


@pytest.fixture(scope="module")
def jobs(pool: PersonalPool) -> dict[str, int]:
    """Both jobs submitted at once; each test waits for its own."""
    files = {"payload.sh": PAYLOAD}
    return {
        "removed": submit_with_files(
            pool, "removed", vm_job_description("+GliteVmDebugHold = 3600"), files
        ),
        "expires": submit_with_files(
            pool, "expires", vm_job_description(f"+GliteVmDebugHold = {SHORT_HOLD}"), files
        ),
    }


def held_in_queue(pool: PersonalPool, cluster: int) -> JobAd:
    """The queue ad once the job runs and its ad says its VM is held."""

    def probe() -> JobAd | None:
        ad = pool.queue_ad(cluster)
        if ad is None or ad.get("JobStatus") != 2 or "GliteVmDebugUntil" not in ad:
            return None
        return ad

    ad: JobAd = wait_until("the job's VM to be held", probe, JOB_TIMEOUT)
    return ad


def test_a_held_job_shows_its_hold_in_condor_q_and_condor_rm_ends_it_with_its_vm(
    pool: PersonalPool, root: Path, jobs: dict[str, int]
) -> None:
    ad = held_in_queue(pool, jobs["removed"])
    domain = ad["GliteVmDomain"]
    # still running in HTCondor, its VM running on the host, until the host's maximum
    assert domain_running(domain)
    assert time.time() < ad["GliteVmDebugUntil"] <= time.time() + MAX_HOLD + 5
    assert f"cut to {MAX_HOLD} s" in ad["GliteVmDebugHoldNote"]
    shown = pool.run(["condor_q", str(jobs["removed"]), "-af", "GliteVmDebugUntil"]).stdout
    assert shown.strip() == str(ad["GliteVmDebugUntil"])

    removed_at = time.monotonic()
    pool.run(["condor_rm", str(jobs["removed"])])
    wait_until("the VM to go", lambda: not domain_running(domain), 60, interval=0.25)
    assert time.monotonic() - removed_at < 30
    history = pool.wait_for_history(jobs["removed"], JOB_TIMEOUT)
    assert history["JobStatus"] == 3  # removed
    assert "GliteVmSnapshotPath" in history  # kept: a removed job counts as failed
    assert domain not in domains_under(root)


def test_a_short_hold_ends_by_itself_and_the_job_ends_as_its_payload_did(
    pool: PersonalPool, root: Path, jobs: dict[str, int]
) -> None:
    ad = held_in_queue(pool, jobs["expires"])
    until = ad["GliteVmDebugUntil"]
    history = pool.wait_for_history(jobs["expires"], JOB_TIMEOUT)
    assert time.time() >= until
    assert history["JobStatus"] == 4  # completed
    assert history["ExitCode"] == 3
    assert history["GliteVmDebugHoldNote"] == "the debug hold ended: expired"
    directory = pool.job_dir("expires")
    assert (directory / "out").read_text() == "partial\n"
    assert (directory / "result.txt").read_text() == "made in the guest\n"
    wait_until("JOB_EXIT to tear the VM down", lambda: not domains_under(root), 60)
