"""End to end: a real personal pool with glite-vm's hooks, the real service, real VMs.

The service (``python -m glite_vm.cli.service serve``) runs as root with a ``file://``
catalogue of the direct-kernel test guest (``test-direct``) and of an image whose file is
missing (``test-broken``: a repository failure, so a host error). The pool runs the
configuration ``glite-vm config`` generates, with the hooks that ``glite-vm hook install``
writes; jobs are submitted as the unprivileged ``glitevm-test``. All jobs are submitted at once
and run side by side; each test waits for its own.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.condor.jobad import HOST_FAILURES_ATTR, HOST_FAILURES_HOLD_CODE
from glite_vm.condor.launcher import LAUNCHER_FAILURE_EXIT
from glite_vm.images.build import write_catalogue
from glite_vm.service.events import event_log_path, read_events
from glite_vm.slots import SlotLayout
from glite_vm.units import GIB
from tests.condor.pool import (
    JobAd,
    PersonalPool,
    glite_vm_pool,
    submit_with_files,
    vm_job_description,
    wait_until,
)
from tests.service.svc_support import ServiceProcess, running_service
from tests.support import domains_under, guest_catalogue, scratch_root

pytestmark = [pytest.mark.condor, pytest.mark.vm]

#: 4 user slots and the last one root-enabled; VMs of 512 MiB.
LAYOUT = SlotLayout(slots=5, root_slots=1, cpus=1, memory_mib=512, disk_bytes=2 * GIB)
MAX_HOST_FAILURES = 2
JOB_TIMEOUT = 240.0
FAILURE_TIMEOUT = 240.0  # two PREPARE_JOB failures (~20 s each to land) plus slot turnover
GUEST_USER_UID = 1000  # the test guest's unprivileged account (tests/guest/build.sh)


@pytest.fixture(scope="module")
def e2e_root() -> Iterator[Path]:
    """QEMU's user, the condor user and the test user must traverse it; nobody lists it.
    GLITE_VM_KEEP_E2E keeps it for a post-mortem: logs, ads, snapshots."""
    with scratch_root("glite-vm-e2e-", "GLITE_VM_KEEP_E2E") as path:
        yield path


@pytest.fixture(scope="module")
def e2e_catalogue(e2e_root: Path, guest_dir: Path) -> Path:
    catalogue = guest_catalogue(guest_dir, e2e_root / "repo", direct={"test-direct": ""})
    doc = json.loads(catalogue.read_text())
    # an image the repository lists but cannot deliver: the host's problem, not the user's
    broken = json.loads(json.dumps(doc["images"][0]))
    broken.update(name="test-broken", url=(catalogue.parent / "missing.qcow2").as_uri())
    broken["sha256"] = "0" * 64
    doc["images"].append(broken)
    return write_catalogue(doc, catalogue)


@pytest.fixture(scope="module")
def e2e_service(e2e_root: Path, e2e_catalogue: Path) -> Iterator[ServiceProcess]:
    extra = {"GLITE_VM_REAP_INTERVAL": "5", **LAYOUT.knobs()}
    with running_service(e2e_root, e2e_catalogue, extra) as svc:
        yield svc


@pytest.fixture(scope="module")
def e2e_pool(
    e2e_root: Path, e2e_service: ServiceProcess, test_user: pwd.struct_passwd
) -> Iterator[PersonalPool]:
    def other_keyword(hooks_dir: Path) -> str:
        (hooks_dir / "other_prepare_job").write_text("#!/bin/sh\necho 'Cmd = \"/bin/false\"'\n")
        (hooks_dir / "other_prepare_job").chmod(0o755)
        return (
            "\n# a keyword a job may name: it must not get around glite-vm's hooks\n"
            f"OTHER_HOOK_PREPARE_JOB = {hooks_dir / 'other_prepare_job'}\n"
        )

    with glite_vm_pool(
        e2e_root,
        e2e_service,
        test_user,
        extra_config=other_keyword,
        layout=LAYOUT,
        max_host_failures=MAX_HOST_FAILURES,
        advertise_period=5,
        reap_period=30,
    ) as pool:
        yield pool


# --- the jobs ---------------------------------------------------------------------------------

PAYLOAD = """#!/bin/sh
echo "uid=$(id -u)"
echo "args=[$1][$2]"
echo "greeting=$GREETING"
tr a-z A-Z < in.txt > result.txt
mkdir -p made/deeper && echo deep > made/deeper/file.txt
echo "to stderr" >&2
exit "${EXIT_WITH:-0}"
"""


def submit_description(*extra: str, image: str = "test-direct") -> str:
    return vm_job_description(
        "arguments = \"'two words' plain\"", "transfer_input_files = in.txt", *extra, image=image
    )


@dataclasses.dataclass(frozen=True)
class Jobs:
    run: int
    root: int
    unknown: int
    broken: int
    removed: int
    other_keyword: int
    orphaned: int


def _submit(pool: PersonalPool, name: str, description: str, payload: str = PAYLOAD) -> int:
    files = {"payload.sh": payload, "in.txt": "input text\n"}
    return submit_with_files(pool, name, description, files)


@pytest.fixture(scope="module")
def jobs(e2e_pool: PersonalPool) -> Jobs:
    p = e2e_pool
    return Jobs(
        run=_submit(
            p,
            "run",
            submit_description(
                "environment = \"GREETING='hello there' EXIT_WITH=7\"",
                # HTCondor brings new top-level files back by itself, new directories only
                # when they are named
                "transfer_output_files = result.txt, made",
            ),
        ),
        root=_submit(p, "root", submit_description("+GliteVmRoot = True")),
        unknown=_submit(p, "unknown", submit_description(image="no-such-image")),
        broken=_submit(p, "broken", submit_description(image="test-broken")),
        removed=_submit(
            p, "removed", submit_description(), payload="#!/bin/sh\necho started\nsleep 600\n"
        ),
        other_keyword=_submit(p, "other", submit_description('+HookKeyword = "OTHER"')),
        orphaned=_submit(
            p, "orphaned", submit_description(), payload="#!/bin/sh\necho started\nsleep 600\n"
        ),
    )


def slot_number(ad: JobAd) -> int:
    return int(str(ad["LastRemoteHost"]).partition("@")[0].removeprefix("slot"))


def wait_until_running_in_vm(pool: PersonalPool, cluster: int) -> str:
    """The domain of ``cluster`` once the job runs and its VM does; waits up to JOB_TIMEOUT."""

    def started() -> str | None:
        ad = pool.queue_ad(cluster)
        if ad is None or ad.get("JobStatus") != 2 or "GliteVmDomain" not in ad:
            return None
        domain: str = ad["GliteVmDomain"]
        return domain if domain in running_domains() else None

    found: str = wait_until("the job to run in its VM", started, JOB_TIMEOUT)
    return found


def running_domains() -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--name"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return out.split()


# --- the tests --------------------------------------------------------------------------------


def test_a_job_runs_in_its_vm_and_its_files_come_back(e2e_pool: PersonalPool, jobs: Jobs) -> None:
    ad = e2e_pool.wait_for_history(jobs.run, JOB_TIMEOUT)
    directory = e2e_pool.job_dir("run")
    out = (directory / "out").read_text()
    assert ad["ExitCode"] == 7, out + (directory / "err").read_text()
    uid = int(out.split("uid=")[1].split()[0])
    assert uid == GUEST_USER_UID  # the guest's unprivileged user, not root, not the host's
    assert "args=[two words][plain]\n" in out
    assert "greeting=hello there\n" in out
    assert (directory / "err").read_text().startswith("to stderr\n")
    assert (directory / "result.txt").read_text() == "INPUT TEXT\n"
    assert (directory / "made" / "deeper" / "file.txt").read_text() == "deep\n"
    assert slot_number(ad) < LAYOUT.slots  # a user slot
    # what the job ad tells the user about the VM
    assert ad["GliteVmDomain"].startswith("glite-vm-")
    assert ad["GliteVmHypervisor"] in ("kvm", "qemu")
    assert len(ad["GliteVmImageDigest"]) == 64
    for timing in ("GliteVmTimeBoot", "GliteVmTimeReady", "GliteVmTimePayload"):
        assert ad[timing] >= 0
    assert ad["GliteVmTimeTeardown"] >= 0  # chirped by JOB_EXIT
    boot_log = Path(ad["GliteVmBootLogPath"])
    assert "Linux version" in boot_log.read_text(errors="replace")
    snapshot = Path(ad["GliteVmSnapshotPath"])  # exit 7 and keep_snapshot = on_failure
    assert snapshot.is_file()
    assert ad["GliteVmDomain"] not in running_domains()


def test_a_root_job_runs_as_root_only_on_the_root_slot(e2e_pool: PersonalPool, jobs: Jobs) -> None:
    ad = e2e_pool.wait_for_history(jobs.root, JOB_TIMEOUT)
    out = (e2e_pool.job_dir("root") / "out").read_text()
    assert ad["ExitCode"] == 0, out
    assert "uid=0\n" in out
    assert slot_number(ad) == LAYOUT.slots  # the root-enabled slot
    assert "GliteVmSnapshotPath" not in ad  # it succeeded: on_failure keeps nothing


def test_an_unknown_image_is_held_with_our_message(e2e_pool: PersonalPool, jobs: Jobs) -> None:
    ad = e2e_pool.wait_for_status(jobs.unknown, 5, FAILURE_TIMEOUT)
    assert ad["HoldReasonCode"] == 19
    assert ad["HoldReasonSubCode"] == 11
    assert "unknown image 'no-such-image'" in ad["HoldReason"]
    assert "test-direct" in ad["HoldReason"]  # it says what exists
    assert ad["NumJobStarts"] == 0


def test_host_failures_requeue_then_hold(e2e_pool: PersonalPool, jobs: Jobs) -> None:
    ad = e2e_pool.wait_for_status(jobs.broken, 5, FAILURE_TIMEOUT)
    assert ad["HoldReasonCode"] == 19
    assert ad["HoldReasonSubCode"] == HOST_FAILURES_HOLD_CODE
    assert f"held after {MAX_HOST_FAILURES} host failures" in ad["HoldReason"]
    assert ad["NumVacatesByReason"]["StarterError"] == MAX_HOST_FAILURES - 1
    assert ad[HOST_FAILURES_ATTR].count("test-broken") == MAX_HOST_FAILURES


def test_condor_rm_stops_the_payload_and_the_vm_within_seconds(
    e2e_pool: PersonalPool, e2e_service: ServiceProcess, jobs: Jobs
) -> None:
    domain = wait_until_running_in_vm(e2e_pool, jobs.removed)
    time.sleep(3)  # the launcher is past push and in the payload's `sleep 600`
    removed_at = time.monotonic()
    e2e_pool.run(["condor_rm", str(jobs.removed)])
    wait_until("the VM to go", lambda: domain not in running_domains(), 30, interval=0.25)
    assert time.monotonic() - removed_at < 15
    ad = e2e_pool.wait_for_history(jobs.removed, JOB_TIMEOUT)
    assert ad["JobStatus"] == 3  # removed
    # on_failure: a removed job counts as failed, so its snapshot is kept and named in the ad
    # (chirped by the launcher before it died: JOB_EXIT cannot chirp on evict)
    snapshot = Path(ad["GliteVmSnapshotPath"])
    assert snapshot.is_file()
    assert snapshot.is_relative_to(Path(e2e_service.env["GLITE_VM_STATE_DIR"]) / "snapshots")
    assert domain in snapshot.parts


def test_a_killed_starter_is_reaped_and_the_event_log_says_why(
    e2e_pool: PersonalPool, e2e_service: ServiceProcess, jobs: Jobs
) -> None:
    """The job's whole process tree (condor_starter and the launcher under it) SIGKILLed: no
    JOB_EXIT will come, so the service's reaper must take the VM, within 60 s."""

    domain = wait_until_running_in_vm(e2e_pool, jobs.orphaned)
    time.sleep(3)  # the launcher is in the payload's `sleep 600`
    (launcher,) = _launchers_of(domain, e2e_pool.user.pw_uid)
    starter = _parent(launcher)
    assert _command(starter) == "condor_starter"
    killed_at = time.monotonic()
    os.kill(starter, signal.SIGKILL)
    os.kill(launcher, signal.SIGKILL)
    wait_until("the VM to go", lambda: domain not in running_domains(), 60, interval=0.5)
    assert time.monotonic() - killed_at < 60
    e2e_pool.run(["condor_rm", str(jobs.orphaned)])  # HTCondor would run it again
    state = Path(e2e_service.env["GLITE_VM_STATE_DIR"])
    events = [e for e in read_events(event_log_path(state)) if e.vm == domain]
    assert [e.event for e in events] == ["started", "reaped"], events
    reaped = events[-1]
    # The starter's death is what the reaper sees first, unless the startd removed the
    # scratch directory before the reaper's pass: either names what is gone.
    assert reaped.reason in (
        f"its starter process {starter} is gone",
        f"its scratch directory {_scratch_of(state, domain)} is gone",
    ), reaped
    assert reaped.snapshot is not None and Path(reaped.snapshot).is_file()


