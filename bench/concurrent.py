"""Concurrency benchmark: N small jobs' VMs started at once on this host, against one alone.

Each job is one thread doing what a job's VM goes through in the library: ``VmHost.start``
(overlay, define, start), ``Vm.wait_ready`` (boot until the guest agent answers), ``Vm.run`` of
a trivial command (``echo ok`` as the guest user, through the agent), ``Vm.teardown``. All N
(``--jobs``, default 16) are released at the same instant t0, on the direct-kernel test guest
with 1 vCPU and ``--memory`` MiB each, sharing one libvirt connection as the service does. All
must succeed. Reported: median and max time-to-ready (t0 -> agent answers), each job's phase
timestamps relative to t0, and the ratio of the median time-to-ready to that of one job alone
on the same host, measured in the same run (``--alone`` runs, split before and after the batch;
one unmeasured warm-up run comes first). ``--png PATH`` draws the batch's phases as a timeline.

Every VM is torn down, also on failure, SIGTERM or Ctrl-C; a last pass destroys any domain of
this run still known to libvirt. The last line is JSON.

Usage: python bench/concurrent.py [--jobs 16] [--memory 160] [--alone 3] [--png PATH]
       python bench/concurrent.py --replot RESULTS.json --png PATH   (redraw, no VMs)
       (needs the test guests: scripts/dev setup)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.config import Settings  # noqa: E402
from glite_vm.request import VMRequest  # noqa: E402
from glite_vm.vm.connect import open_host  # noqa: E402
from glite_vm.vm.domain_xml import DOMAIN_PREFIX  # noqa: E402
from glite_vm.vm.domains import destroy_domain  # noqa: E402
from glite_vm.vm.lifecycle import Vm, VmHost  # noqa: E402
from tests.support import LocalImage, direct_image_in, install_guests  # noqa: E402

GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))
READY_TIMEOUT = 600.0
PAYLOAD_TIMEOUT = 120.0
#: Bound on the whole batch: every thread must have finished by then.
BATCH_TIMEOUT = 1200.0
#: Bound on waiting for the threads after a stop (their VMs are being torn down).
STOP_GRACE = 120.0
OWNER = "bench"
#: The phases drawn, in order: (key, label, colour).
PHASES = (
    ("overlay", "overlay", "#8c564b"),
    ("define_start", "define + start", "#ff7f0e"),
    ("boot", "boot to agent ready", "#1f77b4"),
    ("payload", "payload (echo ok)", "#2ca02c"),
    ("teardown", "teardown", "#7f7f7f"),
)


@dataclasses.dataclass
class Job:
    """One job's timestamps, seconds after the common t0 (None: not reached)."""

    n: int
    start: float | None = None  # VmHost.start called
    overlay_s: float | None = None  # qemu-img inside VmHost.start
    running: float | None = None  # VmHost.start returned: domain running
    ready: float | None = None  # guest agent answered
    payload_done: float | None = None  # echo ok returned
    torn_down: float | None = None
    error: str | None = None

    def phases(self) -> dict[str, tuple[float, float]]:
        """Phase -> (begin, end), for the phases that completed."""
        out: dict[str, tuple[float, float]] = {}
        if self.start is not None and self.running is not None:
            split = self.start + (self.overlay_s or 0.0)
            out["overlay"] = (self.start, split)
            out["define_start"] = (split, self.running)
        if self.running is not None and self.ready is not None:
            out["boot"] = (self.running, self.ready)
        if self.ready is not None and self.payload_done is not None:
            out["payload"] = (self.ready, self.payload_done)
        if self.payload_done is not None and self.torn_down is not None:
            out["teardown"] = (self.payload_done, self.torn_down)
        return out


