"""A site of two execute hosts (tests/condor/site.py): cache-aware matching and pre-staging.

Host ``hosta`` is given ``img-a`` by its admin (``glite-vm images pull``); host ``hostb``
pre-stages ``img-b`` by itself (``GLITE_VM_PREFETCH``). Both have 2 VM slots and share one
nginx repository, whose access log shows every download. The central manager runs the
pre-job rank of ``glite-vm config --central-manager``. The tests run in order: each one's
jobs start from what the earlier ones left in the caches.
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
        hosta = running.add_host("hosta", catalogue, LAYOUT)
        pulled = hosta.admin("images", "pull", "img-a")
        assert pulled.returncode == 0, pulled.stderr
        running.add_host(
            "hostb",
            catalogue,
            LAYOUT,
            settings={"GLITE_VM_PREFETCH": "img-b", "GLITE_VM_PREFETCH_RATE": "4MB/s"},
        )
        yield running
        hosts = list(running.hosts.values())
    # after every daemon and service stopped: nothing of the site's may remain
    assert domains_under(site_root) == []
    for host in hosts:
        assert list(host.root.glob("cache/leases/*/*.json")) == [], f"leases left on {host.name}"
        assert "Traceback" not in host.service.log(), host.service.log()[-3000:]


def images_job(images: list[str], seconds: int) -> str:
    """One cluster, one job per entry of ``images``, each sleeping ``seconds`` in its VM."""
    description = vm_job_description(f"arguments = {seconds}", image="$(image)")
    return description.replace("\nqueue\n", f"\nqueue image in ({', '.join(images)})\n")


def run_cluster(site: Site, name: str, images: list[str], seconds: int) -> list[JobAd]:
    cluster = site.submit(name, images_job(images, seconds), {"payload.sh": PAYLOAD})
    ads = site.wait_for_cluster(cluster, len(images), JOBS_TIMEOUT)
    for ad in ads:
        assert ad["ExitCode"] == 0, ad.get("HoldReason") or ad
    return ads


def test_each_host_advertises_its_images_and_hostb_prestaged_img_b(site: Site) -> None:
    hosta, hostb = site.hosts["hosta"], site.hosts["hostb"]
    wait_until("hosta to advertise img-a", lambda: "img-a" in hosta.cached_images(), 60)
    wait_until("hostb to pre-stage img-b", lambda: "img-b" in hostb.cached_images(), 180)
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


def test_jobs_spill_to_the_other_host_when_the_holder_is_full(site: Site) -> None:
    # three at once, long enough to hold hosta's two slots while the third is matched
    ads = run_cluster(site, "spill", ["img-a", "img-a", "img-a"], 40)
    hosts = sorted(host_of(ad) for ad in ads)
    assert hosts == ["hosta", "hosta", "hostb"]
    spilled = next(ad for ad in ads if host_of(ad) == "hostb")
    assert spilled["GliteVmCacheHit"] is False  # hostb fetched img-a for it
    assert len(site.repository.gets("img-a.qcow2")) == 2  # once per host, never more
    hostb = site.hosts["hostb"]
    wait_until("hostb to advertise img-a", lambda: "img-a" in hostb.cached_images(), 60)
