"""A VM's directory, its job record and the job-ad attributes: each defined here and nowhere
else. Pure: the only I/O is :meth:`JobRecord.write`.

A VM lives in ``<snapshot_dir>/<domain>/`` (:class:`VmFiles`)::

    overlay.qcow2    the job's copy-on-write disk while the VM runs
    xfer.img         the transfer disk (glite_vm.vm.transfer) while the VM runs
    vmlinuz          private copies of a direct-boot image's kernel and initrd, while it runs
    initrd.img
    template-layer.qcow2  a warm-started VM's link to its template's frozen disk layer (the
                     overlay's backing file; kept with the snapshot, root's and read-only)
    state.sav        a warm start's copy of its template's saved state, until the restore
    domain.xml       the domain as it was defined; its metadata names the job
    boot.log         the serial console, from the first byte
    snapshot.qcow2   the overlay, kept after teardown when the job's policy says so
    record.json      the job record (JobRecord): the last thing a teardown writes

:class:`JobRecord` both writes and reads ``record.json``; reading is tolerant of what the
directory's owner (the job's user, after teardown) may have put there: strings come back
printable and bounded, numbers finite. :data:`ATTRIBUTES` lists every ``GliteVm*`` attribute
the hooks and launcher put into a job ad (docs/users.md's table is tested against it), and
:func:`ad_attributes` is the one function that turns what is known of a job's VM into them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from glite_vm.one_line import printable

OVERLAY: Final = "overlay.qcow2"
XFER: Final = "xfer.img"
KERNEL: Final = "vmlinuz"
INITRD: Final = "initrd.img"
DOMAIN_XML: Final = "domain.xml"
BOOT_LOG: Final = "boot.log"
SNAPSHOT: Final = "snapshot.qcow2"
TEMPLATE_LAYER: Final = "template-layer.qcow2"
SAVED_STATE: Final = "state.sav"
RECORD: Final = "record.json"
#: Bytes of a record read back; a larger file is not a record of ours.
MAX_RECORD_BYTES: Final = 1 << 20
_TEXT_LIMIT = 256


@dataclasses.dataclass(frozen=True)
class TeardownResult:
    """What a VM's teardown left: the kept snapshot (if any), the boot log and the record."""

    snapshot_path: Path | None
    boot_log_path: Path
    record_path: Path
    seconds: float


@dataclasses.dataclass(frozen=True)
class VmFiles:
    """The files of one VM's directory (see the module docstring)."""

    directory: Path

    @property
    def overlay(self) -> Path:
        return self.directory / OVERLAY

    @property
    def xfer(self) -> Path:
        return self.directory / XFER

    @property
    def kernel(self) -> Path:
        return self.directory / KERNEL

    @property
    def initrd(self) -> Path:
        return self.directory / INITRD

    @property
    def saved_state(self) -> Path:
        return self.directory / SAVED_STATE

    @property
    def template_layer(self) -> Path:
        return self.directory / TEMPLATE_LAYER

    @property
    def domain_xml(self) -> Path:
        return self.directory / DOMAIN_XML

    @property
    def boot_log(self) -> Path:
        return self.directory / BOOT_LOG

    @property
    def snapshot(self) -> Path:
        return self.directory / SNAPSHOT

    @property
    def record(self) -> Path:
        return self.directory / RECORD


