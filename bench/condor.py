"""HTCondor benchmark: submit -> job done for a trivial job, with glite-vm's hooks vs without.

One process run starts the glite-vm service (root) and TWO personal HTCondor pools side by side
on their own loopback ports, exactly as ``scripts/demo_condor.py`` does (the helpers of
``tests/condor/pool.py`` and ``tests/service/svc_support.py``): (a) a plain pool without our
configuration -- the baseline, since our START refuses jobs without ``GliteVmImage`` -- and
(b) a pool configured by ``glite-vm config`` (2 VM slots, 1 root-enabled). The same trivial job
(a transferred ``/bin/sh`` script that exits 0, submitted as an ordinary user) runs in (a) and,
with ``+GliteVmImage`` of the disk-boot test guest and ``+WantIOProxy = true``, in (b); runs
alternate a, b, a, b, ... one job at a time, after one unmeasured warm-up job per pool (it fills
the image cache and pays first-start costs). Each job is split into phases:

- match: submit -> input transfer starts (000 -> first 040 event: schedd, negotiation, claim);
- queue: submit -> execute (000 -> 001); HTCondor logs 001 only after PREPARE_JOB returned, so
  for ours it includes the input transfer and the whole prepare (VM boot);
- after_match: first 040 -> terminated (005), i.e. total without the negotiation wait;
- run: execute -> terminated (001 -> 005);
- ours only, from the job ad (chirped by the hooks/launcher): prepare = GliteVmTimeFetch +
  GliteVmTimeBoot + GliteVmTimeReady, transfer in/out, payload, teardown;
- total: submit -> terminated (000 -> 005).

Both pools write their user logs with ``DEFAULT_USERLOG_FORMAT_OPTIONS = ISO_DATE SUB_SECOND``
(milliseconds); the JSON says whether sub-second times were found (else 1 s resolution). The
guest's own boot time is GliteVmTimeReady (domain running -> guest agent answering). Target:
added = total(b) - total(a) <= 1.15 x guest boot + 1 s. The negotiation wait (NEGOTIATOR_CYCLE_DELAY
of the personal pool: 5 s) varies by several seconds from job to job and has nothing to do with
the hooks, so the same check is also made on after_match (``added_after_match_s``), the figure
that measures what the hooks add. The last line is JSON.

Usage: python bench/condor.py [--runs N]   (as root; needs the test guests: scripts/dev setup)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.slots import SlotLayout  # noqa: E402
from glite_vm.units import GIB  # noqa: E402
from tests.condor.pool import (  # noqa: E402
    JobAd,
    PersonalPool,
    PoolError,
    ensure_user,
    find_tarball,
    glite_vm_execute_host,
    running_pool,
    unpack_release,
    wait_until,
)
from tests.service.svc_support import ServiceProcess, running_service  # noqa: E402
from tests.support import disk_guest_catalogue, domain_names  # noqa: E402

LAYOUT = SlotLayout(slots=2, root_slots=1, cpus=1, memory_mib=2048, disk_bytes=30 * GIB)
GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))
JOB_TIMEOUT = 300.0
USERLOG_CONFIG = "DEFAULT_USERLOG_FORMAT_OPTIONS = ISO_DATE SUB_SECOND\n"
PAYLOAD = "#!/bin/sh\nexit 0\n"

SUBMIT = """executable              = true.sh
should_transfer_files   = YES
when_to_transfer_output = ON_EXIT
request_cpus            = 1
request_memory          = 1GB
request_disk            = 1GB
output                  = job.out
error                   = job.err
log                     = job.log
{extra}queue
"""
VM_EXTRA = '+GliteVmImage = "test-guest"\n+GliteVmKeepSnapshot = "never"\n+WantIOProxy = true\n'

# "000 (012.000.000) 2025-01-02 03:04:05.678 Job submitted ..." (ISO_DATE; SUB_SECOND adds .ms)
EVENT = re.compile(r"^(\d{3}) \(\d+\.\d+\.\d+\) (\d{4}-\d\d-\d\d[T ][\d:.]+|\d\d/\d\d [\d:.]+)")


def parse_time(text: str) -> tuple[float, bool]:
    """Seconds since the epoch (local time as HTCondor writes it) and whether it had a fraction."""
    if "/" in text:  # legacy "MM/DD HH:MM:SS": no year
        text = f"{time.localtime().tm_year}-{text.replace('/', '-')}"
    text = text.replace(" ", "T")
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in text else "%Y-%m-%dT%H:%M:%S"
    return datetime.datetime.strptime(text, fmt).timestamp(), "." in text


def user_log_events(log: Path) -> tuple[dict[str, float], bool]:
    """First time of each event code in ``log`` and whether the times had sub-second digits."""
    times: dict[str, float] = {}
    sub_second = True
    for line in log.read_text().splitlines():
        m = EVENT.match(line)
        if m and m.group(1) not in times:
            t, frac = parse_time(m.group(2))
            times[m.group(1)] = t
            sub_second = sub_second and frac
    return times, sub_second


def run_job(pool: PersonalPool, name: str, extra: str) -> tuple[JobAd, dict[str, float], bool]:
    """Submit one job as the pool's user, wait for it to leave the queue; ad + user-log times."""
    jobdir = pool.job_dir(name)
    script = jobdir / "true.sh"
    script.write_text(PAYLOAD)
    script.chmod(0o755)
    os.chown(script, pool.user.pw_uid, pool.user.pw_gid)
    cluster = pool.submit(name, SUBMIT.format(extra=extra))

    def done() -> JobAd | None:
        ad = pool.history_ad(cluster)
        if ad is not None:
            return ad
        queued = pool.queue_ad(cluster)
        if queued is not None and queued.get("JobStatus") == 5:
            raise PoolError(f"job {name} ({cluster}) held: {queued.get('HoldReason')}")
        return None

    ad: JobAd = wait_until(f"job {name} ({cluster}) to finish", done, JOB_TIMEOUT, 0.5)
    if ad.get("ExitCode") != 0:
        raise PoolError(f"job {name} ({cluster}) exited with {ad.get('ExitCode')}")
    events, sub_second = user_log_events(jobdir / "job.log")
    missing = {"000", "001", "005", "040"} - set(events)
    if missing:
        head = (jobdir / "job.log").read_text()[:300]
        raise PoolError(f"job {name}: user log lacks events {sorted(missing)}: {head!r}")
    return ad, events, sub_second


