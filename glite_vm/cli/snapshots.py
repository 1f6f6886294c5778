"""`glite-vm snapshots list|show|boot|export|prune`: what jobs left behind for debugging."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import libvirt

from glite_vm.cli.common import EXIT_PROBLEMS, confirm, print_table, signalled
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, UserError
from glite_vm.images.catalogue import format_age
from glite_vm.knob_values import Retention
from glite_vm.snapshots.boot import SnapshotBoot, boot_snapshot, reap_abandoned_boots
from glite_vm.snapshots.console import ConsoleBridge
from glite_vm.snapshots.entry import SnapshotEntry, boot_log_text
from glite_vm.snapshots.export import export_snapshot
from glite_vm.snapshots.store import SnapshotPruneReport, SnapshotStore, running_domain_names
from glite_vm.units import format_size, parse_duration, parse_memory_mib, parse_size
from glite_vm.vm.connect import open_host
from glite_vm.vm.guest_run import quote_command


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snaps = sub.add_parser(
        "snapshots",
        help="list, inspect, boot, export and prune the disks and boot logs jobs left behind",
        description="Each finished job's VM leaves its boot log and record, and its disk as a "
        "snapshot when GliteVmKeepSnapshot says so. You see and use only your own; root sees "
        "everyone's. ID is a domain name (glite-vm-...), a unique prefix of one, or a job id.",
        epilog="See docs/snapshots.md.",
    )
    ssub = snaps.add_subparsers(dest="snapshots_command", metavar="ACTION", required=True)

    p = ssub.add_parser("list", help="your snapshots: job, image, age, size, exit status")
    p.add_argument("--all", action="store_true", help="every user's (root only)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_list)

    p = ssub.add_parser(
        "show", help="paths, job-ad attributes, timings and the end of the boot log"
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--lines", type=int, default=25, help="boot-log lines to show (default 25)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_show)

    p = ssub.add_parser(
        "boot",
        help="boot a throw-away VM of a snapshot, with its serial console on this terminal",
        description="Start a fresh VM on top of a copy of the kept snapshot (the snapshot "
        "itself is never written) and attach its serial console to this terminal: you see the "
        "boot from its first line and type into the guest's console. Ctrl-] leaves, and the VM "
        "is stopped and removed. With a command after --, run it as root through the guest "
        "agent instead, print its output and exit with its status.",
        epilog="Example: glite-vm snapshots boot 1234.0 -- sh -c 'tail /var/log/build.log'",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("--cpus", type=int, help="virtual CPUs (default: as the job had)")
    p.add_argument(
        "--memory",
        metavar="SIZE",
        help="memory with a unit, e.g. 1GB (default: as the job had)",
    )
    p.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        metavar="-- CMD [ARGS...]",
        help="run CMD through the agent instead of attaching the console",
    )
    p.set_defaults(handler=cmd_boot)

    p = ssub.add_parser(
        "export",
        help="write a snapshot with its base as one self-contained qcow2 image",
        description="Flatten the snapshot and the image it was made from into FILE, a qcow2 "
        "without a backing file that boots anywhere (qemu-img check passes). FILE is created "
        "with mode 0600: it holds the job's data.",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--compress", action="store_true", help="compress the qcow2 (smaller, slower)")
    p.set_defaults(handler=cmd_export)

    p = ssub.add_parser(
        "prune",
        help="remove old snapshots by age and total size (GLITE_VM_SNAPSHOT_RETENTION)",
        description="Remove whole entries (snapshot, boot log, record) older than the maximum "
        "age, then the oldest ones until the rest fit in the byte budget. A VM that still runs "
        "is never touched. Limits come from GLITE_VM_SNAPSHOT_RETENTION (e.g. '7d,50GB'); the "
        "flags override one part each ('none' lifts it). Shows what it will remove and how "
        "much first; asks on a terminal, and in scripts removes only with --yes.",
    )
    p.add_argument(
        "--max-age",
        metavar="AGE",
        help="with a unit: 7d, 12h, 30m (a bare number is refused), or none",
    )
    p.add_argument(
        "--max-bytes",
        metavar="SIZE",
        help="with a unit: 50GB, 500MiB (a bare number is refused), or none",
    )
    p.add_argument("--all", action="store_true", help="every user's entries (root only)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.add_argument("--yes", action="store_true", help="do not ask; remove them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_prune)


# --- list / show ------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    entries = SnapshotStore(settings).entries(all_users=args.all)
    if args.json:
        print(json.dumps([e.as_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print("no snapshots" + ("" if args.all else " of yours"))
        return 0
    rows = [
        (
            e.name,
            e.owner,
            e.job_id,
            e.image,
            format_age(e.age()),
            _size(e),
            e.exit_status,
            e.kept_text,
        )
        for e in entries
    ]
    header = ("NAME", "OWNER", "JOB", "IMAGE", "AGE", "SIZE", "EXIT", "KEPT")
    print_table(header, rows, right=frozenset({4, 5}))  # age and size line up on the right
    return 0


def _size(e: SnapshotEntry) -> str:
    """The kept disk's size; for an incomplete entry the whole directory's ('+': at least)."""
    if e.kept:
        return format_size(e.snapshot_bytes)
    if not e.complete:
        return format_size(e.total_bytes) + ("" if e.size_complete else "+")
    return "-"


def cmd_show(args: argparse.Namespace, settings: Settings) -> int:
    entry = SnapshotStore(settings).find(args.id)
    tail = boot_log_text(entry, max(0, args.lines))
    if args.json:
        doc = {**entry.as_dict(), "ad_attributes": entry.ad_attributes(), "boot_log_tail": tail}
        print(json.dumps(doc, indent=2))
        return 0
    finished = datetime.datetime.fromtimestamp(entry.finished).isoformat(timespec="seconds")
    outcome = "failed" if entry.failed else "succeeded"
    rows = [
        ("snapshot", entry.name),
        ("directory", str(entry.directory)),
        ("owner", f"{entry.owner} (uid {entry.owner_uid})"),
        ("job", entry.job_id + ("  (as root in the guest)" if entry.root else "")),
        ("image", f"{entry.image}  sha256 {entry.image_sha256}"),
        ("base", f"{entry.base_image} ({entry.base_format})"),
        ("exit", f"{entry.exit_status} ({outcome})"),
        ("finished", f"{finished} ({format_age(entry.age())} ago)"),
        (
            "disk",
            f"{entry.snapshot} ({format_size(entry.snapshot_bytes)})"
            if entry.snapshot
            else "not kept (only the boot log)",
        ),
        ("boot log", str(entry.boot_log)),
        ("record", str(entry.record_path)),
        ("total", format_size(entry.total_bytes)),
    ]
    if not entry.complete:  # no record: what a teardown would have written is unknown
        rows = [r for r in rows if r[0] not in ("base", "exit", "finished", "disk", "record")]
        rows.insert(1, ("state", f"incomplete: {entry.detail}"))
        rows.insert(-1, ("changed", f"{finished} ({format_age(entry.age())} ago)"))
    for label, value in rows:
        print(f"{label + ':':<11}{value}")
    print("job-ad attributes:")
    for attribute, ad_value in entry.ad_attributes().items():
        print(f"  {attribute} = {_classad(ad_value)}")
    if args.lines > 0:
        print(f"--- last {args.lines} lines of {entry.boot_log} ---")
        print(tail or "(empty)")
    return 0


def _classad(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


# --- boot ---------------------------------------------------------------------------------------


class _Terminated(Exception):
    pass


def cmd_boot(args: argparse.Namespace, settings: Settings) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    elif cmd and cmd[0].startswith("-"):  # an option after ID would be run as the command
        raise UserError(
            f"{cmd[0]} after ID: options go before ID and a command after '--', e.g. "
            "glite-vm snapshots boot --memory 1GB ID -- sh -c 'tail /var/log/syslog'"
        )
    memory_mib = None if args.memory is None else parse_memory_mib(args.memory, "--memory")
    entry = SnapshotStore(settings).find(args.id)
    host = open_host(settings)
    console = "file" if cmd else "pty"
    status = 0
    with _stop_signals() as flag:
        try:
            with boot_snapshot(
                host, entry, console=console, cpus=args.cpus, memory_mib=memory_mib
            ) as boot:
                print(
                    f"glite-vm: started {boot.name} from the snapshot of job {entry.job_id} "
                    f"({entry.image}, {entry.name}) on a throw-away overlay",
                    file=sys.stderr,
                )
                with flag.armed():
                    if cmd:
                        status = _run_command(boot, cmd)
                    else:
                        status = _attach_console(host.conn, boot, flag)
        except (_Terminated, SystemError) as exc:
            stop = signalled(exc)  # raised by the handler in whatever ran, a libvirt call too
            if not isinstance(stop, _Terminated):
                raise
            print(f"glite-vm: stopped by {stop}", file=sys.stderr)
            status = 143
        if flag.pending and status == 0:
            print(f"glite-vm: stopped by {flag.pending}", file=sys.stderr)
            status = 143
    print(
        f"glite-vm: {boot.name} stopped and removed; the snapshot {entry.snapshot} is unchanged",
        file=sys.stderr,
    )
    return status


class _StopFlag:
    """SIGTERM/SIGHUP: a console session ends, a command run is interrupted; while the VM is
    being made or torn down the signal is only remembered, so teardown always completes."""

    def __init__(self) -> None:
        self.bridge: ConsoleBridge | None = None
        self.pending = ""
        self._armed = False

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        if self.pending:
            raise _Terminated(self.pending)
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.bridge is not None:
            self.bridge.stop.set()
        elif self._armed:
            self._armed = False
            raise _Terminated(name)
        self.pending = self.pending or name


@contextlib.contextmanager
def _stop_signals() -> Iterator[_StopFlag]:
    flag = _StopFlag()
    old = {s: signal.signal(s, flag.handle) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield flag
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _run_command(boot: SnapshotBoot, cmd: list[str]) -> int:
    boot.vm.wait_ready()
    print(f"glite-vm: guest agent ready; running {quote_command(cmd)} as root", file=sys.stderr)
    out, err = sys.stdout.buffer, sys.stderr.buffer

    def to_out(data: bytes) -> None:
        out.write(data)
        out.flush()

    def to_err(data: bytes) -> None:
        err.write(data)
        err.flush()

    result = boot.vm.run(cmd, stdout=to_out, stderr=to_err)
    return result.shell_status


def _attach_console(conn: libvirt.virConnect, boot: SnapshotBoot, flag: _StopFlag) -> int:
    if boot.vm.domain is None:
        raise GliteVmError(f"{boot.name} has no domain")
    bridge = ConsoleBridge(conn, boot.vm.domain, boot.boot_log)
    flag.bridge = bridge
    print(
        f"glite-vm: console of {boot.name} (escape: Ctrl-], which also stops and removes the "
        "VM); the boot is shown from its first line",
        file=sys.stderr,
    )
    sys.stdout.flush()
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    saved = termios.tcgetattr(in_fd) if os.isatty(in_fd) else None
    try:
        if saved is not None:
            tty.setraw(in_fd)
        reason = bridge.run(in_fd, out_fd)
    finally:
        if saved is not None:
            termios.tcsetattr(in_fd, termios.TCSADRAIN, saved)
        flag.bridge = None
    said = {
        "escape": "Ctrl-] typed",
        "eof": "input closed",
        "stopped": "the guest stopped",
        "stopped by caller": "stopped by a signal",
    }
    print(f"\nglite-vm: console closed ({said.get(reason, reason)})", file=sys.stderr)
    return 0


# --- export / prune -------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    entry = SnapshotStore(settings).find(args.id)
    result = export_snapshot(entry, Path(args.file), force=args.force, compress=args.compress)
    print(
        f"glite-vm: exported {entry.name} to {result.path}: a self-contained qcow2, "
        f"{format_size(result.file_bytes)} "
        f"on disk, virtual size {format_size(result.virtual_size)}, in {result.seconds:.1f} s",
        file=sys.stderr,
    )
    return 0


def cmd_prune(args: argparse.Namespace, settings: Settings) -> int:
    retention = settings.snapshot_retention
    if args.max_age is not None:
        age = (
            None
            if args.max_age.strip().lower() == "none"
            else parse_duration(args.max_age, "--max-age")
        )
        retention = Retention(age, retention.max_bytes)
    if args.max_bytes is not None:
        size = (
            None
            if args.max_bytes.strip().lower() == "none"
            else parse_size(args.max_bytes, "--max-bytes")
        )
        retention = Retention(retention.max_age, size)
    store = SnapshotStore(settings)
    running = _running(settings, args.dry_run)
    plan = store.prune(retention, dry_run=True, all_users=args.all, running=running)
    if args.dry_run:
        return _prune_report(args, plan)
    if plan.removed:
        if not args.json:
            _prune_report(args, plan, intro=True)
        if not confirm(f"Remove these {len(plan.removed)} entries?", yes=args.yes):
            print("nothing was removed", file=sys.stderr if args.json else sys.stdout)
            return EXIT_PROBLEMS
    # Nothing of anyone's to remove needs no question: the prune then only sweeps directories
    # their owners emptied long ago.
    report = store.prune(retention, dry_run=False, all_users=args.all, running=running)
    return _prune_report(args, report)


def _prune_report(
    args: argparse.Namespace, report: SnapshotPruneReport, *, intro: bool = False
) -> int:
    """Print a prune's outcome (or, with ``intro``, what it will remove); its exit status."""
    if args.json and not intro:
        doc = {
            "dry_run": report.dry_run,
            "retention": str(report.retention),
            "removed": [
                {
                    "name": d.entry.name,
                    "owner": d.entry.owner,
                    "reason": d.reason,
                    "bytes": d.entry.total_bytes,
                    "age_seconds": round(d.entry.age(), 1),
                }
                for d in report.removed
            ],
            "kept": [e.name for e in report.kept],
            "in_use": list(report.in_use),
            "freed_bytes": report.freed_bytes,
            "failures": list(report.failures),
            "empty_dirs_removed": list(report.empty_dirs_removed),
        }
        print(json.dumps(doc, indent=2))
        return EXIT_PROBLEMS if report.failures else 0
    verb = "will remove" if intro else "would remove" if report.dry_run else "removed"
    for d in report.removed:
        print(f"{verb} {d.entry.name} ({format_size(d.entry.total_bytes)}, {d.reason})")
    if intro:
        print(
            f"retention {report.retention}: {len(report.removed)} entries, "
            f"{format_size(report.freed_bytes)}"
        )
        return 0
    for name in report.in_use:
        print(f"kept {name}: its VM still runs")
    if report.empty_dirs_removed:
        print(f"removed {len(report.empty_dirs_removed)} emptied VM directories")
    for problem in report.failures:
        print(f"glite-vm snapshots prune: could not remove {problem}", file=sys.stderr)
    print(
        f"retention {report.retention}: {verb} {len(report.removed)}, kept "
        f"{len(report.kept) + len(report.in_use)}, {format_size(report.freed_bytes)} "
        f"{'would be ' if report.dry_run else ''}freed"
    )
    return EXIT_PROBLEMS if report.failures else 0


def _running(settings: Settings, dry_run: bool) -> set[str] | None:
    """Domains libvirt knows, asked by root (a VM directory is never pruned while its VM
    exists); throw-away VMs of `snapshots boot` whose process was killed are removed on the
    way. Users cannot ask the system's libvirt; for them, as when libvirt does not answer
    (None), the VM directories' overlay files tell which VMs still run."""
    if os.geteuid() != 0:
        return None
    try:
        host = open_host(settings)
    except GliteVmError as exc:
        print(
            f"glite-vm snapshots prune: {exc}; relying on the VM directories' overlay files",
            file=sys.stderr,
        )
        return None
    try:
        for name in reap_abandoned_boots(host, dry_run=dry_run):
            verb = "would destroy" if dry_run else "destroyed"
            print(f"{verb} {name}: its `glite-vm snapshots boot` process is gone", file=sys.stderr)
        return running_domain_names(host.conn)
    finally:
        host.conn.close()
