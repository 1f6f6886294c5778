"""What a job asks for, and what its VM gets: validated and bounded. Pure: no I/O.

Two steps, each defined once:

* :class:`JobRequest`: what a job asks for (image, root, sizes where it says, ...), validated.
  The PREPARE_JOB hook makes it from the job ad (:func:`glite_vm.condor.jobad.request_from_job_ad`),
  ``glite-vm run`` and the API from their arguments; it travels to the service as plain data
  (:meth:`JobRequest.to_wire`), where :meth:`JobRequest.from_wire` validates it again against the
  service's own settings. The service never parses a job ad.
* :func:`vm_request`: the job's request and its slot's facts (:mod:`glite_vm.slots`, which the
  service learns itself) make the :class:`VMRequest` the VM layer boots: root only on a
  root-enabled slot, the slot's size when the slot says it exactly.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping

from glite_vm.config import Settings
from glite_vm.errors import RequestError, RootNotPermittedError
from glite_vm.identity.hostname import resolve_hostname, validate_hostname
from glite_vm.knob_values import check_network_name
from glite_vm.slots import SlotFacts
from glite_vm.units import KIB, MIB, format_size, parse_size

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
MAX_IMAGE_REF = 2048
#: The longest debug hold a job may ask for (``GliteVmDebugHold``), whatever the site allows: a
#: larger number is a mistake (milliseconds? minutes?) better refused than silently capped.
MAX_DEBUG_HOLD_ASKED = 7 * 24 * 3600
DEBUG_HOLD_FIELD = "GliteVmDebugHold"


class KeepSnapshot(enum.Enum):
    """When the job's overlay is kept as a snapshot after teardown."""

    ALWAYS = "always"
    ON_FAILURE = "on_failure"
    NEVER = "never"

    @classmethod
    def parse(cls, value: str) -> KeepSnapshot:
        try:
            return cls(value.strip().lower().replace("-", "_"))
        except (ValueError, AttributeError):
            choices = ", ".join(repr(k.value) for k in cls)
            raise RequestError(
                "GliteVmKeepSnapshot", f"must be one of {choices}, got {value!r}"
            ) from None

    def keeps(self, failed: bool) -> bool:
        return self is KeepSnapshot.ALWAYS or (self is KeepSnapshot.ON_FAILURE and failed)


def check_image_ref(image: str) -> str:
    """A catalogue name, an absolute local path or an http(s)/file URL; nothing odd inside."""
    if not isinstance(image, str) or not image.strip():
        raise RequestError("GliteVmImage", "is empty; name a catalogue image or give a URL")
    if len(image) > MAX_IMAGE_REF:
        raise RequestError(
            "GliteVmImage", f"is {len(image)} characters long; at most {MAX_IMAGE_REF} are allowed"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in image):
        raise RequestError(
            "GliteVmImage", "contains control characters (NUL, line breaks, ...); remove them"
        )
    if image != image.strip():
        raise RequestError("GliteVmImage", "has leading or trailing blanks")
    return image


def _check_job_fields(
    root: object,
    keep_snapshot: KeepSnapshot | str,
    image_sha256: object,
    job_id: object,
    owner: object,
) -> tuple[KeepSnapshot, str | None]:
    """The checks a job's request and its VM's share: root a boolean, the snapshot policy, the
    digest (normalised), the job id and the owner's name. Returns the policy and the digest."""
    if not isinstance(root, bool):
        raise RequestError("GliteVmRoot", f"must be True or False, got {root!r}")
    keep = (
        keep_snapshot
        if isinstance(keep_snapshot, KeepSnapshot)
        else KeepSnapshot.parse(keep_snapshot)
    )
    digest = None
    if image_sha256 is not None:
        if not isinstance(image_sha256, str):
            raise RequestError("GliteVmImageSha256", "must be 64 hexadecimal digits")
        digest = image_sha256.strip().lower()
        if not _SHA256.match(digest):
            raise RequestError("GliteVmImageSha256", "must be 64 hexadecimal digits")
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise RequestError("job id", f"{job_id!r} is not a valid job identifier")
    if not isinstance(owner, str) or not _OWNER.match(owner):
        raise RequestError("Owner", f"{owner!r} is not a valid user name")
    return keep, digest


