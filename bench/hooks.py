"""Hook start-up benchmark: how long the starter waits for a hook before any VM work begins.

Runs the real executables of ``hooks/`` (each copied with its ``#!`` line naming this Python,
exactly what ``glite-vm hook install`` writes) the way the starter runs them: in a scratch
directory, with a job ad of a realistic size on stdin (``prepare_job``, ``job_exit exit``) or in
``$_CONDOR_JOB_AD`` (``launcher``), and ``CONDOR_CONFIG`` naming an execute-host configuration
from ``glite-vm config``. The service socket it names does not exist, so each hook goes through
its whole start -- interpreter, imports (ClassAd and HTCondor bindings included), settings from
the HTCondor configuration, parsing the job ad, listing the scratch directory -- up to its first
call into the service, which fails at once, and then reports that the way HTCondor reads it
(``HookStatusCode``/``HookStatusMessage`` lines on stdout, a message on stderr) and exits. That
is "import + parse + print" without the VM; the figure is the wall time of the process, from
spawn to exit. The hooks have no ``--help``: they read stdin and act.

Baseline, measured in the same run and interleaved with the hooks: ``python -I -c pass`` with
the same interpreter (the cost of any Python program). Target: each hook <= 150 ms. One more
run of each hook under ``-X importtime`` shows which imports the time goes to. The last line is
JSON.

Usage: python bench/hooks.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.condor.config import (  # noqa: E402
    ExecuteHostConfig,
    render_execute_config,
)
from glite_vm.slots import SlotLayout  # noqa: E402
from glite_vm.units import GIB  # noqa: E402

HOOKS = ("prepare_job", "job_exit", "launcher")
TARGET_MS = 150.0
RUN_TIMEOUT = 30.0
#: Attributes a job ad has besides the ones a hook reads (the starter's copy carries ~100+).
FILLER_ATTRIBUTES = 120


def job_ad(vm: str) -> str:
    """An old-syntax job ad: what the hooks read, plus attributes of the kinds HTCondor adds."""
    lines = [
        "ClusterId = 4242",
        "ProcId = 0",
        'Owner = "alice"',
        'User = "alice@example.org"',
        'Cmd = "/home/alice/job/build.sh"',
        "Arguments = \"one 'two three'\"",
        "Environment = \"FOO=bar BAZ='x y'\"",
        'GliteVmImage = "debian-12"',
        f'GliteVmDomain = "{vm}"',
        "WantIOProxy = true",
        "RequestCpus = 1",
        "RequestMemory = 1024",
        "RequestDisk = 1048576",
        "ExitCode = 0",
        "ExitBySignal = false",
        "JobUniverse = 5",
        'Iwd = "/home/alice/job"',
        'TransferInput = "in.txt,data"',
        'Requirements = (TARGET.Arch == "X86_64") && (TARGET.OpSys == "LINUX") && '
        "(TARGET.Disk >= RequestDisk) && (TARGET.Memory >= RequestMemory)",
    ]
    for n in range(FILLER_ATTRIBUTES):
        kind = n % 4
        value = (
            str(n * 1000)
            if kind == 0
            else f'"value {n} of the job ad"'
            if kind == 1
            else "false"
            if kind == 2
            else f"ifThenElse(RequestMemory > {n}, {n}, RequestMemory)"
        )
        lines.append(f"BenchAttribute{n} = {value}")
    return "\n".join(lines) + "\n"


def install_hooks(dest: Path, python: str) -> dict[str, Path]:
    """The repository's hook files with ``#!`` naming ``python``, as ``hook install`` does."""
    dest.mkdir(mode=0o755)
    out = {}
    for name in HOOKS:
        body = (REPO / "hooks" / name).read_text().split("\n", 1)[1]
        path = dest / name
        path.write_text(f"#!{python} -I\n{body}")
        path.chmod(0o755)
        out[name] = path
    return out


