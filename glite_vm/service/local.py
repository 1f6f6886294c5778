"""`LocalService`: the bootstrapper's calls, in-process, on behalf of one caller.

This is the engine behind the socket server (one instance per connection, sharing one
:class:`~glite_vm.service.registry.VmRegistry`) and what a single user can call directly
against ``qemu:///session``. It implements :class:`~glite_vm.service.api.VmService`:

* ``prepare``: a :class:`~glite_vm.request.JobRequest` (the hook made it from the job ad; the
  service never parses one) plus the slot's facts -> :func:`~glite_vm.request.vm_request` ->
  image from the cache (over the socket a job may not name host paths) -> overlay, domain,
  boot -> agent ready -> guest identity when configured. The VM belongs to the caller (uid in
  the domain metadata); the request's owner is replaced by the caller's account name, so a job
  cannot claim someone else's name (``GLITE_VM_ROOT_USERS`` names local accounts). The cache
  lease is held until teardown. On any failure nothing is left: no domain, no overlay, no lease.
* the slot: a caller over the socket (not root) never states its slot. Its :class:`Claim`
  (the root-run condor_starter it descends from, found by the server) names the slot, whose
  root and size come from the service's :class:`~glite_vm.slots.SlotLayout`; one claim gets
  one VM, which lives as long as that starter. A caller of no claim gets a VM "outside
  HTCondor": never root, at most one slot's size, at most ``max_unmanaged_vms_per_user`` of
  them, each for at most ``unmanaged_vm_lifetime``. Root, and a caller in this process, may
  still state a slot (:class:`~glite_vm.slots.SlotFacts`; ``glite-vm run`` states its own VM's,
  :meth:`~glite_vm.slots.SlotFacts.own_vm`).
* every other call acts only on the caller's own VMs (root: on all), and moves files with the
  caller's rights (:mod:`glite_vm.service.sandbox`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from glite_vm import __version__
from glite_vm.config import Settings
from glite_vm.errors import AccessDeniedError, HostError, RequestError, TransientBootError
from glite_vm.images.acquire import ImageLease, acquire_image
from glite_vm.images.download import Progress
from glite_vm.images.leases import process_start_time
from glite_vm.images.sources import classify_ref
from glite_vm.request import JobRequest, VMRequest, vm_request
from glite_vm.service import events, protocol, sandbox
from glite_vm.service.api import (
    ExecOutcome,
    OutputSink,
    PrepareResult,
    ReapedVm,
    ServiceInfo,
    TeardownOutcome,
    VmSummary,
)
from glite_vm.service.children import Identity
from glite_vm.service.claims import Claim, process_uids
from glite_vm.service.registry import Admission, VmRegistry
from glite_vm.service.vm_state import FinishedVm, VmRecord
from glite_vm.slots import SlotFacts, SlotLayout
from glite_vm.vm.boot_attempts import boot_with_retries
from glite_vm.vm.lifecycle import Vm, VmHost, qemu_pid
from glite_vm.vm.record import ad_attributes

log = logging.getLogger(__name__)

MAX_ARGV_BYTES = 1 << 20


class LocalService:
    """The service's calls for one caller (``caller_uid``), in this process."""

    def __init__(
        self,
        settings: Settings,
        host: VmHost,
        *,
        caller_uid: int,
        caller_name: str,
        caller_gid: int | None = None,
        caller_groups: Sequence[int] | None = None,
        registry: VmRegistry | None = None,
        over_socket: bool = False,
        claim: Claim | None = None,
    ) -> None:
        self.settings = settings
        self.host = host
        self.caller_uid = caller_uid
        self.caller_name = caller_name
        # Over the socket a caller other than root states nothing about its slot: ``claim``
        # (from the kernel's view of its process, see claims.find_claim) says which it is.
        self.over_socket = over_socket
        self.claim = claim
        if caller_gid is None:
            self.identity = Identity.of_user(caller_uid)
        else:
            groups = tuple(caller_groups) if caller_groups is not None else ()
            self.identity = Identity(caller_uid, caller_gid, groups)
        self.registry = registry if registry is not None else VmRegistry(settings, host)

    @classmethod
    def for_this_user(
        cls, settings: Settings, host: VmHost, *, registry: VmRegistry | None = None
    ) -> LocalService:
        """The service for whoever runs this process (a single user's in-process use)."""
        uid = os.getuid()
        return cls(
            settings,
            host,
            caller_uid=uid,
            caller_name=account_name(uid),
            caller_gid=os.getgid(),
            caller_groups=os.getgroups(),
            registry=registry,
        )

    @property
    def is_root(self) -> bool:
        return self.caller_uid == 0

    @property
    def trusted(self) -> bool:
        """May this caller state its slot (root, or a caller in this process)?"""
        return not self.over_socket or self.is_root

    # -- prepare -----------------------------------------------------------------------------

    def prepare(
        self,
        job: JobRequest,
        *,
        scratch_dir: str,
        starter_pid: int | None,
        slot: SlotFacts | None = None,
        cancel: threading.Event | None = None,
        progress: Progress | None = None,
        started: Callable[[str, Path], None] | None = None,
    ) -> PrepareResult:
        """Fetch the image, start the job's VM and wait for its agent. Setting ``cancel``
        (the caller hung up) stops the wait and removes the VM again; ``progress(done, total)``
        hears of a download's bytes, ``started(name, boot_log)`` of each VM as it starts (a boot
        attempt that fails leaves its boot log).

        ``job`` has been validated against this service's settings (:meth:`JobRequest.from_wire`
        on the socket); its owner becomes the caller's account (root's is taken as it is).
        ``slot`` is heeded only from a trusted caller (:attr:`trusted`); anyone else's slot is
        the one its claim names (see the module docstring)."""
        scratch, owner_uid = self._check_scratch_dir(scratch_dir)
        if not self.is_root:
            job = dataclasses.replace(job, owner=self.caller_name)
        # A job over the socket names no host paths; the user at this process's keyboard may.
        classify_ref(
            job.image, sources=self.settings.custom_image_sources, allow_local=not self.over_socket
        )
        facts, starter_pid, managed = self._slot(slot, starter_pid)
        starter_start = _check_starter(starter_pid)
        request = vm_request(job, facts, self.settings)
        # After the request: a bad request is held for what it is even while libvirtd is down.
        self.registry.ensure_connection()
        admission = Admission(
            uid=self.caller_uid,
            starter=(starter_pid, starter_start) if managed and starter_pid else None,
            limit=None if self.is_root or facts.own else self.settings.max_unmanaged_vms_per_user,
        )
        place = _Place(
            scratch, owner_uid, facts.name or "slot1", starter_pid, starter_start, managed
        )
        listeners = _Listeners(cancel, progress, started)
        with self.registry.admit(admission):
            return self._prepare_admitted(request, place, admission, listeners)

    def _slot(
        self, slot: SlotFacts | None, starter_pid: int | None
    ) -> tuple[SlotFacts, int | None, bool]:
        """The slot the VM is for, the starter whose life bounds it, and whether it is for a
        HTCondor job (see the module docstring)."""
        layout = SlotLayout.from_settings(self.settings)
        trusted = self.trusted
        if trusted and slot is not None:
            return slot, starter_pid, starter_pid is not None
        if trusted and self.claim is None:
            return SlotFacts(), starter_pid, starter_pid is not None
        if self.claim is not None:
            facts = layout.facts(self.claim.slot)
            if facts is None:
                raise AccessDeniedError(
                    f"this job runs in {self.claim.slot!r}, which is not one of the "
                    f"{layout.slots} VM slots this host's glite-vm knows (GLITE_VM_SLOTS); "
                    "the execute host's configuration and the service's disagree"
                )
            return facts, self.claim.starter_pid, True
        if starter_pid is not None and self.caller_uid not in process_uids(starter_pid)[:2]:
            raise RequestError(
                "starter_pid",
                f"process {starter_pid} is neither yours nor the condor_starter of your job; "
                "a VM started outside HTCondor can only live as long as a process of yours",
            )
        return layout.unmanaged(), starter_pid, False

    def _prepare_admitted(
        self,
        request: VMRequest,
        place: _Place,
        admission: Admission,
        listeners: _Listeners,
    ) -> PrepareResult:
        cancel = listeners.cancel

        def boot(attempt: int, seconds_left: float) -> VmRecord:
            return self._boot(
                request, place, admission, listeners, timeout=seconds_left, attempt=attempt
            )

        record, attempts = boot_with_retries(
            boot, attempts=self.settings.boot_attempts, budget=self.settings.boot_timeout
        )
        vm = record.vm
        assert record.lease is not None  # every boot attempt leases its image
        image = record.lease.image
        try:
            hostname = self._apply_identity(vm, request, place.slot_name)
        except BaseException as exc:
            self._abandon(record, exc, cancel)
            raise
        attributes: dict[str, object] = dict(
            ad_attributes(
                domain=vm.name,
                hypervisor=self.host.hypervisor.kind,
                image_digest=image.sha256,
                cache_hit=image.cache_hit,
                guest_user=vm.guest_user,
                guest_hostname=hostname,
                guest_network=request.network,
                boot_log=vm.boot_log,
                record=vm.record,
                boot_attempts=attempts,
                timings={
                    "fetch": vm.timings.fetch,
                    "boot": vm.timings.boot,
                    "ready": vm.timings.ready,
                },
            )
        )
        record.ad_attributes = attributes
        self.registry.persist(record)
        log.info(
            "prepared %s for job %s of uid %d (%s) in %.1f s",
            vm.name,
            request.job_id,
            place.owner_uid,
            image.name,
            (vm.timings.fetch or 0) + (vm.timings.boot or 0) + (vm.timings.ready or 0),
        )
        return PrepareResult(
            vm=vm.name,
            ad_attributes=dict(attributes),
            guest_user=vm.guest_user,
            boot_log_path=str(vm.boot_log),
        )

    def _boot(
        self,
        request: VMRequest,
        place: _Place,
        admission: Admission,
        listeners: _Listeners,
        *,
        timeout: float,
        attempt: int,
    ) -> VmRecord:
        """One boot attempt: lease the image, start the VM, wait for its agent. On failure it
        leaves nothing behind: no domain, no overlay, no lease (the boot log stays)."""
        lease_job_id = f"{request.job_id}/{secrets.token_hex(4)}"
        lease = acquire_image(
            self.settings,
            request.image,
            sha256=request.image_sha256,
            job_id=lease_job_id,
            allow_local=not self.over_socket,
            reader=self.identity,
            progress=listeners.progress,
        )
        cancel = listeners.cancel
        try:
            if cancel is not None and cancel.is_set():
                raise HostError("the caller hung up while the image was fetched")
            image = lease.image
            vm = self.host.start(
                request,
                image,
                owner_uid=place.owner_uid,
                starter_pid=place.starter_pid,
                scratch_dir=place.scratch,
                fetch_seconds=image.fetch_seconds,
            )
        except BaseException:
            lease.release()
            raise
        if listeners.started is not None:
            listeners.started(vm.name, vm.boot_log)
        record = VmRecord(
            vm,
            owner_uid=place.owner_uid,
            scratch_dir=str(place.scratch),
            starter_pid=place.starter_pid,
            starter_start=place.starter_start,
            lease_job_id=lease_job_id,
            created=time.time(),
            lease=lease,
            managed=place.managed,
        )
        try:
            self.registry.add(record, admission)  # from here on a restarted service adopts it
            _give_boot_log(vm, place.owner_uid)
            _bind_lease_to_qemu(lease, vm.name)
            vm.wait_ready(timeout, cancel=cancel)
        except BaseException as exc:
            self._abandon(record, exc, cancel, attempt)
            raise
        return record

    def _abandon(
        self,
        record: VmRecord,
        exc: BaseException,
        cancel: threading.Event | None,
        attempt: int | None = None,
    ) -> None:
        """Tear down a VM whose prepare failed (or whose caller went), saying why."""
        log.warning("preparing %s for uid %d failed: %s", record.name, record.owner_uid, exc)
        if cancel is not None and cancel.is_set():
            reason = "the caller of prepare hung up before the VM was ready"
        elif attempt is not None and isinstance(exc, TransientBootError):
            reason = f"boot attempt {attempt} failed: {exc.what}"
        else:  # the first line: quoted boot-log lines stay in the boot log
            reason = f"preparing it failed: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        self.registry.teardown(
            record, failed=True, keep_override=False, reason=reason, event=events.ABANDONED
        )

    def _check_scratch_dir(self, scratch_dir: str) -> tuple[Path, int]:
        """The job's scratch directory, normalised; and the uid the VM will belong to."""
        if not isinstance(scratch_dir, str) or not os.path.isabs(scratch_dir):
            raise RequestError("scratch_dir", f"{scratch_dir!r} is not an absolute path")
        path = Path(os.path.normpath(scratch_dir))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise RequestError("scratch_dir", f"{path} does not exist") from None
        except OSError as exc:
            raise AccessDeniedError(f"cannot look at {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            raise AccessDeniedError(
                f"the scratch directory {path} is a symlink; give the directory itself"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise RequestError("scratch_dir", f"{path} is not a directory")
        if not self.is_root and st.st_uid != self.caller_uid:
            raise AccessDeniedError(
                f"the scratch directory {path} belongs to uid {st.st_uid}, not to you "
                f"(uid {self.caller_uid}): the service prepares VMs only for jobs whose "
                "scratch directory the caller owns"
            )
        # Root acts for the directory's owner, whose VM it then is.
        return path, (st.st_uid if self.is_root else self.caller_uid)

    def _apply_identity(self, vm: Vm, request: VMRequest, slot_name: str) -> str | None:
        s = self.settings
        wanted = (
            s.guest_identity
            or request.hostname is not None
            or any(p is not None for p in (s.host_cert_dir, s.ca_cert, s.ca_key))
        )
        if not wanted:
            return None
        from glite_vm.identity.guest import prepare_guest_identity  # noqa: PLC0415
        from glite_vm.vm.guest_setup import apply_guest_setup  # noqa: PLC0415

        setup = prepare_guest_identity(
            s,
            host=socket.gethostname(),
            slot=slot_name,
            job_id=request.job_id,
            requested=request.hostname,
        )
        if not request.root and _custom_image(request, s):
            # Whoever made a custom image is root in its guest, whatever the job may be: the
            # host key goes only where root is the site's (its catalogue's images) or the job's
            # by the site's policy (a root job on a root-enabled slot).
            log.info("%s: a custom image of a job that is not root gets no host key", vm.name)
            setup = setup.without_secrets()
        apply_guest_setup(vm, setup)
        return setup.hostname

    # -- the other calls ---------------------------------------------------------------------

    def push(self, vm: str, src_dir: str) -> int:
        record = self._usable(vm)
        src = _absolute("src_dir", src_dir)
        with record.io_lock:
            written = sandbox.pack_as(self.identity, record.vm.xfer, src)
            record.vm.unpack_pushed(written)
        return written

    def exec(
        self,
        vm: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        cancel: threading.Event | None = None,
        timeout: float | None = None,
    ) -> ExecOutcome:
        """Run ``argv`` in the guest as the guest user; ``cancel`` and ``timeout`` stop waiting
        (the VM's teardown stops the payload)."""
        record = self._usable(vm)
        _check_command(argv, env)
        with record.io_lock:
            result = record.vm.run(
                list(argv),
                env=dict(env) if env else None,
                stdout=stdout,
                stderr=stderr,
                cancel=cancel,
                timeout=timeout,
            )
        self.registry.persist(record)
        return ExecOutcome(result.exit_code, result.signal, result.seconds)

    def pull(self, vm: str, dest_dir: str, *, unchanged_from: str | None = None) -> list[str]:
        record = self._usable(vm)
        dest = _absolute("dest_dir", dest_dir)
        before = _absolute("unchanged_from", unchanged_from) if unchanged_from else None
        with record.io_lock:
            record.vm.pack_for_pull()
            files, refused = sandbox.unpack_as(self.identity, record.vm.xfer, dest, before)
        for problem in refused:
            log.info("%s: not copied out: %s", vm, problem)
        return files

    def teardown(self, vm: str, *, failed: bool) -> TeardownOutcome:
        self.registry.ensure_connection()
        entry = self._own(vm)
        if isinstance(entry, FinishedVm):
            return entry.outcome
        outcome = self.registry.teardown(entry, failed=failed)
        log.info("tore down %s of uid %d (failed=%s)", vm, entry.owner_uid, failed)
        return outcome

    def list_vms(self) -> list[VmSummary]:
        now = time.time()
        return [
            VmSummary(
                vm=r.name,
                owner=r.owner,
                owner_uid=r.owner_uid,
                job_id=r.vm.request.job_id,
                image=r.vm.image.name,
                age_seconds=round(max(0.0, now - r.created), 3),
                running=r.running(),
            )
            for r in sorted(self.registry.active(), key=lambda r: r.created)
            if self._sees(r.owner_uid)
        ]

    def reap(self) -> list[ReapedVm]:
        """One reaper pass now (anyone may ask: it only applies the reaper's rules)."""
        return [r for r in self.registry.reap_once() if self._sees(r.owner_uid)]

    def ping(self) -> ServiceInfo:
        return ServiceInfo(
            protocol=protocol.VERSION,
            version=__version__,
            pid=os.getpid(),
            uptime_seconds=round(time.monotonic() - self.registry.started, 3),
            caller_uid=self.caller_uid,
            vms=sum(1 for r in self.registry.active() if self._sees(r.owner_uid)),
        )

    # -- ownership ---------------------------------------------------------------------------

    def _sees(self, owner_uid: int) -> bool:
        return self.is_root or owner_uid == self.caller_uid

    def _own(self, name: str) -> VmRecord | FinishedVm:
        if not isinstance(name, str) or not name:
            raise RequestError("vm", "must name a VM")
        entry = self.registry.get(name)
        if entry is None or not self._sees(entry.owner_uid):
            # The same answer for someone else's VM and for none at all: names are not probed.
            raise AccessDeniedError(
                f"no VM named {name!r} belongs to uid {self.caller_uid}: a VM can only be "
                "used by the user whose job it serves"
            )
        return entry

    def _usable(self, name: str) -> VmRecord:
        self.registry.ensure_connection()
        entry = self._own(name)
        if isinstance(entry, FinishedVm):
            why = f" ({entry.reason})" if entry.reason else ""
            raise HostError(f"the VM {name} was already torn down{why}")
        if entry.state_lost:
            raise HostError(
                f"the service restarted without the state of {name}; it can only be torn down"
            )
        return entry


# -- helpers ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Listeners:
    """Who hears of a prepare as it goes: a cancel event (the caller hung up), a download's
    progress, each VM as it starts."""

    cancel: threading.Event | None
    progress: Progress | None
    started: Callable[[str, Path], None] | None


@dataclasses.dataclass(frozen=True)
class _Place:
    """Where a VM being prepared belongs: its job's scratch directory and owner, the slot it is
    named after, and the starter whose life bounds it (``managed``: a HTCondor job's)."""

    scratch: Path
    owner_uid: int
    slot_name: str
    starter_pid: int | None
    starter_start: int | None
    managed: bool


def account_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def _custom_image(request: VMRequest, settings: Settings) -> bool:
    """Is the job's image a custom one (a URL or a path), rather than one of the site's
    catalogue? (Only classified here: prepare applied the policy on it already.)"""
    ref = classify_ref(request.image, sources=settings.custom_image_sources, allow_local=True)
    return ref.kind == "url"


def _check_starter(pid: int | None) -> int | None:
    """The starter's start time (so a recycled pid is not mistaken for it later)."""
    if pid is None:
        return None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise RequestError("starter_pid", f"must be a process id, got {pid!r}")
    start = process_start_time(pid)
    if start is None:
        raise RequestError("starter_pid", f"no process {pid} is running")
    return start


def _check_command(argv: Sequence[str], env: Mapping[str, str] | None) -> None:
    if isinstance(argv, str) or not argv:
        raise RequestError("command", "must be a non-empty list of arguments")
    size = 0
    for arg in argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise RequestError("command", "arguments must be strings without NUL characters")
        size += len(arg)
    for key, value in (env or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise RequestError("environment", "names and values must be strings")
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise RequestError("environment", f"{key!r} is not a valid variable name")
        size += len(key) + len(value)
    if size > MAX_ARGV_BYTES:
        raise RequestError("command", f"arguments and environment exceed {MAX_ARGV_BYTES} bytes")


def _absolute(field: str, path: str) -> Path:
    if not isinstance(path, str) or not os.path.isabs(path) or "\0" in path:
        raise RequestError(field, f"{path!r} is not an absolute path")
    return Path(path)


def _give_boot_log(vm: Vm, owner_uid: int) -> None:
    """The job's owner may read its boot log while the VM runs (no one else may)."""
    if os.geteuid() != 0:
        return
    try:
        os.chown(vm.boot_log, owner_uid, -1, follow_symlinks=False)
        os.chmod(vm.boot_log, 0o600)
    except OSError as exc:
        log.warning("cannot give %s to uid %d: %s", vm.boot_log, owner_uid, exc)


def _bind_lease_to_qemu(lease: ImageLease, name: str) -> None:
    """The cache lease lives as long as the VM's QEMU, so a service restart does not let
    eviction take a base image from under a running VM."""
    pid = qemu_pid(name)
    if pid is not None:
        lease.rebind(pid)
        return
    log.debug("no QEMU pid file for %s; its cache lease stays with the service", name)
