"""Broken-boot benchmark: how soon a guest that cannot boot is reported, against a good boot.

In one process run, alternating so that machine noise hits all alike: the good direct-kernel
test guest from ``VmHost.start`` to ``wait_ready`` returning, and three broken ones from
``VmHost.start`` to ``wait_ready`` raising its error (tests/support.py's BROKEN_GUESTS): a
kernel that panics at once (``test-panic``), a disk without boot loader
(``test-nobootloader``) and a guest that reaches its login prompt without starting its agent
(``test-agentless``). Each error must be the image's (ImageBootError); the run fails otherwise.
Targets: panic and nothing-to-boot within 1.5 x the good boot; no agent within the good boot
+ 30 s. The boot timeout is 300 s throughout. The last line is JSON.

Usage: python bench/boot_failures.py [--runs N]   (needs the test guests: scripts/dev setup)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.config import Settings  # noqa: E402
from glite_vm.errors import GliteVmError, ImageBootError  # noqa: E402
from glite_vm.images.acquire import acquire_image  # noqa: E402
from glite_vm.request import VMRequest  # noqa: E402
from glite_vm.vm.connect import open_host  # noqa: E402
from glite_vm.vm.lifecycle import VmHost  # noqa: E402
from tests.support import BROKEN_GUESTS, guest_catalogue  # noqa: E402

GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))
BOOT_TIMEOUT = 300.0
GOOD = "test-direct"
BROKEN = {
    "panic": "test-panic",
    "no_boot_device": "test-nobootloader",
    "no_agent": "test-agentless",
}
PANIC_RATIO = 1.5
NO_AGENT_MARGIN_S = 30.0


def time_boot(host: VmHost, name: str, n: int) -> tuple[float, str]:
    """Seconds from the request to ready (good) or to the error (broken); what ended it."""
    settings = host.settings
    with acquire_image(settings, name, job_id=f"bench.{n}") as lease:
        request = VMRequest.create(
            settings, image=name, job_id=f"bench.{n}", owner="bench", keep_snapshot="never"
        )
        start = time.monotonic()
        vm = host.start(request, lease.image)
        try:
            vm.wait_ready()
            outcome = "ready"
        except ImageBootError as exc:
            outcome = f"ImageBootError: {exc.problem}"
        except GliteVmError as exc:
            outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        seconds = time.monotonic() - start
        vm.teardown(failed=False, keep_override=False)
    return seconds, outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="glite-vm-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    times: dict[str, list[float]] = {"good": [], **{k: [] for k in BROKEN}}
    wrong: list[str] = []
    try:
        catalogue = guest_catalogue(
            GUESTS, work / "repo", direct={GOOD: ""}, variants=BROKEN_GUESTS
        )
        settings = Settings(
            state_dir=work / "state",
            catalogue=str(catalogue),
            boot_timeout=BOOT_TIMEOUT,
            default_memory_mib=512,
            default_disk_bytes=2 << 30,
        )
        host = open_host(settings)
        n = 0
        for run in range(args.runs):
            for kind, name in (("good", GOOD), *BROKEN.items()):
                n += 1
                seconds, outcome = time_boot(host, name, n)
                times[kind].append(seconds)
                expected = "ready" if kind == "good" else "ImageBootError"
                if not outcome.startswith(expected):
                    wrong.append(f"{name}: {outcome}")
                print(f"run {run + 1}: {name:<18} {seconds:6.2f} s  {outcome}", flush=True)
        host.conn.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    good = statistics.median(times["good"])
    median = {k: statistics.median(v) for k, v in times.items()}
    panic_ratio = median["panic"] / good
    no_boot_ratio = median["no_boot_device"] / good
    no_agent_over = median["no_agent"] - good
    met = (
        not wrong
        and panic_ratio <= PANIC_RATIO
        and no_boot_ratio <= PANIC_RATIO
        and no_agent_over <= NO_AGENT_MARGIN_S
    )
    figures = {
        "benchmark": "boot_failures",
        "hypervisor": host.hypervisor.kind,
        "runs": args.runs,
        "boot_timeout_s": BOOT_TIMEOUT,
        "agent_timeout_s": settings.agent_timeout,
        "good_boot_s": round(good, 3),
        "panic_s": round(median["panic"], 3),
        "panic_ratio": round(panic_ratio, 3),
        "no_boot_device_s": round(median["no_boot_device"], 3),
        "no_boot_device_ratio": round(no_boot_ratio, 3),
        "no_agent_s": round(median["no_agent"], 3),
        "no_agent_over_good_s": round(no_agent_over, 3),
        "wrong_outcomes": wrong,
        "targets": {"ratio": PANIC_RATIO, "no_agent_over_good_s": NO_AGENT_MARGIN_S},
        "target_met": met,
    }
    print(
        f"median good boot {good:.2f} s; panic {median['panic']:.2f} s ({panic_ratio:.2f} x), "
        f"no boot device {median['no_boot_device']:.2f} s ({no_boot_ratio:.2f} x), "
        f"no agent {median['no_agent']:.2f} s (good + {no_agent_over:.1f} s)"
    )
    for problem in wrong:
        print(f"WRONG: {problem}")
    print(json.dumps(figures))
    return 0 if not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