@dataclasses.dataclass
class Timings:
    """Seconds a job's VM spent in each phase (``None``: the phase did not happen)."""

    fetch: float | None = None
    overlay: float | None = None
    boot: float | None = None  # request to domain running (overlay, define, start)
    ready: float | None = None  # domain running to agent answering
    payload: float | None = None
    teardown: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class JobRecord:
    """What glite-vm knows of one job's VM after its teardown (``record.json``)."""

    domain: str
    job_id: str
    owner: str
    image: str
    image_sha256: str
    base_image: str | None  # the cached base image, what booting the snapshot again needs
    base_format: str
    kernel: str | None
    initrd: str | None
    cmdline: str | None
    guest_user: str
    hypervisor: str
    root: bool
    failed: bool
    exit_code: int | None
    signal: int | None
    snapshot: str | None  # the kept disk, when the policy kept it
    boot_log: str
    timings: Mapping[str, float | None]  # seconds by phase (Timings), None: did not happen
    finished: float  # when the teardown ended (seconds since the epoch)
    # a warm start's template disk layer (between the snapshot and base_image), else None
    template_layer: str | None = None

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["timings"] = dict(self.timings)
        return json.dumps(data, indent=2) + "\n"

    def write(self, path: Path) -> None:
        """Write the record to ``path`` whole or not at all, private (0600) from its first
        byte and never through a link."""
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, 0o600), "w") as f:
            f.write(self.to_json())
        tmp.replace(path)

    @classmethod
    def from_json(cls, raw: bytes) -> JobRecord:
        """A record from ``raw`` (what :meth:`to_json` wrote, or what the directory's owner
        made of it): every field read with a type check, strings printable and bounded,
        numbers finite; a missing or odd field gets a neutral value. ``ValueError`` when
        ``raw`` is not a JSON object at all."""
        try:
            data = json.loads(raw)
        except RecursionError:  # nested deeper than the parser goes
            raise ValueError("nested too deeply") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        timings: dict[str, float | None] = {}
        raw_timings = data.get("timings")
        if isinstance(raw_timings, dict):
            for key, value in list(raw_timings.items())[:32]:
                if value is None or finite(value) is not None:
                    timings[text(key)] = finite(value)
        base = text(data.get("base_image"), "")
        return cls(
            domain=text(data.get("domain")),
            job_id=text(data.get("job_id")),
            owner=text(data.get("owner")),
            image=text(data.get("image")),
            image_sha256=text(data.get("image_sha256"), ""),
            base_image=base if base.startswith("/") else None,
            base_format=text(data.get("base_format"), "qcow2"),
            kernel=_path_or_none(data.get("kernel")),
            initrd=_path_or_none(data.get("initrd")),
            cmdline=text(data.get("cmdline"), "") or None,
            guest_user=text(data.get("guest_user")),
            hypervisor=text(data.get("hypervisor")),
            root=data.get("root") is True,
            failed=data.get("failed") is True,
            exit_code=small_int(data.get("exit_code")),
            signal=small_int(data.get("signal")),
            snapshot=_path_or_none(data.get("snapshot")),
            boot_log=text(data.get("boot_log"), ""),
            timings=timings,
            finished=finite(data.get("finished")) or 0.0,
            template_layer=_path_or_none(data.get("template_layer")),
        )


# --- job-ad attributes ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One ``GliteVm*`` attribute glite-vm puts into a job ad."""

    name: str
    meaning: str


