"""Settings: one typed object, built once from layers and passed down.

Layers, lowest first: built-in defaults, a TOML file (``GLITE_VM_CONFIG`` or
``/etc/glite-vm/config.toml``), HTCondor's configuration (``GLITE_VM_*`` knobs read through
``htcondor2.param`` when the bindings are importable and asked for), and finally the process
environment (``GLITE_VM_*`` variables). Keys are the knob names without the ``GLITE_VM_`` prefix,
case-insensitive in the TOML file.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from glite_vm.errors import RequestError
from glite_vm.knob_values import (
    MetricsAddress,
    Prefetch,
    Retention,
    check_network_name,
    parse_rate,
    parse_textfile,
)
from glite_vm.units import (
    GIB,
    MIB,
    TIB,
    parse_duration,
    parse_memory_mib,
    parse_size,
    parse_timeout,
)


def _bool(v: str) -> bool:
    s = v.strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {v!r}")


def _list(v: str) -> tuple[str, ...]:
    return tuple(p for p in (x.strip() for x in v.replace(",", " ").split()) if p)


def _default_state_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/glite-vm")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "glite-vm"


def _default_socket() -> Path:
    return Path("/run/glite-vm/glite-vm.sock")


def _knob(default: Any, parse: Callable[[str], Any]) -> Any:
    """A settings field whose text (environment, TOML, condor_config) ``parse`` reads."""
    return dataclasses.field(default=default, metadata={"parse": parse})


def _size(default: int) -> Any:
    return _knob(default, lambda text: parse_size(text, "size"))


def _memory(default: int) -> Any:
    return _knob(default, lambda text: parse_memory_mib(text, "memory"))


def _seconds(default: float, *, zero_ok: bool = False) -> Any:
    if zero_ok:
        return _knob(default, lambda text: parse_duration(text, "seconds", bare_seconds=True))
    return _knob(default, lambda text: parse_timeout(text, "seconds"))


def _count(default: int, low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            raise ValueError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return _knob(default, parse)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob glite-vm reads. Build with :meth:`load`; pass it down, never make it global.

    Sizes and durations in knob texts follow the unit contract above (sizes need a unit;
    timeouts and intervals take bare seconds).
    """

    state_dir: Path = dataclasses.field(default_factory=_default_state_dir)
    libvirt_uri: str = ""  # empty: qemu:///system as root, qemu:///session otherwise
    hypervisor: str = "auto"  # auto | kvm | qemu
    # image cache and catalogue
    cache_dir: Path | None = None  # default: state_dir/cache
    cache_max_bytes: int = _size(50 * GIB)
    catalogue: str = ""
    # seconds a fetched catalogue is used without revalidating (0: ask every time)
    catalogue_max_age: float = _seconds(60.0, zero_ok=True)
    cache_min_free_bytes: int = _size(512 * MIB)  # free space a download must leave on disk
    custom_image_sources: tuple[str, ...] = ()
    max_image_virtual_bytes: int = _size(64 * GIB)
    max_image_file_bytes: int = _size(32 * GIB)
    download_timeout: float = _seconds(60.0)  # without progress before a download fails
    # pre-staging (docs/images.md): the warm set the service fetches in the background, at
    # most this many bytes a second, checked at start and every prefetch_interval
    prefetch: Prefetch = dataclasses.field(default_factory=Prefetch)
    prefetch_rate: int | None = dataclasses.field(default=20 * MIB, metadata={"parse": parse_rate})
    prefetch_interval: float = _seconds(600.0)
    lock_timeout: float = _seconds(1800.0)  # a job waits for another job's download
    # VM sizing bounds and defaults (the site's historical VM: 1 core / 2 GB / 30 GB)
    default_cpus: int = _count(1, 1)
    default_memory_mib: int = _memory(2048)
    default_disk_bytes: int = _size(30 * GIB)
    max_cpus: int = _count(64, 1)
    max_memory_mib: int = _memory(256 * 1024)
    max_disk_bytes: int = _size(2 * TIB)
    # life cycle
    boot_timeout: float = _seconds(300.0)  # for all boot attempts of one job together
    # boots of one job on this host when a boot fails in a way that may not recur (docs/vm.md)
    boot_attempts: int = _count(3, 1)
    # a guest that reached its login prompt or boot target may take this long to start its agent
    agent_timeout: float = _seconds(25.0)
    teardown_timeout: float = _seconds(30.0)
    # warm start (docs/vm.md): restore VMs from templates saved at agent-ready where one exists;
    # the images whose templates the service builds ahead of time and after a cold boot ("*": all)
    warm_start: bool = True
    warm_images: tuple[str, ...] = ()
    # restores under way at once (each loads a memory state: on a busy host, queued ones finish
    # sooner than all at once); 0: as many as the host has cores
    max_parallel_restores: int = _count(0, 0)
    snapshot_dir: Path | None = None  # default: state_dir/snapshots
    # kept snapshots: age and/or total bytes, e.g. "7d", "7d,50GB", "none" (docs/snapshots.md)
    snapshot_retention: Retention = dataclasses.field(default_factory=Retention)
    run_dir: Path | None = None  # default: state_dir/run (overlays of running VMs, boot logs)
    guest_user: str = "glite"  # default unprivileged guest account
    # policy
    root_users: tuple[str, ...] = ()
    default_image: str = ""
    max_host_failures: int = _count(3, 0)  # host failures of one job before it is held (0: never)
    # the VMs' network when a job asks for none: none | user | <libvirt network>
    network: str = "none"
    # further networks a job may ask for (GliteVmNetwork, --network, VmJob(network=...))
    job_networks: tuple[str, ...] = ()
    socket_path: Path = dataclasses.field(default_factory=_default_socket)
    # the execute host's VM slots (glite-vm config renders them; the service trusts only these:
    # glite_vm.slots); the last root_slots of them are root-enabled
    slots: int = _count(3, 1)
    root_slots: int = _count(1, 0)
    slot_cpus: int = _count(1, 1)
    slot_memory_bytes: int = _size(2 * GIB)
    slot_disk_bytes: int = _size(30 * GIB)
    # the bootstrapper service (docs/service.md)
    reap_interval: float = _seconds(15.0)  # between reaper passes of `glite-vm serve`
    max_calls_per_user: int = _count(32, 1)  # calls one local user (not root) may have running
    max_unmanaged_vms_per_user: int = _count(4, 0)  # VMs started outside HTCondor, per user
    # seconds such a VM may live (0: no limit)
    unmanaged_vm_lifetime: float = _seconds(12 * 3600.0, zero_ok=True)
    # the longest a job's VM is kept running after its payload failed, for its owner to look
    # inside (the job's +GliteVmDebugHold asks; docs/admin.md, "Debug holds"); 0: off
    max_debug_hold: float = _seconds(0.0, zero_ok=True)
    service_connect_timeout: float = _seconds(5.0)  # a client waits to connect to the service
    service_idle_timeout: float = _seconds(30.0)  # a client waits for any sign of life mid-call
    # the service waits this long for a client that reads nothing of a reply (then drops it)
    service_send_timeout: float = _seconds(120.0)
    # Prometheus metrics of the service (docs/admin.md, "Metrics"): an HTTP endpoint on a
    # literal IP and port (loopback unless metrics_allow_remote), and/or a node_exporter textfile
    # rewritten every reap_interval; both off by default
    metrics_address: MetricsAddress | None = dataclasses.field(
        default=None, metadata={"parse": MetricsAddress.parse}
    )
    metrics_allow_remote: bool = False
    metrics_textfile: Path | None = dataclasses.field(
        default=None, metadata={"parse": parse_textfile}
    )
    # guest identity: hostname and host certificate (docs/identity.md)
    guest_identity: bool = False  # the service sets each VM's hostname (certificates imply it)
    hostname_pattern: str = "{host}-{slot}.{domain}"
    allow_job_hostname: bool = False  # may a job name its VM (GliteVmHostname)?
    job_hostname_domains: tuple[str, ...] = ()  # if set, job-chosen names must lie inside these
    host_cert_dir: Path | None = None  # pre-issued pairs: <dir>/<hostname>/host{cert,key}.pem
    ca_cert: Path | None = None  # local CA certificate (also the trust anchor put into guests)
    ca_key: Path | None = None  # local CA key: mint a certificate per VM
    host_key_type: str = "rsa"  # rsa (RSA 2048) | ec (P-256) for minted host keys
    # a minted certificate outlives the job's expected run by this
    cert_margin: float = _seconds(3600.0, zero_ok=True)
    cert_default_runtime: float = _seconds(86400.0)  # assumed when the job states no run time
    cert_max_lifetime: float = _seconds(7 * 86400.0)  # upper bound of a minted certificate

    def __post_init__(self) -> None:
        address = self.metrics_address
        if address is not None and not address.loopback and not self.metrics_allow_remote:
            raise ValueError(
                f"setting GLITE_VM_METRICS_ADDRESS: {address} is not a loopback address; the "
                "endpoint has no authentication or TLS, so it listens beyond this host only with "
                "GLITE_VM_METRICS_ALLOW_REMOTE = true (or use GLITE_VM_METRICS_TEXTFILE and "
                "node_exporter)"
            )
        for name in self.allowed_networks:
            try:
                check_network_name(name)
            except RequestError as exc:
                knob = "GLITE_VM_NETWORK" if name == self.network else "GLITE_VM_JOB_NETWORKS"
                raise ValueError(f"setting {knob}: {exc.problem}") from None

    # -- derived ------------------------------------------------------------------------------

    @property
    def effective_libvirt_uri(self) -> str:
        if self.libvirt_uri:
            return self.libvirt_uri
        return "qemu:///system" if os.geteuid() == 0 else "qemu:///session"

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or self.state_dir / "cache"

    @property
    def effective_snapshot_dir(self) -> Path:
        return self.snapshot_dir or self.state_dir / "snapshots"

    @property
    def effective_run_dir(self) -> Path:
        return self.run_dir or self.state_dir / "run"

    @property
    def allowed_networks(self) -> tuple[str, ...]:
        """Networks a VM may have here: the default (``network``) first, then ``job_networks``."""
        return tuple(dict.fromkeys((self.network, *self.job_networks)))

    # -- loading ------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        config_file: Path | None = None,
        use_condor: bool = False,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from the layers (see the module docstring); ``overrides`` win."""
        env = os.environ if environ is None else environ
        raw: dict[str, str] = {}
        path = config_file or Path(env.get("GLITE_VM_CONFIG", "/etc/glite-vm/config.toml"))
        try:
            data = tomllib.loads(path.read_text("utf-8")) if path.is_file() else {}
        except OSError as exc:
            raise ValueError(
                f"cannot read the configuration file {path}: {exc.strerror or exc} "
                "(make it readable, or point GLITE_VM_CONFIG elsewhere)"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"the configuration file {path} is not valid TOML: {exc}") from None
        for key, value in data.items():
            raw[key.lower()] = value if isinstance(value, str) else _toml_to_str(value)
        if use_condor:
            raw.update(_condor_params())
        for key, value in env.items():
            if key.startswith("GLITE_VM_") and key != "GLITE_VM_CONFIG":
                raw[key[len("GLITE_VM_") :].lower()] = value
        return cls.from_strings(raw, overrides)

    @classmethod
    def from_strings(
        cls, raw: Mapping[str, str], overrides: Mapping[str, Any] | None = None
    ) -> Settings:
        kwargs: dict[str, Any] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, text in raw.items():
            if key not in fields:
                continue  # unknown knobs belong to other tools or later versions
            parse = fields[key].metadata.get("parse") or _PARSERS[fields[key].type]
            try:
                kwargs[key] = parse(text)
            except RequestError as exc:
                raise ValueError(f"setting GLITE_VM_{key.upper()}: {exc.problem}") from None
            except ValueError as exc:
                raise ValueError(f"setting GLITE_VM_{key.upper()}: {exc}") from None
        kwargs.update(overrides or {})
        return cls(**kwargs)


def _toml_to_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return str(value)


def _opt_path(v: str) -> Path | None:
    return Path(v) if v.strip() else None


_PARSERS: dict[object, Callable[[str], Any]] = {
    "Path": Path,
    "Path | None": _opt_path,
    "str": str,
    "bool": _bool,
    "tuple[str, ...]": _list,
    "Retention": Retention.parse,
    "Prefetch": Prefetch.parse,
}


def _condor_params() -> dict[str, str]:
    """GLITE_VM_* knobs from HTCondor's configuration, when the bindings are installed."""
    try:
        import htcondor2  # noqa: PLC0415 - optional and slow; only when asked for
    except ImportError:
        return {}
    out: dict[str, str] = {}
    for f in dataclasses.fields(Settings):
        value = htcondor2.param.get("GLITE_VM_" + f.name.upper())
        if value is not None:
            out[f.name] = str(value)
    return out