def phases(ad: JobAd, events: dict[str, float], vm: bool) -> dict[str, float]:
    out = {
        "match": events["040"] - events["000"],
        "queue": events["001"] - events["000"],
        "after_match": events["005"] - events["040"],
        "run": events["005"] - events["001"],
        "total": events["005"] - events["000"],
    }
    if vm:

        def num(key: str) -> float:
            value = ad.get(key)
            if not isinstance(value, int | float):
                raise PoolError(f"job ad lacks {key} (has {sorted(ad)})")
            return float(value)

        out.update(
            fetch=num("GliteVmTimeFetch"),
            boot=num("GliteVmTimeBoot"),
            ready=num("GliteVmTimeReady"),
            prepare=num("GliteVmTimeFetch") + num("GliteVmTimeBoot") + num("GliteVmTimeReady"),
            transfer_in=num("GliteVmTimeTransferIn"),
            payload=num("GliteVmTimePayload"),
            transfer_out=num("GliteVmTimeTransferOut"),
            teardown=num("GliteVmTimeTeardown"),
        )
    return out


def describe(label: str, p: dict[str, float]) -> str:
    return f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in p.items())


def median(runs: list[dict[str, float]], key: str) -> float:
    return round(statistics.median(r[key] for r in runs), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="glite-vm-bench-condor-", dir="/var/tmp"))
    root.chmod(0o711)
    domains: list[str] = []
    try:
        figures = run_bench(root, args.runs, domains)
    finally:
        left = domain_names()
        ours_left = sorted(set(left) & set(domains))
        print(f"VMs of this run left: {ours_left or 'none'}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    figures["vms_left"] = len(ours_left)
    print(json.dumps(figures))
    return 0 if not ours_left else 1


def run_bench(root: Path, runs: int, domains: list[str]) -> dict[str, Any]:
    repo = root / "repo"
    repo.mkdir(mode=0o755)
    catalogue = disk_guest_catalogue(GUESTS, repo, "test-guest")
    # The service knows the pool's slots as `glite-vm config` writes them.
    with running_service(root, catalogue, LAYOUT.knobs()) as service:
        state = Path(service.env["GLITE_VM_STATE_DIR"])
        return run_pools(root, service, state, runs, domains)


def run_pools(
    root: Path, service: ServiceProcess, state: Path, runs: int, domains: list[str]
) -> dict[str, Any]:
    plain_prefix = root / "plain"
    ours_prefix = root / "htcondor"
    plain_prefix.mkdir(mode=0o755)
    unpack_release(find_tarball(), plain_prefix)
    _hooks, config = glite_vm_execute_host(
        ours_prefix,
        state_dir=state,
        socket_path=service.socket_path,
        layout=LAYOUT,
        advertise_period=10,
    )
    user = ensure_user()
    base: list[dict[str, float]] = []
    ours: list[dict[str, float]] = []
    sub_second = True
    hypervisor = "?"
    with (
        running_pool(plain_prefix, USERLOG_CONFIG, user) as plain,
        running_pool(ours_prefix, USERLOG_CONFIG + config, user) as pool,
    ):
        print(f"pools up: plain on port {plain.port}, glite-vm on port {pool.port}", flush=True)
        for n in range(runs + 1):
            label = "warm-up" if n == 0 else f"run {n}"
            ad, events, frac = run_job(plain, f"base-{n}", "")
            b = phases(ad, events, vm=False)
            ad, events, frac2 = run_job(pool, f"vm-{n}", VM_EXTRA)
            domains.append(str(ad.get("GliteVmDomain", "")))
            hypervisor = str(ad.get("GliteVmHypervisor", "?"))
            o = phases(ad, events, vm=True)
            print(describe(f"{label} baseline", b), flush=True)
            print(describe(f"{label} glite-vm", o), flush=True)
            if n == 0:
                continue
            sub_second = sub_second and frac and frac2
            base.append(b)
            ours.append(o)
    added = median(ours, "total") - median(base, "total")
    guest_boot = median(ours, "ready")
    target = 1.15 * guest_boot + 1.0
    added_after_match = median(ours, "after_match") - median(base, "after_match")
    figures: dict[str, Any] = {
        "benchmark": "condor",
        "hypervisor": hypervisor,
        "runs": runs,
        "userlog_sub_second": sub_second,
        **{f"baseline_{k}_s": median(base, k) for k in base[0]},
        **{f"glite_vm_{k}_s": median(ours, k) for k in ours[0]},
        "added_s": round(added, 3),
        "guest_boot_s": guest_boot,
        "target_added_s": round(target, 3),
        "target_met": added <= target,
        "added_after_match_s": round(added_after_match, 3),
        "target_met_after_match": added_after_match <= target,
    }
    print(
        f"median total: baseline {figures['baseline_total_s']} s, glite-vm "
        f"{figures['glite_vm_total_s']} s; added {added:.3f} s vs target "
        f"1.15 x guest boot {guest_boot:.3f} s + 1 s = {target:.3f} s: "
        f"{'met' if added <= target else 'NOT met'}; without the negotiation wait: added "
        f"{added_after_match:.3f} s, {'met' if added_after_match <= target else 'NOT met'}",
        flush=True,
    )
    return figures


if __name__ == "__main__":
    sys.exit(main())
