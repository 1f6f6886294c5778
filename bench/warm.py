"""Warm-start benchmark: jobs' VMs booted cold against VMs restored from a template, in one run.

Every job goes the one engine's whole way (``LocalService`` in-process, as ``glite-vm run`` does):
``prepare`` (image lease, overlay, boot or restore, agent ready, the guest's account), then
``exec`` of a payload that prints a line at once, then teardown. Timed per job from the call of
``prepare`` to (a) its return (agent ready, guest set up: "ready") and (b) the payload's first
byte of output ("first output"). The same guest, sizes and code for both; only
``GLITE_VM_WARM_START`` differs. The template is built once first (its build time is reported).

Two rounds: one job at a time (``--runs`` of each, cold and warm alternating so machine noise
hits both alike), then ``--jobs`` (default 16) at once, cold, then warm, each released at the same
instant t0 in threads sharing one libvirt connection. Reported: medians, the warm/cold ratios,
and the 16-at-once medians and maxima. The last line is JSON.

Guest: the direct-kernel test guest (tests/guest/build.sh), ``--memory`` MiB, 1 vCPU; or, opt-in,
``--debian DIR``: the Debian 12 systemd guest bench/debian_guest.sh makes in DIR (its stock boot
takes 10-20 s under TCG, the case warm start is for).

Usage: python bench/warm.py [--runs 3] [--jobs 16] [--memory 256] [--debian DIR] [--batch KIND]
                            [--parallel-restores N] [--png PATH]
       (needs scripts/dev setup; --debian needs bench/debian_guest.sh DIR first)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
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
from glite_vm.images.acquire import acquire_image  # noqa: E402
from glite_vm.images.build import build_catalogue, write_catalogue  # noqa: E402
from glite_vm.images.inspect import Limits  # noqa: E402
from glite_vm.request import JobRequest, vm_request  # noqa: E402
from glite_vm.service.local import LocalService  # noqa: E402
from glite_vm.service.registry import VmRegistry  # noqa: E402
from glite_vm.service.vm_state import VmRecord  # noqa: E402
from glite_vm.service.warm_start import build_template  # noqa: E402
from glite_vm.slots import SlotFacts  # noqa: E402
from glite_vm.vm.connect import open_host  # noqa: E402
from glite_vm.vm.lifecycle import VmHost  # noqa: E402
from tests.support import guest_catalogue  # noqa: E402

GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))
IMAGE = "bench-direct"
PAYLOAD = ["sh", "-c", "echo first; echo done"]


@dataclasses.dataclass
class Timing:
    ready: float | None = None  # prepare returned
    first_output: float | None = None  # the payload's first byte
    warm: bool | None = None
    error: str | None = None
    boot: float | None = None  # of ready: starting the domain (a restore: queue and restore)
    guest: float | None = None  # of ready: agent, refresh of a clone, the account


def one_job(service: LocalService, scratch: Path, n: int, t0: float | None = None) -> Timing:
    timing = Timing()
    job_dir = scratch / f"job{n}-{time.monotonic_ns()}"
    job_dir.mkdir()
    request = JobRequest.create(
        service.settings, image=IMAGE, job_id=f"bench.{n}", owner="bench", keep_snapshot="never"
    )
    start = time.monotonic() if t0 is None else t0
    vm = None
    try:
        prepared = service.prepare(request, scratch_dir=str(job_dir), starter_pid=None)
        vm = prepared.vm
        timing.ready = time.monotonic() - start
        timing.warm = bool(prepared.ad_attributes.get("GliteVmWarmStart"))
        record = service.registry.get(vm)
        if isinstance(record, VmRecord):
            timing.boot, timing.guest = record.vm.timings.boot, record.vm.timings.ready

        def heard(data: bytes) -> None:
            if timing.first_output is None and data:
                timing.first_output = time.monotonic() - start

        outcome = service.exec(vm, PAYLOAD, stdout=heard)
        if outcome.exit_code != 0:
            timing.error = f"payload exited {outcome.exit_code}"
    except Exception as exc:
        timing.error = str(exc).splitlines()[0]
    finally:
        if vm is not None:
            service.teardown(vm, failed=False)
        shutil.rmtree(job_dir, ignore_errors=True)
    return timing


def batch(service: LocalService, scratch: Path, jobs: int) -> list[Timing]:
    results: list[Timing] = [Timing() for _ in range(jobs)]
    gate = threading.Barrier(jobs + 1)
    t0_box: list[float] = []

    def run(n: int) -> None:
        gate.wait()
        results[n] = one_job(service, scratch, n, t0_box[0])

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(jobs)]
    for t in threads:
        t.start()
    t0_box.append(time.monotonic())
    gate.wait()
    for t in threads:
        t.join(timeout=1800)
    return results


def debian_catalogue(guest: Path, repo: Path) -> Path:
    """A ``file://`` repository listing the Debian guest as :data:`IMAGE`; the catalogue."""
    facts = json.loads((guest / "guest.json").read_text())
    repo.mkdir(mode=0o755)
    for name in ("kernel", "initrd"):
        shutil.copyfile(guest / facts[name], repo / facts[name])
    shutil.copyfile(guest / facts["disk"], repo / f"{IMAGE}.qcow2")
    sidecar = {
        "name": IMAGE,
        "guest_user": facts["guest_user"],
        "boot": "kernel",
        "kernel": facts["kernel"],
        "initrd": facts["initrd"],
        "cmdline": facts["cmdline"],
    }
    (repo / f"{IMAGE}.qcow2.json").write_text(json.dumps(sidecar))
    doc = build_catalogue(repo, limits=Limits(max_virtual_bytes=64 << 30, max_file_bytes=4 << 30))
    return write_catalogue(doc, repo / "catalogue.json")


