"""Preparing a job's VM: from a validated request to a VM whose agent answers.

:meth:`VmPreparer.prepare` takes a :class:`~glite_vm.request.JobRequest` (the hook made it
from the job ad; the service never parses one) plus the slot's facts ->
:func:`~glite_vm.request.vm_request` -> image from the cache (over the socket a job may not name
host paths) -> overlay, domain, boot -> agent ready -> guest identity when configured, with up
to ``boot_attempts`` boots within ``boot_timeout``.

Invariants. The VM belongs to the caller (uid in the domain metadata); the request's owner is
replaced by the caller's account name, so a job cannot claim someone else's name
(``GLITE_VM_ROOT_USERS`` names local accounts). A caller over the socket (not root) never states
its slot: its claim names the slot, whose root and size come from the service's
:class:`~glite_vm.slots.SlotLayout`; one claim gets one VM, which lives as long as that starter.
A caller of no claim gets a VM "outside HTCondor": never root, at most one slot's size, at most
``max_unmanaged_vms_per_user`` of them, each for at most ``unmanaged_vm_lifetime``. Root, and a
caller in this process, may still state a slot (:class:`~glite_vm.slots.SlotFacts`). The cache
lease is held until teardown, bound to the VM's QEMU. A VM is in the registry (so a restarted
service adopts it) from the moment its domain exists; on any failure nothing is left: no domain,
no overlay, no lease (the boot log stays).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from glite_vm.config import Settings
from glite_vm.errors import (
    AccessDeniedError,
    GliteVmError,
    HostError,
    RequestError,
    TransientBootError,
)
from glite_vm.images.acquire import ImageLease, ResolvedImage, acquire_image
from glite_vm.images.download import Progress
from glite_vm.images.leases import process_start_time
from glite_vm.images.sources import classify_ref
from glite_vm.request import DebugHoldGrant, JobRequest, VMRequest, grant_debug_hold, vm_request
from glite_vm.service import events, warm_start
from glite_vm.service.api import PrepareResult
from glite_vm.service.caller import Caller
from glite_vm.service.claims import process_uids
from glite_vm.service.job_identity import apply_identity
from glite_vm.service.registry import Admission, VmRegistry
from glite_vm.service.vm_state import VmRecord
from glite_vm.slots import SlotFacts, SlotLayout
from glite_vm.vm.boot_attempts import boot_with_retries
from glite_vm.vm.domains import qemu_pid
from glite_vm.vm.lifecycle import Vm, VmHost
from glite_vm.vm.record import ad_attributes
from glite_vm.vm.warm import TemplateFiles

log = logging.getLogger(__name__)


class VmPreparer:
    """Prepares VMs for one :class:`~glite_vm.service.caller.Caller` (see the module docstring)."""

    def __init__(
        self, settings: Settings, host: VmHost, registry: VmRegistry, caller: Caller
    ) -> None:
        self.settings = settings
        self.host = host
        self.registry = registry
        self.caller = caller
        self._rebuild = False  # a template failed here: build it again behind the cold boot

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
        """The steps of :meth:`~glite_vm.service.local.LocalService.prepare` (see there)."""
        began = time.monotonic()
        caller = self.caller
        scratch, owner_uid = self._check_scratch_dir(scratch_dir)
        if not caller.is_root:
            job = dataclasses.replace(job, owner=caller.name)
        # A job over the socket names no host paths; the user at this process's keyboard may.
        classify_ref(
            job.image,
            sources=self.settings.custom_image_sources,
            allow_local=not caller.over_socket,
        )
        facts, starter_pid, managed = self._slot(slot, starter_pid)
        starter_start = _check_starter(starter_pid)
        request = vm_request(job, facts, self.settings)
        # After the request: a bad request is held for what it is even while libvirtd is down.
        self.registry.ensure_connection()
        admission = Admission(
            uid=caller.uid,
            starter=(starter_pid, starter_start) if managed and starter_pid else None,
            limit=None if caller.is_root or facts.own else self.settings.max_unmanaged_vms_per_user,
            root=request.root,
        )
        place = _Place(
            scratch,
            owner_uid,
            facts.name or "slot1",
            starter_pid,
            starter_start,
            managed,
            # the site's rule, applied here: the hook checked only the request's form
            grant_debug_hold(job.debug_hold, self.settings),
        )
        listeners = _Listeners(cancel, progress, started)
        with self.registry.admit(admission):
            try:
                return self._prepare_admitted(request, place, admission, listeners, began)
            except BaseException as exc:
                self.registry.metrics.note_boot_failed(exc)
                raise

    def _slot(
        self, slot: SlotFacts | None, starter_pid: int | None
    ) -> tuple[SlotFacts, int | None, bool]:
        """The slot the VM is for, the starter whose life bounds it, and whether it is for a
        HTCondor job (see the module docstring)."""
        layout = SlotLayout.from_settings(self.settings)
        trusted = self.caller.trusted
        claim = self.caller.claim
        if trusted and slot is not None:
            return slot, starter_pid, starter_pid is not None
        if trusted and claim is None:
            return SlotFacts(), starter_pid, starter_pid is not None
        if claim is not None:
            facts = layout.facts(claim.slot)
            if facts is None:
                raise AccessDeniedError(
                    f"this job runs in {claim.slot!r}, which is not one of the "
                    f"{layout.slots} VM slots this host's glite-vm knows (GLITE_VM_SLOTS); "
                    "the execute host's configuration and the service's disagree"
                )
            return facts, claim.starter_pid, True
        if starter_pid is not None and self.caller.uid not in process_uids(starter_pid)[:2]:
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
        began: float,
    ) -> PrepareResult:
        """Boot (with retries), set the guest's identity, note the boot (``began``: when the
        call began, by the monotonic clock)."""
        cancel = listeners.cancel

        def boot(attempt: int, seconds_left: float) -> VmRecord:
            try:
                record = self._boot(
                    request, place, admission, listeners, timeout=seconds_left, attempt=attempt
                )
            except TransientBootError:
                self.registry.metrics.note_boot_attempt("transient")
                raise
            except BaseException:
                self.registry.metrics.note_boot_attempt("failed")
                raise
            self.registry.metrics.note_boot_attempt("ok")
            return record

        record, attempts = boot_with_retries(
            boot, attempts=self.settings.boot_attempts, budget=self.settings.boot_timeout
        )
        vm = record.vm
        assert record.lease is not None  # every boot attempt leases its image
        image = record.lease.image
        try:
            hostname = apply_identity(self.settings, vm, request, place.slot_name)
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
                warm_start=vm.template is not None,
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
        self.registry.metrics.note_ready(time.monotonic() - began, cache_hit=image.cache_hit)
        if vm.template is not None:
            self.registry.metrics.note_warm_start("restored")
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
        warm: bool = True,
    ) -> VmRecord:
        """One boot attempt: lease the image, start the VM (restored from a template when
        ``warm`` and one is usable, else booted; a warm start that fails boots cold within the
        same ``timeout``), wait for its agent. On failure it leaves nothing behind: no domain,
        no overlay, no lease (the boot log stays)."""
        began = time.monotonic()
        lease_job_id = f"{request.job_id}/{secrets.token_hex(4)}"
        lease = self._lease(request, listeners, lease_job_id)
        cancel = listeners.cancel
        try:
            if cancel is not None and cancel.is_set():
                raise HostError("the caller hung up while the image was fetched")
            vm = self._start(request, lease.image, place, warm=warm)
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
            debug=place.debug,
        )
        try:
            self.registry.add(record, admission)  # from here on a restarted service adopts it
            _give_boot_log(vm, place.owner_uid)
            _bind_lease_to_qemu(lease, vm.name)
            # A restored guest answers within a second or so: one that does not within the
            # agent's grace (twice it, for a crowded host) boots cold in the time left.
            wait = timeout if vm.template is None else min(timeout, 2 * self.settings.agent_timeout)
            vm.wait_ready(wait, cancel=cancel)
        except BaseException as exc:
            template = vm.template
            warm_failed = template is not None and not (cancel is not None and cancel.is_set())
            self._abandon(record, exc, cancel, attempt)
            if not warm_failed or not isinstance(exc, Exception):
                raise
            assert template is not None
            self._warm_failed(request, place, template, vm.name, exc)
            left = max(1.0, timeout - (time.monotonic() - began))
            return self._boot(  # the same attempt, booted cold this time
                request, place, admission, listeners, timeout=left, attempt=attempt, warm=False
            )
        wanted = self._rebuild or warm_start.wanted(self.settings, lease.image.name)
        if vm.template is None and wanted:
            warm_start.build_in_background(
                self.settings, self.host, request, request.image, lease.image.sha256
            )
        return record

    def _start(self, request: VMRequest, image: ResolvedImage, place: _Place, *, warm: bool) -> Vm:
        """Start the VM: restored from a usable template (``warm``), else booted; a template
        that fails is discarded and the VM boots cold."""
        template = None
        if warm:
            try:
                template = warm_start.find_template(self.settings, self.host, request, image)
            except (OSError, ValueError, GliteVmError) as exc:
                self._warm_failed(request, place, None, None, exc)
        start = functools.partial(
            self.host.start,
            request,
            image,
            owner_uid=place.owner_uid,
            starter_pid=place.starter_pid,
            scratch_dir=place.scratch,
            fetch_seconds=image.fetch_seconds,
        )
        if template is None:
            return start()
        try:
            return start(template=template)
        except (OSError, ValueError, GliteVmError) as exc:
            self._warm_failed(request, place, template, None, exc)
            return start()

    def _warm_failed(
        self,
        request: VMRequest,
        place: _Place,
        template: TemplateFiles | None,
        name: str | None,
        exc: BaseException,
    ) -> None:
        """A template did not give a working VM: say so, drop it, boot cold (and rebuild it)."""
        first = str(exc).splitlines()[0] if str(exc) else repr(exc)
        which = f"template {template.key}" if template is not None else "a template"
        reason = f"warm start from {which} failed, booting cold: {first}"
        log.warning("%s", reason)
        self.registry.metrics.note_warm_start("fallback")
        self.registry.events.record(
            events.WARM_FALLBACK,
            name or "-",
            job=request.job_id,
            uid=place.owner_uid,
            reason=reason,
        )
        if template is not None:
            warm_start.discard_template(self.settings, template.key, first)
            self._rebuild = True  # someone made it: it is built again after this boot

    def _lease(self, request: VMRequest, listeners: _Listeners, job_id: str) -> ImageLease:
        lease = acquire_image(
            self.settings,
            request.image,
            sha256=request.image_sha256,
            job_id=job_id,
            allow_local=not self.caller.over_socket,
            reader=self.caller.identity,
            progress=listeners.progress,
            observer=self.registry.metrics,
        )
        self.registry.metrics.note_cache_lookup(hit=lease.image.cache_hit)
        return lease

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
        if not scratch_dir.isprintable():  # it is named in logs, the event log, domain XML
            raise RequestError(
                "scratch_dir",
                f"{scratch_dir!a} contains control characters (line breaks, escapes, ...); "
                "give a directory whose name has none",
            )
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
        if not self.caller.is_root and st.st_uid != self.caller.uid:
            raise AccessDeniedError(
                f"the scratch directory {path} belongs to uid {st.st_uid}, not to you "
                f"(uid {self.caller.uid}): the service prepares VMs only for jobs whose "
                "scratch directory the caller owns"
            )
        # Root acts for the directory's owner, whose VM it then is.
        return path, (st.st_uid if self.caller.is_root else self.caller.uid)


# -- helpers -------------------------------------------------------------------------------


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
    debug: DebugHoldGrant  # how long the VM may be kept after its payload failed


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


__all__ = ["VmPreparer"]
