"""The life of one job's VM: overlay, define, boot, agent ready, run, copy, teardown.

:class:`VmHost` starts VMs on one libvirt connection, injected (never global); :class:`Vm` is
one of them until its teardown. Each VM owns a directory ``<snapshot_dir>/<domain name>/``,
laid out as :mod:`glite_vm.vm.record` says and made as :mod:`glite_vm.vm.vm_dir` says; what runs
in the guest is :mod:`glite_vm.vm.guest_run`'s.

Invariants. A start is all or nothing: on any failure, everything it made so far is torn down
again before the error propagates. From ``mkdir`` until its domain is defined and started, a
VM's directory is locked by its start; a teardown takes the same lock (unless its own start
holds it). A teardown is idempotent, within a process (one at a time, the first result is
returned again) and across processes: ``record.json`` is the last thing it writes, and a
teardown that finds one changes nothing. It never raises for a domain that is already gone; it
keeps the overlay as the snapshot only as the job's policy says, removes every other disk, and
hands the kept files to the job's owner.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import libvirt

from glite_vm.config import Settings
from glite_vm.errors import AgentError, HypervisorError, RequestError
from glite_vm.request import VMRequest
from glite_vm.vm import shell_port, transfer
from glite_vm.vm.agent import GuestAgent
from glite_vm.vm.boot_watch import watch_boot
from glite_vm.vm.domain_xml import (
    DomainSpec,
    JobMetadata,
    build_domain_xml,
    domain_name,
)
from glite_vm.vm.domains import destroy_domain, our_domains
from glite_vm.vm.guest_run import (
    GUEST_WORKDIR,
    ExecResult,
    OutputSink,
    run_payload,
    run_root_script,
)
from glite_vm.vm.guest_user import ROOT_ACCOUNT, GuestAccount, ensure_guest_user
from glite_vm.vm.hypervisor import HypervisorInfo
from glite_vm.vm.qemu_user import let_qemu_read
from glite_vm.vm.record import JobRecord, TeardownResult, Timings, VmFiles
from glite_vm.vm.vm_dir import (
    copy_private,
    create_overlay,
    create_sparse,
    give_to_owner,
    link_private,
    lock_vm_dir,
    make_vm_dir,
    write_private,
)
from glite_vm.vm.warm import (
    RestoreQueue,
    RestoreTurn,
    TemplateFiles,
    merge_template_layer,
    new_mac,
    refresh_clone,
    restore_clone,
    warm_boot_log,
)

log = logging.getLogger(__name__)


class BaseImage(Protocol):
    """What the VM layer needs of a resolved image (``glite_vm.images.acquire.ResolvedImage``)."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def format(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def kernel(self) -> Path | None: ...
    @property
    def initrd(self) -> Path | None: ...
    @property
    def cmdline(self) -> str | None: ...
    @property
    def guest_user(self) -> str | None: ...


