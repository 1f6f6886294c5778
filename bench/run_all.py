"""Run every benchmark under bench/ and collect their JSON figures in bench/results.json.

Each benchmark prints its figures as JSON on its last line; this runs them one after another
(never in parallel: they measure against baselines taken in the same run, on a shared machine)
and prints a short table. Usage: python bench/run_all.py [NAME ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ALL = ("boot", "transfer", "cache", "condor")


def main(argv: list[str]) -> int:
    names = argv or list(ALL)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: dict[str, dict[str, object] | None] = {}
    failed = []
    for name in names:
        print(f"== bench/{name}.py", flush=True)
        proc = subprocess.run(
            [sys.executable, str(BENCH / f"{name}.py")],
            stdout=subprocess.PIPE,
            text=True,
            check=False,
        )
        sys.stdout.write(proc.stdout)
        lines = proc.stdout.strip().splitlines()
        try:
            results[name] = json.loads(lines[-1]) if proc.returncode == 0 else None
        except (IndexError, ValueError):
            results[name] = None
        if results[name] is None:
            failed.append(name)
    (BENCH / "results.json").write_text(
        json.dumps({"started": started, **results}, indent=2) + "\n"
    )
    print("\nbenchmark  figures")
    for name in names:
        figures = results[name]
        shown = (
            "FAILED"
            if figures is None
            else ", ".join(f"{k}={v}" for k, v in figures.items() if isinstance(v, int | float))
        )
        print(f"{name:<10} {shown}")
    print(f"figures written to {BENCH / 'results.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
