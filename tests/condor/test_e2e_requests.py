"""What a job asks for beyond its image, end to end: a network, and its own time limit.

A real personal pool with glite-vm's hooks and configuration, the real service, real VMs of the
direct-kernel test guest. The service offers the VMs' default network (``none``) and ``user``
(GLITE_VM_JOB_NETWORKS); the pool's configuration also admits ``lab`` — an execute host whose
HTCondor configuration and service disagree, so a job asking for ``lab`` reaches the service and
must be held with the list of what it offers. Jobs are submitted as an unprivileged user.
"""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.condor.jobad import HOLD_CODES
from glite_vm.errors import RequestError
from glite_vm.slots import SlotLayout
from glite_vm.units import GIB
from tests.condor.pool import (
    PersonalPool,
    glite_vm_pool,
    pool_service,
    submit_with_files,
    vm_job_description,
    wait_until,
)
from tests.service.svc_support import ServiceProcess
from tests.support import domain_names

pytestmark = [pytest.mark.condor, pytest.mark.vm]

LAYOUT = SlotLayout(slots=3, root_slots=1, cpus=1, memory_mib=512, disk_bytes=2 * GIB)
JOB_TIMEOUT = 240.0
TIME_LIMIT = 20  # seconds: allowed_execute_duration of the job that sleeps far longer


@pytest.fixture(scope="module")
def service(root: Path, guest_dir: Path) -> Iterator[ServiceProcess]:
    with pool_service(root, guest_dir, LAYOUT, {"GLITE_VM_JOB_NETWORKS": "user"}) as svc:
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
        max_host_failures=2,
        job_networks=("user", "lab"),  # "lab": START admits it, the service does not offer it
        advertise_period=5,
        reap_period=30,
    ) as p:
        yield p


def submit(pool: PersonalPool, name: str, payload: str, *extra: str) -> int:
    return submit_with_files(pool, name, vm_job_description(*extra), {"payload.sh": payload})


@pytest.fixture(scope="module")
def jobs(pool: PersonalPool) -> dict[str, int]:
    return {
        "user": submit(pool, "user", "#!/bin/sh\nls /sys/class/net\n", '+GliteVmNetwork = "user"'),
        "lab": submit(pool, "lab", "#!/bin/sh\necho ran\n", '+GliteVmNetwork = "lab"'),
        "slow": submit(
            pool,
            "slow",
            "#!/bin/sh\necho started\nsleep 600\n",
            f"allowed_execute_duration = {TIME_LIMIT}",
        ),
    }


def test_a_job_gets_the_network_it_asks_for(pool: PersonalPool, jobs: dict[str, int]) -> None:
    ad = pool.wait_for_history(jobs["user"], JOB_TIMEOUT)
    out = (pool.job_dir("user") / "out").read_text()
    assert ad["ExitCode"] == 0, out
    assert "eth0" in out.split()  # the VM has an interface (none by default)
    assert ad["GliteVmNetwork"] == "user"  # the request stays what the job asked for
    assert ad["GliteVmGuestNetwork"] == "user"  # what the service gave it


def test_a_network_the_service_does_not_offer_is_held_with_the_list(
    pool: PersonalPool, jobs: dict[str, int]
) -> None:
    ad = pool.wait_for_status(jobs["lab"], 5, JOB_TIMEOUT)
    assert ad["HoldReasonCode"] == 19
    assert ad["HoldReasonSubCode"] == HOLD_CODES[RequestError]
    assert "GliteVmNetwork: 'lab' is not offered here" in ad["HoldReason"]
    assert "'none', 'user'" in ad["HoldReason"]
    assert ad["NumJobStarts"] == 0
    assert (
        not (pool.job_dir("lab") / "out").exists()
        or "ran" not in (pool.job_dir("lab") / "out").read_text()
    )


def test_slot_ads_advertise_the_networks(pool: PersonalPool, jobs: dict[str, int]) -> None:
    def advertised() -> list[str] | None:
        values = [str(ad.get("GliteVmNetworks", "")) for ad in pool.slot_ads()]
        return values if values and all(values) else None

    values = wait_until("slot ads with GliteVmNetworks", advertised, 60)
    # the service's own settings: GLITE_VM_NETWORK first, then GLITE_VM_JOB_NETWORKS of the
    # pool's configuration, which STARTD_CRON reads
    assert set(values) == {"none,user,lab"}


def test_a_job_that_outlives_its_own_time_limit_is_held_naming_the_limit(
    pool: PersonalPool, service: ServiceProcess, jobs: dict[str, int]
) -> None:
    try:
        ad = pool.wait_for_status(jobs["slow"], 5, JOB_TIMEOUT + TIME_LIMIT)
    except Exception:
        queued = pool.queue_ad(jobs["slow"]) or pool.history_ad(jobs["slow"]) or {}
        keys = (
            "JobStatus",
            "HoldReason",
            "LastHoldReason",
            "AllowedExecuteDuration",
            "NumJobStarts",
            "ExitCode",
            "ExitSignal",
            "GliteVmLauncherError",
            "RemoveReason",
        )
        raise AssertionError({k: queued.get(k) for k in keys}) from None
    assert ad["HoldReasonCode"] == 47  # HTCondor's JobExecuteExceeded: the job's own limit
    assert f"{TIME_LIMIT}" in ad["HoldReason"] and "duration" in ad["HoldReason"], ad["HoldReason"]
    domain = ad["GliteVmDomain"]
    wait_until("the VM to go", lambda: domain not in domain_names(inactive=False), 60)
    snapshot = Path(ad["GliteVmSnapshotPath"])  # on_failure: a stopped job's disk is kept
    assert snapshot.is_file()
    assert snapshot.is_relative_to(Path(service.env["GLITE_VM_STATE_DIR"]) / "snapshots")
    assert Path(ad["GliteVmBootLogPath"]).is_file()