def check_debug_hold(value: object) -> int | None:
    """The seconds a job asks its VM to be kept after its payload failed (``GliteVmDebugHold``):
    ``None`` (or 0) for no hold, else a whole number of seconds up to
    :data:`MAX_DEBUG_HOLD_ASKED`. How long it is really kept is the site's rule
    (:func:`grant_debug_hold`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(
            DEBUG_HOLD_FIELD,
            f"must be a whole number of seconds (e.g. +{DEBUG_HOLD_FIELD} = 1800), "
            f"got {value!r:.60}",
        )
    if value < 0:
        raise RequestError(DEBUG_HOLD_FIELD, f"must not be negative, got {value}")
    if value > MAX_DEBUG_HOLD_ASKED:
        raise RequestError(
            DEBUG_HOLD_FIELD,
            f"asks for {value} s; at most {MAX_DEBUG_HOLD_ASKED} s (a week) may be asked "
            "(the value is in seconds)",
        )
    return value or None


@dataclasses.dataclass(frozen=True)
class DebugHoldGrant:
    """How long a job's VM is kept after its payload failed (``seconds``, 0: not at all), and
    ``note``, what the job's owner reads about it when the site changed what was asked."""

    seconds: int = 0
    note: str = ""


def grant_debug_hold(asked: int | None, settings: Settings) -> DebugHoldGrant:
    """The site's rule for a job's debug hold: what the job asked, at most
    ``GLITE_VM_MAX_DEBUG_HOLD``; nothing while that is 0 (a note says so)."""
    if not asked:
        return DebugHoldGrant()
    cap = int(settings.max_debug_hold)
    if cap <= 0:
        return DebugHoldGrant(
            0,
            f"{DEBUG_HOLD_FIELD} = {asked} was not granted: debug holds are off on this host "
            "(GLITE_VM_MAX_DEBUG_HOLD = 0)",
        )
    if asked > cap:
        return DebugHoldGrant(
            cap,
            f"{DEBUG_HOLD_FIELD} = {asked} was cut to {cap} s, the most this host allows "
            "(GLITE_VM_MAX_DEBUG_HOLD)",
        )
    return DebugHoldGrant(asked)


