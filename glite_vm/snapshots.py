"""Kept snapshots: find, show, boot, export and prune what a job's teardown left behind.

The entries themselves (every VM directory, finished or not: :mod:`glite_vm.snapshot_entry`),
finding and pruning them (:mod:`glite_vm.snapshot_store`) are re-exported here. An entry belongs
to the owner of its directory; a caller sees and touches only their own entries, root sees
everyone's. Nothing here changes an entry except :meth:`SnapshotStore.prune`, which removes
whole entries.

* :func:`boot_snapshot` starts a throw-away VM on a private copy of the snapshot (QEMU never
  opens the kept file, so it stays byte-identical) over the same base image, optionally with an
  interactive serial console (:class:`ConsoleBridge`).
* :func:`export_snapshot` flattens snapshot + base into one self-contained qcow2, written in a
  private directory of the exporter's and moved into place by directory descriptors, so a
  destination directory its owner rearranges meanwhile never makes the exporter (root) write
  through a link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pwd
import secrets
import select
import shutil
import stat
import struct
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

from glite_vm import _dirfd
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, HypervisorError, RequestError, UserError
from glite_vm.images import leases as lease_files
from glite_vm.images.cache import ImageCache
from glite_vm.images.catalogue import load_catalogue
from glite_vm.images.leases import LeaseRecord
from glite_vm.images.sources import NAME_RE
from glite_vm.request import VMRequest
from glite_vm.snapshot_entry import (
    MAX_DOMAIN_XML_BYTES,
    SnapshotEntry,
    boot_log_text,
    open_entry_file,
    read_entry_file,
    read_record,
)
from glite_vm.snapshot_store import (
    EMPTY_DIR_GRACE,
    PruneDecision,
    PruneReport,
    SnapshotNotFoundError,
    SnapshotStore,
)
from glite_vm.vm.domain_xml import DOMAIN_PREFIX, with_serial_console
from glite_vm.vm.lifecycle import Vm, VmHost, destroy_domain
from glite_vm.vm.qemu_user import qemu_ids
from glite_vm.vm.record import DOMAIN_XML, SNAPSHOT

log = logging.getLogger(__name__)

BOOTS_DIR = "snapshot-boots"  # throw-away VMs of `snapshots boot`, beside the snapshot dir
ESCAPE = b"\x1d"  # Ctrl-]
QEMU_IMG_TIMEOUT = 3600.0  # a flattening export of a big disk takes a while
_COPY_CHUNK = 1 << 20
_QCOW_MAGIC = b"QFI\xfb"
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_EXPORT_NAME = "export.qcow2"  # the image's name inside the exporter's private directory


# --- errors ---------------------------------------------------------------------------------


class SnapshotUnusableError(UserError):
    """The entry exists but cannot be booted or exported (no disk kept, base gone, ...)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"snapshot {name}: {reason}")
        self.name = name
        self.reason = reason


