"""The submit templates' job ``rank`` (``stringListMember(GliteVmImage, GliteVmCachedImages)``)
in a site whose central manager keeps HTCondor's default pre-job rank: the user's way to ask
for a host that holds the image. Same site as test_site.py, without ``glite-vm config
--central-manager``; each host's admin pulled one image.
"""

from __future__ import annotations

import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.condor.pool import vm_job_description, wait_until
from tests.condor.site import Site, host_of, running_site, site_repository
from tests.condor.test_site import JOBS_TIMEOUT, LAYOUT, PAYLOAD
from tests.support import domains_under, scratch_root

pytestmark = [pytest.mark.condor, pytest.mark.vm, pytest.mark.timeout(1800)]

#: The line of submit_templates/build-as-user.sub.
JOB_RANK = "rank = stringListMember(GliteVmImage, GliteVmCachedImages)"


@pytest.fixture(scope="module")
def site(guest_dir: Path, test_user: pwd.struct_passwd) -> Iterator[Site]:
    with scratch_root("glite-vm-site-rank-", "GLITE_VM_KEEP_SITE") as root:
        repo = root / "repo"
        site_repository(guest_dir, repo, ("img-a", "img-b"), pad_mib=2)
        with running_site(root, test_user, repo, cache_rank=False) as running:
            catalogue = running.repository.url + "/catalogue.json"
            for name, image in (("hosta", "img-a"), ("hostb", "img-b")):
                host = running.add_host(name, catalogue, LAYOUT)
                pulled = host.admin("images", "pull", image)
                assert pulled.returncode == 0, pulled.stderr
                wait_until(f"{name} to advertise {image}", host.cached_images, 60)
            yield running
        assert domains_under(root) == []


def test_the_templates_job_rank_sends_jobs_to_the_host_with_their_image(site: Site) -> None:
    template = Path(__file__).resolve().parents[2] / "submit_templates/build-as-user.sub"
    assert JOB_RANK in (" ".join(line.split()) for line in template.read_text().splitlines())
    images = ["img-a", "img-b", "img-a", "img-b"]
    description = vm_job_description("arguments = 5", JOB_RANK, image="$(image)")
    description = description.replace("\nqueue\n", f"\nqueue image in ({', '.join(images)})\n")
    cluster = site.submit("job-rank", description, {"payload.sh": PAYLOAD})
    ads = site.wait_for_cluster(cluster, len(images), JOBS_TIMEOUT)
    assert all(ad["ExitCode"] == 0 for ad in ads)
    assert {(ad["GliteVmImage"], host_of(ad)) for ad in ads} == {
        ("img-a", "hosta"),
        ("img-b", "hostb"),
    }
    assert len(site.repository.gets("img-a.qcow2")) == 1
    assert len(site.repository.gets("img-b.qcow2")) == 1
