"""A site of two execute hosts (tests/condor/site.py): cache-aware matching, pre-staging, the
templates' job rank, and host faults. One site serves the whole module (starting one costs
about a minute); each test leaves it as the next one needs it, and a test that breaks
something (a drain, the repository, a service) restores it.

Host ``hosta`` is given ``img-a`` by its admin (``glite-vm images pull``); host ``hostb``
pre-stages ``img-b`` by itself (``GLITE_VM_PREFETCH``). Both have 2 VM slots, the site's drain
policy, and share one nginx repository, whose access log shows every download. The central
manager runs the pre-job rank of ``glite-vm config --central-manager`` (but for the job rank
test). The tests run in order: each one's jobs start from what the earlier ones left in the
caches. The spill gives ``hostb`` ``img-a`` too, so it comes after the job rank test, and the
faults then use ``img-b``, which only ``hostb`` holds until its service stops.
Faults lose nothing (every job ends with exit code 0) and nothing leaks (no domain, no lease,
no traceback in a service's log).
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
IMAGES = ("img-a", "img-b")
JOBS_TIMEOUT = 600.0  # a handful of TCG boots on a machine shared with other VMs
PAYLOAD = '#!/bin/sh\nsleep "$1"\necho "ran $1"\n'
#: The line of submit_templates/build-as-user.sub.
JOB_RANK = "rank = stringListMember(GliteVmImage, GliteVmCachedImages)"
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
def site_root() -> Iterator[Path]:
    with scratch_root("glite-vm-site-", "GLITE_VM_KEEP_SITE") as path:
        yield path


@pytest.fixture(scope="module")
def site(site_root: Path, guest_dir: Path, test_user: pwd.struct_passwd) -> Iterator[Site]:
    repo = site_root / "repo"
    site_repository(guest_dir, repo, IMAGES, pad_mib=2)
    with running_site(site_root, test_user, repo) as running:
        catalogue = running.repository.url + "/catalogue.json"
        hosta = running.add_host("hosta", catalogue, LAYOUT, site_policy=DRAIN_POLICY)
        pulled = hosta.admin("images", "pull", "img-a")
        assert pulled.returncode == 0, pulled.stderr
        hostb = running.add_host(
            "hostb",
            catalogue,
            LAYOUT,
            settings={"GLITE_VM_PREFETCH": "img-b", "GLITE_VM_PREFETCH_RATE": "4MB/s"},
            site_policy=DRAIN_POLICY,
        )
        # every test starts from this: each host advertises the image it was given
        wait_until("hosta to advertise img-a", lambda: "img-a" in hosta.cached_images(), 60)
        wait_until("hostb to pre-stage img-b", lambda: "img-b" in hostb.cached_images(), 180)
        yield running
        hosts = list(running.hosts.values())
    # after every daemon and service stopped: nothing of the site's may remain
    assert domains_under(site_root) == []
    for host in hosts:
        assert list(host.root.glob("cache/leases/*/*.json")) == [], f"leases left on {host.name}"
        assert "Traceback" not in host.service.log(), host.service.log()[-3000:]


def images_job(images: list[str], seconds: int | str, *extra: str) -> str:
    """One cluster, one job per entry of ``images``, each sleeping ``seconds`` in its VM."""
    description = vm_job_description(f"arguments = {seconds}", *extra, image="$(image)")
    return description.replace("\nqueue\n", f"\nqueue image in ({', '.join(images)})\n")


def run_cluster(site: Site, name: str, images: list[str], seconds: int, *extra: str) -> list[JobAd]:
    cluster = site.submit(name, images_job(images, seconds, *extra), {"payload.sh": PAYLOAD})
    ads = site.wait_for_cluster(cluster, len(images), JOBS_TIMEOUT)
    all_succeeded(ads)
    return ads


def all_succeeded(ads: list[JobAd]) -> None:
    for ad in ads:
        assert ad["ExitCode"] == 0, ad.get("GliteVmLauncherError") or ad.get("HoldReason") or ad


def submit(site: Site, name: str, image: str, count: int, seconds: int | str, *extra: str) -> int:
    description = images_job([image] * count, seconds, *extra)
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


# -- cache-aware matching and pre-staging ---------------------------------------------------


def test_each_host_advertises_its_images_and_hostb_prestaged_img_b(site: Site) -> None:
    hosta, hostb = site.hosts["hosta"], site.hosts["hostb"]
    assert hosta.cached_images() == {"img-a"}
    assert hostb.cached_images() == {"img-b"}
    # the advertiser (user condor) reaches each host's service: its slots take jobs
    for host in (hosta, hostb):
        assert {ad.get("GliteVmServiceUp") for ad in host.slot_ads()} == {True}
    # one download each: img-a by hosta's admin, img-b by hostb's service on its own
    assert len(site.repository.gets("img-a.qcow2")) == 1
    assert len(site.repository.gets("img-b.qcow2")) == 1
    assert "pre-staging img-b: fetched" in hostb.service.log()


def test_jobs_run_where_their_image_is_and_prestaged_ones_download_nothing(site: Site) -> None:
    # interleaved, so that slots taken in their listed order would mix the images up
    ads = run_cluster(site, "by-image", ["img-a", "img-b", "img-a", "img-b"], 5)
    where = {(ad["GliteVmImage"], host_of(ad)) for ad in ads}
    assert where == {("img-a", "hosta"), ("img-b", "hostb")}
    assert all(ad["GliteVmCacheHit"] is True for ad in ads)
    # the first jobs of the pre-staged image paid no download: still the one of pre-staging
    assert len(site.repository.gets("img-b.qcow2")) == 1
    assert len(site.repository.gets("img-a.qcow2")) == 1


def test_the_templates_job_rank_sends_jobs_to_the_host_with_their_image(site: Site) -> None:
    """The user's way to ask for a host that holds the image, in a site whose central manager
    keeps HTCondor's default pre-job rank (no ``glite-vm config --central-manager``)."""
    template = Path(__file__).resolve().parents[2] / "submit_templates/build-as-user.sub"
    assert JOB_RANK in (" ".join(line.split()) for line in template.read_text().splitlines())
    downloads = {i: len(site.repository.gets(f"{i}.qcow2")) for i in IMAGES}
    site.use_cache_rank(False)
    try:
        ads = run_cluster(site, "job-rank", ["img-a", "img-b", "img-a", "img-b"], 5, JOB_RANK)
    finally:
        site.use_cache_rank(True)
    assert {(ad["GliteVmImage"], host_of(ad)) for ad in ads} == {
        ("img-a", "hosta"),
        ("img-b", "hostb"),
    }
    assert {i: len(site.repository.gets(f"{i}.qcow2")) for i in IMAGES} == downloads


