"""`glite-vm run` (one command in a fresh VM) and `glite-vm doctor` (is this host fit to run
them). `glite-vm vms ...` is :mod:`glite_vm.cli.vms`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from glite_vm import qemu_img
from glite_vm.cli.common import (
    EXIT_FAILURE,
    EXIT_TIMEOUT,
    describe_error,
    error_class,
    local_ref,
    report_error,
    signalled,
)
from glite_vm.cli.progress import ProgressBar
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, PayloadTimeoutError, RequestError
from glite_vm.request import KeepSnapshot
from glite_vm.session import JobSpec, RunReport, check_output_dir, run_job
from glite_vm.units import format_size, parse_memory_mib, parse_size, parse_timeout
from glite_vm.vm import hypervisor as hv
from glite_vm.vm.connect import hypervisor_for, open_host
from glite_vm.vm.hypervisor import HYPERVISOR_CACHE

_RUN_EPILOG = """\
IMAGE is a catalogue name (GLITE_VM_CATALOGUE), an http(s)/file URL or a local path (a
relative path such as ./my.qcow2 is made absolute); URLs and paths get the same safety checks
as custom images from jobs.

Sizes need a unit (--memory 2GB, --memory 2048MiB, --disk 30GB: binary units; a bare number
is refused, as HTCondor reads it as MiB and other tools as bytes). --timeout takes seconds or
a unit (600, 10m, 2h) and must be more than zero.

exit status:
  0-255    the command's own exit status; 128+N when signal N ended it
  124      the command outlived --timeout (as timeout(1)); the VM was torn down
  125      glite-vm failed; stderr names the class: "request error" (fix the command line or
           its inputs; nothing ran or the outputs could not be saved), "host error" (this host
           failed: libvirt, disk, download) or "configuration error" (a GLITE_VM_* setting)
  126/127  not used by glite-vm: the guest's shell reports them (command not executable /
           not found), as the command's own status
  130/143  glite-vm was interrupted (SIGINT/SIGTERM); the VM was torn down

On success and on every failure after a VM was made, stderr ends with the VM's name, its boot
log, the snapshot (or "not kept") and, once the command ran, its exit status.

example: glite-vm run --image debian-12 --input src/ --output out/ -- ./build.sh"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = sub.add_parser(
        "run",
        help="run a command in a fresh VM of an image",
        description="Boot a fresh VM of IMAGE, run CMD inside it as the guest user (or root), "
        "stream its stdout/stderr to ours, tear the VM down and exit with CMD's exit status. "
        "The snapshot and boot-log paths and the phase timings are printed on stderr.",
        epilog=_RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--image", required=True, help="catalogue name, URL or local path")
    run.add_argument("--sha256", help="expected sha256 of a custom image")
    run.add_argument("--root", action="store_true", help="run CMD as root in the guest")
    run.add_argument("--cpus", type=int, help="virtual CPUs (default: GLITE_VM_DEFAULT_CPUS)")
    run.add_argument(
        "--memory", metavar="SIZE", help="guest memory, e.g. 2GB or 512MiB (a unit is required)"
    )
    run.add_argument("--disk", metavar="SIZE", help="disk size, e.g. 30GB (a unit is required)")
    run.add_argument(
        "--network",
        metavar="NAME",
        help="the VM's network: GLITE_VM_NETWORK (the default) or one of GLITE_VM_JOB_NETWORKS",
    )
    run.add_argument(
        "--hostname",
        metavar="NAME",
        help="the guest's host name (the VM is yours: the site's policy on job-chosen names "
        "does not apply); default: from GLITE_VM_HOSTNAME_PATTERN when guest identity is on",
    )
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
        help="copy new and changed files of the working directory to DIR after (DIR is "
        "created and checked to be writable before the VM starts)",
    )
    run.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment variable for CMD (repeatable)",
    )
    run.add_argument(
        "--timeout",
        metavar="DURATION",
        help="stop CMD after this long: seconds (600) or with a unit (10m, 2h)",
    )
    run.add_argument(
        "--json",
        action="store_true",
        help="print the result (paths, timings; the error on failure) as JSON on stderr at the end",
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
        description="Check the accelerator (KVM only when a bounded self-test passes, else "
        "QEMU TCG), libvirt, qemu-img and the state directories, and say what to fix. The "
        "accelerator verdict is the one remembered in <state dir>/hypervisor.json (what jobs "
        "and the service use); it is probed, and remembered, when there is none or it no "
        "longer holds (new kernel, QEMU or /dev/kvm), or with --reprobe.",
    )
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument(
        "--reprobe",
        action="store_true",
        help="probe KVM again now (up to ~10 s) and remember the new verdict",
    )
    doctor.set_defaults(handler=cmd_doctor)


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


