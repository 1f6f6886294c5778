"""`glite-vm run`, `glite-vm doctor`, `glite-vm vms ...`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from glite_vm.cli.progress import ProgressBar
from glite_vm.config import Settings, format_size
from glite_vm.errors import GliteVmError, RequestError
from glite_vm.request import KeepSnapshot
from glite_vm.session import JobSpec, hypervisor_for, open_host, run_job
from glite_vm.vm import hypervisor as hv
from glite_vm.vm.lifecycle import destroy_domain


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="run a command in a fresh VM of an image",
        description="Boot a fresh VM of IMAGE, run CMD inside it as the guest user (or root), "
        "stream its stdout/stderr to ours, tear the VM down and exit with CMD's exit status. "
        "The snapshot and boot-log paths and the phase timings are printed on stderr.",
        epilog="IMAGE is a catalogue name (GLITE_VM_CATALOGUE), an http(s)/file URL or a local "
        "path; URLs and paths get the same safety checks as custom images from jobs. "
        "Example: glite-vm run --image debian-12 --input src/ --output out/ -- ./build.sh",
    )
    run.add_argument("--image", required=True, help="catalogue name, URL or local path")
    run.add_argument("--sha256", help="expected sha256 of a custom image")
    run.add_argument("--root", action="store_true", help="run CMD as root in the guest")
    run.add_argument("--cpus", type=int, help="virtual CPUs (default: GLITE_VM_DEFAULT_CPUS)")
    run.add_argument("--memory", type=int, metavar="MiB", help="guest memory in MiB")
    run.add_argument("--disk", metavar="SIZE", help="disk size, e.g. 30GB")
    run.add_argument(
        "--keep-snapshot",
        choices=[k.value for k in KeepSnapshot],
        default=KeepSnapshot.ON_FAILURE.value,
        help="when to keep the VM's disk as a snapshot (default: on_failure)",
    )
    run.add_argument(
        "--input",
        type=Path,
        metavar="DIR",
        help="copy DIR's contents into the guest's working directory first",
    )
    run.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="copy new and changed files of the working directory to DIR after",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for CMD (repeatable)",
    )
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="stop CMD after this long")
    run.add_argument(
        "--json",
        action="store_true",
        help="print the result (paths, timings) as JSON on stderr at the end",
    )
    run.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- CMD [ARGS...]",
        help="the command to run in the guest",
    )
    run.set_defaults(handler=cmd_run)

    doctor = sub.add_parser(
        "doctor",
        help="check this host: hypervisor, libvirt, tools, directories",
        description="Probe the accelerator (KVM only when a bounded self-test passes, else "
        "QEMU TCG), check libvirt, qemu-img and the state directories, and say what to fix.",
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(handler=cmd_doctor)

    vms = sub.add_parser(
        "vms",
        help="list or remove this tool's VMs",
        description="Inspect and clean up VMs created by glite-vm.",
    )
    vms_sub = vms.add_subparsers(dest="vms_command", metavar="ACTION", required=True)
    lst = vms_sub.add_parser("list", help="running VMs with owner, job and age")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(handler=cmd_vms_list)
    destroy = vms_sub.add_parser("destroy", help="stop and undefine VMs by name")
    destroy.add_argument("names", nargs="+", metavar="NAME")
    destroy.set_defaults(handler=cmd_vms_destroy)


class _Terminated(Exception):
    pass


def _raise_terminated(signum: int, _frame: FrameType | None) -> None:
    raise _Terminated(signal.Signals(signum).name)


def _parse_env(items: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "a").isalnum():
            raise RequestError("--env", f"expected NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print(
            "glite-vm run: give the command after --, e.g. glite-vm run --image IMG -- uname -a",
            file=sys.stderr,
        )
        return 2
    if args.input is not None and not args.input.is_dir():
        print(f"glite-vm run: --input {args.input} is not a directory", file=sys.stderr)
        return 2
    spec = JobSpec(
        image=args.image,
        argv=cmd,
        image_sha256=args.sha256,
        root=args.root,
        cpus=args.cpus,
        memory_mib=args.memory,
        disk=args.disk,
        keep_snapshot=args.keep_snapshot,
        input_dir=args.input,
        output_dir=args.output,
        env=_parse_env(args.env),
        timeout=args.timeout,
    )
    out = sys.stdout.buffer
    err = sys.stderr.buffer

    def to_stdout(data: bytes) -> None:
        out.write(data)
        out.flush()

    def to_stderr(data: bytes) -> None:
        err.write(data)
        err.flush()

    bar = ProgressBar(f"fetching {args.image}", sys.stderr)
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        host = open_host(settings)
        result = run_job(
            host,
            spec,
            stdout=to_stdout,
            stderr=to_stderr,
            progress=bar.update,
            cancel=threading.Event(),
        )
    except _Terminated as exc:
        print(f"glite-vm run: stopped by {exc}; the VM was torn down", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, old)
        bar.close()
    t = result.timings
    lines = [
        f"glite-vm: VM {result.domain} ({result.hypervisor}) exit "
        + (f"signal {result.signal}" if result.signal is not None else f"{result.exit_code}"),
        f"glite-vm: boot log: {result.boot_log_path}",
        f"glite-vm: snapshot: {result.snapshot_path or '(not kept)'}",
        "glite-vm: timings: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in t.as_dict().items() if v is not None),
    ]
    if result.boot_attempts > 1:
        lines.append(f"glite-vm: booted at attempt {result.boot_attempts} (docs/vm.md)")
    if result.outputs:
        lines.append(f"glite-vm: {len(result.outputs)} file(s) copied to {args.output}")
    print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "domain": result.domain,
                    "exit_code": result.exit_code,
                    "signal": result.signal,
                    "snapshot_path": str(result.snapshot_path) if result.snapshot_path else None,
                    "boot_log_path": str(result.boot_log_path),
                    "record_path": str(result.record_path),
                    "hypervisor": result.hypervisor,
                    "image_digest": result.image_digest,
                    "cache_hit": result.cache_hit,
                    "outputs": result.outputs,
                    "timings": t.as_dict(),
                    "boot_attempts": result.boot_attempts,
                }
            ),
            file=sys.stderr,
        )
    return result.shell_status


def _check(name: str, ok: bool, detail: str, fix: str = "") -> dict[str, object]:
    return {"check": name, "ok": ok, "detail": detail, "fix": fix}


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    checks: list[dict[str, object]] = []
    t0 = time.monotonic()
    info = hv.detect(settings.hypervisor)
    checks.append(
        _check(
            "hypervisor",
            True,
            f"{info.kind} ({info.reason}; probe {time.monotonic() - t0:.1f} s)",
            "" if info.accelerated else "VMs run under QEMU TCG (slower); enable KVM for speed",
        )
    )
    if hv.KVM_DEVICE.exists():
        st = hv.KVM_DEVICE.stat()
        checks.append(
            _check(
                "kvm device",
                bool(st.st_mode & 0o060),
                f"{hv.KVM_DEVICE} mode {st.st_mode & 0o777:o}, gid {st.st_gid}",
                "chgrp kvm /dev/kvm && chmod 0660 /dev/kvm (Debian's udev default); "
                "otherwise libvirt re-probes QEMU on every VM start",
            )
        )
    checks.append(
        _check("qemu", bool(info.emulator), info.emulator or "not found", "install qemu-system-x86")
    )
    qemu_img = shutil.which("qemu-img")
    version = ""
    if qemu_img:
        version = subprocess.run(
            [qemu_img, "--version"], capture_output=True, text=True, check=False
        ).stdout.splitlines()[0]
    checks.append(_check("qemu-img", bool(qemu_img), version or "not found", "install qemu-utils"))
    try:
        host = open_host(settings, info)
        checks.append(
            _check(
                "libvirt",
                True,
                f"{settings.effective_libvirt_uri} (libvirt {_version(host.conn.getLibVersion())})",
            )
        )
    except GliteVmError as exc:
        checks.append(_check("libvirt", False, str(exc), "start libvirtd (libvirtd -d)"))
    for label, path in (
        ("state dir", settings.state_dir),
        ("cache dir", settings.effective_cache_dir),
        ("snapshot dir", settings.effective_snapshot_dir),
    ):
        ok, detail = _dir_status(path)
        checks.append(_check(label, ok, detail, f"create {path} writable by this user"))
    if args.json:
        print(json.dumps({"hypervisor": info.kind, "checks": checks}, indent=2))
    else:
        for c in checks:
            mark = "ok " if c["ok"] else "BAD"
            print(f"[{mark}] {c['check']:<13} {c['detail']}")
            if c["fix"] and not c["ok"]:
                print(f"      fix: {c['fix']}")
            elif c["fix"] and c["check"] == "hypervisor":
                print(f"      note: {c['fix']}")
    return 0 if all(c["ok"] for c in checks) else 1


def _version(n: int) -> str:
    return f"{n // 1000000}.{n // 1000 % 1000}.{n % 1000}"


def _dir_status(path: Path) -> tuple[bool, str]:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        return False, f"{path} is not writable"
    if path.exists():
        usage = shutil.disk_usage(path)
        return True, f"{path} ({format_size(usage.free)} free)"
    return True, f"{path} (will be created)"


def cmd_vms_list(args: argparse.Namespace, settings: Settings) -> int:
    host = open_host(settings, hypervisor_for(settings))
    rows = []
    now = time.time()
    for dom, meta in host.our_domains():
        rows.append(
            {
                "name": dom.name(),
                "state": "running" if dom.isActive() else "defined",
                "owner": meta.owner if meta else "?",
                "job": meta.job_id if meta else "?",
                "image": meta.image if meta else "?",
                "age_seconds": round(now - meta.created) if meta else None,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no glite-vm VMs")
        return 0
    print(f"{'NAME':<44} {'STATE':<8} {'OWNER':<12} {'JOB':<16} {'AGE':>7}  IMAGE")
    for r in rows:
        age = r["age_seconds"]
        print(
            f"{r['name']!s:<44} {r['state']!s:<8} {r['owner']!s:<12} {r['job']!s:<16} "
            f"{_age(age):>7}  {r['image']}"
        )
    return 0


def _age(seconds: object) -> str:
    if not isinstance(seconds, int):
        return "?"
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def cmd_vms_destroy(args: argparse.Namespace, settings: Settings) -> int:
    host = open_host(settings, hypervisor_for(settings))
    ours = {dom.name(): dom for dom, _meta in host.our_domains()}
    status = 0
    for name in args.names:
        dom = ours.get(name)
        if dom is None:
            print(f"glite-vm vms destroy: no glite-vm VM named {name!r}", file=sys.stderr)
            status = 1
            continue
        destroy_domain(dom)
        print(f"destroyed {name}")
    return status