class ExportExistsError(UserError, FileExistsError):
    """The export's destination exists and ``force`` was not given."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} exists; choose another name or overwrite it with --force")
        self.path = path


# --- what a snapshot boots with -------------------------------------------------------------


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
        raw = read_entry_file(entry, DOMAIN_XML, MAX_DOMAIN_XML_BYTES)
        root = ET.fromstring(raw)  # noqa: S314 - bounded; expat refuses entity expansion bombs
    except (OSError, ET.ParseError, ValueError, RecursionError):
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


def _require_disk(entry: SnapshotEntry) -> tuple[Path, Path]:
    """The kept snapshot and its base, or a clear reason why there are none."""
    if not entry.complete:
        raise SnapshotUnusableError(
            entry.name,
            f"its VM did not finish with a teardown ({entry.detail}); there is no snapshot "
            f"to use, only the files in {entry.directory}",
        )
    if entry.snapshot is None:
        raise SnapshotUnusableError(
            entry.name,
            "only the boot log was kept (the job's policy did not keep its disk); "
            'submit with GliteVmKeepSnapshot = "always" to keep it next time',
        )
    base = entry.base_image
    if base is None or not base.is_file():
        raise SnapshotUnusableError(
            entry.name,
            f"its base image {base or '(unrecorded)'} is gone from this host (evicted from the "
            f"image cache?); fetch it again (glite-vm images pull {entry.image}) — the cache "
            "keeps it under the same digest",
        )
    if entry.base_format not in ("qcow2", "raw"):
        raise SnapshotUnusableError(entry.name, f"unknown base format {entry.base_format!r}")
    return entry.snapshot, base


def _open_snapshot(entry: SnapshotEntry, path: Path) -> int:
    """An fd of the kept snapshot, refusing symlinks, FIFOs and anything but a plain qcow2
    without an external data file (which would make QEMU open another host file)."""
    try:
        fd = open_entry_file(entry, path.name)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise SnapshotUnusableError(entry.name, f"cannot open {path}: {why}") from None
    try:
        header = os.pread(fd, 104, 0)
        if len(header) < 72 or header[:4] != _QCOW_MAGIC:
            raise SnapshotUnusableError(entry.name, f"{path} is not a qcow2 image")
        version = struct.unpack(">I", header[4:8])[0]
        incompat = struct.unpack(">Q", header[72:80])[0] if version >= 3 else 0
        if incompat & _QCOW2_INCOMPAT_DATA_FILE:
            raise SnapshotUnusableError(entry.name, f"{path} uses an external data file")
        if incompat & _QCOW2_INCOMPAT_CORRUPT:
            raise SnapshotUnusableError(entry.name, f"{path} is marked corrupt")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _chain_json(snapshot: str, base: str, base_format: str) -> str:
    """A qemu ``json:`` filename pinning the chain: the snapshot's header does not choose its
    backing file or probe formats."""
    doc = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": snapshot},
        "backing": {"driver": base_format, "file": {"driver": "file", "filename": base}},
    }
    return "json:" + json.dumps(doc)


def _qemu_img(argv: list[str], what: str, *, fds: tuple[int, ...] = ()) -> str:
    try:
        proc = subprocess.run(
            ["qemu-img", *argv],
            capture_output=True,
            text=True,
            timeout=QEMU_IMG_TIMEOUT,
            check=False,
            pass_fds=fds,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HypervisorError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        raise HypervisorError(f"{what}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def qemu_img_info(path: Path, *, fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """``qemu-img info`` of a qcow2 file we made (format pinned, backing not opened); ``fds``:
    descriptors the path goes through (``/proc/self/fd/N/...``)."""
    argv = ["info", "-U", "--output=json", "-f", "qcow2", str(path)]
    out = _qemu_img(argv, f"inspecting {path}", fds=fds)
    data: dict[str, Any] = json.loads(out)
    return data


# --- export ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    virtual_size: int
    file_bytes: int
    seconds: float


def export_snapshot(
    entry: SnapshotEntry, dest: Path, *, force: bool = False, compress: bool = False
) -> ExportResult:
    """Write snapshot + base as one self-contained qcow2 (no backing file) at ``dest``.

    The directory of ``dest`` may be someone else's, who can swap any name in it at any moment,
    so nothing is ever written through a name there: the image is made in a private directory
    (0700, the exporter's) created beside ``dest`` and addressed only through its descriptor
    (``/proc/self/fd/N`` for qemu-img), checked with ``qemu-img check``, and only then moved
    into place from that descriptor to the directory's (mode 0600: it holds the job's data).
    On the way to the directory, root follows only root's own links. ``dest`` never holds half
    an image; it is not replaced unless ``force``.
    """
    t0 = time.monotonic()
    snapshot, base = _require_disk(entry)
    dest = Path(os.path.abspath(dest))
    if dest.name in ("", ".", ".."):
        raise RequestError("FILE", f"{dest} is a directory; name the image file to write")
    parent_fd = _open_export_dir(dest.parent)
    fds: list[int] = [parent_fd]
    work: str | None = None
    work_fd: int | None = None
    try:
        there = _dirfd.lstat_at(parent_fd, dest.name)
        if there is not None and stat.S_ISDIR(there.st_mode):
            raise RequestError("FILE", f"{dest} is a directory; name the image file to write")
        if there is not None and not force:
            raise ExportExistsError(dest)
        snap_fd = _open_snapshot(entry, snapshot)
        fds.append(snap_fd)
        base_fd = _open_base(entry, base)
        fds.append(base_fd)
        work = f".glite-vm-export-{secrets.token_hex(6)}"
        os.mkdir(work, 0o700, dir_fd=parent_fd)
        work_fd = _private_dir(parent_fd, work)
        fds.append(work_fd)
        image = f"/proc/self/fd/{work_fd}/{_EXPORT_NAME}"
        argv = ["convert", "-O", "qcow2", *(["-c"] if compress else [])]
        argv += [_chain_json(f"/dev/fd/{snap_fd}", f"/dev/fd/{base_fd}", entry.base_format)]
        _qemu_img([*argv, image], f"exporting {entry.name}", fds=(snap_fd, base_fd, work_fd))
        os.chmod(_EXPORT_NAME, 0o600, dir_fd=work_fd)
        check = ["check", "-q", "-f", "qcow2", image]
        _qemu_img(check, f"checking the export of {entry.name}", fds=(work_fd,))
        info = qemu_img_info(Path(image), fds=(work_fd,))
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise HypervisorError(f"the export of {entry.name} still has a backing file")
        size = os.stat(_EXPORT_NAME, dir_fd=work_fd, follow_symlinks=False).st_size
        if force:
            os.rename(_EXPORT_NAME, dest.name, src_dir_fd=work_fd, dst_dir_fd=parent_fd)
        else:
            try:  # fails rather than replace a file that appeared meanwhile
                os.link(
                    _EXPORT_NAME,
                    dest.name,
                    src_dir_fd=work_fd,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
            except FileExistsError:
                raise ExportExistsError(dest) from None
    finally:
        if work is not None and work_fd is not None:
            _remove_private_dir(parent_fd, work, work_fd)
        elif work is not None:
            with contextlib.suppress(OSError):
                os.rmdir(work, dir_fd=parent_fd)  # made, but not ours to open: empty anyway
        for fd in fds:
            os.close(fd)
    return ExportResult(
        path=dest,
        virtual_size=int(info.get("virtual-size", 0)),
        file_bytes=size,
        seconds=time.monotonic() - t0,
    )


def _open_export_dir(directory: Path) -> int:
    """A descriptor of the directory the export goes to. As root, only root's own links are
    followed on the way (a user's link could lead root's write anywhere)."""
    try:
        if os.geteuid() == 0:
            return _dirfd.open_dir_path(directory, trusted_uids=frozenset({0}))
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RequestError("FILE", f"the directory {directory} does not exist") from None
    except NotADirectoryError:
        raise RequestError("FILE", f"{directory} is not a directory") from None
    except OSError as exc:
        raise RequestError(
            "FILE",
            f"cannot export into {directory}: {exc.strerror or exc}; "
            "choose a directory reached without other users' symbolic links",
        ) from None


def _private_dir(parent_fd: int, name: str) -> int:
    """The directory ``name`` just made in ``parent_fd``, opened, and proven to be the one made
    (the exporter's, 0700, empty): someone who swapped the name meanwhile gets an error."""
    try:
        fd = _dirfd.open_dir(name, dir_fd=parent_fd)
    except OSError as exc:
        raise HypervisorError(
            f"the export's work directory {name} was replaced meanwhile ({exc.strerror})"
        ) from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700 or os.listdir(fd):
        os.close(fd)
        raise HypervisorError(f"the export's work directory {name} was replaced meanwhile")
    return fd


def _remove_private_dir(parent_fd: int, name: str, fd: int) -> None:
    """Remove what the export left in its private directory, and the directory when the name
    in ``parent_fd`` still is that directory."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_EXPORT_NAME, dir_fd=fd)
    mine = os.fstat(fd)
    there = _dirfd.lstat_at(parent_fd, name)
    if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=parent_fd)


def _open_base(entry: SnapshotEntry, base: Path) -> int:
    """The base image for an export: a regular file (a FIFO swapped in cannot stall it)."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except PermissionError:
        raise SnapshotUnusableError(
            entry.name,
            f"you may not read its base image {base}: a custom image is cached readable only "
            "by root and QEMU; ask the host's admin to export it",
        ) from None
    except OSError as exc:
        raise SnapshotUnusableError(entry.name, f"cannot open {base}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotUnusableError(entry.name, f"its base image {base} is not a regular file")
    os.set_blocking(fd, True)
    return fd


# --- boot -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SnapshotImage:
    """A private copy of a kept snapshot, as the base of a throw-away overlay."""

    name: str
    path: Path
    sha256: str
    virtual_size: int
    kernel: Path | None
    initrd: Path | None
    cmdline: str | None
    guest_user: str | None
    format: str = "qcow2"


@dataclasses.dataclass
class SnapshotBoot:
    """A running throw-away VM of a snapshot (see :func:`boot_snapshot`)."""

    vm: Vm
    entry: SnapshotEntry
    workspace: Path  # holds the snapshot's copy and the VM's directory; removed afterwards
    console: str  # "file" or "pty"

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def boot_log(self) -> Path:
        return self.vm.boot_log


def boots_root(settings: Settings) -> Path:
    """Where throw-away VMs of snapshots live: beside the state of this host when the caller
    may write there (root), else in the caller's cache directory (their own QEMU reads it)."""
    state = settings.state_dir
    if os.geteuid() == 0 or (state.is_dir() and os.access(state, os.W_OK | os.X_OK)):
        return state / BOOTS_DIR
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "glite-vm" / BOOTS_DIR


@contextlib.contextmanager
def boot_snapshot(
    host: VmHost,
    entry: SnapshotEntry,
    *,
    console: str = "file",
    cpus: int | None = None,
    memory_mib: int | None = None,
) -> Iterator[SnapshotBoot]:
    """Start a throw-away VM of ``entry``'s kept disk; tear it down and remove it on exit.

    The VM boots a fresh overlay on top of a private copy of the snapshot, on top of the same
    base image (``VmHost.start(..., base_chain=...)``), with the guest agent as usual and the
    payload user root (the VM is the caller's own). The kept snapshot is only read, through a
    descriptor that never follows a symlink, so it stays byte-identical. ``console="pty"``
    gives the VM an interactive serial console (attach with :class:`ConsoleBridge`), still
    logged to the VM's boot log. Call ``boot.vm.wait_ready()`` for the agent.
    """
    if console not in ("file", "pty"):
        raise ValueError(f"console must be 'file' or 'pty', not {console!r}")
    snapshot, base = _require_disk(entry)
    files = resolve_boot_files(host.settings, entry)
    fd = _open_snapshot(entry, snapshot)
    leases: list[LeaseRecord] = []
    vm: Vm | None = None
    workspace: Path | None = None
    try:
        workspace_root = boots_root(host.settings)
        workspace_root.mkdir(parents=True, exist_ok=True, mode=0o711)
        workspace = workspace_root / secrets.token_hex(8)
        workspace.mkdir(mode=0o711)  # QEMU's user must traverse it (qemu:///system)
        copy = workspace / SNAPSHOT
        _copy_fd(fd, copy)
        info = qemu_img_info(copy)
        _hand_to_qemu(host, copy)
        leases = _lease_cached(host.settings, entry, (base, files.kernel, files.initrd))
        image = _SnapshotImage(
            name=f"snapshot:{entry.name}",
            path=copy,
            sha256=entry.image_sha256 or "0" * 64,
            virtual_size=int(info["virtual-size"]),
            kernel=files.kernel,
            initrd=files.initrd,
            cmdline=files.cmdline,
            guest_user=files.guest_user,
        )
        settings = dataclasses.replace(host.settings, snapshot_dir=workspace)
        request = VMRequest.create(
            settings,
            image=image.name,
            job_id=_debug_job_id(entry.job_id),
            owner=_caller_name(),
            cpus=cpus if cpus is not None else files.cpus,
            memory_mib=memory_mib if memory_mib is not None else files.memory_mib,
            disk=min(max(image.virtual_size, 64 << 20), settings.max_disk_bytes),
            root=True,
            keep_snapshot="never",
        )
        boot_host = VmHost(host.conn, settings, host.hypervisor)
        vm = boot_host.start(
            request, image, base_chain=((base, entry.base_format),), starter_pid=os.getpid()
        )
        if console == "pty":
            _switch_to_pty(vm)
        yield SnapshotBoot(vm, entry, workspace, console)
    finally:
        os.close(fd)
        try:
            if vm is not None:
                vm.teardown(failed=False, keep_override=False)
        finally:
            for record in leases:
                lease_files.remove_lease(record)
            if workspace is not None:
                shutil.rmtree(workspace, ignore_errors=True)


def _copy_fd(fd: int, dest: Path) -> None:
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while True:
            block = os.pread(fd, _COPY_CHUNK, offset)
            if not block:
                break
            if block.count(0) == len(block):
                os.lseek(out, len(block), os.SEEK_CUR)  # keep holes holes
            else:
                view = memoryview(block)
                while view:
                    view = view[os.write(out, view) :]
            offset += len(block)
        os.ftruncate(out, offset)
    finally:
        os.close(out)


def _hand_to_qemu(host: VmHost, path: Path) -> None:
    """Let QEMU's own user read the copy (libvirt does not relabel backing images of ours)."""
    ids = qemu_ids(host.conn, host.hypervisor.kind) if os.geteuid() == 0 else None
    if ids is None:
        return  # qemu:///session: QEMU runs as the caller, who owns the copy
    os.chown(path, ids[0], ids[1], follow_symlinks=False)
    path.chmod(0o400)


def _lease_cached(
    settings: Settings, entry: SnapshotEntry, paths: tuple[Path | None, ...]
) -> list[LeaseRecord]:
    """Cache leases on the files the VM reads, so eviction leaves them alone meanwhile
    (best effort: a user without write access to the cache boots without one)."""
    cache = ImageCache(settings)
    out = []
    for path in paths:
        if path is None or path.parent != cache.blobs or not NAME_RE.match(path.name):
            continue
        try:
            out.append(lease_files.write_lease(cache.leases, path.name, f"snapshot:{entry.name}"))
        except OSError as exc:
            log.debug("no cache lease on %s: %s", path, exc)
    return out


def _debug_job_id(job_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "._@:-" else "-" for c in job_id).lstrip("._@:-")
    return f"{safe[:100] or 'snapshot'}.debug"


def _caller_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid{os.geteuid()}"


def _switch_to_pty(vm: Vm) -> None:
    """Restart the just-started domain with an interactive serial console.

    ``VmHost.start`` defines every domain with the file console of jobs; the domain is
    destroyed at once (its throw-away overlay is all the guest could have touched), redefined
    with the pty variant of :func:`~glite_vm.vm.domain_xml.with_serial_console` and started
    again, which costs about a second.
    """
    dom = vm.domain
    if dom is None:
        raise HypervisorError(f"{vm.name} has no domain")
    conn = vm.host.conn
    try:
        dom.destroy()
        xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        conn.defineXML(with_serial_console(xml, vm.boot_log, "pty"))
        dom.create()
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"libvirt could not give {vm.name} a console: {exc}") from exc


# --- the interactive console ----------------------------------------------------------------


class ConsoleBridge:
    """Joins a terminal to a domain's serial console until Ctrl-] or the guest stops.

    Keys go to the guest through libvirt's console stream (``virDomainOpenConsole``, what
    ``virsh console`` uses). What the guest prints is taken from the boot log, which records
    the console from its first byte, so the user sees the boot from the start even though the
    stream attached a moment later; the stream's own copy is read and dropped (an unread pty
    would stall the guest's console).
    """

    def __init__(
        self,
        conn: libvirt.virConnect,
        domain: libvirt.virDomain,
        boot_log: Path,
        *,
        escape: bytes = ESCAPE,
        poll_seconds: float = 0.03,
    ) -> None:
        self.conn = conn
        self.domain = domain
        self.boot_log = boot_log
        self.escape = escape
        self.poll_seconds = poll_seconds
        self.stop = threading.Event()  # set from any thread (a signal handler) to end run()

    def run(self, in_fd: int, out_fd: int) -> str:
        """Pump until the user types the escape key (``"escape"``), input ends (``"eof"``),
        the guest stops (``"stopped"``) or :attr:`stop` is set (``"stopped by caller"``)."""
        stream = self.conn.newStream(0)
        try:
            self.domain.openConsole(None, stream, 0)
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"cannot open the console: {exc}") from exc
        drained = threading.Event()
        reader = threading.Thread(target=_drain, args=(stream, drained), daemon=True)
        reader.start()
        tail = _LogTail(self.boot_log)
        last_check = 0.0
        reason = "stopped by caller"
        try:
            while not self.stop.is_set():
                _write_all(out_fd, tail.read())
                ready, _, _ = select.select([in_fd], [], [], self.poll_seconds)
                if ready:
                    data = os.read(in_fd, 4096)
                    if not data:
                        reason = "eof"
                        break
                    head, hit, _rest = data.partition(self.escape)
                    if head:
                        _send_all(stream, head)
                    if hit:
                        reason = "escape"
                        break
                now = time.monotonic()
                if now - last_check > 0.5:
                    last_check = now
                    if not _active(self.domain):
                        reason = "stopped"
                        break
            time.sleep(self.poll_seconds)
            _write_all(out_fd, tail.read())
        finally:
            tail.close()
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()
            reader.join(timeout=2)
        return reason


