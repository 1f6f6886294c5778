"""Site benchmark: 2 execute hosts x 2 VM slots, one repository, jobs over several images, with
and without cache-aware matching, in one run.

Each variant gets a fresh site (tests/condor/site.py): a central manager, two execute hosts set
up by ``glite-vm hook install``, ``glite-vm config`` and ``glite-vm serve`` with empty caches,
and Debian's nginx serving the repository (direct-kernel test guests, each data disk made
distinct by ``--pad-mib`` MiB of its own bytes). The baseline's central manager keeps
HTCondor's default ``NEGOTIATOR_PRE_JOB_RANK``; the other runs ``glite-vm config
--central-manager`` (cache-aware: an idle slot whose host holds the job's image first); a third
variant adds ``CLAIM_WORKLIFE = 0`` on the execute hosts, so that the schedd cannot hand a
finished job's slot to the next job without a negotiation (which consults no rank). The same
cluster is submitted to each at once: ``--jobs`` jobs, images in turn (a, b, c, d, a, ...),
each sleeping ``--seconds`` in its VM.

Reported per variant: bytes and GETs the repository served per image (nginx's access log; the
kernel and initramfs, shared by all images, separately), cache hits, makespan (first submit ->
last completion), per-job wait (submit -> start of the job, which HTCondor logs after
PREPARE_JOB, so it includes the image fetch and the boot). Target: each image fetched at most
once per host. Ratios are the cache-aware variant over the baseline. The last line is JSON.

Usage: python bench/site.py [--jobs 24] [--images 4] [--seconds 5] [--pad-mib 16]
(as root; needs the test guests and nginx: scripts/dev setup)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.slots import SlotLayout  # noqa: E402
from glite_vm.units import GIB  # noqa: E402
from tests.condor.pool import ensure_user, vm_job_description  # noqa: E402
from tests.condor.site import Site, host_of, running_site, site_repository  # noqa: E402
from tests.support import domains_under, install_guests, scratch_root  # noqa: E402

LAYOUT = SlotLayout(slots=2, root_slots=0, cpus=1, memory_mib=256, disk_bytes=2 * GIB)
HOSTS = ("hosta", "hostb")
GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))
PAYLOAD = '#!/bin/sh\nsleep "$1"\n'
JOBS_TIMEOUT = 3600.0


def image_names(count: int) -> list[str]:
    return [f"img-{chr(ord('a') + n)}" for n in range(count)]


#: label -> (cache-aware rank on the central manager, the execute hosts' extra policy)
VARIANTS: dict[str, tuple[bool, str]] = {
    "baseline": (False, ""),
    "cache_aware": (True, ""),
    "cache_aware_no_claim_reuse": (True, "CLAIM_WORKLIFE = 0\n"),
}


def run_variant(
    root: Path,
    guests: Path,
    *,
    cache_rank: bool,
    site_policy: str,
    images: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    repo = root / "repo"
    site_repository(guests, repo, images, pad_mib=args.pad_mib)
    with running_site(root, ensure_user(), repo, cache_rank=cache_rank) as site:
        catalogue = site.repository.url + "/catalogue.json"
        for host in HOSTS:
            site.add_host(host, catalogue, LAYOUT, site_policy=site_policy)
        order = [images[n % len(images)] for n in range(args.jobs)]
        description = vm_job_description(f"arguments = {args.seconds}", image="$(image)")
        description = description.replace("\nqueue\n", f"\nqueue image in ({', '.join(order)})\n")
        cluster = site.submit("bench", description, {"payload.sh": PAYLOAD})
        ads = site.wait_for_cluster(cluster, args.jobs, JOBS_TIMEOUT)
        figures = summarise(site, ads, images)
    figures["leftover_domains"] = len(domains_under(root))
    return figures


def summarise(site: Site, ads: list[dict[str, Any]], images: list[str]) -> dict[str, Any]:
    failed = [ad["ProcId"] for ad in ads if ad.get("ExitCode") != 0]
    waits = [float(ad["JobCurrentStartDate"] - ad["QDate"]) for ad in ads]
    makespan = max(ad["CompletionDate"] for ad in ads) - min(ad["QDate"] for ad in ads)
    per_image: dict[str, dict[str, Any]] = {}
    for image in images:
        gets = site.repository.gets(f"{image}.qcow2")
        per_image[image] = {
            "gets": len(gets),
            "bytes": sum(int(r["bytes"]) for r in gets),
            "hosts_ran": sorted({host_of(ad) for ad in ads if ad["GliteVmImage"] == image}),
        }
    shared = [site.repository.gets(f) for f in ("vmlinuz", "initrd.img")]
    return {
        "jobs": len(ads),
        "failed": failed,
        "cache_hits": sum(1 for ad in ads if ad.get("GliteVmCacheHit") is True),
        "makespan_s": float(makespan),
        "wait_median_s": statistics.median(waits),
        "wait_max_s": max(waits),
        "image_gets": sum(v["gets"] for v in per_image.values()),
        "image_bytes": sum(v["bytes"] for v in per_image.values()),
        "shared_bytes": sum(int(r["bytes"]) for gets in shared for r in gets),
        "per_image": per_image,
        "at_most_once_per_host": all(v["gets"] <= len(HOSTS) for v in per_image.values()),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5, help="each payload's sleep")
    parser.add_argument("--pad-mib", type=int, default=16, help="each image's own bytes")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/site.py: run as root (services and HTCondor daemons)", file=sys.stderr)
        return 2
    images = image_names(args.images)
    results: dict[str, Any] = {"jobs": args.jobs, "images": images, "hosts": list(HOSTS)}
    with scratch_root("glite-vm-bench-site-", "GLITE_VM_KEEP_SITE") as tmp:
        guests = tmp / "guests"
        install_guests(GUESTS, guests)
        for label, (rank, policy) in VARIANTS.items():
            with scratch_root(f"glite-vm-bench-site-{label}-", "GLITE_VM_KEEP_SITE") as root:
                print(f"site: {label} ...", file=sys.stderr, flush=True)
                results[label] = run_variant(
                    root, guests, cache_rank=rank, site_policy=policy, images=images, args=args
                )
    base = results["baseline"]
    results["ratios"] = {
        label: {
            key: (results[label][key] / base[key]) if base[key] else None
            for key in ("image_bytes", "image_gets", "makespan_s", "wait_median_s")
        }
        for label in VARIANTS
        if label != "baseline"
    }
    for label in VARIANTS:
        r = results[label]
        print(
            f"{label:26} image GETs {r['image_gets']:3d} ({r['image_bytes'] / 2**20:7.1f} MiB), "
            f"shared {r['shared_bytes'] / 2**20:5.1f} MiB, hits {r['cache_hits']:2d}/{r['jobs']}, "
            f"makespan {r['makespan_s']:6.0f} s, wait median {r['wait_median_s']:5.0f} s "
            f"max {r['wait_max_s']:5.0f} s, at most once per host: {r['at_most_once_per_host']}"
        )
    print(json.dumps(results))
    return 0 if not any(results[label]["failed"] for label in VARIANTS) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