def _launchers_of(domain: str, uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            owner = entry.stat().st_uid
        except OSError:
            continue
        if owner == uid and domain.encode() in argv and any(b"launcher" in a for a in argv):
            found.append(int(entry.name))
    return found


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_bytes()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


def _command(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _scratch_of(state: Path, domain: str) -> str:
    data = json.loads((state / "service" / "vms" / f"{domain}.json").read_text())
    return str(data["scratch_dir"])


def test_a_jobs_own_hook_keyword_does_not_bypass_the_vm(e2e_pool: PersonalPool, jobs: Jobs) -> None:
    ad = e2e_pool.wait_for_history(jobs.other_keyword, JOB_TIMEOUT)
    out = (e2e_pool.job_dir("other") / "out").read_text()
    assert ad["HookKeyword"] == "OTHER"
    assert ad["ExitCode"] == 0, out
    assert f"uid={GUEST_USER_UID}\n" in out
    assert ad["GliteVmDomain"].startswith("glite-vm-")


def test_slot_ads_carry_the_host_facts(e2e_pool: PersonalPool, jobs: Jobs) -> None:
    e2e_pool.wait_for_history(jobs.root, JOB_TIMEOUT)  # the image is in the cache by now

    def facts() -> list[JobAd] | None:
        ads = e2e_pool.slot_ads()
        done = ads and all("test-direct" in ad.get("GliteVmCachedImages", "") for ad in ads)
        return ads if done else None

    ads: list[JobAd] = wait_until("slot ads with the cached image", facts, 60)
    for ad in ads:
        assert set(ad["GliteVmHypervisors"].split(",")) <= {"kvm", "qemu"}
        assert ad["GliteVmCacheFreeBytes"] > 0


def test_nothing_is_left_behind(
    e2e_pool: PersonalPool, e2e_service: ServiceProcess, jobs: Jobs
) -> None:
    for cluster in (jobs.run, jobs.root, jobs.other_keyword, jobs.removed, jobs.orphaned):
        e2e_pool.wait_for_history(cluster, JOB_TIMEOUT)
    client = e2e_service.client()
    wait_until("the service to hold no VM", lambda: client.list_vms() == [], 60)
    state = Path(e2e_service.env["GLITE_VM_STATE_DIR"])
    # this pool's VMs only: other pools on this libvirtd may run the same user's jobs
    assert domains_under(state) == []
    assert not list((state / "cache" / "leases").rglob("*.json"))
    # no job ended through a failure of glite-vm itself
    for cluster in (jobs.run, jobs.root, jobs.other_keyword):
        ad = e2e_pool.history_ad(cluster)
        assert ad is not None and "GliteVmLauncherError" not in ad
        assert ad["ExitCode"] != LAUNCHER_FAILURE_EXIT
