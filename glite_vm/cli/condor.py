"""`glite-vm config`: the condor_config.d snippet that turns an execute host into VM slots."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from glite_vm.condor.config import (
    ExecuteHostConfig,
    SlotLayout,
    default_hooks_dir,
    render_execute_config,
)
from glite_vm.config import MIB, Settings, parse_size
from glite_vm.errors import RequestError

_DEFAULT = SlotLayout()


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
        help=f"directory of the hook executables (default: {default_hooks_dir()})",
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
        default=_DEFAULT.slots,
        help=f"VM slots on this host (default: {_DEFAULT.slots})",
    )
    p.add_argument(
        "--root-slots",
        type=int,
        default=_DEFAULT.root_slots,
        help=f"how many of them are root-enabled (default: {_DEFAULT.root_slots})",
    )
    p.add_argument(
        "--cpus",
        type=int,
        default=_DEFAULT.cpus,
        help=f"CPUs per VM slot (default: {_DEFAULT.cpus})",
    )
    p.add_argument("--memory", default="2GiB", help="memory per VM slot (default: 2GiB)")
    p.add_argument("--disk", default="30GiB", help="VM disk per slot (default: 30GiB)")
    p.add_argument("-o", "--output", type=Path, help="write the snippet here instead of stdout")
    p.set_defaults(handler=handle_config)


def _running_glite_vm() -> Path:
    beside = Path(sys.executable).parent / "glite-vm"
    if beside.is_file():
        return beside
    found = shutil.which("glite-vm")
    return Path(found) if found else beside


def handle_config(args: argparse.Namespace, settings: Settings) -> int:
    try:
        memory = parse_size(args.memory, "--memory")
        layout = SlotLayout(
            slots=args.slots,
            root_slots=args.root_slots,
            cpus=args.cpus,
            memory_mib=memory // MIB,
            disk_bytes=parse_size(args.disk, "--disk"),
        )
        cfg = ExecuteHostConfig.from_settings(
            settings,
            hooks_dir=(args.hooks_dir or default_hooks_dir()).absolute(),
            glite_vm=(args.glite_vm or _running_glite_vm()).absolute(),
            layout=layout,
        )
    except (ValueError, RequestError) as exc:
        print(f"glite-vm config: {exc}", file=sys.stderr)
        return 2
    text = render_execute_config(cfg)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0