#: Every attribute the hooks and the launcher put into a job ad, in the order docs/users.md
#: lists them (tests/unit/test_record.py holds the table there against this one).
ATTRIBUTES: Final = (
    Attribute("GliteVmDomain", "the VM's name (libvirt domain); also the snapshot's directory"),
    Attribute("GliteVmHypervisor", "`kvm` or `qemu` (software emulation, slower)"),
    Attribute("GliteVmImageDigest", "sha256 of the image the VM booted"),
    Attribute("GliteVmCacheHit", "`true` when the host already had the image"),
    Attribute("GliteVmGuestUser", "the guest account the program ran as"),
    Attribute("GliteVmGuestHostname", "the VM's hostname, where the site sets one"),
    Attribute("GliteVmGuestNetwork", "the network the VM had"),
    Attribute("GliteVmBootLogPath", "the VM's serial console from the first byte"),
    Attribute("GliteVmSnapshotPath", "the kept disk (`snapshot.qcow2`), when the policy kept it"),
    Attribute("GliteVmRecordPath", "`record.json`: job, image, exit, timings of the VM"),
    Attribute("GliteVmTimeFetch", "seconds getting the image"),
    Attribute("GliteVmTimeBoot", "seconds starting the VM"),
    Attribute("GliteVmTimeReady", "seconds until the guest agent answered"),
    Attribute("GliteVmTimePrepare", "seconds of the whole preparation"),
    Attribute("GliteVmTimeTransferIn", "seconds copying the input files in"),
    Attribute("GliteVmTimePayload", "seconds of the program"),
    Attribute("GliteVmTimeTransferOut", "seconds copying the output files out"),
    Attribute("GliteVmTimeTeardown", "seconds tearing the VM down"),
    Attribute("GliteVmPayloadSignal", "the signal that ended the program, if one did"),
    Attribute(
        "GliteVmDebugUntil",
        "while the VM is kept after a failed payload (`GliteVmDebugHold`): when the hold ends, "
        "in seconds since the epoch",
    ),
    Attribute(
        "GliteVmDebugHoldNote",
        "what became of `GliteVmDebugHold`: not granted here, cut to the site's maximum, how "
        "the hold ended",
    ),
    Attribute("GliteVmLauncherError", "why glite-vm could not finish running the job"),
    Attribute("GliteVmHostFailures", "the reasons of earlier attempts that failed on hosts"),
    Attribute("GliteVmBootAttempts", "how many boots the VM took on this host"),
    Attribute("GliteVmWarmStart", "`true` when the VM was restored from a template"),
)
NAMES: Final = frozenset(a.name for a in ATTRIBUTES)
PAYLOAD_SIGNAL: Final = "GliteVmPayloadSignal"
LAUNCHER_ERROR: Final = "GliteVmLauncherError"
HOST_FAILURES: Final = "GliteVmHostFailures"
DEBUG_UNTIL: Final = "GliteVmDebugUntil"
DEBUG_HOLD_NOTE: Final = "GliteVmDebugHoldNote"

AdValue = str | bool | int | float


def time_attribute(phase: str) -> str:
    """``GliteVmTime<Phase>`` for a phase (``transfer_in`` -> ``GliteVmTimeTransferIn``)."""
    name = "GliteVmTime" + "".join(part.capitalize() for part in phase.split("_"))
    if name not in NAMES:
        raise ValueError(f"no job-ad attribute for the phase {phase!r}")
    return name


def ad_attributes(
    *,
    domain: str | None = None,
    hypervisor: str | None = None,
    image_digest: str | None = None,
    cache_hit: bool | None = None,
    guest_user: str | None = None,
    guest_hostname: str | None = None,
    guest_network: str | None = None,
    boot_log: Path | str | None = None,
    snapshot: Path | str | None = None,
    record: Path | str | None = None,
    boot_attempts: int | None = None,
    warm_start: bool | None = None,
    timings: Mapping[str, float | None] | None = None,
) -> dict[str, AdValue]:
    """The ``GliteVm*`` attributes of what is known of a job's VM; unknown facts (``None``)
    are left out, times are rounded to milliseconds."""
    facts: dict[str, AdValue | Path | None] = {
        "GliteVmDomain": domain,
        "GliteVmHypervisor": hypervisor,
        "GliteVmImageDigest": image_digest,
        "GliteVmCacheHit": cache_hit,
        "GliteVmGuestUser": guest_user,
        # Not GliteVmHostname or GliteVmNetwork: those are the job's requests, and a requeued
        # job carrying our answer there would look as if it had asked for it.
        "GliteVmGuestHostname": guest_hostname,
        "GliteVmGuestNetwork": guest_network,
        "GliteVmBootLogPath": boot_log,
        "GliteVmSnapshotPath": snapshot,
        "GliteVmRecordPath": record,
        "GliteVmBootAttempts": boot_attempts,
        "GliteVmWarmStart": warm_start,
    }
    out: dict[str, AdValue] = {
        name: str(value) if isinstance(value, Path) else value
        for name, value in facts.items()
        if value is not None
    }
    for phase, seconds in (timings or {}).items():
        if seconds is not None and phase != "overlay":  # part of boot in the ad
            out[time_attribute(phase)] = round(seconds, 3)
    return out


