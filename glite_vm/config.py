"""Settings: one typed object, built once from layers and passed down.

Layers, lowest first: built-in defaults, a TOML file (``GLITE_VM_CONFIG`` or
``/etc/glite-vm/config.toml``), HTCondor's configuration (``GLITE_VM_*`` knobs read through
``htcondor2.param`` when the bindings are importable and asked for), and finally the process
environment (``GLITE_VM_*`` variables). Keys are the knob names without the ``GLITE_VM_`` prefix,
case-insensitive in the TOML file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from glite_vm.errors import RequestError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

_UNITS = {
    "": 1,
    "b": 1,
    "k": KIB,
    "kb": KIB,
    "kib": KIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": TIB,
    "tb": TIB,
    "tib": TIB,
}


def parse_size(text: str | int, field: str = "size") -> int:
    """Parse ``"30GB"``, ``"512 MiB"``, ``"1073741824"`` into bytes (binary units)."""
    if isinstance(text, bool):
        raise RequestError(field, f"expected a size like '2GB', got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise RequestError(field, f"must not be negative, got {text}")
        return text
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num) :]
    if unit not in _UNITS or not num:
        raise RequestError(field, f"expected a size like '2GB' or '512MiB', got {text!r}")
    try:
        value = float(num)
    except ValueError:
        raise RequestError(field, f"expected a size like '2GB' or '512MiB', got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise RequestError(field, f"must be a finite, non-negative size, got {text!r}")
    return int(value * _UNITS[unit])


def format_size(n: int) -> str:
    """Human-readable binary size: ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str, field: str = "duration") -> float:
    """Parse ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"`` (or a plain number of seconds)."""
    s = text.strip().lower().replace(" ", "")
    unit = s[-1:] if s[-1:] in _DURATION_UNITS else ""
    num = s[: len(s) - len(unit)]
    try:
        value = float(num) * _DURATION_UNITS.get(unit, 1.0)
    except ValueError:
        raise RequestError(field, f"expected a duration like '7d' or '12h', got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise RequestError(field, f"must be a finite, non-negative duration, got {text!r}")
    return value


def format_duration(seconds: float) -> str:
    """The largest whole unit up to days: ``7d``, ``36h``, ``90s``."""
    for unit in ("d", "h", "m"):
        n = _DURATION_UNITS[unit]
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:g}s"