@dataclasses.dataclass(frozen=True)
class VMRequest:
    """One VM for one job. Build with :meth:`create`, which validates and bounds every field."""

    image: str
    cpus: int
    memory_mib: int
    disk_bytes: int
    root: bool
    keep_snapshot: KeepSnapshot
    job_id: str
    owner: str
    image_sha256: str | None = None
    hostname: str | None = None
    network: str = "none"  # one of settings.allowed_networks

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        image: str,
        job_id: str,
        owner: str,
        cpus: int | None = None,
        memory_mib: int | None = None,
        disk: int | str | None = None,
        root: bool = False,
        keep_snapshot: KeepSnapshot | str = KeepSnapshot.ON_FAILURE,
        image_sha256: str | None = None,
        hostname: str | None = None,
        network: str | None = None,
    ) -> VMRequest:
        check_image_ref(image)
        cpus = settings.default_cpus if cpus is None else cpus
        memory_mib = settings.default_memory_mib if memory_mib is None else memory_mib
        disk_bytes = (
            settings.default_disk_bytes if disk is None else parse_size(disk, "RequestDisk")
        )
        _bounded_int("RequestCpus", cpus, 1, settings.max_cpus)
        _bounded_int("RequestMemory", memory_mib, 64, settings.max_memory_mib, unit=" MiB")
        if disk_bytes < 64 * MIB or disk_bytes > settings.max_disk_bytes:
            raise RequestError(
                "RequestDisk",
                f"{format_size(disk_bytes)} is outside 64.0 MiB .. "
                f"{format_size(settings.max_disk_bytes)}",
            )
        keep, image_sha256 = _check_job_fields(root, keep_snapshot, image_sha256, job_id, owner)
        network = check_network(settings, network)
        return cls(
            image=image,
            cpus=cpus,
            memory_mib=memory_mib,
            disk_bytes=disk_bytes,
            root=root,
            keep_snapshot=keep,
            job_id=job_id,
            owner=owner,
            image_sha256=image_sha256,
            hostname=hostname,
            network=network,
        )


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """What a job asks for. Build with :meth:`create` (or :meth:`from_wire`), which validate
    and bound every field; sizes are ``None`` where the job does not say (its slot, else the
    settings, decide: :func:`vm_request`)."""

    image: str
    job_id: str
    owner: str
    cpus: int | None = None
    memory_mib: int | None = None
    disk_bytes: int | None = None
    root: bool = False
    keep_snapshot: KeepSnapshot = KeepSnapshot.ON_FAILURE
    image_sha256: str | None = None
    hostname: str | None = None  # resolved and checked against the site's hostname policy
    network: str | None = None  # None: the host's default network
    debug_hold: int | None = None  # seconds asked (GliteVmDebugHold); the site grants them

    @classmethod
    def create(
        cls,
        settings: Settings,
        *,
        image: str,
        job_id: str,
        owner: str,
        cpus: int | None = None,
        memory_mib: int | None = None,
        disk: int | str | None = None,
        root: bool = False,
        keep_snapshot: KeepSnapshot | str = KeepSnapshot.ON_FAILURE,
        image_sha256: str | None = None,
        hostname: str | None = None,
        network: str | None = None,
        debug_hold: int | None = None,
        site_policy: bool = True,
    ) -> JobRequest:
        """Validate and bound what a job asks. With ``site_policy`` the site's rules in
        ``settings`` apply too (which hostnames and networks a job may choose); without it only
        the form is checked, as the PREPARE_JOB hook does: the service applies the rules with
        its own settings, which the hook may not all see."""
        check_image_ref(image)
        # A job's sizes are what it asks: its slot's size replaces them, or bounds them, and
        # the VM's own bounds (64 MiB .. the settings' maximum) come with the VM (vm_request).
        # HTCondor's default RequestMemory is often 1 MiB, so nothing is refused here but what
        # no VM could be.
        for field, value in (("RequestCpus", cpus), ("RequestMemory", memory_mib)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise RequestError(field, f"must be a positive whole number, got {value!r}")
        disk_bytes = None if disk is None else parse_size(disk, "RequestDisk")
        if disk_bytes is not None and disk_bytes < 1:
            raise RequestError("RequestDisk", f"must be positive, got {disk_bytes} bytes")
        keep, image_sha256 = _check_job_fields(root, keep_snapshot, image_sha256, job_id, owner)
        if hostname is not None:
            if not isinstance(hostname, str):
                raise RequestError("GliteVmHostname", f"must be a string, got {hostname!r}")
            if site_policy:
                hostname = resolve_hostname(
                    settings, host="", slot="", job_id=job_id, requested=hostname
                )
            else:
                hostname = validate_hostname(hostname)
        if network is not None:
            if site_policy:
                check_network(settings, network)
            else:
                check_network_name(network, "GliteVmNetwork")
        return cls(
            image=image,
            job_id=job_id,
            owner=owner,
            cpus=cpus,
            memory_mib=memory_mib,
            disk_bytes=disk_bytes,
            root=root,
            keep_snapshot=keep,
            image_sha256=image_sha256,
            hostname=hostname,
            network=network,
            debug_hold=check_debug_hold(debug_hold),
        )

    def to_wire(self) -> dict[str, object]:
        """Plain JSON values; :meth:`from_wire` takes them back (and validates them again)."""
        wire = dataclasses.asdict(self)
        wire["keep_snapshot"] = self.keep_snapshot.value
        if self.debug_hold is None:
            del wire["debug_hold"]  # a request without one reads as before it existed
        return wire

    @classmethod
    def from_wire(cls, data: object, settings: Settings) -> JobRequest:
        """A request as :meth:`to_wire` gave it, validated against ``settings`` (the receiver's
        bounds and policy, not the sender's). Unknown or mistyped fields are refused."""
        if not isinstance(data, dict):
            raise RequestError("request", "must be an object")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in fields)
        if unknown:
            raise RequestError("request", f"unknown fields {', '.join(unknown)}")
        for name in ("image", "job_id", "owner"):
            if not isinstance(data.get(name), str):
                raise RequestError("request", f"{name} must be a string")
        args = {k: v for k, v in data.items() if k not in ("disk_bytes", "keep_snapshot")}
        disk = data.get("disk_bytes")
        if disk is not None and (isinstance(disk, bool) or not isinstance(disk, int)):
            raise RequestError("RequestDisk", f"must be a whole number of bytes, got {disk!r}")
        keep = data.get("keep_snapshot", KeepSnapshot.ON_FAILURE.value)
        if not isinstance(keep, str):
            raise RequestError("GliteVmKeepSnapshot", f"must be a string, got {keep!r}")
        return cls.create(settings, **args, disk=disk, keep_snapshot=keep)