class VmHost:
    """Creates and finds this tool's VMs on one libvirt connection."""

    def __init__(
        self, conn: libvirt.virConnect, settings: Settings, hypervisor: HypervisorInfo
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.hypervisor = hypervisor
        n = settings.max_parallel_restores or os.cpu_count() or 1
        self.restores = RestoreQueue(n, patience=settings.agent_timeout)

    def start(
        self,
        request: VMRequest,
        image: BaseImage,
        *,
        owner_uid: int | None = None,
        starter_pid: int | None = None,
        scratch_dir: Path | None = None,
        fetch_seconds: float | None = None,
        base_chain: tuple[tuple[Path, str], ...] = (),
        with_shell: bool = True,
        template: TemplateFiles | None = None,
        genid: bool = False,
    ) -> Vm:
        """Create the overlay, define and start the domain. Call :meth:`Vm.wait_ready` next.
        ``with_shell``: the domain gets the shell's serial port (:mod:`glite_vm.vm.shell_port`).

        With ``template`` (a warm start, :mod:`glite_vm.vm.warm`) the domain is restored from
        the template's saved state instead of booted, on an overlay over the template's disk
        layer; ``genid`` gives a booted VM a generation ID device (what templates are made
        with). On any failure everything created so far is removed again.
        """
        t0 = time.monotonic()
        token = secrets.token_hex(3)
        name = domain_name(request.job_id, request.owner, token)
        vm_dir = make_vm_dir(self.settings.effective_snapshot_dir, name)
        vm = Vm(self, name, vm_dir, request, image, owner_uid=owner_uid)
        vm.timings.fetch = fetch_seconds
        vm.template = template
        # Until the domain exists the directory is locked: a sweeper of half-made VM
        # directories (what a crash between mkdir and define leaves) must not take this one.
        held = lock_vm_dir(vm_dir, blocking=True)
        vm._dir_lock = held
        try:
            t1 = time.monotonic()
            size = max(image.virtual_size, request.disk_bytes)
            if template is None:
                create_overlay(image.path, image.format, vm.overlay, size)
            else:
                link_private(template.layer, vm.files.template_layer)
                create_overlay(vm.files.template_layer, "qcow2", vm.overlay, size)
                warm_boot_log(template, vm.boot_log)
            vm.timings.overlay = time.monotonic() - t1
            create_sparse(vm.xfer, request.disk_bytes)
            # libvirt hands kernel and initrd to QEMU's user while the VM runs; per-VM copies
            # keep the cached originals root-owned and unwritable by any QEMU.
            kernel = initrd = None
            if image.kernel is not None:
                kernel = copy_private(image.kernel, vm.files.kernel)
            if image.initrd is not None:
                initrd = copy_private(image.initrd, vm.files.initrd)
            bases = [image.path, *dict(base_chain)]
            cache_blobs = self.settings.effective_cache_dir / "blobs"
            let_qemu_read(self.conn, self.hypervisor.kind, bases, cache_blobs=cache_blobs)
            domain_uuid = str(uuid.uuid4())
            if with_shell:
                vm.shell_socket = shell_port.prepare_socket(self.settings, domain_uuid)
            metadata = JobMetadata(
                job_id=request.job_id,
                owner=request.owner,
                owner_uid=os.getuid() if owner_uid is None else owner_uid,
                image=image.name,
                image_sha256=image.sha256,
                keep_snapshot=request.keep_snapshot.value,
                vm_dir=str(vm_dir),
                created=time.time(),
                starter_pid=starter_pid,
                scratch_dir=str(scratch_dir) if scratch_dir else None,
            )
            spec = DomainSpec(
                name=name,
                uuid=domain_uuid,
                domain_type=self.hypervisor.kind,
                emulator=self.hypervisor.emulator,
                cpus=request.cpus,
                memory_mib=request.memory_mib,
                overlay=vm.overlay,
                base_image=image.path,
                base_format=image.format,
                boot_log=vm.boot_log,
                xfer_disk=vm.xfer,
                metadata=metadata,
                kernel=kernel,
                initrd=initrd,
                cmdline=image.cmdline,
                network=request.network,
                base_chain=base_chain,
                shell_socket=vm.shell_socket,
                genid=genid,
            )
            if template is None:
                xml = build_domain_xml(spec)
                write_private(vm.files.domain_xml, xml)
                try:
                    vm.domain = self.conn.defineXML(xml)
                    vm.domain.create()
                except libvirt.libvirtError as exc:
                    raise HypervisorError(f"libvirt could not start {name}: {exc}") from exc
            else:
                vm.mac = new_mac() if request.network != "none" else None
                vm.restore_turn = self.restores.turn()  # ended once the clone is refreshed
                vm.domain = restore_clone(self.conn, template, spec, vm.files, vm.mac)
            vm.timings.boot = time.monotonic() - t0
        except BaseException:
            vm.teardown(failed=True, keep_override=False)
            raise
        finally:
            vm._dir_lock = None
            if held is not None:
                os.close(held)
        return vm

    def our_domains(self) -> Iterator[tuple[libvirt.virDomain, JobMetadata | None]]:
        """Every domain this tool made, with its job metadata when readable."""
        return our_domains(self.conn)


class Vm:
    """One running (or torn down) VM of one job. Use as a context manager for teardown."""

    def __init__(
        self,
        host: VmHost,
        name: str,
        vm_dir: Path,
        request: VMRequest,
        image: BaseImage,
        *,
        owner_uid: int | None,
    ) -> None:
        self.host = host
        self.name = name
        self.dir = vm_dir
        self.request = request
        self.image = image
        self.owner_uid = owner_uid
        self.files = VmFiles(vm_dir)
        self.overlay = self.files.overlay
        self.boot_log = self.files.boot_log
        self.xfer = self.files.xfer
        self.snapshot = self.files.snapshot
        self.record = self.files.record
        self.domain: libvirt.virDomain | None = None
        # the host's end of the shell's serial port (glite_vm.vm.shell_port); None: not known
        # (a VM rebuilt after a restart: its domain's XML says)
        self.shell_socket: Path | None = None
        self.timings = Timings()
        self.exec_result: ExecResult | None = None
        # the job's guest account once the VM is ready (None: adopted, looked up in the guest)
        self.guest_account: GuestAccount | None = None
        self.torn_down: TeardownResult | None = None
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._dir_lock: int | None = None  # the VM directory's flock while start holds it
        self.template: TemplateFiles | None = None  # a warm start's template
        self.mac: str | None = None  # a warm start's new MAC address (when it has a network)
        self.restore_turn = RestoreTurn(None)

    # -- readiness ---------------------------------------------------------------------------

    @property
    def agent(self) -> GuestAgent:
        if self.domain is None:
            raise AgentError(f"{self.name} has no domain")
        return GuestAgent(self.domain)

    @property
    def guest_user(self) -> str:
        return (
            "root"
            if self.request.root
            else (self.image.guest_user or self.host.settings.guest_user)
        )

    @property
    def guest_ids(self) -> str:
        """The job's guest account as the guest's fixed scripts take it: ``UID:GID``, or "-"
        when not known here (a VM adopted after a restart): the scripts look it up."""
        return "-" if self.guest_account is None else self.guest_account.ids

    def wait_ready(
        self, timeout: float | None = None, *, cancel: threading.Event | None = None
    ) -> float:
        """Wait until the guest agent answers and the job's guest account exists; seconds from
        domain start. Fails fast with the cause (:mod:`glite_vm.vm.boot_watch`): ImageBootError
        or GuestUserError when the image is at fault, TransientBootError, BootError, or
        AgentError once ``cancel`` is set (whoever wanted the VM is gone)."""
        if self.domain is None:
            raise AgentError(f"{self.name} has no domain")
        settings = self.host.settings
        start = time.monotonic()
        whole = settings.boot_timeout if timeout is None else timeout
        try:
            watch_boot(
                self.domain,
                self.boot_log,
                name=self.name,
                timeout=whole,
                agent_timeout=settings.agent_timeout,
                cancel=cancel,
            )
            if self.template is not None:  # before anything of the job's runs in the guest
                # in the same time: a guest that never answers its refresh costs no more
                left = whole - (time.monotonic() - start)
                refresh_clone(self.domain, mac=self.mac, timeout=left)
        finally:
            self.restore_turn.end()
        if self.request.root:
            self.guest_account = ROOT_ACCOUNT
        else:  # an ordinary job's account: made if missing, never root
            self.guest_account = ensure_guest_user(self.agent, self.guest_user)
        self.timings.ready = time.monotonic() - start
        return self.timings.ready

    # -- running things ----------------------------------------------------------------------

    def push(self, src: Path) -> int:
        """Copy the contents of host directory ``src`` into the guest's working directory."""
        written = transfer.pack_tree(src, self.xfer)
        self.unpack_pushed(written)
        return written

    def unpack_pushed(self, written: int) -> None:
        """Extract the tar stream of ``written`` bytes at the start of the transfer disk into
        the guest's working directory (for callers that packed it themselves)."""
        run_root_script(
            self.agent,
            transfer.GUEST_UNPACK,
            [GUEST_WORKDIR, self.guest_user, str(written), self.guest_ids],
            "copying files in",
        )

    def pack_for_pull(self) -> None:
        """Have the guest write its working directory as a tar stream onto the transfer disk
        (for callers that unpack it themselves)."""
        run_root_script(
            self.agent,
            transfer.GUEST_PACK,
            [GUEST_WORKDIR, self.guest_user, self.guest_ids],
            "copying files out",
        )

    def pull(
        self, dest: Path, *, unchanged_from: Path | None = None, refused: list[str] | None = None
    ) -> list[str]:
        """Copy the guest's working directory back into ``dest``; names of files copied.

        With ``unchanged_from``, files byte-identical to the same name there are skipped, so
        only new and changed files land in ``dest``.
        """
        self.pack_for_pull()
        staging = transfer.new_staging_dir(self.dir)
        try:
            names = transfer.unpack_tree(self.xfer, staging, refused)
            return transfer.copy_changed(staging, names, dest, unchanged_from)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> ExecResult:
        """Run the payload in the guest's working directory as the job's guest user.

        stdout and stderr are streamed to the sinks as the payload writes them (polled through
        the agent), kept apart and byte-exact. Returns the exit code or the signal.
        """
        if not argv:
            raise RequestError("command", "is empty")
        result = run_payload(
            self.agent,
            self.guest_user,
            argv,
            ids=self.guest_ids,
            env=env,
            stdout=stdout,
            stderr=stderr,
            timeout=timeout,
            cancel=cancel,
        )
        self.timings.payload = result.seconds
        self.exec_result = result
        return result

    # -- teardown ----------------------------------------------------------------------------

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        failed = exc is not None or (self.exec_result is not None and self.exec_result.failed)
        self.teardown(failed=failed)

    def teardown(self, *, failed: bool, keep_override: bool | None = None) -> TeardownResult:
        """Destroy and undefine the domain; keep the overlay as the snapshot by policy.

        Idempotent and never raises for a domain that is already gone.
        """
        self.restore_turn.end()
        with self._lock:
            if self.torn_down is not None:
                return self.torn_down
            held = None if self._dir_lock is not None else lock_vm_dir(self.dir, blocking=True)
            try:
                return self._teardown_locked(failed, keep_override)
            finally:
                if held is not None:
                    os.close(held)

    def _teardown_locked(self, failed: bool, keep_override: bool | None) -> TeardownResult:
        t0 = time.monotonic()
        if self.record.exists():
            # Another process tore this VM down already (its record is the last thing a
            # teardown writes): say what it left, and change nothing.
            kept = self.snapshot if self.snapshot.exists() else None
            return TeardownResult(kept, self.boot_log, self.record, 0.0)
        dom = self.domain
        if dom is None:
            try:
                dom = self.host.conn.lookupByName(self.name)
            except libvirt.libvirtError:
                dom = None
        socket_path = self.shell_socket
        if dom is not None:
            socket_path = socket_path or shell_port.socket_of_domain(self.host.settings, dom)
            destroy_domain(dom)
        shell_port.remove_socket(socket_path)
        keep = self.request.keep_snapshot.keeps(failed) if keep_override is None else keep_override
        for scratch in (self.xfer, self.files.kernel, self.files.initrd, self.files.saved_state):
            scratch.unlink(missing_ok=True)
        snapshot: Path | None = None
        if keep and self.overlay.exists():
            if self.files.template_layer.exists():
                merge_template_layer(
                    self.overlay, self.files.template_layer, self.image.path, self.image.format
                )
            self.overlay.rename(self.snapshot)
            snapshot = self.snapshot
        else:
            self.overlay.unlink(missing_ok=True)
            self.files.template_layer.unlink(missing_ok=True)
        self.timings.teardown = time.monotonic() - t0
        self._write_record(failed, snapshot)
        give_to_owner(
            self.dir, [p for p in (snapshot, self.boot_log, self.record) if p], self.owner_uid
        )
        self.torn_down = TeardownResult(snapshot, self.boot_log, self.record, self.timings.teardown)
        return self.torn_down

    def _write_record(self, failed: bool, snapshot: Path | None) -> None:
        r = self.exec_result
        image = self.image
        JobRecord(
            domain=self.name,
            job_id=self.request.job_id,
            owner=self.request.owner,
            image=image.name,
            image_sha256=image.sha256,
            # what booting the snapshot again needs (glite-vm snapshots boot)
            base_image=str(image.path),
            base_format=image.format,
            kernel=str(image.kernel) if image.kernel else None,
            initrd=str(image.initrd) if image.initrd else None,
            cmdline=image.cmdline,
            guest_user=image.guest_user or self.host.settings.guest_user,
            hypervisor=self.host.hypervisor.kind,
            root=self.request.root,
            failed=failed,
            exit_code=r.exit_code if r else None,
            signal=r.signal if r else None,
            snapshot=str(snapshot) if snapshot else None,
            boot_log=str(self.boot_log),
            timings=self.timings.as_dict(),
            finished=time.time(),
            template_layer=(
                str(self.files.template_layer)
                if snapshot and self.files.template_layer.exists()
                else None
            ),
        ).write(self.record)


__all__ = ["BaseImage", "TeardownResult", "Vm", "VmHost"]