def summary(timings: list[Timing]) -> dict[str, float | int | None]:
    ok = [t for t in timings if t.error is None and t.ready is not None]
    ready = [t.ready for t in ok if t.ready is not None]
    first = [t.first_output for t in ok if t.first_output is not None]
    return {
        "ok": len(ok),
        "failed": len(timings) - len(ok),
        "warm_starts": sum(1 for t in ok if t.warm),
        "ready_median": statistics.median(ready) if ready else None,
        "ready_max": max(ready) if ready else None,
        "first_output_median": statistics.median(first) if first else None,
        "first_output_max": max(first) if first else None,
    }


def ratio(a: float | int | None, b: float | int | None) -> float | None:
    return round(a / b, 3) if a and b else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=16)
    parser.add_argument("--memory", type=int, default=256, help="MiB per VM")
    parser.add_argument("--debian", type=Path, help="the guest of bench/debian_guest.sh DIR")
    parser.add_argument(
        "--parallel-restores",
        type=int,
        default=0,
        help="GLITE_VM_MAX_PARALLEL_RESTORES for the warm service (0: the host's cores)",
    )
    parser.add_argument("--png", type=Path, help="draw the batches' phases as a timeline here")
    parser.add_argument(
        "--batch",
        choices=("both", "warm", "none"),
        default="both",
        help="which kinds run JOBS at once (warm: skip the long cold batch while tuning)",
    )
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="glite-vm-bench-warm-", dir="/var/tmp"))
    root.chmod(0o711)
    try:
        if args.debian is None:
            catalogue = guest_catalogue(GUESTS, root / "repo", direct={IMAGE: ""})
        else:
            catalogue = debian_catalogue(args.debian, root / "repo")
        warm = Settings(
            state_dir=root / "state",
            catalogue=str(catalogue),
            boot_timeout=1200.0,
            default_memory_mib=args.memory,
            default_disk_bytes=1 << 30,
            cache_min_free_bytes=0,
            max_unmanaged_vms_per_user=max(4, args.jobs),
            max_parallel_restores=args.parallel_restores,
        )
        cold = dataclasses.replace(warm, warm_start=False)
        (root / "state").mkdir(mode=0o711)
        host = open_host(warm)
        try:
            return run(args, root, host, warm, cold)
        finally:
            host.conn.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args: argparse.Namespace, root: Path, host: VmHost, warm: Settings, cold: Settings) -> int:
    registry = VmRegistry(warm, host)
    services = {
        "cold": LocalService.for_this_user(
            cold, VmHost(host.conn, cold, host.hypervisor), registry=registry
        ),
        "warm": LocalService.for_this_user(warm, host, registry=registry),
    }
    scratch = root / "scratch"
    scratch.mkdir(mode=0o711)
    job = JobRequest.create(warm, image=IMAGE, job_id="bench.template", owner="bench")
    with acquire_image(warm, IMAGE, job_id="bench/template") as lease:
        t = time.monotonic()
        template = build_template(warm, host, vm_request(job, SlotFacts(), warm), lease.image)
        build_seconds = time.monotonic() - t
    assert template is not None
    print(f"template built in {build_seconds:.2f} s ({template.size >> 20} MiB)", file=sys.stderr)
    one_job(services["cold"], scratch, 0)  # warm-up, not measured
    alone: dict[str, list[Timing]] = {"cold": [], "warm": []}
    for i in range(args.runs):
        for kind in ("cold", "warm"):
            timing = one_job(services[kind], scratch, i + 1)
            alone[kind].append(timing)
            print(f"alone {kind}: {timing}", file=sys.stderr)
    together = {}
    kinds = {"both": ("cold", "warm"), "warm": ("warm",), "none": ()}[args.batch]
    batches: dict[str, list[Timing]] = {}
    for kind in ("cold", "warm"):
        batches[kind] = batch(services[kind], scratch, args.jobs if kind in kinds else 0)
        together[kind] = summary(batches[kind])
        print(f"{args.jobs} at once, {kind}: {together[kind]}", file=sys.stderr)
    one = {kind: summary(timings) for kind, timings in alone.items()}
    result: dict[str, Any] = {
        "guest": "debian" if args.debian else "test-direct",
        "memory_mib": args.memory,
        "accelerator": "KVM" if host.hypervisor.kind == "kvm" else "QEMU TCG",
        "template_build_seconds": round(build_seconds, 3),
        "template_bytes": template.size,
        "alone": one,
        "together": together,
        "jobs": args.jobs,
        "ratio_ready_alone": ratio(one["warm"]["ready_median"], one["cold"]["ready_median"]),
        "ratio_first_output_alone": ratio(
            one["warm"]["first_output_median"], one["cold"]["first_output_median"]
        ),
        "ratio_ready_together": ratio(
            together["warm"]["ready_median"], together["cold"]["ready_median"]
        ),
        "ratio_first_output_together": ratio(
            together["warm"]["first_output_median"], together["cold"]["first_output_median"]
        ),
    }
    result["batches"] = {
        kind: [dataclasses.asdict(t) for t in timings] for kind, timings in batches.items()
    }
    if args.png is not None:
        draw_timeline(result, args.png)
    print(json.dumps(result))
    failed = sum(int(s["failed"] or 0) for s in (*one.values(), *together.values()))
    return 1 if failed else 0


