"""`glite-vm images|cache|catalogue ...`: look at and manage the catalogue and the local cache."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from glite_vm.cli.common import (
    EXIT_FAILURE,
    EXIT_PROBLEMS,
    confirm,
    local_ref,
    print_table,
    report_error,
)
from glite_vm.cli.progress import ProgressBar
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError
from glite_vm.images.acquire import acquire_image
from glite_vm.images.build import CATALOGUE_NAME, build_catalogue, write_catalogue
from glite_vm.images.cache import ImageCache
from glite_vm.images.cache_budget import PrunePlan
from glite_vm.images.catalogue import format_age, load_catalogue
from glite_vm.images.inspect import Limits
from glite_vm.units import format_size, parse_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    images = subparsers.add_parser("images", help="list catalogue images, fetch them")
    isub = images.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = isub.add_parser("list", help="the catalogue, with what is cached on this host")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=images_list)
    p = isub.add_parser(
        "pull",
        help="fetch images into the cache now",
        description="Fetch catalogue images, custom image URLs or local image files "
        "(paths need a '/': ./disk.qcow2) into the cache, with the same checks a job gets.",
    )
    p.add_argument("refs", nargs="+", metavar="IMAGE", help="catalogue name, URL or path")
    p.add_argument("--sha256", help="expected digest (only with a single IMAGE)")
    p.add_argument(
        "--progress",
        choices=("auto", "always", "never"),
        default="auto",
        help="progress bar on stderr (auto: when stderr is a terminal)",
    )
    p.set_defaults(handler=images_pull)
    p = isub.add_parser(
        "warm",
        help="build the warm-start template of an image now",
        description="Boot a catalogue image once, save it at agent-ready and keep it in the "
        "cache as a template that jobs' VMs are restored from (docs/vm.md, 'Warm start'). "
        "The template is made for the VM a HTCondor job gets in this host's slots, or with "
        "--own for the VMs of 'glite-vm run'.",
    )
    p.add_argument("name", metavar="IMAGE", help="catalogue name")
    p.add_argument("--own", action="store_true", help="for 'glite-vm run' (default sizes)")
    p.add_argument("--network", help="for VMs on this network (default: the host's default)")
    p.set_defaults(handler=images_warm)

    cache = subparsers.add_parser("cache", help="inspect, prune and verify the image cache")
    csub = cache.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = csub.add_parser("status", help="bytes, entries, leases and budget")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cache_status)
    p = csub.add_parser(
        "prune",
        help="evict unused images down to a size",
        description="Remove dead leases and interrupted downloads, then evict the least "
        "recently used images that no job is using until the cache fits SIZE. Shows what "
        "it will remove and how much first; asks on a terminal, and in scripts removes "
        "only with --yes.",
    )
    p.add_argument(
        "--to",
        metavar="SIZE",
        help="target size with a unit, e.g. 20GB (default: the budget, GLITE_VM_CACHE_MAX_BYTES)",
    )
    p.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    p.add_argument("--yes", action="store_true", help="do not ask; remove it")
    p.set_defaults(handler=cache_prune)
    p = csub.add_parser("verify", help="re-hash every cached file; remove corrupt ones")
    p.add_argument("--keep-bad", action="store_true", help="report corrupt files, keep them")
    p.set_defaults(handler=cache_verify)

    cat = subparsers.add_parser("catalogue", help="build the catalogue of an image repository")
    tsub = cat.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = tsub.add_parser(
        "build",
        help="write catalogue.json for a directory of images",
        description="Inspect every image in DIR (*.qcow2, *.raw, *.img, or any file with a "
        "<file>.json sidecar giving name/os/arch/guest_user/description/boot/kernel/initrd/"
        "cmdline) and write DIR/catalogue.json. See docs/images.md.",
    )
    p.add_argument("directory", type=Path, metavar="DIR")
    p.add_argument(
        "-o", "--output", type=Path, help=f"where to write (default: DIR/{CATALOGUE_NAME})"
    )
    p.add_argument("--base-url", help="absolute URL prefix for image URLs (default: relative)")
    p.add_argument("--arch", default="x86_64", help="arch of images without a sidecar value")
    p.add_argument("--guest-user", help="guest user of images without a sidecar value")
    p.set_defaults(handler=catalogue_build)


# --- images ----------------------------------------------------------------------------------


def images_list(args: argparse.Namespace, settings: Settings) -> int:
    catalogue = load_catalogue(settings)
    cache = ImageCache(settings)
    entries = [catalogue.get(name) for name in catalogue.names()]
    cached = {e.name: cache.entry(e.sha256) is not None for e in entries}
    if catalogue.stale:
        print(
            f"note: repository unreachable; catalogue as of {format_age(catalogue.age())} ago",
            file=sys.stderr,
        )
    if args.json:
        rows = [
            {
                "name": e.name,
                "os": e.os,
                "arch": e.arch,
                "boot": e.boot,
                "format": e.format,
                "size": e.size,
                "sha256": e.sha256,
                "cached": cached[e.name],
                "description": e.description,
            }
            for e in entries
        ]
        print(json.dumps(rows, indent=2))
        return 0
    table = []
    for e in entries:
        size = format_size(e.size) if e.size is not None else "?"
        table.append([e.name, e.os, e.arch, e.boot, size, "yes" if cached[e.name] else "no"])
    print_table(("NAME", "OS", "ARCH", "BOOT", "SIZE", "CACHED"), table)
    return 0


def images_pull(args: argparse.Namespace, settings: Settings) -> int:
    if args.sha256 and len(args.refs) != 1:
        raise GliteVmError("--sha256 needs exactly one IMAGE")
    show = args.progress == "always" or (args.progress == "auto" and sys.stderr.isatty())
    worst = 0
    for ref in args.refs:
        target = local_ref(ref)
        bar = ProgressBar(ref, sys.stderr, force=show) if show else None
        try:
            with acquire_image(
                settings,
                target,
                sha256=args.sha256,
                job_id=f"cli-pull-{os.getpid()}",
                progress=bar.update if bar is not None else None,
                allow_local=True,
            ) as lease:
                image = lease.image
        except GliteVmError as exc:
            if bar is not None:
                bar.close()
            report_error(exc, ref)
            worst = EXIT_FAILURE
            continue
        if bar is not None:
            bar.close()
        how = "cached" if image.cache_hit else f"fetched in {image.fetch_seconds:.2f}s"
        print(f"{image.name}\t{image.format}\t{image.sha256}\t{image.path}\t{how}")
    return worst


def images_warm(args: argparse.Namespace, settings: Settings) -> int:
    from glite_vm.service import warm_start  # noqa: PLC0415 - libvirt only for this command
    from glite_vm.vm.connect import open_host  # noqa: PLC0415

    request = warm_start.shape_request(settings, args.name, own=args.own, network=args.network)
    with acquire_image(settings, args.name, job_id=f"cli-warm-{os.getpid()}") as lease:
        host = open_host(settings)
        try:
            started = time.monotonic()
            template = warm_start.build_template(settings, host, request, lease.image)
        finally:
            host.conn.close()
    if template is None:
        raise GliteVmError(f"another process is building the template of {args.name} right now")
    seconds = time.monotonic() - started
    print(f"{args.name}\t{template.key}\t{format_size(template.size)}\t{seconds:.2f}s")
    return 0


# --- cache -----------------------------------------------------------------------------------


def cache_status(args: argparse.Namespace, settings: Settings) -> int:
    st = ImageCache(settings).status()
    if args.json:
        doc: dict[str, Any] = {
            "root": str(st.root),
            "budget": st.budget,
            "used_bytes": st.used_bytes,
            "partial_bytes": st.partial_bytes,
            "free_bytes": st.free_bytes,
            "live_leases": st.live_leases,
            "dead_leases": st.dead_leases,
            "entries": [
                {
                    **{k: v for k, v in dataclasses.asdict(e.entry).items() if k != "path"},
                    "path": str(e.entry.path),
                    "leases": [
                        {"job_id": r.job_id, "pid": r.pid, "since": r.created} for r in e.leases
                    ],
                }
                for e in st.entries
            ],
        }
        print(json.dumps(doc, indent=2))
        return 0
    pct = 100.0 * st.used_bytes / st.budget if st.budget else 0.0
    print(f"cache      {st.root}")
    print(
        f"budget     {format_size(st.budget)}; used {format_size(st.used_bytes)} ({pct:.0f}%); "
        f"partial downloads {format_size(st.partial_bytes)}; disk free {format_size(st.free_bytes)}"
    )
    print(f"entries    {len(st.entries)}; leases {st.live_leases} live, {st.dead_leases} dead")
    if st.entries:
        table = [
            [
                e.entry.sha256[:12],
                format_size(e.entry.size),
                e.entry.format or e.entry.kind,
                ", ".join(r.job_id for r in e.leases) or "-",
                _when(e.entry.last_used),
                ", ".join(e.entry.sources),
            ]
            for e in sorted(st.entries, key=lambda x: -x.entry.last_used)
        ]
        print()
        print_table(("SHA256", "SIZE", "FORMAT", "LEASES", "LAST USED", "SOURCES"), table)
    return 0


def cache_prune(args: argparse.Namespace, settings: Settings) -> int:
    target = parse_size(args.to, "--to") if args.to else None
    cache = ImageCache(settings)
    plan = cache.prune_plan(target)
    _show_prune_plan(cache, plan, dry_run=args.dry_run)
    if args.dry_run or not plan.removes_anything:
        return EXIT_PROBLEMS if plan.in_use_above_target else 0
    if not confirm("Remove them?", yes=args.yes):
        print("nothing was removed")
        return EXIT_PROBLEMS
    report = cache.prune(target)
    print(
        f"removed {len(report.removed)} image file(s), freed {format_size(report.freed_bytes)}; "
        f"dropped {report.partials_removed} interrupted download(s) and "
        f"{report.dead_leases_removed} dead lease(s)"
    )
    for e in report.removed:
        print(f"  removed {e.sha256[:12]} {format_size(e.size)} {', '.join(e.sources)}")
    if report.kept_in_use:
        print(f"{report.kept_in_use} image(s) in use were kept; the cache is still above target")
        return EXIT_PROBLEMS
    return 0


def _show_prune_plan(cache: ImageCache, plan: PrunePlan, *, dry_run: bool) -> None:
    verb = "would remove" if dry_run else "will remove"
    print(
        f"cache {cache.root}: {format_size(plan.used_bytes)} in images, target "
        f"{format_size(plan.target_bytes)}"
    )
    if not plan.removes_anything:
        print("nothing to remove")
    if plan.evict:
        print(
            f"{verb} {len(plan.evict)} image file(s), {format_size(plan.evict_bytes)}, "
            "least recently used first:"
        )
        print_table(
            ("  SHA256", "SIZE", "LAST USED", "SOURCES"),
            [
                (
                    "  " + e.sha256[:12],
                    format_size(e.size),
                    _when(e.last_used),
                    ", ".join(e.sources) or "-",
                )
                for e in plan.evict
            ],
            right=frozenset({1}),
        )
    if plan.partial_downloads:
        print(
            f"{verb} {plan.partial_downloads} interrupted download(s), "
            f"{format_size(plan.partial_bytes)}"
        )
    if plan.dead_leases:
        print(f"{verb} {plan.dead_leases} lease(s) of processes that are gone")
    if plan.in_use_above_target:
        print("images in use by jobs stay, so the cache stays above the target")


def _when(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


def cache_verify(args: argparse.Namespace, settings: Settings) -> int:
    results = ImageCache(settings).verify(remove_bad=not args.keep_bad)
    bad = 0
    for r in results:
        if r.ok:
            print(f"ok   {r.sha256}")
        else:
            bad += 1
            print(f"BAD  {r.sha256}: {r.detail}")
    print(f"{len(results)} file(s) checked, {bad} bad")
    return EXIT_PROBLEMS if bad else 0


# --- catalogue -------------------------------------------------------------------------------


def catalogue_build(args: argparse.Namespace, settings: Settings) -> int:
    limits = Limits(settings.max_image_virtual_bytes, settings.max_image_file_bytes)
    doc = build_catalogue(
        args.directory,
        limits=limits,
        base_url=args.base_url,
        default_arch=args.arch,
        default_guest_user=args.guest_user,
    )
    output = write_catalogue(doc, args.output or args.directory / CATALOGUE_NAME)
    print(f"wrote {output}: {len(doc['images'])} image(s)")
    for entry in doc["images"]:
        print(f"  {entry['name']}\t{entry['format']}\t{format_size(entry['size'])}\t{entry['url']}")
    return 0
