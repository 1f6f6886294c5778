"""A throw-away VM of a kept snapshot (:func:`boot_snapshot`), and the reaper of those whose
process died without tearing them down (:func:`reap_abandoned_boots`).

The VM boots a fresh overlay on a private copy of the snapshot (QEMU never opens the kept file,
so it stays byte-identical) over the same base image, optionally with an interactive serial
console (:class:`~glite_vm.snapshots.console.ConsoleBridge`). Each VM lives in a workspace
``<boots root>/<random>/`` that holds the copy and the VM's directory, and goes with it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt

from glite_vm.config import Settings
from glite_vm.errors import HypervisorError
from glite_vm.images import leases as lease_files
from glite_vm.images.cache import ImageCache
from glite_vm.images.leases import LeaseRecord
from glite_vm.images.sources import NAME_RE
from glite_vm.request import VMRequest
from glite_vm.snapshots.boot_files import resolve_boot_files
from glite_vm.snapshots.disk import open_snapshot, qemu_img_info, require_disk
from glite_vm.snapshots.entry import SnapshotEntry, account_name
from glite_vm.snapshots.store import EMPTY_DIR_GRACE
from glite_vm.vm.domain_xml import with_serial_console
from glite_vm.vm.domains import destroy_domain
from glite_vm.vm.lifecycle import Vm, VmHost
from glite_vm.vm.qemu_user import qemu_ids
from glite_vm.vm.record import SNAPSHOT

log = logging.getLogger(__name__)

BOOTS_DIR = "snapshot-boots"  # throw-away VMs of `snapshots boot`, beside the snapshot dir
_COPY_CHUNK = 1 << 20


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
    snapshot, base = require_disk(entry)
    files = resolve_boot_files(host.settings, entry)
    fd = open_snapshot(entry, snapshot)
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
            owner=account_name(os.geteuid()),
            cpus=cpus if cpus is not None else files.cpus,
            memory_mib=memory_mib if memory_mib is not None else files.memory_mib,
            disk=min(max(image.virtual_size, 64 << 20), settings.max_disk_bytes),
            root=True,
            keep_snapshot="never",
        )
        boot_host = VmHost(host.conn, settings, host.hypervisor)
        vm = boot_host.start(
            request,
            image,
            base_chain=((base, entry.base_format),),
            starter_pid=os.getpid(),
            with_shell=False,  # its console is interactive already; no service relays a shell
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
