"""`glite-vm serve` (the bootstrapper, run as root), `glite-vm reap` (one reaper pass now) and
`glite-vm events` (the service's event log)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from glite_vm.cli.main import dispatch
from glite_vm.config import Settings
from glite_vm.errors import AccessDeniedError
from glite_vm.one_line import printable
from glite_vm.service.api import ReapedVm
from glite_vm.service.events import EVENTS, event_log_path, read_events
from glite_vm.units import parse_duration

log = logging.getLogger("glite_vm.service")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the bootstrapper service (as root, in the foreground)",
        description="Own libvirt, the image cache and the VMs, and serve hooks, launcher and "
        "CLI on a Unix socket that every local user may connect to; each caller acts only on "
        "its own jobs and VMs (peer credentials). Logs go to stderr. SIGTERM or SIGINT stop "
        "the service without touching running VMs; the next start adopts them. VMs whose job "
        "is gone are reaped every GLITE_VM_REAP_INTERVAL seconds. With GLITE_VM_METRICS_ADDRESS "
        "(a loopback IP:PORT) or GLITE_VM_METRICS_TEXTFILE (a node_exporter .prom file) it "
        "exports Prometheus metrics (docs/admin.md, Metrics).",
        epilog="See docs/service.md; a systemd unit is glite_vm/service/glite-vm.service.",
    )
    serve.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="the socket to listen on (default: GLITE_VM_SOCKET_PATH)",
    )
    serve.add_argument(
        "--condor-config",
        action="store_true",
        help="also read GLITE_VM_* knobs from HTCondor's configuration (an execute host)",
    )
    serve.set_defaults(handler=cmd_serve)

    reap = sub.add_parser(
        "reap",
        help="reap VMs whose job or run is gone, now (through the service where one runs)",
        description="Ask the running service for one reaper pass (it also reaps on its own "
        "every GLITE_VM_REAP_INTERVAL seconds). Prints nothing on stdout unless --json, so it "
        "can run as a STARTD_CRON job; what was reaped goes to stderr. Where no service runs "
        "(no socket at GLITE_VM_SOCKET_PATH, and no --socket given) and the state directory "
        "is yours, it reaps the VMs of your own killed `glite-vm run`s itself. Exits 125 when "
        "the service cannot be reached.",
    )
    reap.add_argument("--socket", type=Path, metavar="PATH", help="the service's socket")
    reap.add_argument("--json", action="store_true", help="print the reaped VMs as JSON")
    reap.set_defaults(handler=cmd_reap)

    events = sub.add_parser(
        "events",
        help="show what happened to each VM of the service, and why",
        description="Print the service's event log: every VM started, adopted after a "
        "restart, torn down by its job, reaped (with the reason: starter gone, scratch "
        "directory gone, domain gone), abandoned (its boot failed or its caller hung up) or "
        "swept up after a crash. Newest last. The log is root's (<state dir>/service/"
        f"events.jsonl). Event names: {', '.join(EVENTS)}.",
    )
    events.add_argument("--vm", metavar="NAME", help="only this VM (its domain name)")
    events.add_argument("--job", metavar="ID", help="only this job (e.g. 1234.0)")
    events.add_argument("--event", choices=EVENTS, help="only events of this kind")
    events.add_argument(
        "--since",
        metavar="AGE",
        help="only events newer than AGE, with a unit (90s, 30m, 12h, 7d)",
    )
    events.add_argument(
        "-n",
        "--last",
        type=int,
        default=50,
        metavar="N",
        help="at most the last N matching events (default 50; 0 for all)",
    )
    events.add_argument("--json", action="store_true", help="print the stored JSON lines")
    events.set_defaults(handler=cmd_events)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from prometheus_client import disable_created_metrics  # noqa: PLC0415

    from glite_vm.service.metrics import ServiceMetrics  # noqa: PLC0415
    from glite_vm.service.prefetch import Prefetcher  # noqa: PLC0415
    from glite_vm.service.registry import VmRegistry  # noqa: PLC0415 - libvirt: only here
    from glite_vm.service.server import ServiceServer  # noqa: PLC0415
    from glite_vm.service.service_dirs import claim_service_dirs  # noqa: PLC0415
    from glite_vm.vm import libvirt_events  # noqa: PLC0415
    from glite_vm.vm.connect import hypervisor_for, open_host  # noqa: PLC0415
    from glite_vm.vm.hypervisor import HYPERVISOR_CACHE  # noqa: PLC0415

    if args.condor_config:
        settings = Settings.load(use_condor=True)
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
    socket_path: Path = args.socket or settings.socket_path
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    log.info(
        "starting: choosing the accelerator (a KVM self-test of up to ~10 s unless the verdict "
        "in %s still holds), then libvirt at %s",
        settings.state_dir / HYPERVISOR_CACHE,
        settings.effective_libvirt_uri,
    )
    started = time.monotonic()
    claim_service_dirs(settings)  # nothing of another user's is trusted as the service's own
    hypervisor = hypervisor_for(settings)
    log.info("accelerator: %s (%s)", hypervisor.kind, hypervisor.reason)
    host = open_host(settings, hypervisor)
    try:
        # The process's choice, like its logging: no *_created series beside every counter (they
        # double what a scrape and the textfile carry, and dashboards do not use them).
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = VmRegistry(settings, host, ServiceMetrics())
        server = ServiceServer(settings, host, registry, socket_path)
        server.bind()  # before adopting: a second instance must not touch the first's VMs
        log.info("socket %s bound; adopting VMs of an earlier run, reaping", socket_path)
        registry.recover()
        registry.reap_once()
        log.info(
            "ready after %.1f s: %s, %s, state in %s, %d VMs; accepting calls on %s",
            time.monotonic() - started,
            settings.effective_libvirt_uri,
            host.hypervisor.kind,
            settings.state_dir,
            len(registry.active()),
            socket_path,
        )
        prefetcher = Prefetcher(settings, registry.metrics)
        prefetcher.start()  # the warm set, in the background (GLITE_VM_PREFETCH)
        try:
            server.serve(stop)
        finally:
            prefetcher.stop()
    finally:
        host.conn.close()
        libvirt_events.stop()  # after the connection: it answers libvirt's keepalives
    return 0


def cmd_reap(args: argparse.Namespace, settings: Settings) -> int:
    from glite_vm.service.client import ServiceClient  # noqa: PLC0415

    client = ServiceClient.from_settings(settings)
    if args.socket is not None:
        client.socket_path = str(args.socket)
    if args.socket is None and not os.path.exists(client.socket_path) and _owns(settings.state_dir):
        reaped = _reap_here(settings)  # no service: this user's own runs (glite-vm run)
    else:
        reaped = client.reap()
    for r in reaped:
        print(f"glite-vm reap: {r.vm} (uid {r.owner_uid}): {r.reason}", file=sys.stderr)
    if args.json:
        print(json.dumps([vars(r) for r in reaped], indent=2))
    return 0


def _owns(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.geteuid()
    except OSError:
        return False


def _reap_here(settings: Settings) -> list[ReapedVm]:
    """A reaper pass in this process over the VMs of the caller's own runs (``glite-vm run``)
    whose process is gone: what ``reap`` does where no service runs."""
    from glite_vm.service.registry import VmRegistry  # noqa: PLC0415 - libvirt: only here
    from glite_vm.vm.connect import open_host  # noqa: PLC0415

    print(
        "glite-vm reap: no service here; reaping the VMs of your own runs that were killed "
        f"(state in {settings.state_dir})",
        file=sys.stderr,
    )
    from glite_vm.session import sweep_run_dirs  # noqa: PLC0415

    host = open_host(settings)
    try:
        reaped = VmRegistry(settings, host).reap_orphans()
    finally:
        host.conn.close()
    sweep_run_dirs(settings)
    return reaped


def cmd_events(args: argparse.Namespace, settings: Settings) -> int:
    path = event_log_path(settings.state_dir)
    cutoff = None
    if args.since is not None:
        age = parse_duration(args.since, "--since")
        cutoff = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age))
    try:
        found = [
            e
            for e in read_events(path)
            if (args.vm is None or e.vm == args.vm)
            and (args.job is None or e.job == args.job)
            and (args.event is None or e.event == args.event)
            and (cutoff is None or e.time >= cutoff)
        ]
    except PermissionError:
        raise AccessDeniedError(f"the event log {path} is readable by root only") from None
    if args.last > 0:
        found = found[-args.last :]
    for e in found:
        if args.json:
            print(e.to_json())
            continue
        who = f"job {e.job} uid {e.uid}" if e.job is not None else ""
        extra = "; ".join(
            x
            for x in (
                e.reason,
                f"snapshot {e.snapshot}" if e.snapshot else None,
                "failed" if e.failed else None,
            )
            if x
        )
        line = f"{e.time}  {e.event:<9}  {e.vm}  {who}{'  ' + extra if extra else ''}".rstrip()
        print(printable(line))  # a reason can quote a guest or an image
    if not found and not args.json:
        print("no events" + ("" if path.exists() else f" ({path} does not exist yet)"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m glite_vm.cli.service serve|reap ...``: these commands on their own."""
    parser = argparse.ArgumentParser(prog="glite-vm")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return dispatch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