def _drain(stream: libvirt.virStream, done: threading.Event) -> None:
    try:
        while True:
            data = stream.recv(65536)
            if not isinstance(data, bytes) or not data:
                return
    except libvirt.libvirtError:
        return
    finally:
        done.set()


def _send_all(stream: libvirt.virStream, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = stream.send(bytes(view))
        if not isinstance(sent, int) or sent <= 0:
            raise HypervisorError("the console stream closed")
        view = view[sent:]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


class _LogTail:
    """New bytes of a file that is written by someone else (and may be rotated by virtlogd)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._ino = -1

    def read(self) -> bytes:
        chunks = []
        if self._fd is None:
            self._open()
        elif self._replaced():
            chunks.append(self._rest())
            self.close()
            self._open()
        chunks.append(self._rest())
        return b"".join(chunks)

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            self._ino = os.fstat(self._fd).st_ino
        except OSError:
            self._fd = None

    def _replaced(self) -> bool:
        try:
            return os.stat(self.path).st_ino != self._ino
        except OSError:
            return False

    def _rest(self) -> bytes:
        if self._fd is None:
            return b""
        if os.fstat(self._fd).st_size < os.lseek(self._fd, 0, os.SEEK_CUR):
            os.lseek(self._fd, 0, os.SEEK_SET)  # truncated: start over
        out: list[bytes] = []
        while True:
            block = os.read(self._fd, 65536)
            if not block:
                return b"".join(out)
            out.append(block)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# --- running domains --------------------------------------------------------------------------


def reap_abandoned_boots(
    host: VmHost, *, dry_run: bool = False, now: float | None = None
) -> list[str]:
    """Throw-away VMs of :func:`boot_snapshot` whose process died without tearing them down
    (``kill -9``, a crash): destroy them and remove their workspaces; also workspaces older
    than an hour that no VM uses. Names of the domains destroyed (or, with ``dry_run``, that
    would be)."""
    root = boots_root(host.settings)
    now = time.time() if now is None else now
    reaped: list[str] = []
    in_use: set[Path] = set()
    for dom, meta in host.our_domains():
        if meta is None or Path(meta.vm_dir).parent.parent != root:
            continue
        workspace = Path(meta.vm_dir).parent
        if meta.starter_pid is not None and lease_files.process_alive(meta.starter_pid, None):
            in_use.add(workspace)
            continue
        reaped.append(dom.name())
        if dry_run:
            continue
        destroy_domain(dom)
        shutil.rmtree(workspace, ignore_errors=True)
    try:
        workspaces = [] if dry_run else list(root.iterdir())
    except OSError:
        workspaces = []
    for workspace in workspaces:
        with contextlib.suppress(OSError):
            st = os.lstat(workspace)
            if (
                workspace not in in_use
                and stat.S_ISDIR(st.st_mode)
                and now - st.st_mtime > EMPTY_DIR_GRACE
            ):
                shutil.rmtree(workspace)
    return reaped


def running_domain_names(conn: libvirt.virConnect) -> set[str]:
    """Names of this tool's domains that libvirt knows (running or merely defined)."""
    return {d.name() for d in conn.listAllDomains(0) if d.name().startswith(DOMAIN_PREFIX)}


__all__ = [
    "BootFiles",
    "ConsoleBridge",
    "ExportExistsError",
    "ExportResult",
    "PruneDecision",
    "PruneReport",
    "SnapshotBoot",
    "SnapshotEntry",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "SnapshotUnusableError",
    "boot_log_text",
    "boot_snapshot",
    "boots_root",
    "export_snapshot",
    "qemu_img_info",
    "reap_abandoned_boots",
    "resolve_boot_files",
    "running_domain_names",
]