PHASES = (
    ("before", "lease, template lookup", "#bbbbbb"),
    ("boot", "cold: boot until running / warm: restore (queued)", "#4c72b0"),
    ("guest", "agent answers, clone refreshed, account", "#dd8452"),
    ("output", "payload started, first output", "#55a868"),
)


def phases(t: Timing) -> dict[str, tuple[float, float]]:
    """Each phase of a job as (begin, end) seconds after its release."""
    if t.ready is None or t.boot is None or t.guest is None:
        return {}
    began = max(t.ready - t.guest - t.boot, 0.0)
    out = {
        "before": (0.0, began),
        "boot": (began, began + t.boot),
        "guest": (t.ready - t.guest, t.ready),
    }
    if t.first_output is not None:
        out["output"] = (t.ready, t.first_output)
    return out


def draw_timeline(result: dict[str, Any], png: Path) -> None:
    """One panel per batch (cold, warm), a row per job, a bar per phase."""
    import matplotlib  # noqa: PLC0415 - only when a picture is asked for

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.patches import Patch  # noqa: PLC0415

    kinds = [k for k in ("cold", "warm") if result["batches"].get(k)]
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(6 * len(kinds), 0.28 * result["jobs"] + 2.2), dpi=110, squeeze=False
    )
    colours = {key: colour for key, _, colour in PHASES}
    for ax, kind in zip(axes[0], kinds, strict=True):
        jobs = [Timing(**t) for t in result["batches"][kind]]
        jobs.sort(key=lambda t: t.ready or 0.0)
        for y, job in enumerate(jobs):
            for key, (begin, end) in phases(job).items():
                ax.broken_barh(
                    [(begin, max(end - begin, 0.01))], (y - 0.4, 0.8), color=colours[key]
                )
        ax.set_yticks(range(len(jobs)), [f"job {i + 1}" for i in range(len(jobs))], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(left=0)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("seconds after the jobs were released")
        s = result["together"][kind]
        ax.set_title(
            f"{kind}: ready median {s['ready_median']:.1f} s, max {s['ready_max']:.1f} s",
            fontsize=9,
        )
    fig.suptitle(
        f"{result['jobs']} jobs at once, {result['guest']} guest, 1 vCPU / "
        f"{result['memory_mib']} MiB each, {os.cpu_count()} host cores, {result['accelerator']}",
        fontsize=10,
    )
    fig.legend(
        handles=[Patch(color=c, label=label) for _, label, c in PHASES],
        loc="lower center",
        ncol=len(PHASES),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