def _job_spec(args: argparse.Namespace) -> JobSpec:
    """Everything of the command line checked, before anything is fetched or booted."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise RequestError(
            "CMD", "give the command after --, e.g. glite-vm run --image IMG -- uname -a"
        )
    return JobSpec(
        image=local_ref(args.image),
        argv=cmd,
        image_sha256=args.sha256,
        root=args.root,
        cpus=args.cpus,
        memory_mib=None if args.memory is None else parse_memory_mib(args.memory, "--memory"),
        disk=None if args.disk is None else parse_size(args.disk, "--disk"),
        keep_snapshot=args.keep_snapshot,
        input_dir=args.input,
        output_dir=args.output,
        env=_parse_env(args.env),
        timeout=None if args.timeout is None else parse_timeout(args.timeout, "--timeout"),
        network=args.network,
        hostname=args.hostname,
    )


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    out = sys.stdout.buffer
    err = sys.stderr.buffer

    def to_stdout(data: bytes) -> None:
        out.write(data)
        out.flush()

    def to_stderr(data: bytes) -> None:
        err.write(data)
        err.flush()

    bar = ProgressBar(f"fetching {args.image}", sys.stderr)
    report = RunReport()
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        spec = _job_spec(args)
        if spec.output_dir is not None:
            check_output_dir(spec.output_dir)  # before anything is fetched, booted or connected
        host = open_host(settings)
        result = run_job(
            host,
            spec,
            stdout=to_stdout,
            stderr=to_stderr,
            progress=bar.update,
            cancel=threading.Event(),
            report=report,
        )
    except (_Terminated, KeyboardInterrupt, SystemError) as raised:
        bar.close()
        stop = signalled(raised)  # raised by a handler in whatever ran, a libvirt call too
        if isinstance(stop, _Terminated):
            print(f"glite-vm run: stopped by {stop}", file=sys.stderr)
            return _failed(args, report, None, 143)
        if isinstance(stop, KeyboardInterrupt):
            print("glite-vm run: interrupted", file=sys.stderr)
            return _failed(args, report, None, 130)
        report_error(raised)
        return _failed(args, report, raised, EXIT_FAILURE)
    except Exception as exc:
        bar.close()
        if isinstance(exc, PayloadTimeoutError):
            print(f"glite-vm: request error: {exc} (--timeout)", file=sys.stderr)
            return _failed(args, report, exc, EXIT_TIMEOUT)
        report_error(exc)
        if report.domain is None and "/" not in args.image and os.path.isfile(args.image):
            # a name without '/' is a catalogue name, even when a file of that name is here
            print(
                f"glite-vm: hint: {args.image} was taken for a catalogue name; "
                f"to boot the file here, write --image ./{args.image}",
                file=sys.stderr,
            )
        return _failed(args, report, exc, EXIT_FAILURE)
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
                    "exit_status": result.shell_status,
                    "snapshot_path": str(result.snapshot_path) if result.snapshot_path else None,
                    "boot_log_path": str(result.boot_log_path),
                    "record_path": str(result.record_path),
                    "hypervisor": result.hypervisor,
                    "image_digest": result.image_digest,
                    "cache_hit": result.cache_hit,
                    "outputs": result.outputs,
                    "timings": t.as_dict(),
                    "error": None,
                    "boot_attempts": result.boot_attempts,
                }
            ),
            file=sys.stderr,
        )
    return result.shell_status


def _failed(
    args: argparse.Namespace, report: RunReport, exc: BaseException | None, status: int
) -> int:
    """What `run` promises on a failure too: the VM, its boot log, the snapshot, the command's
    status when it ran, and the exit status chosen."""
    done = report.teardown
    lines = []
    if report.domain is None:
        lines.append("glite-vm: no VM was started")
    else:
        lines.append(f"glite-vm: VM {report.domain}")
        lines.append(f"glite-vm: boot log: {report.boot_log_path}")
        snapshot = done.snapshot_path if done is not None else None
        lines.append(f"glite-vm: snapshot: {snapshot or '(not kept)'}")
    payload = report.payload
    if payload is not None:
        ended = f"signal {payload.signal}" if payload.signal is not None else f"{payload.exit_code}"
        lines.append(f"glite-vm: the command had ended: exit {ended}")
    lines.append(f"glite-vm: exit status {status}")
    print("\n".join(lines), file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "domain": report.domain,
                    "exit_code": payload.exit_code if payload else None,
                    "signal": payload.signal if payload else None,
                    "exit_status": status,
                    "snapshot_path": (
                        str(done.snapshot_path) if done and done.snapshot_path else None
                    ),
                    "boot_log_path": str(report.boot_log_path) if report.boot_log_path else None,
                    "record_path": str(done.record_path) if done else None,
                    "error": None
                    if exc is None
                    else {"class": error_class(exc), "message": describe_error(exc)},
                }
            ),
            file=sys.stderr,
        )
    return status


def _check(name: str, ok: bool, detail: str, fix: str = "") -> dict[str, object]:
    return {"check": name, "ok": ok, "detail": detail, "fix": fix}


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    checks: list[dict[str, object]] = []
    t0 = time.monotonic()
    info = hypervisor_for(settings, reprobe=args.reprobe)
    took = time.monotonic() - t0
    remembered = settings.state_dir / HYPERVISOR_CACHE
    if "(cached probe)" in info.reason:
        how = f"; the verdict remembered in {remembered} (--reprobe probes again)"
    elif settings.hypervisor == "qemu":
        how = ""
    else:
        how = f"; probed in {took:.1f} s, remembered in {remembered}"
    checks.append(
        _check(
            "hypervisor",
            True,
            f"{info.kind} ({info.reason}{how})",
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
    version = qemu_img.version()
    checks.append(
        _check("qemu-img", version is not None, version or "not found", "install qemu-utils")
    )
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
