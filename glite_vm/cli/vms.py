"""`glite-vm vms list|destroy|release`: the VMs this tool made on this host, removing them by
name, and ending a job's debug hold (through the service, as the VM's owner)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import libvirt

from glite_vm.cli.common import EXIT_PROBLEMS, confirm, print_table
from glite_vm.config import Settings
from glite_vm.images.catalogue import format_age
from glite_vm.vm.connect import hypervisor_for, open_host
from glite_vm.vm.domains import destroy_domain
from glite_vm.vm.lifecycle import VmHost


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vms = sub.add_parser(
        "vms",
        help="list or remove this tool's VMs",
        description="Inspect and clean up VMs created by glite-vm.",
    )
    vms_sub = vms.add_subparsers(dest="vms_command", metavar="ACTION", required=True)
    lst = vms_sub.add_parser("list", help="running VMs with owner, job and age")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(handler=cmd_vms_list)
    destroy = vms_sub.add_parser(
        "destroy",
        help="stop and undefine VMs by name",
        description="Show the VMs (owner, job, image, age), then stop them at once and remove "
        "their definitions; a running job loses its VM. Asks first on a terminal; --yes "
        "confirms in scripts, --dry-run only shows them.",
    )
    destroy.add_argument("names", nargs="+", metavar="NAME")
    destroy.add_argument("--yes", action="store_true", help="do not ask; destroy them")
    destroy.add_argument("--dry-run", action="store_true", help="only show what would go")
    destroy.set_defaults(handler=cmd_vms_destroy)
    release = vms_sub.add_parser(
        "release",
        help="end a job's debug hold now (+GliteVmDebugHold)",
        description="A job whose payload failed and that asked for +GliteVmDebugHold keeps its "
        "VM running, and stays running in HTCondor, until GliteVmDebugUntil. This ends the hold "
        "now: the VM is torn down and the job ends as it would have without the hold (same exit "
        "status and output files). Only the job's owner (or root) may. With no VM named, the "
        "VM of the job whose sandbox you are in (where condor_ssh_to_job leaves you). Exits 125 "
        "when the service cannot be reached.",
    )
    release.add_argument(
        "name",
        nargs="?",
        metavar="VM|JOB",
        help="the VM (the job's GliteVmDomain) or its job id (12.0); default: this sandbox's job",
    )
    release.add_argument("--socket", type=Path, metavar="PATH", help="the service's socket")
    release.set_defaults(handler=cmd_vms_release)


def _vm_rows(host: VmHost) -> list[dict[str, object]]:
    now = time.time()
    rows: list[dict[str, object]] = []
    for dom, meta in host.our_domains():
        try:
            active = dom.isActive()
        except libvirt.libvirtError:
            continue  # it went away while we looked (another job's VM ending)
        rows.append(
            {
                "name": dom.name(),
                "state": "running" if active else "defined",
                "owner": meta.owner if meta else "?",
                "job": meta.job_id if meta else "?",
                "image": meta.image if meta else "?",
                "age_seconds": round(now - meta.created) if meta else None,
            }
        )
    return rows


def _print_vms(rows: list[dict[str, object]]) -> None:
    print_table(
        ("NAME", "STATE", "OWNER", "JOB", "AGE", "IMAGE"),
        [
            (
                str(r["name"]),
                str(r["state"]),
                str(r["owner"]),
                str(r["job"]),
                format_age(age) if isinstance(age := r["age_seconds"], int) else "?",
                str(r["image"]),
            )
            for r in rows
        ],
        right=frozenset({4}),
    )


def cmd_vms_list(args: argparse.Namespace, settings: Settings) -> int:
    rows = _vm_rows(open_host(settings, hypervisor_for(settings)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no glite-vm VMs")
        return 0
    _print_vms(rows)
    return 0


def cmd_vms_destroy(args: argparse.Namespace, settings: Settings) -> int:
    host = open_host(settings, hypervisor_for(settings))
    ours = {dom.name(): dom for dom, _meta in host.our_domains()}
    unknown = [n for n in args.names if n not in ours]
    for name in unknown:
        print(f"glite-vm vms destroy: no glite-vm VM named {name!r}", file=sys.stderr)
    wanted = [n for n in dict.fromkeys(args.names) if n in ours]
    if not wanted:
        return EXIT_PROBLEMS
    rows = [r for r in _vm_rows(host) if r["name"] in wanted]
    verb = "would destroy" if args.dry_run else "will destroy"
    print(f"{verb} {len(rows)} VM(s); a job still running in one loses it:")
    _print_vms(rows)
    if args.dry_run:
        return EXIT_PROBLEMS if unknown else 0
    if not confirm(f"Destroy {len(rows)} VM(s)?", yes=args.yes):
        print("nothing was destroyed")
        return EXIT_PROBLEMS
    for name in wanted:
        destroy_domain(ours[name])
        print(f"destroyed {name}")
    return EXIT_PROBLEMS if unknown else 0


def cmd_vms_release(args: argparse.Namespace, settings: Settings) -> int:
    from glite_vm.service.client import ServiceClient  # noqa: PLC0415
    from glite_vm.service.terminal import choose_vm, scratch_dir_of_job  # noqa: PLC0415

    client = ServiceClient.from_settings(settings)
    if args.socket is not None:
        client.socket_path = str(args.socket)
    vm = choose_vm(client.list_vms(), args.name, os.getcwd(), scratch_dir_of_job())
    client.debug_release(vm)
    print(f"released {vm}: its job now ends as it would have without the hold")
    return 0
