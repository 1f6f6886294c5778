"""Host faults in a site of two execute hosts (tests/condor/site.py): a drain, the repository
gone for a while, one host's glite-vm service stopped mid-run. Nothing is lost (every job ends
with exit code 0) and nothing leaks (no domain, no lease, no traceback in a service's log).

``hosta`` holds ``img-a`` and ``hostb`` holds ``img-b`` (``glite-vm images pull``), so the
central manager's cache-aware rank sends each image's jobs to its host first. The tests run in
order; the service stop comes last.
"""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.slots import SlotLayout
from glite_vm.units import GIB
from tests.condor.pool import JobAd, vm_job_description, wait_until
from tests.condor.site import Site, host_of, running_site, site_repository
from tests.support import domains_under, scratch_root

# VMs boot slowly under TCG on a machine shared with other VMs: every wait has its own bound
pytestmark = [pytest.mark.condor, pytest.mark.vm, pytest.mark.timeout(1800)]

LAYOUT = SlotLayout(slots=2, root_slots=0, cpus=1, memory_mib=256, disk_bytes=2 * GIB)
JOBS_TIMEOUT = 600.0
PAYLOAD = '#!/bin/sh\nsleep "$1"\necho "ran $1"\n'
#: What the submit templates show: a job whose launcher reports that glite-vm (not the
#: payload) failed goes back to the queue instead of ending with exit code 125, a bounded
#: number of times (the attribute stays in the ad after such a run: a plain on_exit_remove on
#: it would requeue the next, successful run too, for ever).
REQUEUE_ON_GLITE_VM_FAILURE = (
    "max_retries = 3",
    "retry_until = (ExitCode =!= 125) || (GliteVmLauncherError =?= undefined)",
)
#: The site's drain policy: a drained host lets its running VMs finish (HTCondor's default
#: MaxJobRetirementTime of 0 would evict them at once, to run again elsewhere).
DRAIN_POLICY = "MAXJOBRETIREMENTTIME = 3600\n"


@pytest.fixture(scope="module")
def site(guest_dir: Path, test_user: pwd.struct_passwd) -> Iterator[Site]:
    with scratch_root("glite-vm-site-faults-", "GLITE_VM_KEEP_SITE") as root:
        repo = root / "repo"
        site_repository(guest_dir, repo, ("img-a", "img-b"), pad_mib=2)
        with running_site(root, test_user, repo) as running:
            catalogue = running.repository.url + "/catalogue.json"
            for name, image in (("hosta", "img-a"), ("hostb", "img-b")):
                host = running.add_host(name, catalogue, LAYOUT, site_policy=DRAIN_POLICY)
                pulled = host.admin("images", "pull", image)
                assert pulled.returncode == 0, pulled.stderr
                wait_until(f"{name} to advertise {image}", host.cached_images, 60)
            yield running
            hosts = list(running.hosts.values())
        assert domains_under(root) == []
        for host in hosts:
            assert list(host.root.glob("cache/leases/*/*.json")) == [], host.name
            assert "Traceback" not in host.service.log(), host.service.log()[-3000:]


def submit(site: Site, name: str, image: str, count: int, seconds: int, *extra: str) -> int:
    description = vm_job_description(f"arguments = {seconds}", *extra, image=image)
    description = description.replace("\nqueue\n", f"\nqueue {count}\n")
    return site.submit(name, description, {"payload.sh": PAYLOAD})


def running_on(site: Site, cluster: int, host: str, count: int) -> list[JobAd]:
    """The queue ads once ``count`` jobs of ``cluster`` run in their VMs on ``host``."""

    def probe() -> list[JobAd] | None:
        ads = site.queue(cluster)
        up = [
            ad
            for ad in ads
            if ad.get("JobStatus") == 2
            and f"@{host}@" in str(ad.get("RemoteHost", ""))
            and ad.get("GliteVmDomain")
        ]
        return up if len(up) == count else None

    found: list[JobAd] = wait_until(f"{count} VMs of {cluster} on {host}", probe, JOBS_TIMEOUT, 3)
    return found


def all_succeeded(ads: list[JobAd]) -> None:
    for ad in ads:
        assert ad["ExitCode"] == 0, ad.get("GliteVmLauncherError") or ad.get("HoldReason") or ad


def test_a_drained_host_lets_its_vms_finish(site: Site) -> None:
    cluster = submit(site, "drain", "img-a", 2, 40)
    running_on(site, cluster, "hosta", 2)
    hosta = site.hosts["hosta"]
    site.cm.run(["condor_drain", "-graceful", hosta.drain_target])
    ads = site.wait_for_cluster(cluster, 2, JOBS_TIMEOUT)
    all_succeeded(ads)
    assert [host_of(ad) for ad in ads] == ["hosta", "hosta"]
    assert all(ad["NumJobStarts"] == 1 for ad in ads)  # finished, not evicted and run again
    wait_until(
        "hosta's slots to be drained",
        lambda: {ad.get("State") for ad in hosta.slot_ads()} == {"Drained"},
        120,
    )
    site.cm.run(["condor_drain", "-cancel", hosta.drain_target])
    wait_until(
        "hosta's slots to take jobs again",
        lambda: {ad.get("State") for ad in hosta.slot_ads()} == {"Unclaimed"},
        120,
    )


def test_cached_images_keep_jobs_running_while_the_repository_is_down(site: Site) -> None:
    site.repository.stop()
    try:
        cluster = submit(site, "no-repo", "img-a", 1, 1)
        (ad,) = site.wait_for_cluster(cluster, 1, JOBS_TIMEOUT)
    finally:
        site.repository.start()
    all_succeeded([ad])
    assert host_of(ad) == "hosta"
    assert ad["GliteVmCacheHit"] is True


def test_a_stopped_service_sends_its_jobs_to_the_other_host(site: Site) -> None:
    hostb = site.hosts["hostb"]
    cluster = submit(site, "svc-stop", "img-b", 2, 90, *REQUEUE_ON_GLITE_VM_FAILURE)
    running_on(site, cluster, "hostb", 2)
    assert hostb.service.stop() == 0
    try:
        wait_until(
            "hostb to report its service down",
            lambda: {ad.get("GliteVmServiceUp") for ad in hostb.slot_ads()} == {False},
            60,
        )
        ads = site.wait_for_cluster(cluster, 2, JOBS_TIMEOUT)
    finally:
        hostb.service.start()  # adopts the VMs it left running; their starters are gone
    all_succeeded(ads)
    assert [host_of(ad) for ad in ads] == ["hosta", "hosta"]
    assert all(ad["NumJobStarts"] >= 2 for ad in ads)  # started on hostb, then on hosta
    assert all(ad["NumJobCompletions"] == 2 for ad in ads)  # the failed run, the good one
    # the restarted service reaps the VMs whose jobs moved on
    wait_until("hostb's orphaned VMs to be reaped", lambda: not domains_under(hostb.root), 120)
