"""What a snapshot boots with besides its disk: the kernel, initrd and command line of a
direct-kernel image, the guest user, and the size the original VM had
(:func:`resolve_boot_files`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

from glite_vm.config import Settings
from glite_vm.errors import GliteVmError
from glite_vm.images.cache import ImageCache
from glite_vm.images.catalogue import load_catalogue
from glite_vm.images.sources import NAME_RE
from glite_vm.snapshots.disk import SnapshotUnusableError
from glite_vm.snapshots.entry import SnapshotEntry, open_entry, read_domain_xml, read_record

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BootFiles:
    """What the original VM booted besides its disk (direct-kernel images) and its size."""

    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    guest_user: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None


def resolve_boot_files(settings: Settings, entry: SnapshotEntry) -> BootFiles:
    """Kernel, initrd and command line of the entry's image, and the VM's size.

    From the record when it names them, else from the catalogue entry with the same digest
    (files in the image cache); the entry's ``domain.xml`` tells whether the original was a
    direct-kernel boot at all, its command line and its size. The record is its owner's to
    change: for anyone else (root debugging a user's job) its kernel and initrd paths are not
    used (the VM's start copies them), only the catalogue's files.
    """
    original = _original_domain(entry)
    record = read_record(entry)
    own = entry.owner_uid == os.geteuid() and record is not None
    kernel = _path_or_none(record.kernel) if own and record is not None else None
    initrd = _path_or_none(record.initrd) if own and record is not None else None
    cmdline = (record.cmdline if record is not None else None) or original.cmdline
    guest_user = record.guest_user if record is not None and record.guest_user != "?" else None
    if kernel is None and original.direct_kernel:
        found = _kernel_from_catalogue(settings, entry)
        if found is None:
            raise SnapshotUnusableError(
                entry.name,
                f"image {entry.image} boots a kernel of its own, which the record does not "
                "name and the catalogue no longer lists with this image digest; the snapshot "
                "cannot be booted here (`glite-vm snapshots export` still works)",
            )
        kernel, initrd, catalogue_cmdline, guest_user = found
        cmdline = cmdline or catalogue_cmdline
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if path is not None and not path.is_file():
            raise SnapshotUnusableError(
                entry.name,
                f"the image's {what} {path} is gone from this host; "
                f"fetch the image again: glite-vm images pull {entry.image}",
            )
    return BootFiles(
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline if kernel is not None else None,
        guest_user=guest_user,
        cpus=original.cpus,
        memory_mib=original.memory_mib,
    )


@dataclasses.dataclass(frozen=True)
class _OriginalDomain:
    direct_kernel: bool = False
    cmdline: str | None = None
    cpus: int | None = None
    memory_mib: int | None = None


def _original_domain(entry: SnapshotEntry) -> _OriginalDomain:
    try:
        with open_entry(entry) as dir_fd:
            root = read_domain_xml(dir_fd)
    except OSError:
        root = None
    if root is None:
        return _OriginalDomain()
    memory = root.find("memory")
    mib: int | None = None
    if memory is not None and (memory.text or "").strip().isdigit():
        unit = memory.get("unit", "KiB")
        factor = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024}.get(unit)
        mib = int(int((memory.text or "0").strip()) * factor) if factor else None
    vcpu = root.findtext("vcpu", "").strip()
    return _OriginalDomain(
        direct_kernel=root.find("os/kernel") is not None,
        cmdline=root.findtext("os/cmdline") or None,
        cpus=int(vcpu) if vcpu.isdigit() else None,
        memory_mib=mib,
    )


def _path_or_none(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


def _kernel_from_catalogue(
    settings: Settings, entry: SnapshotEntry
) -> tuple[Path, Path | None, str | None, str | None] | None:
    if not settings.catalogue or not NAME_RE.match(entry.image):
        return None
    try:
        item = load_catalogue(settings).entries.get(entry.image)
    except (GliteVmError, OSError, ValueError) as exc:  # no catalogue here: not found here
        log.warning("catalogue lookup for %s failed: %s", entry.image, exc)
        return None
    if item is None or item.sha256 != entry.image_sha256 or item.kernel is None:
        return None
    cache = ImageCache(settings)
    kernel = cache.entry(item.kernel.sha256)
    initrd = cache.entry(item.initrd.sha256) if item.initrd is not None else None
    if kernel is None or (item.initrd is not None and initrd is None):
        raise SnapshotUnusableError(
            entry.name,
            f"the kernel or initrd of image {entry.image} is no longer in the image cache; "
            f"fetch it again: glite-vm images pull {entry.image}",
        )
    return kernel.path, initrd.path if initrd else None, item.cmdline, item.guest_user