@dataclasses.dataclass(frozen=True)
class Retention:
    """How long kept snapshots stay (``GLITE_VM_SNAPSHOT_RETENTION``, docs/snapshots.md).

    ``max_age``: seconds after a job ended; ``max_bytes``: disk space of all VM directories
    together, oldest removed first. ``None``: no limit of that kind.
    """

    max_age: float | None = 7 * 86400.0
    max_bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> Retention:
        """``"7d"``, ``"50GB"``, ``"7d,50GB"``, ``"none"``. Durations end in s/m/h/d/w; sizes
        end in a byte unit (``500MB``, ``50GiB``), so ``30m`` is thirty minutes."""
        age: float | None = None
        size: int | None = None
        parts = [p for p in text.replace(",", " ").split() if p]
        if not parts or [p.lower() for p in parts] == ["none"]:
            return cls(None, None)
        for part in parts:
            low = part.lower()
            if low[-1:] in _DURATION_UNITS:
                if age is not None:
                    raise RequestError("snapshot retention", f"two ages in {text!r}")
                age = parse_duration(part, "snapshot retention")
            elif low.endswith("b"):
                if size is not None:
                    raise RequestError("snapshot retention", f"two sizes in {text!r}")
                size = parse_size(part, "snapshot retention")
            else:
                raise RequestError(
                    "snapshot retention",
                    f"{part!r} is neither an age (7d, 12h) nor a size (50GB); "
                    f"expected e.g. '7d,50GB' or 'none'",
                )
        return cls(age, size)

    def __str__(self) -> str:
        parts = []
        if self.max_age is not None:
            parts.append(format_duration(self.max_age))
        if self.max_bytes is not None:
            parts.append(format_size(self.max_bytes).replace(" ", "").replace(".0", ""))
        return ",".join(parts) or "none"


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


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every knob glite-vm reads. Build with :meth:`load`; pass it down, never make it global."""

    state_dir: Path = dataclasses.field(default_factory=_default_state_dir)
    libvirt_uri: str = ""  # empty: qemu:///system as root, qemu:///session otherwise
    hypervisor: str = "auto"  # auto | kvm | qemu
    # image cache and catalogue
    cache_dir: Path | None = None  # default: state_dir/cache
    cache_max_bytes: int = 50 * GIB
    catalogue: str = ""
    catalogue_max_age: float = 60.0  # seconds a fetched catalogue is used without revalidating
    cache_min_free_bytes: int = 512 * MIB  # free space a download must leave on the cache's disk
    custom_image_sources: tuple[str, ...] = ()
    max_image_virtual_bytes: int = 64 * GIB
    max_image_file_bytes: int = 32 * GIB
    download_timeout: float = 60.0  # seconds without progress before a download fails
    lock_timeout: float = 1800.0  # seconds a job waits for another job's download
    # VM sizing bounds and defaults (the site's historical VM: 1 core / 2 GB / 30 GB)
    default_cpus: int = 1
    default_memory_mib: int = 2048
    default_disk_bytes: int = 30 * GIB
    max_cpus: int = 64
    max_memory_mib: int = 256 * 1024
    max_disk_bytes: int = 2 * TIB
    # life cycle
    boot_timeout: float = 300.0  # seconds for all boot attempts of one job together
    # boots of one job on this host when a boot fails in a way that may not recur (docs/vm.md)
    boot_attempts: int = 3
    # seconds a guest that reached its login prompt or boot target may take to start its agent
    agent_timeout: float = 25.0
    teardown_timeout: float = 30.0
    snapshot_dir: Path | None = None  # default: state_dir/snapshots
    # kept snapshots: age and/or total bytes, e.g. "7d", "7d,50GB", "none" (docs/snapshots.md)
    snapshot_retention: Retention = dataclasses.field(default_factory=Retention)
    run_dir: Path | None = None  # default: state_dir/run (overlays of running VMs, boot logs)
    guest_user: str = "glite"  # default unprivileged guest account
    # policy
    root_users: tuple[str, ...] = ()
    default_image: str = ""
    max_host_failures: int = 3  # host failures of one job before it is held (0: never)
    network: str = "none"
    socket_path: Path = dataclasses.field(default_factory=_default_socket)
    # the bootstrapper service (docs/service.md)
    reap_interval: float = 15.0  # seconds between reaper passes of `glite-vm serve`
    service_connect_timeout: float = 5.0  # seconds a client waits to connect to the service
    service_idle_timeout: float = 30.0  # seconds a client waits for any sign of life mid-call
    # guest identity: hostname and host certificate (docs/identity.md)
    guest_identity: bool = False  # the service sets each VM's hostname (certificates imply it)
    hostname_pattern: str = "{host}-{slot}.{domain}"
    allow_job_hostname: bool = False  # may a job name its VM (GliteVmHostname)?
    job_hostname_domains: tuple[str, ...] = ()  # if set, job-chosen names must lie inside these
    host_cert_dir: Path | None = None  # pre-issued pairs: <dir>/<hostname>/host{cert,key}.pem
    ca_cert: Path | None = None  # local CA certificate (also the trust anchor put into guests)
    ca_key: Path | None = None  # local CA key: mint a certificate per VM
    host_key_type: str = "rsa"  # rsa (RSA 2048) | ec (P-256) for minted host keys
    cert_margin: float = 3600.0  # seconds a minted certificate outlives the job's expected run
    cert_default_runtime: float = 86400.0  # seconds assumed when the job states no run time
    cert_max_lifetime: float = 7 * 86400.0  # seconds; upper bound of a minted certificate

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
            try:
                kwargs[key] = _PARSERS[fields[key].type](text)
            except (ValueError, RequestError) as exc:
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
    "int": lambda v: parse_size(v, "setting") if v.strip()[-1:].isalpha() else int(v),
    "float": float,
    "bool": _bool,
    "tuple[str, ...]": _list,
    "Retention": Retention.parse,
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