class Batch:
    """Runs jobs in threads; makes sure each VM is torn down whatever happens."""

    def __init__(self, host: VmHost, image: LocalImage, memory_mib: int, tag: str) -> None:
        self.host = host
        self.image = image
        self.memory_mib = memory_mib
        self.tag = tag
        self.stop = threading.Event()
        self.guard = threading.Lock()
        self.vms: list[Vm] = []

    def job_id(self, label: str) -> str:
        return f"{self.tag}.{label}"

    def run_one(self, job: Job, label: str, t0: float) -> None:
        """One job's life; timestamps into ``job``, errors into ``job.error``."""
        req = VMRequest.create(
            self.host.settings,
            image=self.image.name,
            job_id=self.job_id(label),
            owner=OWNER,
            cpus=1,
            memory_mib=self.memory_mib,
            keep_snapshot="never",
        )
        vm: Vm | None = None
        try:
            if self.stop.is_set():
                raise RuntimeError("stopped before it started")
            job.start = time.monotonic() - t0
            vm = self.host.start(req, self.image)
            job.running = time.monotonic() - t0
            job.overlay_s = vm.timings.overlay
            with self.guard:
                self.vms.append(vm)
                if self.stop.is_set():
                    raise RuntimeError("stopped")
            vm.wait_ready(READY_TIMEOUT)
            job.ready = time.monotonic() - t0
            out: list[bytes] = []
            result = vm.run(["echo", "ok"], stdout=out.append, timeout=PAYLOAD_TIMEOUT)
            if result.failed or b"".join(out) != b"ok\n":
                raise RuntimeError(f"payload: status {result.shell_status}, output {out!r}")
            job.payload_done = time.monotonic() - t0
        except Exception as exc:
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            if vm is not None:
                try:
                    vm.teardown(failed=job.error is not None, keep_override=False)
                    job.torn_down = time.monotonic() - t0
                except Exception as exc:
                    job.error = job.error or f"teardown: {type(exc).__name__}: {exc}"

    def run(self, count: int, label: str) -> list[Job]:
        """``count`` jobs released at the same t0; returns when all have finished."""
        jobs = [Job(n) for n in range(count)]
        go = threading.Event()
        t0 = 0.0

        def body(job: Job) -> None:
            if go.wait(60.0):
                self.run_one(job, f"{label}{job.n}", t0)
            else:
                job.error = "never released"

        threads = [
            threading.Thread(target=body, args=(job,), name=f"job-{job.n}", daemon=True)
            for job in jobs
        ]
        for t in threads:
            t.start()
        try:
            t0 = time.monotonic()
            go.set()
            deadline = t0 + BATCH_TIMEOUT
            for t in threads:
                # short joins: Ctrl-C and SIGTERM reach this (main) thread between them
                while t.is_alive() and time.monotonic() < deadline:
                    t.join(0.2)
            if any(t.is_alive() for t in threads):
                raise TimeoutError(f"the batch did not finish within {BATCH_TIMEOUT:g} s")
        except BaseException:
            self.stop_all(threads)
            raise
        return jobs

    def stop_all(self, threads: list[threading.Thread]) -> None:
        """Tear down every VM started so far; later ones see ``stop`` and tear down their own."""
        self.stop.set()
        with self.guard:
            started = list(self.vms)
        for vm in started:
            vm.teardown(failed=True, keep_override=False)
        deadline = time.monotonic() + STOP_GRACE
        for t in threads:
            t.join(max(deadline - time.monotonic(), 0.0))

    def destroy_leftovers(self) -> list[str]:
        """Last resort: destroy any domain of this run libvirt still has; their names."""
        prefix = f"{DOMAIN_PREFIX}{OWNER}-{self.tag}."
        left = []
        for dom in self.host.conn.listAllDomains(0):
            name = dom.name()
            if name.startswith(prefix):
                left.append(name)
                destroy_domain(dom)
        return left


def machine_facts(accelerator: str) -> dict[str, Any]:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "accelerator": "KVM" if accelerator == "kvm" else "QEMU TCG (no KVM)",
    }


