"""What a job asks for, validated and bounded. Pure: no I/O, no side effects."""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping

from glite_vm.config import MIB, Settings, check_network_name, format_size, parse_size
from glite_vm.errors import RequestError

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
_OWNER = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
MAX_IMAGE_REF = 2048


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
        if not isinstance(root, bool):
            raise RequestError("GliteVmRoot", f"must be True or False, got {root!r}")
        keep = (
            keep_snapshot
            if isinstance(keep_snapshot, KeepSnapshot)
            else (KeepSnapshot.parse(keep_snapshot))
        )
        if image_sha256 is not None:
            image_sha256 = image_sha256.strip().lower()
            if not _SHA256.match(image_sha256):
                raise RequestError("GliteVmImageSha256", "must be 64 hexadecimal digits")
        network = check_network(settings, network)
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise RequestError("job id", f"{job_id!r} is not a valid job identifier")
        if not isinstance(owner, str) or not _OWNER.match(owner):
            raise RequestError("Owner", f"{owner!r} is not a valid user name")
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