def vm_request(job: JobRequest, slot: SlotFacts, settings: Settings) -> VMRequest:
    """The VM ``job`` gets in ``slot``.

    Raises :class:`~glite_vm.errors.RootNotPermittedError` for root on a slot that is not
    root-enabled or by a user not in ``settings.root_users`` (not for one's own VM,
    ``slot.own``), and :class:`~glite_vm.errors.RequestError` for a size larger than the slot;
    both hold the job. Sizes: the slot's when it states them exactly (the job was given exactly
    that), else the job's (at most the slot's), else the settings' defaults.
    """
    if job.root and not slot.root_enabled:
        which = f"the slot {slot.name}" if slot.name else "this slot"
        raise RootNotPermittedError(
            f"GliteVmRoot = True, but {which} is not root-enabled; "
            "root jobs must match only slots with GliteVmRootEnabled = True"
        )
    if job.root and not slot.own and settings.root_users and job.owner not in settings.root_users:
        raise RootNotPermittedError(
            f"user {job.owner!r} may not run jobs as root in the guest here "
            "(not in GLITE_VM_ROOT_USERS); remove GliteVmRoot or ask the site's admins"
        )
    cpus = _vm_size("RequestCpus", job.cpus, slot.cpus, "CPUs", slot)
    memory = _vm_size("RequestMemory", job.memory_mib, slot.memory_mib, "MiB", slot)
    asked_kib = None if job.disk_bytes is None else -(-job.disk_bytes // KIB)  # as HTCondor's
    given_kib = _vm_size("RequestDisk", asked_kib, slot.disk_kib, "KiB", slot)
    disk = job.disk_bytes if given_kib is None or given_kib == asked_kib else given_kib * KIB
    return VMRequest.create(
        settings,
        image=job.image,
        job_id=job.job_id,
        owner=job.owner,
        cpus=cpus,
        memory_mib=memory,
        disk=disk,
        root=job.root,
        keep_snapshot=job.keep_snapshot,
        image_sha256=job.image_sha256,
        hostname=job.hostname,
        network=job.network,
    )


def _vm_size(
    field: str, requested: int | None, offered: int | None, unit: str, slot: SlotFacts
) -> int | None:
    """The slot's size when known and exact (the job was given exactly that), else the request
    (bounded by the slot's size when there is one)."""
    if offered is None:
        return requested
    if requested is not None and requested > offered:
        where = (
            "this slot offers"
            if slot.exact
            else "a VM started outside HTCondor may have at most (one slot)"
        )
        raise RequestError(field, f"asks for {requested} {unit} but {where} {offered} {unit}")
    return offered if slot.exact else requested


def check_network(settings: Settings, network: str | None) -> str:
    """The network a job asked for (``None``: the host's default), if this host offers it.

    The host offers its default network (``GLITE_VM_NETWORK``) and the ones in
    ``GLITE_VM_JOB_NETWORKS``; anything else is refused with the list, so a held job says
    what it may ask for.
    """
    if network is None:
        return settings.network
    check_network_name(network, "GliteVmNetwork")
    allowed = settings.allowed_networks
    if network not in allowed:
        raise RequestError(
            "GliteVmNetwork",
            f"{network!r} is not offered here; this host's VMs may have "
            + ", ".join(repr(n) for n in allowed)
            + f" (default {settings.network!r}; the site sets GLITE_VM_JOB_NETWORKS)",
        )
    return network


def with_field_names(error: RequestError, names: Mapping[str, str]) -> RequestError:
    """``error`` naming its field as the caller knows it (``RequestMemory`` -> ``--memory``).

    The request speaks in job-ad attributes; the CLI and the API rename them to their options
    and parameters, so a user reads the name they typed.
    """
    name = names.get(error.field)
    if name is None:
        return error
    renamed = RequestError(name, error.problem)
    renamed.__cause__ = error.__cause__
    return renamed


def _bounded_int(field: str, value: object, low: int, high: int, unit: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(field, f"must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(field, f"{value}{unit} is outside {low}{unit} .. {high}{unit}")