def draw_timeline(figures: dict[str, Any], png: Path) -> None:
    """A Gantt chart of the batch: one row per job, a coloured bar per phase."""
    import matplotlib  # noqa: PLC0415 - only when a picture is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    jobs = [Job(**j) for j in figures["jobs"]]
    alone = Job(**figures["alone_example"]) if figures.get("alone_example") else None
    rows: list[tuple[str, Job]] = [(f"job {j.n + 1}", j) for j in jobs]
    if alone is not None:
        rows.append(("one alone", alone))
    fig, ax = plt.subplots(figsize=(11, 0.3 * len(rows) + 1.8), dpi=110)
    colours = {key: colour for key, _, colour in PHASES}
    for y, (_label, job) in enumerate(rows):
        for key, (begin, end) in job.phases().items():
            ax.broken_barh([(begin, max(end - begin, 0.02))], (y - 0.4, 0.8), color=colours[key])
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    if alone is not None:
        ax.axhline(len(rows) - 1.5, color="black", linewidth=0.6, linestyle="--")
    ax.invert_yaxis()
    ax.set_xlabel("seconds after all jobs were released (the lone job: after its own start)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlim(left=0)
    m = figures["machine"]
    ax.set_title(
        f"{figures['jobs_started']} VMs started at once, 1 vCPU / {figures['memory_mib']} MiB "
        f"each, on {m['cores']} host cores, {m['memory_gib']:g} GiB, {m['accelerator']}\n"
        f"time to agent ready: median {figures['ready_median_s']:.1f} s, "
        f"max {figures['ready_max_s']:.1f} s (one alone: {figures['alone_ready_median_s']:.1f} s)",
        fontsize=9,
    )
    ax.legend(
        handles=[Patch(color=colour, label=label) for _, label, colour in PHASES],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


def rounded(job: Job) -> dict[str, Any]:
    return {
        k: round(v, 3) if isinstance(v, float) else v for k, v in dataclasses.asdict(job).items()
    }


def run_bench(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], bool]:
    image = direct_image_in(work, install_guests(GUESTS, work), "bench-direct")
    settings = Settings(state_dir=work / "state", default_disk_bytes=2 << 30)
    host = open_host(settings)
    batch = Batch(host, image, args.memory, f"c{secrets.token_hex(3)}")
    # SIGTERM and SIGINT (even where the shell ignored it) stop the run through KeyboardInterrupt
    previous = {
        sig: signal.signal(sig, signal.default_int_handler)
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        alone_runs: list[Job] = []
        jobs: list[Job] = []
        before = (args.alone + 1) // 2
        plan = ["warm-up"] + ["alone"] * before + ["batch"] + ["alone"] * (args.alone - before)
        for i, step in enumerate(plan):
            if step == "batch":
                print(f"starting {args.jobs} jobs at once", flush=True)
                jobs = batch.run(args.jobs, "j")
                continue
            job = batch.run(1, f"a{i}-")[0]
            if job.error is not None or job.ready is None:
                raise RuntimeError(f"{step} run failed: {job.error}")
            print(f"{step}: agent ready after {job.ready:.2f} s", flush=True)
            if step == "alone":
                alone_runs.append(job)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        left = batch.destroy_leftovers()
        if left:
            print(f"destroyed leftover domains: {', '.join(left)}", flush=True)
    for job in jobs:
        if job.error is not None:
            print(f"job {job.n + 1} FAILED: {job.error}", flush=True)
    ok = [j for j in jobs if j.error is None and j.ready is not None]
    ready = [j.ready for j in ok if j.ready is not None]
    alone_ready = statistics.median(j.ready for j in alone_runs if j.ready is not None)
    succeeded = len(ok) == len(jobs)
    figures: dict[str, Any] = {
        "benchmark": "concurrent",
        "hypervisor": host.hypervisor.kind,
        "machine": machine_facts(host.hypervisor.kind),
        "memory_mib": args.memory,
        "jobs_started": len(jobs),
        "jobs_succeeded": len(ok),
        "all_succeeded": succeeded,
        "ready_median_s": round(statistics.median(ready), 2) if ready else None,
        "ready_max_s": round(max(ready), 2) if ready else None,
        "alone_runs": len(alone_runs),
        "alone_ready_median_s": round(alone_ready, 2),
        "ratio_ready_median": round(statistics.median(ready) / alone_ready, 2) if ready else None,
        # if the cores were shared perfectly and a lone boot kept one core busy throughout
        "fair_share_ready_s": round(alone_ready * len(jobs) / (os.cpu_count() or 1), 2),
        "all_done_s": round(max(j.torn_down or 0.0 for j in jobs), 2),
        "leftover_domains": len(left),
        "alone_example": rounded(alone_runs[len(alone_runs) // 2]),
        "jobs": [rounded(j) for j in jobs],
    }
    return figures, succeeded and not left


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=16, help="VMs started at once (16)")
    parser.add_argument("--memory", type=int, default=160, help="MiB per VM (160)")
    parser.add_argument("--alone", type=int, default=3, help="runs of one job alone (3)")
    parser.add_argument("--png", type=Path, help="draw the batch's phase timeline here")
    parser.add_argument("--replot", type=Path, help="redraw --png from saved JSON; no VMs")
    args = parser.parse_args()
    if args.replot is not None:
        if args.png is None:
            parser.error("--replot needs --png")
        saved = json.loads(args.replot.read_text())
        draw_timeline(saved.get("concurrent", saved), args.png)
        print(f"timeline written to {args.png}")
        return 0
    args.jobs = max(args.jobs, 1)
    args.alone = max(args.alone, 1)
    work = Path(tempfile.mkdtemp(prefix="glite-vm-bench-concurrent-", dir="/var/tmp"))
    work.chmod(0o711)  # QEMU runs as libvirt-qemu and must reach the overlays and guests
    try:
        figures, ok = run_bench(args, work)
    except KeyboardInterrupt:
        print("interrupted: the VMs of this run are torn down", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("job  start  running  ready  payload  torn down   (s after t0)")
    for j in figures["jobs"]:
        cells = [j[k] for k in ("start", "running", "ready", "payload_done", "torn_down")]
        shown = "  ".join(f"{c:7.2f}" if c is not None else "      -" for c in cells)
        print(f"{j['n'] + 1:3}  {shown}" + (f"  {j['error']}" if j["error"] else ""))
    print(
        f"{figures['jobs_succeeded']} of {figures['jobs_started']} jobs succeeded; "
        f"time to agent ready: median {figures['ready_median_s']} s, max "
        f"{figures['ready_max_s']} s; one alone {figures['alone_ready_median_s']} s "
        f"(ratio {figures['ratio_ready_median']}; perfect sharing of the cores would give "
        f"{figures['fair_share_ready_s']} s); all torn down {figures['all_done_s']} s "
        f"after t0; {os.cpu_count()} cores, {figures['machine']['accelerator']}",
        flush=True,
    )
    if args.png is not None:
        draw_timeline(figures, args.png)
        print(f"timeline written to {args.png}")
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
