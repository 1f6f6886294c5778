"""A site on one machine: a central manager, execute hosts, one image repository over HTTP.

Each execute host is what an admin makes of a machine by the documented steps (docs/admin.md,
docs/condor.md): its own HTCondor (a release unpacked into its own prefix: own LOCAL_DIR,
condor_master and startd, named with ``STARTD_NAME``/``MASTER_NAME``, ports picked by HTCondor),
its own ``glite-vm serve`` (own socket, state, cache and run directories), its hooks from
``glite-vm hook install`` and its HTCondor configuration from ``glite-vm config`` run with the
host's settings. The central manager (collector, negotiator, schedd; no startd) runs the
snippet of ``glite-vm config --central-manager``. The repository is Debian's nginx serving a
directory on a free loopback port; its access log (one JSON object a request) shows what each
download cost. Every wait is bounded; :meth:`Site.close` stops everything that was started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from glite_vm.images.build import build_catalogue, write_catalogue
from glite_vm.images.inspect import Limits
from glite_vm.slots import SlotLayout
from tests.condor.pool import (
    JobAd,
    PersonalPool,
    PoolError,
    find_tarball,
    free_port,
    unpack_release,
    wait_until,
)
from tests.service.svc_support import ServiceProcess, admin_cli
from tests.support import guest_catalogue, service_env, traversable

NGINX = "/usr/sbin/nginx"
#: The access log: one JSON object per request, what the tests count downloads by.
_LOG_FORMAT = (
    '{"method":"$request_method","uri":"$uri","status":$status,'
    '"bytes":$body_bytes_sent,"range":"$http_range"}'
)


class NginxRepository:
    """Debian's nginx serving ``docroot`` on ``127.0.0.1:<free port>`` (static files: ETag,
    Last-Modified and Range are nginx's defaults). Runs as root with its workers as root too
    (``user root``), in the foreground, as a child of the test; :meth:`stop` ends it."""

    def __init__(self, root: Path, docroot: Path) -> None:
        self.root = root
        self.docroot = docroot
        self.port = free_port()
        self.access_log = root / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(mode=0o755, exist_ok=True)
        self.conf = root / "nginx.conf"
        self.conf.write_text(
            "\n".join(
                [
                    "daemon off;",
                    "master_process on;",
                    "worker_processes 1;",
                    "user root;",
                    f"pid {root / 'nginx.pid'};",
                    f"error_log {root / 'error.log'} info;",
                    "events { worker_connections 64; }",
                    "http {",
                    "  access_log off;",
                    f"  log_format glitevm escape=json '{_LOG_FORMAT}';",
                    f"  client_body_temp_path {root / 'tmp'};",
                    "  server {",
                    f"    listen 127.0.0.1:{self.port};",
                    f"    root {docroot};",
                    f"    access_log {self.access_log} glitevm;",
                    "  }",
                    "}",
                    "",
                ]
            )
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with (self.root / "nginx.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [NGINX, "-p", str(self.root), "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise PoolError(f"nginx exited: {(self.root / 'error.log').read_text()[-2000:]}")
            try:
                import socket  # noqa: PLC0415

                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_until("nginx to listen", answers, timeout, interval=0.2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: finish requests, then exit
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def requests(self) -> list[dict[str, Any]]:
        try:
            lines = self.access_log.read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def gets(self, file: str) -> list[dict[str, Any]]:
        """The GET requests of ``/<file>`` answered with bytes (200 or 206)."""
        return [
            r
            for r in self.requests()
            if r["method"] == "GET" and r["uri"] == f"/{file}" and r["status"] in (200, 206)
        ]

    def bytes_sent(self, suffix: str = "") -> int:
        return sum(int(r["bytes"]) for r in self.requests() if r["uri"].endswith(suffix))


def site_repository(guest_dir: Path, repo: Path, images: Sequence[str], pad_mib: int) -> Path:
    """A repository in ``repo`` of direct-kernel test guests named ``images``, each data disk
    made distinct (its own bytes, so its own digest and cache entry) by ``pad_mib`` MiB of its
    own pattern written past the end of the guest's files (the last block group of its ext4,
    whose data blocks are free); the catalogue's path. Kernel and initramfs are shared, as
    a real repository's images share nothing but are fetched once per host here."""
    guest_catalogue(guest_dir, repo, direct={name: "" for name in images})
    offset = 1000 * 1024 * 1024  # the disk is 1 GiB of ext4: group 7 past its metadata
    for n, name in enumerate(images):
        disk = repo / f"{name}.qcow2"
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "qcow2",
                "-c",
                f"write -P {0x41 + n} {offset} {pad_mib}M",
                str(disk),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        disk.chmod(0o644)
    doc = build_catalogue(repo, limits=Limits(max_virtual_bytes=64 << 30, max_file_bytes=1 << 30))
    return write_catalogue(doc, repo / "catalogue.json")