def wall(argv: Sequence[str], env: dict[str, str], cwd: Path, stdin: str) -> tuple[float, int, str]:
    """Seconds from spawn to exit, exit status, stdout."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    return time.perf_counter() - t0, proc.returncode, proc.stdout


def heaviest_imports(stderr: str, count: int = 6) -> list[dict[str, object]]:
    """From ``-X importtime`` output: the costliest modules glite_vm imports itself, and which
    glite_vm module imported each (or "run time": imported inside a function, later)."""
    rows: list[tuple[int, int, str]] = []  # (depth, cumulative us, module)
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, total_us, name = line[len("import time:") :].split("|", 2)
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((depth, int(total_us), name.strip()))
    # -X importtime lists a module after everything it imported: the parent of row i is the
    # first later row one level up.
    parent: list[int | None] = [None] * len(rows)
    waiting: dict[int, list[int]] = {}
    for i, (depth, _, _) in enumerate(rows):
        for child in waiting.pop(depth + 1, []):
            parent[child] = i
        waiting.setdefault(depth, []).append(i)
    started = next((i for i, r in enumerate(rows) if r[2].startswith("glite_vm")), len(rows))
    found: list[tuple[int, str, str]] = []
    for i, (depth, cumulative, name) in enumerate(rows):
        if name.startswith("glite_vm"):
            continue
        p = parent[i]
        if p is not None and rows[p][2].startswith("glite_vm"):
            via = rows[p][2]  # imported by a glite_vm module as it loaded
        elif depth == 0 and i > started:
            via = "run time"  # imported by glite_vm code later (a function's own import)
        else:
            continue
        found.append((cumulative, name, via))
    found.sort(reverse=True)
    return [{"module": n, "ms": round(us / 1000, 1), "via": via} for us, n, via in found[:count]]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    runs = max(args.runs, 1)
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="glite-vm-bench-hooks-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        hooks = install_hooks(work / "hooks", python)
        missing_socket = work / "run" / "glite-vm.sock"  # never created
        condor_config = work / "condor_config"
        condor_config.write_text(
            render_execute_config(
                ExecuteHostConfig(
                    hooks_dir=work / "hooks",
                    glite_vm=Path(python).parent / "glite-vm",
                    layout=SlotLayout(
                        slots=2, root_slots=1, cpus=1, memory_mib=2048, disk_bytes=30 * GIB
                    ),
                    state_dir=work / "state",
                    socket_path=missing_socket,
                )
            )
        )
        scratch = work / "scratch"
        scratch.mkdir()
        ad = job_ad("glite-vm-bench-4242.0-alice-000000")
        for name, text in ((".job.ad", ad), (".machine.ad", "Cpus = 1\nMemory = 2048\n")):
            (scratch / name).write_text(text)
        (scratch / "in.txt").write_text("input\n")
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            "CONDOR_CONFIG": str(condor_config),
            "GLITE_VM_CONFIG": str(work / "no-config.toml"),
            "_CONDOR_SCRATCH_DIR": str(scratch),
            "_CONDOR_JOB_AD": str(scratch / ".job.ad"),
            "_CONDOR_MACHINE_AD": str(scratch / ".machine.ad"),
        }
        commands: dict[str, tuple[list[str], str, int]] = {
            "baseline": ([python, "-I", "-c", "pass"], "", 0),
            "prepare_job": ([str(hooks["prepare_job"])], ad, 1),
            "job_exit": ([str(hooks["job_exit"]), "exit"], ad, 1),
            "launcher": (
                [str(hooks["launcher"]), f"--socket={missing_socket}", "--", "vm", "in.txt"],
                "",
                125,
            ),
        }
        # the outcome each must have: proof that the hook ran its whole start-up
        check = {"prepare_job": "HookStatusCode = 3"}
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, (argv, stdin, status) in commands.items():
                seconds, rc, stdout = wall(argv, env, scratch, stdin)
                if rc != status or check.get(name, "") not in stdout:
                    print(f"{name}: exit status {rc}, stdout {stdout!r}", file=sys.stderr)
                    return 1
                times[name].append(seconds)
        imports = {}
        for name in HOOKS:
            argv, stdin, _ = commands[name]
            proc = subprocess.run(
                [python, "-I", "-X", "importtime", *argv],
                input=stdin,
                capture_output=True,
                text=True,
                env=env,
                cwd=scratch,
                timeout=RUN_TIMEOUT,
                check=False,
            )
            imports[name] = heaviest_imports(proc.stderr)
    med = {name: statistics.median(t) * 1000 for name, t in times.items()}
    base = med["baseline"]
    figures: dict[str, object] = {
        "benchmark": "hooks",
        "runs": runs,
        "mode": "job ad in, service socket missing: whole start-up, then HookStatus/error out",
        "python_pass_ms": round(base, 1),
    }
    print(f"median of {runs} runs, wall time spawn -> exit:")
    print(f"  python -I -c pass   {base:6.1f} ms (baseline)")
    for name in HOOKS:
        m = med[name]
        figures[f"{name}_ms"] = round(m, 1)
        figures[f"{name}_ratio"] = round(m / base, 2)
        figures[f"{name}_added_ms"] = round(m - base, 1)
        verdict = "met" if m <= TARGET_MS else "NOT met"
        print(
            f"  {name:<18}  {m:6.1f} ms ({m / base:.1f} x baseline, +{m - base:.0f} ms): "
            f"target {TARGET_MS:.0f} ms {verdict}"
        )
    for name in HOOKS:
        shown = ", ".join(f"{r['module']} {r['ms']} ms (via {r['via']})" for r in imports[name])
        print(f"  {name} heaviest imports (one -X importtime run, cumulative): {shown}")
    figures["heaviest_imports_prepare_job"] = imports["prepare_job"]
    figures["target_ms"] = TARGET_MS
    figures["target_met"] = all(med[name] <= TARGET_MS for name in HOOKS)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
