"""Run every benchmark under bench/ and collect their JSON figures in bench/results.json.

Each benchmark prints its figures as JSON on its last line; this runs them one after another
(never in parallel: they measure against baselines taken in the same run, on a shared machine)
and prints a short table of the figures that have targets. Figures of benchmarks not run this
time stay in bench/results.json from earlier runs (with when they were measured); a benchmark
that fails is recorded as null. The concurrent benchmark also draws docs/img/timeline.png.

Usage: python bench/run_all.py [NAME ...]   (names: boot boot_failures overlay transfer cache
concurrent warm hooks condor; default all)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.json"
TIMELINE = BENCH.parent / "docs" / "img" / "timeline.png"
ALL = (
    "boot",
    "boot_failures",
    "overlay",
    "transfer",
    "cache",
    "concurrent",
    "warm",
    "hooks",
    "condor",
)
EXTRA_ARGS = {"concurrent": ["--png", str(TIMELINE)]}

Figures = dict[str, Any]
#: (benchmark, what) -> (value, target, met or None when there is no target)
Row = tuple[str, str, Callable[[Figures], tuple[str, str, bool | None]]]


def _yes(met: object) -> bool | None:
    return met if isinstance(met, bool) else None


ROWS: list[Row] = [
    (
        "boot",
        "boot ratio glite-vm / bare QEMU",
        lambda f: (f"{f['ratio']}", "<= 1.15", f["ratio"] <= 1.15),
    ),
    (
        "boot",
        "boot host overhead",
        lambda f: (f"{f['overhead_ms']:.0f} ms", "<= 250 ms", f["overhead_ms"] <= 250),
    ),
    (
        "boot",
        "teardown, median",
        lambda f: (f"{f['teardown_s']} s", "<= 1 s", f["teardown_s"] <= 1.0),
    ),
    (
        "boot_failures",
        "kernel panic reported / good boot",
        lambda f: (
            f"{f['panic_ratio']} ({f['panic_s']} s vs {f['good_boot_s']} s)",
            "<= 1.5",
            f["panic_ratio"] <= 1.5 and not f["wrong_outcomes"],
        ),
    ),
    (
        "boot_failures",
        "nothing to boot reported / good boot",
        lambda f: (
            f"{f['no_boot_device_ratio']} ({f['no_boot_device_s']} s)",
            "<= 1.5",
            f["no_boot_device_ratio"] <= 1.5 and not f["wrong_outcomes"],
        ),
    ),
    (
        "boot_failures",
        "no agent reported, after good boot",
        lambda f: (
            f"+{f['no_agent_over_good_s']} s ({f['no_agent_s']} s)",
            "<= +30 s",
            f["no_agent_over_good_s"] <= 30 and not f["wrong_outcomes"],
        ),
    ),
    (
        "overlay",
        "overlay on 1 GiB / 20 GiB base",
        lambda f: (
            f"{f['overlay_1gib_ms']:.1f} / {f['overlay_20gib_ms']:.1f} ms "
            f"(qemu-img alone {f['qemu_img_plain_ms']:.1f})",
            "flat in size",
            not f["grows_with_virtual_size"],
        ),
    ),
    (
        "transfer",
        "transfer disk vs agent, in / out",
        lambda f: (f"{f['speedup_in']} x / {f['speedup_out']} x", "", None),
    ),
    (
        "cache",
        "cache: bytes served / image, 8 cold",
        lambda f: (f"{f['bytes_served_ratio']}", "<= 1.01", f["bytes_served_ratio"] <= 1.01),
    ),
    (
        "cache",
        "cache: cold throughput / curl",
        lambda f: (
            f"{f['throughput_ratio']} (best runs {f['throughput_ratio_best_runs']})",
            ">= 0.9",
            f["throughput_ratio"] >= 0.9,
        ),
    ),
    (
        "cache",
        "cache: warm acquire, median",
        lambda f: (
            f"{f['warm_acquire_median_ms']} ms",
            "<= 20 ms",
            f["warm_acquire_median_ms"] <= 20,
        ),
    ),
    (
        "concurrent",
        "concurrent VMs, all succeeded",
        lambda f: (
            f"{f['jobs_succeeded']} of {f['jobs_started']}",
            "all",
            bool(f["all_succeeded"]),
        ),
    ),
    (
        "concurrent",
        "concurrent: time to ready, median",
        lambda f: (
            f"{f['ready_median_s']} s ({f['ratio_ready_median']} x alone, max "
            f"{f['ready_max_s']} s)",
            "",
            None,
        ),
    ),
    (
        "warm",
        "warm start / cold boot, ready, 1 job",
        lambda f: (
            f"{f['ratio_ready_alone']} ({f['alone']['warm']['ready_median']:.2f} s vs "
            f"{f['alone']['cold']['ready_median']:.2f} s)",
            "<= 0.1 (a guest of >= 10 s cold boot)",
            f["ratio_ready_alone"] <= 0.1 if f["guest"] == "debian" else None,
        ),
    ),
    (
        "warm",
        "warm start: 16 at once, ready median",
        lambda f: (
            f"{f['together']['warm']['ready_median']:.1f} s (cold "
            f"{f['together']['cold']['ready_median']:.1f} s)",
            "<= 5 s",
            f["together"]["warm"]["ready_median"] <= 5,
        ),
    ),
    (
        "hooks",
        "hook start-up prepare/exit/launcher",
        lambda f: (
            f"{f['prepare_job_ms']:.0f} / {f['job_exit_ms']:.0f} / {f['launcher_ms']:.0f} ms "
            f"(python {f['python_pass_ms']:.0f})",
            "<= 150 ms",
            _yes(f["target_met"]),
        ),
    ),
    (
        "condor",
        "condor: added submit->done",
        lambda f: (
            f"{f['added_s']} s (after match {f['added_after_match_s']} s)",
            f"<= {f['target_added_s']} s",
            _yes(f["target_met"]),
        ),
    ),
    (
        "condor",
        "condor: prepare/in/payload/out/down",
        lambda f: (
            " / ".join(
                f"{f[f'glite_vm_{k}_s']:.1f}"
                for k in ("prepare", "transfer_in", "payload", "transfer_out", "teardown")
            )
            + " s",
            "",
            None,
        ),
    ),
]


def run(name: str) -> Figures | None:
    print(f"== bench/{name}.py", flush=True)
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), *EXTRA_ARGS.get(name, [])],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    sys.stdout.write(proc.stdout)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return None
    try:
        figures = json.loads(lines[-1])
    except ValueError:
        return None
    return figures if isinstance(figures, dict) else None


def table(results: Figures, fresh: set[str]) -> list[str]:
    out = [f"{'figure':<38} {'measured':<40} {'target':<13} met"]
    for bench, label, show in ROWS:
        figures = results.get(bench)
        if not isinstance(figures, dict):
            shown, target, met = ("FAILED" if bench in fresh else "not run"), "", None
        else:
            try:
                shown, target, met = show(figures)
            except (KeyError, TypeError):
                shown, target, met = "(figures incomplete)", "", None
        mark = "" if met is None else ("yes" if met else "NO")
        older = "" if bench in fresh or figures is None else " *"
        out.append(f"{label:<38} {shown + older:<40} {target:<13} {mark}".rstrip())
    return out


def main(argv: list[str]) -> int:
    names = argv or list(ALL)
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; known: {' '.join(ALL)}")
        return 2
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        results: Figures = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        results = {}
    earlier = results.get("measured")
    measured: dict[str, str] = dict(earlier) if isinstance(earlier, dict) else {}
    failed = []
    for name in names:
        measured[name] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        results[name] = run(name)
        if results[name] is None:
            failed.append(name)
    results["started"] = started
    results["measured"] = measured
    ordered = {k: results[k] for k in ("started", "measured", *ALL) if k in results}
    RESULTS.write_text(json.dumps(ordered, indent=2) + "\n")
    print()
    print("\n".join(table(ordered, set(names))))
    if set(names) != set(ALL):
        print("* from an earlier run (see 'measured' in the results file)")
    print(f"figures written to {RESULTS}")
    if "concurrent" in names and "concurrent" not in failed:
        print(f"timeline drawn in {TIMELINE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