def phase_of(name: str) -> str | None:
    """The phase a ``GliteVmTime*`` attribute times (``GliteVmTimeTransferIn`` ->
    ``transfer_in``); ``None`` for any other name. The inverse of :func:`time_attribute`."""
    if name not in NAMES or not name.startswith("GliteVmTime"):
        return None
    camel = name.removeprefix("GliteVmTime")
    return "".join("_" + c.lower() if c.isupper() else c for c in camel).lstrip("_")


@dataclasses.dataclass(frozen=True)
class AdFacts:
    """What a job ad says of the job's VM: the ``GliteVm*`` attributes read back, typed (the
    inverse of :func:`ad_attributes`). A value of the wrong type counts as absent (``None``):
    an ad is the job owner's to change, so nothing read here is trusted beyond its type."""

    domain: str | None = None
    hypervisor: str | None = None
    image_digest: str | None = None
    cache_hit: bool | None = None
    guest_user: str | None = None
    guest_hostname: str | None = None
    guest_network: str | None = None
    boot_log: str | None = None
    snapshot: str | None = None
    record: str | None = None
    boot_attempts: int | None = None
    payload_signal: int | None = None
    launcher_error: str | None = None
    host_failures: str | None = None
    timings: Mapping[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_ad(cls, ad: Mapping[str, object]) -> AdFacts:
        """Read from an ad's plain values (expressions already evaluated)."""

        def string(name: str) -> str | None:
            value = ad.get(name)
            return value if isinstance(value, str) and value else None

        cache_hit = ad.get("GliteVmCacheHit")
        timings: dict[str, float] = {}
        for name, value in ad.items():
            phase = phase_of(name)
            seconds = finite(value)
            if phase is not None and seconds is not None:
                timings[phase] = seconds
        return cls(
            domain=string("GliteVmDomain"),
            hypervisor=string("GliteVmHypervisor"),
            image_digest=string("GliteVmImageDigest"),
            cache_hit=cache_hit if isinstance(cache_hit, bool) else None,
            guest_user=string("GliteVmGuestUser"),
            guest_hostname=string("GliteVmGuestHostname"),
            guest_network=string("GliteVmGuestNetwork"),
            boot_log=string("GliteVmBootLogPath"),
            snapshot=string("GliteVmSnapshotPath"),
            record=string("GliteVmRecordPath"),
            boot_attempts=small_int(ad.get("GliteVmBootAttempts")),
            payload_signal=small_int(ad.get(PAYLOAD_SIGNAL)),
            launcher_error=string(LAUNCHER_ERROR),
            host_failures=string(HOST_FAILURES),
            timings=timings,
        )


def record_attributes(record: JobRecord, record_path: Path) -> dict[str, AdValue]:
    """The attributes a finished job's ad carries, from its record."""
    return ad_attributes(
        domain=record.domain,
        hypervisor=record.hypervisor,
        image_digest=record.image_sha256 or None,
        boot_log=Path(record.boot_log) if record.boot_log else None,
        snapshot=record.snapshot,
        record=record_path,
        timings=record.timings,
    )


# --- values from files someone else controls --------------------------------------------------


def text(value: object, default: str = "?") -> str:
    """A string from a file a user controls, safe to print: no control characters (terminal
    escapes), no lone surrogates, bounded."""
    if not isinstance(value, str) or not value:
        return default
    return printable(value[:_TEXT_LIMIT])


def finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def small_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if -(2**31) <= value < 2**31 else None


def _path_or_none(value: object) -> str | None:
    path = text(value, "")
    return path if path.startswith("/") else None