@dataclasses.dataclass
class ExecuteHost:
    """One execute host of the site: its HTCondor (``pool``: master and startd) and its
    glite-vm service."""

    name: str
    root: Path
    service: ServiceProcess
    pool: PersonalPool
    config: str  # what `glite-vm config` printed for it

    @property
    def state_dir(self) -> Path:
        return Path(self.service.env["GLITE_VM_STATE_DIR"])

    def admin(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``glite-vm ARGS`` as this host's admin (root, with the host's settings)."""
        return admin_cli(self.service, *args)

    def slot_ads(self) -> list[JobAd]:
        return [
            ad
            for ad in self.pool.slot_ads()
            if str(ad.get("Name", "")).split("@")[1:2] == [self.name]
        ]

    @property
    def drain_target(self) -> str:
        """What ``condor_drain`` takes for this host's startd: one of its slots' names (the
        startd's own name, ``hosta@machine``, is not found by address; measured on 25.0)."""
        (first, *_) = self.slot_ads()
        return str(first["Name"])

    def cached_images(self) -> set[str]:
        """What this host's slot ads advertise in ``GliteVmCachedImages``."""
        found: set[str] = set()
        for ad in self.slot_ads():
            found.update(x for x in str(ad.get("GliteVmCachedImages", "")).split(",") if x)
        return found


def host_of(ad: JobAd) -> str:
    """The execute host a finished job ran on last: ``slot1@hosta@machine`` -> ``hosta``."""
    where = str(ad.get("LastRemoteHost") or ad.get("RemoteHost") or "")
    parts = where.split("@")
    if len(parts) < 3:
        raise AssertionError(f"job ran on {where!r}, not on a named execute host")
    return parts[1]


class Site:
    """A central manager and execute hosts; build with :func:`running_site`."""

    def __init__(self, root: Path, user: pwd.struct_passwd, repository: NginxRepository) -> None:
        self.root = root
        self.user = user
        self.repository = repository
        self.cm = PersonalPool(root / "cm", user)
        self.hosts: dict[str, ExecuteHost] = {}
        self._cm_config = ("", "")  # glite-vm's snippet, the test's own lines

    # -- building ---------------------------------------------------------------------------

    def start_central_manager(self, extra_config: str = "", *, cache_rank: bool = True) -> None:
        """The central manager; with ``cache_rank`` it runs the snippet of ``glite-vm config
        --central-manager`` (else HTCondor's default pre-job rank: the baseline)."""
        prefix = self.cm.prefix
        prefix.mkdir(mode=0o755)
        unpack_release(find_tarball(), prefix)
        cm_snippet = _cli_output(["config", "--central-manager"]) if cache_rank else ""

        def schedd_up(pool: PersonalPool) -> bool:
            out = pool.run(["condor_status", "-schedd", "-af", "Name"], check=False)
            return out.returncode == 0 and bool(out.stdout.strip())

        self._cm_config = (cm_snippet, extra_config)
        self.cm.start(self._central_manager_config(cache_rank), ready=schedd_up)

    def _central_manager_config(self, cache_rank: bool) -> str:
        cm_snippet, extra_config = self._cm_config
        return (
            "DAEMON_LIST = MASTER COLLECTOR NEGOTIATOR SCHEDD\n"
            + (cm_snippet if cache_rank else "")
            + extra_config
        )

    def use_cache_rank(self, enabled: bool) -> None:
        """Put the snippet of ``glite-vm config --central-manager`` into the central manager's
        configuration or take it out (HTCondor's default pre-job rank), as its admin would,
        and return once the running negotiator uses the change."""
        if not self._cm_config[0]:
            raise PoolError("the central manager was started without the snippet")
        self.cm.reconfigure(self._central_manager_config(enabled))

        def negotiator_rank() -> bool:
            out = self.cm.run(
                ["condor_config_val", "-negotiator", "NEGOTIATOR_PRE_JOB_RANK"], check=False
            )
            # the macro's name, or what it expands to
            ours = any(mark in out.stdout for mark in ("GLITE_VM_HAS_IMAGE", "GliteVmCachedImages"))
            return out.returncode == 0 and ours == enabled

        wait_until("the negotiator to take its new configuration", negotiator_rank, 60)

    def add_host(
        self,
        name: str,
        catalogue_url: str,
        layout: SlotLayout,
        *,
        settings: Mapping[str, str] | None = None,
        advertise_period: int = 5,
        site_policy: str = "",
    ) -> ExecuteHost:
        """Set up execute host ``name`` (lower-case letters) by the documented steps and
        start it; wait until its slots are in the collector. ``settings``: further
        ``GLITE_VM_*`` of the host; ``site_policy``: HTCondor configuration of the site's own,
        after glite-vm's snippet."""
        if not re.fullmatch(r"[a-z][a-z0-9]{0,15}", name):
            raise ValueError(f"host name {name!r}")
        root = traversable(self.root / name)
        env = service_env(
            root,
            Path("unused"),  # replaced: the catalogue is the repository's URL
            {
                "GLITE_VM_CATALOGUE": catalogue_url,
                "GLITE_VM_REAP_INTERVAL": "5",
                "GLITE_VM_DEFAULT_MEMORY_MIB": f"{layout.memory_mib}MiB",
                "GLITE_VM_CACHE_DIR": str(root / "cache"),
                "GLITE_VM_RUN_DIR": str(root / "vms"),
                **layout.knobs(),
                **(settings or {}),
            },
        )
        traversable(Path(env["GLITE_VM_STATE_DIR"]))
        service = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
        prefix = root / "htcondor"
        prefix.mkdir(mode=0o755)
        unpack_release(find_tarball(), prefix)
        hooks = prefix / "glite-vm-hooks"
        installed = admin_cli(service, "hook", "install", str(hooks), "--python", sys.executable)
        if installed.returncode != 0:
            raise PoolError(f"glite-vm hook install failed: {installed.stderr}")
        # `glite-vm config` with the host's settings (they name its state, cache and socket)
        made = admin_cli(
            service,
            "config",
            "--hooks-dir",
            str(hooks),
            "--glite-vm",
            str(Path(sys.executable).parent / "glite-vm"),
        )
        if made.returncode != 0:
            raise PoolError(f"glite-vm config failed: {made.stderr}")
        config = made.stdout.replace(
            "STARTD_CRON_GLITE_VM_ADVERTISE_PERIOD = 60s",
            f"STARTD_CRON_GLITE_VM_ADVERTISE_PERIOD = {advertise_period}s",
        )
        service.start()
        pool = PersonalPool(prefix, self.user)
        host = ExecuteHost(name, root, service, pool, config)
        self.hosts[name] = host

        def slots_up(p: PersonalPool) -> bool:
            return len(host.slot_ads()) == layout.slots

        pool.start(
            f"DAEMON_LIST = MASTER STARTD\nMASTER_NAME = {name}\nSTARTD_NAME = {name}\n"
            + config
            + site_policy,
            collector_port=self.cm.port,
            ready=slots_up,
        )
        return host

    # -- running ----------------------------------------------------------------------------

    def submit(self, name: str, description: str, files: Mapping[str, str]) -> int:
        directory = self.cm.job_dir(name)
        for file, text in files.items():
            (directory / file).write_text(text)
            os.chown(directory / file, self.user.pw_uid, self.user.pw_gid)
        return self.cm.submit(name, description)

    def queue(self, cluster: int) -> list[JobAd]:
        text = self.cm.run(["condor_q", "-json", str(cluster)]).stdout.strip()
        ads: list[JobAd] = json.loads(text) if text else []
        return ads

    def history(self, cluster: int) -> list[JobAd]:
        text = self.cm.run(["condor_history", "-json", str(cluster)]).stdout.strip()
        ads: list[JobAd] = json.loads(text) if text else []
        return sorted(ads, key=lambda ad: int(ad["ProcId"]))

    def wait_for_cluster(self, cluster: int, count: int, timeout: float) -> list[JobAd]:
        """The history ads of all ``count`` jobs of ``cluster`` once they all left the queue."""

        def done() -> list[JobAd] | None:
            ads = self.history(cluster)
            return ads if len(ads) == count else None

        try:
            ads: list[JobAd] = wait_until(f"the {count} jobs of {cluster}", done, timeout, 3)
        except PoolError:
            queue = self.cm.run(["condor_q", "-nobatch", str(cluster)], check=False).stdout
            raise PoolError(f"jobs of cluster {cluster} did not finish; queue:\n{queue}") from None
        return ads

    # -- stopping ---------------------------------------------------------------------------

    def close(self) -> None:
        """Remove every job, stop every daemon and service started, then nginx."""
        with contextlib.suppress(Exception):
            if self.cm.port:
                self.cm.run(["condor_rm", "-all"], check=False)
        for host in self.hosts.values():
            host.pool.stop()
        self.cm.stop()
        for host in self.hosts.values():
            if host.service.proc is not None and host.service.proc.poll() is None:
                _teardown_all(host.service)
                host.service.stop()
        self.repository.stop()


def _teardown_all(service: ServiceProcess) -> None:
    with contextlib.suppress(Exception):
        client = service.client()
        for vm in client.list_vms():
            client.teardown(vm.vm, failed=False)


def _cli_output(argv: list[str]) -> str:
    made = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from glite_vm.cli.main import main; sys.exit(main())",
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if made.returncode != 0:
        raise PoolError(f"glite-vm {' '.join(argv)} failed: {made.stderr}")
    return made.stdout


@contextlib.contextmanager
def running_site(
    root: Path,
    user: pwd.struct_passwd,
    docroot: Path,
    *,
    cm_config: str = "",
    cache_rank: bool = True,
) -> Iterator[Site]:
    """A site whose central manager runs and whose repository serves ``docroot``; the test
    adds hosts (:meth:`Site.add_host`). Everything stops afterwards."""
    repository = NginxRepository(root / "nginx", docroot)
    site = Site(root, user, repository)
    try:
        repository.start()
        site.start_central_manager(cm_config, cache_rank=cache_rank)
        yield site
    finally:
        site.close()
