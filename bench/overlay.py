"""Overlay benchmark: creating a job's copy-on-write overlay on a 1 GiB and a 20 GiB base.

Every job gets its own qcow2 overlay over the cached base image; ``VmHost.start`` creates it
with ``qemu-img create -q -f qcow2 -u -b BASE -F FMT OVERLAY SIZE``, through the library's one
``qemu-img`` runner, in ``glite_vm.vm.vm_dir.create_overlay``; this benchmark calls that same
function. The bases are sparse qcow2 images of 1 GiB and 20 GiB virtual size, made with
``qemu-img`` under /var/tmp.

Baselines, measured in the same run and interleaved with the overlays so that machine noise
hits all alike: (a) ``qemu-img create -q -f qcow2 FILE 1G`` without a backing file -- the cost
of starting the tool at all, the floor for anything done with ``qemu-img``; (b) ``cp
--reflink=auto`` of a 64 KiB file -- the cheapest "give the job its own copy". Prints medians
in ms, the ratio of each overlay to baseline (a), and whether the cost grows with the virtual
size (20 GiB / 1 GiB median above 1.25 counts as growing). The last line is JSON.

Usage: python bench/overlay.py [--runs N]
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.qemu_img import qemu_img  # noqa: E402
from glite_vm.units import GIB  # noqa: E402
from glite_vm.vm.vm_dir import create_overlay  # noqa: E402

SIZES_GIB = (1, 20)
#: Above this 20 GiB / 1 GiB ratio of medians, the overlay's cost is said to grow with size.
GROWTH_LIMIT = 1.25


def timed(action: Callable[[], object], cleanup: Path) -> float:
    """Seconds ``action`` took; ``cleanup`` (the file it made) is removed afterwards."""
    t0 = time.perf_counter()
    action()
    elapsed = time.perf_counter() - t0
    cleanup.unlink()
    return elapsed


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    if shutil.which("qemu-img") is None:
        print("bench/overlay.py needs qemu-img (qemu-utils)", file=sys.stderr)
        return 2
    runs = max(args.runs, 1)
    with tempfile.TemporaryDirectory(prefix="glite-vm-bench-overlay-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        bases = {}
        for gib in SIZES_GIB:
            base = work / f"base-{gib}g.qcow2"
            qemu_img(["create", "-q", "-f", "qcow2", base, str(gib * GIB)], "creating a base image")
            bases[gib] = base
        small = work / "small.bin"
        small.write_bytes(bytes(range(256)) * 256)  # 64 KiB
        overlay = work / "overlay.qcow2"
        plain = work / "plain.qcow2"
        copy = work / "copy.bin"
        actions: list[tuple[str, Callable[[], object], Path]] = [
            (
                f"overlay_{gib}g",
                functools.partial(create_overlay, base, "qcow2", overlay, gib * GIB),
                overlay,
            )
            for gib, base in bases.items()
        ]
        actions.append(
            (
                "qemu_img_plain",
                functools.partial(
                    qemu_img,
                    ["create", "-q", "-f", "qcow2", plain, "1G"],
                    "creating a plain qcow2",
                    umask=0o077,
                ),
                plain,
            )
        )
        actions.append(
            (
                "cp_reflink",
                functools.partial(
                    subprocess.run, ["cp", "--reflink=auto", str(small), str(copy)], check=True
                ),
                copy,
            )
        )
        times: dict[str, list[float]] = {key: [] for key, _, _ in actions}
        for n in range(runs):
            # a different order each run, so no action always runs right after another
            k = n % len(actions)
            for key, action, made in actions[k:] + actions[:k]:
                times[key].append(timed(action, made))
    med = {k: ms(v) for k, v in times.items()}
    floor = med["qemu_img_plain"]
    growth = med["overlay_20g"] / med["overlay_1g"]
    grows = growth > GROWTH_LIMIT
    figures = {
        "benchmark": "overlay",
        "runs": runs,
        "overlay_1gib_ms": med["overlay_1g"],
        "overlay_20gib_ms": med["overlay_20g"],
        "qemu_img_plain_ms": floor,
        "cp_reflink_64k_ms": med["cp_reflink"],
        "ratio_1gib": round(med["overlay_1g"] / floor, 3),
        "ratio_20gib": round(med["overlay_20g"] / floor, 3),
        "ratio_20gib_to_1gib": round(growth, 3),
        "grows_with_virtual_size": grows,
    }
    print(
        f"median of {runs}: overlay on 1 GiB base {med['overlay_1g']:.2f} ms "
        f"({figures['ratio_1gib']} x plain qemu-img create), on 20 GiB base "
        f"{med['overlay_20g']:.2f} ms ({figures['ratio_20gib']} x); plain qemu-img create "
        f"{floor:.2f} ms, cp --reflink=auto of 64 KiB {med['cp_reflink']:.2f} ms"
    )
    print(
        f"20 GiB / 1 GiB = {growth:.2f}: the cost "
        + ("GROWS with the virtual size" if grows else "does not grow with the virtual size")
        + " (qemu-img -u opens no backing file; the overlay holds only metadata)"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
