"""HTCondor execute hosts: `glite-vm config` (the condor_config.d snippet that turns a host into
VM slots), `glite-vm hook install` (the hook executables) and `glite-vm advertise` (STARTD_CRON).
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from glite_vm.cli.common import EXIT_FAILURE
from glite_vm.condor.config import (
    DEFAULT_HOOKS_DIR,
    HOOK_ENTRY_POINTS,
    ExecuteHostConfig,
    hook_script,
    render_execute_config,
    render_negotiator_config,
)
from glite_vm.config import Settings
from glite_vm.errors import UserError
from glite_vm.slots import SlotLayout
from glite_vm.units import parse_memory_mib, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "config",
        help="print the HTCondor configuration of an execute host",
        description="Print a complete condor_config.d snippet: hook keyword and paths, "
        "static VM slots (some root-enabled), START/RANK policy and the STARTD_CRON entries "
        "running `glite-vm advertise` and `glite-vm reap`. Default image, root users and "
        "the host-failure limit come from the settings (GLITE_VM_*). See docs/condor.md.",
    )
    p.add_argument(
        "--hooks-dir",
        type=Path,
        default=None,
        help="directory of the hook executables, as `glite-vm hook install` wrote it "
        f"(default: {DEFAULT_HOOKS_DIR})",
    )
    p.add_argument(
        "--glite-vm",
        type=Path,
        default=None,
        dest="glite_vm",
        help="the glite-vm executable STARTD_CRON runs (default: the one running)",
    )
    p.add_argument(
        "--slots",
        type=int,
        default=None,
        help="VM slots on this host (default: GLITE_VM_SLOTS, 3)",
    )
    p.add_argument(
        "--root-slots",
        type=int,
        default=None,
        help="how many of them are root-enabled, the last ones (default: GLITE_VM_ROOT_SLOTS, 1)",
    )
    p.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="CPUs per VM slot (default: GLITE_VM_SLOT_CPUS, 1)",
    )
    p.add_argument(
        "--memory",
        default=None,
        help="memory per VM slot, with a unit (default: GLITE_VM_SLOT_MEMORY_BYTES, 2GiB)",
    )
    p.add_argument(
        "--disk",
        default=None,
        help="VM disk per slot, with a unit (default: GLITE_VM_SLOT_DISK_BYTES, 30GiB)",
    )
    p.add_argument(
        "--central-manager",
        action="store_true",
        help="print the central manager's snippet instead: a NEGOTIATOR_PRE_JOB_RANK that "
        "sends jobs to idle slots whose host already holds their image (docs/condor.md)",
    )
    p.add_argument("-o", "--output", type=Path, help="write the snippet here instead of stdout")
    p.set_defaults(handler=handle_config)

    hook = subparsers.add_parser(
        "hook",
        help="install the HTCondor hook executables",
        description="The starter runs PREPARE_JOB, JOB_EXIT and the launcher as the job "
        "owner; they must not be writable by others. See docs/condor.md.",
    )
    hook_sub = hook.add_subparsers(dest="hook_command", metavar="ACTION", required=True)
    install = hook_sub.add_parser(
        "install",
        help="write prepare_job, job_exit and launcher into a directory",
        description="Write the hook executables, each naming the Python interpreter that has "
        "glite_vm (default: the one running this command) in its #! line. The directory "
        "must not be writable by group or others (the starter refuses such hooks).",
    )
    install.add_argument(
        "directory",
        type=Path,
        nargs="?",
        default=DEFAULT_HOOKS_DIR,
        help=f"where to write them (default: {DEFAULT_HOOKS_DIR})",
    )
    install.add_argument(
        "--python",
        default=sys.executable,
        help=f"the interpreter the hooks run with (default: {sys.executable})",
    )
    install.set_defaults(handler=handle_hook_install)

    adv = subparsers.add_parser(
        "advertise",
        help="print host facts for the slot ads (STARTD_CRON)",
        description="Print GliteVmHypervisors, GliteVmCachedImages and GliteVmCacheFreeBytes "
        "as ClassAd lines. Cheap: reads the image cache and the remembered hypervisor probe, "
        "never probes. Settings include HTCondor's configuration (GLITE_VM_STATE_DIR, ...).",
    )
    adv.set_defaults(handler=handle_advertise)


def _running_glite_vm() -> Path:
    beside = Path(sys.executable).parent / "glite-vm"
    if beside.is_file():
        return beside
    found = shutil.which("glite-vm")
    return Path(found) if found else beside


def handle_config(args: argparse.Namespace, settings: Settings) -> int:
    if args.central_manager:
        return _write_snippet(args.output, render_negotiator_config())
    # The options override the settings' layout, which the snippet then carries for the
    # service (GLITE_VM_SLOTS, ...): both read the same slots.
    base = SlotLayout.from_settings(settings)
    layout = SlotLayout(
        slots=base.slots if args.slots is None else args.slots,
        root_slots=base.root_slots if args.root_slots is None else args.root_slots,
        cpus=base.cpus if args.cpus is None else args.cpus,
        memory_mib=(
            base.memory_mib if args.memory is None else parse_memory_mib(args.memory, "--memory")
        ),
        disk_bytes=base.disk_bytes if args.disk is None else parse_size(args.disk, "--disk"),
    )
    cfg = ExecuteHostConfig.from_settings(
        settings,
        hooks_dir=(args.hooks_dir or DEFAULT_HOOKS_DIR).absolute(),
        glite_vm=(args.glite_vm or _running_glite_vm()).absolute(),
        layout=layout,
    )
    return _write_snippet(args.output, render_execute_config(cfg))


def _write_snippet(output: Path | None, text: str) -> int:
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
    return 0


def _writable_by_others(path: Path) -> bool:
    mode = path.stat().st_mode
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def handle_hook_install(args: argparse.Namespace, settings: Settings) -> int:
    directory: Path = args.directory.absolute()
    python = str(args.python)
    if not os.path.isabs(python) or not os.access(python, os.X_OK):
        raise UserError(f"--python {python} is not an executable absolute path")
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    if _writable_by_others(directory):
        raise UserError(
            f"{directory} is writable by group or others; the starter refuses hooks there "
            "(chmod go-w it or choose another directory)"
        )
    for name in HOOK_ENTRY_POINTS:
        target = directory / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(hook_script(name, python))
            os.chmod(tmp, 0o755)  # noqa: S103 - the starter runs them as job owners
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        print(target)
    return 0


def handle_advertise(args: argparse.Namespace, settings: Settings) -> int:
    from glite_vm.condor.advertise import collect, render  # noqa: PLC0415

    try:
        settings = Settings.load(use_condor=True)  # STARTD_CRON: HTCondor's knobs count
    except ValueError as exc:
        print(f"glite-vm advertise: configuration error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    facts = collect(settings)
    for problem in facts.problems:
        print(f"glite-vm advertise: {problem}", file=sys.stderr)
    sys.stdout.write(render(facts))
    return 0