def test_jobs_spill_to_the_other_host_when_the_holder_is_full(site: Site) -> None:
    # three at once, long enough to hold hosta's two slots while the third is matched
    downloads = len(site.repository.gets("img-a.qcow2"))
    ads = run_cluster(site, "spill", ["img-a", "img-a", "img-a"], 40)
    hosts = sorted(host_of(ad) for ad in ads)
    assert hosts == ["hosta", "hosta", "hostb"]
    spilled = next(ad for ad in ads if host_of(ad) == "hostb")
    assert spilled["GliteVmCacheHit"] is False  # hostb fetched img-a for it
    assert len(site.repository.gets("img-a.qcow2")) == downloads + 1  # once per host, never more
    hostb = site.hosts["hostb"]
    wait_until("hostb to advertise img-a", lambda: "img-a" in hostb.cached_images(), 60)


# -- host faults ----------------------------------------------------------------------------


def test_a_drained_host_lets_its_vms_finish(site: Site) -> None:
    cluster = submit(site, "drain", "img-b", 2, 40)
    running_on(site, cluster, "hostb", 2)
    hostb = site.hosts["hostb"]
    site.cm.run(["condor_drain", "-graceful", hostb.drain_target])
    try:
        ads = site.wait_for_cluster(cluster, 2, JOBS_TIMEOUT)
        all_succeeded(ads)
        assert [host_of(ad) for ad in ads] == ["hostb", "hostb"]
        assert all(ad["NumJobStarts"] == 1 for ad in ads)  # finished, not evicted and run again
        wait_until(
            "hostb's slots to be drained",
            lambda: {ad.get("State") for ad in hostb.slot_ads()} == {"Drained"},
            120,
        )
    finally:
        site.cm.run(["condor_drain", "-cancel", hostb.drain_target], check=False)
    wait_until(
        "hostb's slots to take jobs again",
        lambda: {ad.get("State") for ad in hostb.slot_ads()} == {"Unclaimed"},
        120,
    )


def test_cached_images_keep_jobs_running_while_the_repository_is_down(site: Site) -> None:
    site.repository.stop()
    try:
        cluster = submit(site, "no-repo", "img-b", 1, 1)
        (ad,) = site.wait_for_cluster(cluster, 1, JOBS_TIMEOUT)
    finally:
        site.repository.start()
    all_succeeded([ad])
    assert host_of(ad) == "hostb"
    assert ad["GliteVmCacheHit"] is True


def test_a_stopped_service_sends_its_jobs_to_the_other_host(site: Site) -> None:
    hostb = site.hosts["hostb"]
    # 90 s on hostb, long enough to be running still when its service stops; 1 s when run
    # again on hosta (``$$([...])`` is evaluated at each match; NumJobStarts, unscoped, is
    # the job's: as TARGET.NumJobStarts it was undefined, so every run slept 90 s)
    seconds = "$$([ifThenElse((NumJobStarts ?: 0) > 0, 1, 90)])"
    cluster = submit(site, "svc-stop", "img-b", 2, seconds, *REQUEUE_ON_GLITE_VM_FAILURE)
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
    # the restarted service reaps the VMs whose jobs moved on, and its slots take jobs again
    wait_until("hostb's orphaned VMs to be reaped", lambda: not domains_under(hostb.root), 120)
    wait_until(
        "hostb to report its service up",
        lambda: {ad.get("GliteVmServiceUp") for ad in hostb.slot_ads()} == {True},
        60,
    )
