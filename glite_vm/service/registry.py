"""The service's book of VMs: whose each one is, what a restart needs to keep serving it, and
the reaper that tears down VMs whose job is gone.

Every VM the service starts gets a state file ``<state dir>/service/vms/<domain>.json`` (root,
0600, in a 0700 directory), written as soon as the domain exists and updated after each phase.
The domain's libvirt metadata names its owner uid, starter pid and scratch directory too, so a
restarted service finds every domain it made (those whose VM directory lies in its snapshot
directory: other instances' domains are left alone), rebuilds each VM from its state file and
serves it as before — or, when the state file is missing, keeps it for teardown and the
reaper only. A state file whose domain vanished while the service was down is finished off
(snapshot kept by policy, lease released).

A VM is reaped when its starter process is gone (pid plus the process's start time, so a
recycled pid does not keep it alive), its scratch directory is gone or no longer the owner's, or
its domain disappeared or stopped running. Torn-down VMs are remembered for
:data:`FINISHED_RETENTION` seconds so that a second teardown (a JOB_EXIT hook after the reaper)
gets the same outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import stat
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

from glite_vm.config import Settings
from glite_vm.errors import AccessDeniedError, HypervisorError
from glite_vm.images.acquire import ImageLease, release_job_leases
from glite_vm.images.cache import ImageCache
from glite_vm.images.leases import process_alive, read_leases, write_lease
from glite_vm.request import KeepSnapshot, VMRequest
from glite_vm.service import events
from glite_vm.service.api import ReapedVm, TeardownOutcome
from glite_vm.vm.domain_xml import DOMAIN_PREFIX, JobMetadata
from glite_vm.vm.domains import destroy_domain, qemu_pid
from glite_vm.vm.lifecycle import BaseImage, TeardownResult, Vm, VmHost
from glite_vm.vm.record import Timings, VmFiles, ad_attributes
from glite_vm.vm.vm_dir import lock_vm_dir

log = logging.getLogger(__name__)

STATE_VERSION = 1
FINISHED_RETENTION = 3600.0
SWEEP_MIN_AGE = 10.0  # seconds a VM directory must be unchanged before a sweep may take it


@dataclasses.dataclass(frozen=True)
class StoredImage:
    """The facts of a base image a VM needs after a restart (a :class:`BaseImage`)."""

    name: str
    path: Path
    format: str
    sha256: str
    virtual_size: int
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    guest_user: str | None = None

    @classmethod
    def of(cls, image: BaseImage) -> StoredImage:
        return cls(
            name=image.name,
            path=image.path,
            format=image.format,
            sha256=image.sha256,
            virtual_size=image.virtual_size,
            kernel=image.kernel,
            initrd=image.initrd,
            cmdline=image.cmdline,
            guest_user=image.guest_user,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in vars(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StoredImage:
        def path(key: str) -> Path | None:
            return Path(data[key]) if data.get(key) else None

        return cls(
            name=str(data["name"]),
            path=Path(data["path"]),
            format=str(data["format"]),
            sha256=str(data["sha256"]),
            virtual_size=int(data["virtual_size"]),
            kernel=path("kernel"),
            initrd=path("initrd"),
            cmdline=data.get("cmdline"),
            guest_user=data.get("guest_user"),
        )


class VmRecord:
    """One live VM of the service and everything needed to serve and reap it."""

    def __init__(
        self,
        vm: Vm,
        *,
        owner_uid: int,
        scratch_dir: str | None,
        starter_pid: int | None,
        starter_start: int | None,
        lease_job_id: str | None,
        created: float,
        lease: ImageLease | None = None,
        state_lost: bool = False,
        adopted: bool = False,
        managed: bool = True,
    ) -> None:
        self.vm = vm
        self.owner_uid = owner_uid
        self.scratch_dir = scratch_dir
        self.starter_pid = starter_pid
        self.starter_start = starter_start
        self.lease_job_id = lease_job_id
        self.created = created
        self.lease = lease
        self.state_lost = state_lost  # adopted without a state file: teardown and reaping only
        self.adopted = adopted
        self.managed = managed  # started for a HTCondor job (else: capped per user, and in age)
        self.ad_attributes: dict[str, object] = {}
        self.io_lock = threading.Lock()  # push, exec and pull share the transfer disk

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def owner(self) -> str:
        return self.vm.request.owner

    def running(self) -> bool:
        try:
            return self.vm.domain is not None and bool(self.vm.domain.isActive())
        except libvirt.libvirtError:
            return False

    def to_state(self, finished: dict[str, Any] | None = None) -> dict[str, Any]:
        request = dataclasses.asdict(self.vm.request)
        request["keep_snapshot"] = self.vm.request.keep_snapshot.value
        return {
            "version": STATE_VERSION,
            "vm": self.name,
            "vm_dir": str(self.vm.dir),
            "owner_uid": self.owner_uid,
            "scratch_dir": self.scratch_dir,
            "starter_pid": self.starter_pid,
            "starter_start": self.starter_start,
            "lease_job_id": self.lease_job_id,
            "created": self.created,
            "state_lost": self.state_lost,
            "managed": self.managed,
            "request": request,
            "image": StoredImage.of(self.vm.image).to_dict(),
            "timings": self.vm.timings.as_dict(),
            "ad_attributes": self.ad_attributes,
            "finished": finished,
        }


@dataclasses.dataclass(eq=False)
class Admission:
    """A prepare under way: for the claim of ``starter`` (pid, start time), or, with ``starter``
    ``None``, outside HTCondor for ``uid`` with at most ``limit`` such VMs (``None``: no cap).
    ``registered``: its VM is in the registry now, and counts there."""

    uid: int
    starter: tuple[int, int | None] | None
    limit: int | None
    registered: bool = False


@dataclasses.dataclass(frozen=True)
class FinishedVm:
    """A torn-down VM, remembered so that teardown stays idempotent."""

    name: str
    owner_uid: int
    outcome: TeardownOutcome
    at: float
    reason: str | None  # why the reaper took it; None for an ordinary teardown


class VmRegistry:
    """The VMs of one service instance (thread-safe), persisted for restarts."""

    def __init__(self, settings: Settings, host: VmHost) -> None:
        self.settings = settings
        self.host = host
        self.state_dir = settings.state_dir / "service" / "vms"
        self.started = time.monotonic()
        self._active: dict[str, VmRecord] = {}
        self._finished: dict[str, FinishedVm] = {}
        self._lock = threading.Lock()
        self._teardown_locks: dict[str, threading.Lock] = {}
        self._admitted: dict[int, Admission] = {}  # prepares under way, by a token
        self.events = events.EventLog(events.event_log_path(settings.state_dir))

    # -- lookup ------------------------------------------------------------------------------

    def get(self, name: str) -> VmRecord | FinishedVm | None:
        with self._lock:
            return self._active.get(name) or self._finished.get(name)

    def active(self) -> list[VmRecord]:
        with self._lock:
            return list(self._active.values())

    # -- admission ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def admit(self, admission: Admission) -> Iterator[None]:
        """Count a prepare against its caller's limits from now until it returns: one VM per
        HTCondor claim (its starter), and ``max_unmanaged_vms_per_user`` VMs started outside
        HTCondor per user (root has no cap). Raises AccessDeniedError over a limit."""
        with self._lock:
            if admission.starter is not None:
                taken = [
                    r.name
                    for r in self._active.values()
                    if (r.starter_pid, r.starter_start) == admission.starter
                ]
                pending = (a.starter for a in self._admitted.values() if not a.registered)
                if taken or admission.starter in pending:
                    raise AccessDeniedError(
                        "this job already has a VM"
                        + (f" ({taken[0]})" if taken else " being prepared")
                        + "; a HTCondor claim gets one VM"
                    )
            elif admission.limit is not None:
                mine = sum(
                    1
                    for r in self._active.values()
                    if not r.managed and r.owner_uid == admission.uid
                ) + sum(
                    1
                    for a in self._admitted.values()
                    if a.starter is None and a.uid == admission.uid and not a.registered
                )
                if mine >= admission.limit:
                    raise AccessDeniedError(
                        f"uid {admission.uid} already has {mine} VMs started outside HTCondor, "
                        f"the most one user may have here (GLITE_VM_MAX_UNMANAGED_VMS_PER_USER "
                        f"= {admission.limit}); tear one down first"
                    )
            token = id(admission)
            self._admitted[token] = admission
        try:
            yield
        finally:
            with self._lock:
                self._admitted.pop(token, None)

    # -- changes -----------------------------------------------------------------------------

    def add(self, record: VmRecord, admission: Admission | None = None) -> None:
        with self._lock:
            self._active[record.name] = record
            if admission is not None:
                admission.registered = True  # counted as the record from now on
            self._teardown_locks.setdefault(record.name, threading.Lock())
        self.persist(record)
        self.events.record(
            events.ADOPTED if record.adopted else events.STARTED,
            record.name,
            job=record.vm.request.job_id,
            uid=record.owner_uid,
        )

    def persist(self, record: VmRecord, finished: dict[str, Any] | None = None) -> None:
        self._write_state(record.name, record.to_state(finished))

    def teardown(
        self,
        record: VmRecord,
        *,
        failed: bool,
        reason: str | None = None,
        keep_override: bool | None = None,
        event: str | None = None,
    ) -> TeardownOutcome:
        """Destroy the VM, keep the snapshot by policy, release the lease; idempotent.

        ``reason`` says why when the job did not ask for it; ``event`` is what the event log
        calls it (default: ``reaped`` with a reason, ``torn_down`` without)."""
        with self._lock:
            guard = self._teardown_locks.setdefault(record.name, threading.Lock())
        with guard:
            done = self.get(record.name)
            if isinstance(done, FinishedVm):
                return done.outcome
            if _handed_over(record):
                result = _finish_handed_over(record)
            else:
                result = record.vm.teardown(failed=failed, keep_override=keep_override)
            if record.lease is not None:
                record.lease.release()
            if record.lease_job_id is not None:
                release_job_leases(self.settings, record.lease_job_id)
            attributes: dict[str, object] = dict(
                ad_attributes(
                    boot_log=result.boot_log_path,
                    record=result.record_path,
                    snapshot=result.snapshot_path,
                    timings={"teardown": result.seconds, "payload": record.vm.timings.payload},
                )
            )
            outcome = TeardownOutcome(
                snapshot_path=str(result.snapshot_path) if result.snapshot_path else None,
                boot_log_path=str(result.boot_log_path),
                record_path=str(result.record_path),
                ad_attributes=attributes,
            )
            finished = FinishedVm(record.name, record.owner_uid, outcome, time.time(), reason)
            self.persist(record, _finished_state(finished))
            with self._lock:
                self._active.pop(record.name, None)
                self._finished[record.name] = finished
            self.events.record(
                event or (events.REAPED if reason else events.TORN_DOWN),
                record.name,
                job=record.vm.request.job_id,
                uid=record.owner_uid,
                reason=reason,
                snapshot=outcome.snapshot_path,
                failed=failed,
            )
            return outcome

    # -- the libvirt connection --------------------------------------------------------------

    def ensure_connection(self) -> None:
        """Reconnect to libvirt if its connection died (libvirtd restarted); VMs carry on."""
        with self._lock:
            try:
                if self.host.conn.isAlive():
                    return
            except libvirt.libvirtError:
                pass
            uri = self.settings.effective_libvirt_uri
            try:
                conn = libvirt.open(uri)
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"lost the connection to libvirt at {uri}: {exc}") from exc
            old, self.host.conn = self.host.conn, conn
            with contextlib.suppress(libvirt.libvirtError):
                old.close()
            for record in self._active.values():
                try:
                    record.vm.domain = conn.lookupByName(record.name)
                except libvirt.libvirtError:
                    record.vm.domain = None  # gone: the reaper finishes it
            log.warning("reconnected to libvirt at %s", uri)

    # -- reaping -----------------------------------------------------------------------------

    def reap_reason(self, record: VmRecord, now: float | None = None) -> str | None:
        """Why ``record``'s job is gone, or ``None`` while it may still need its VM."""
        lifetime = self.settings.unmanaged_vm_lifetime
        age = (time.time() if now is None else now) - record.created
        if not record.managed and lifetime > 0 and age > lifetime:
            return (
                f"it was started outside HTCondor {age:.0f} s ago, longer than such a VM may "
                f"live (GLITE_VM_UNMANAGED_VM_LIFETIME = {lifetime:g} s)"
            )
        pid = record.starter_pid
        if pid is not None and not _alive(pid, record.starter_start):
            return f"its starter process {pid} is gone"
        if record.scratch_dir is not None:
            try:
                st = os.lstat(record.scratch_dir)
            except FileNotFoundError:
                return f"its scratch directory {record.scratch_dir} is gone"
            except OSError:
                st = None
            if st is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != record.owner_uid):
                return f"its scratch directory {record.scratch_dir} was replaced"
        try:
            dom = self.host.conn.lookupByName(record.name)
            if not dom.isActive():
                return "its domain stopped (the guest powered off or QEMU died)"
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "its domain disappeared"
        return None

    def reap_once(self) -> list[ReapedVm]:
        """Tear down every VM whose job is gone; forget old finished VMs."""
        reaped: list[ReapedVm] = []
        self.ensure_connection()
        for record in self.active():
            reason = self.reap_reason(record)
            if reason is None:
                continue
            log.warning(
                "reaping %s (job %s of uid %d): %s",
                record.name,
                record.vm.request.job_id,
                record.owner_uid,
                reason,
            )
            try:
                self.teardown(record, failed=True, reason=reason)
            except Exception:
                log.exception("reaping %s failed", record.name)
                continue
            reaped.append(ReapedVm(record.name, record.owner_uid, reason))
        self._expire_finished()
        self.sweep_half_made()
        self.drop_dead_leases()
        return reaped

    def sweep_half_made(self) -> list[str]:
        """Remove VM directories a crash left between their creation and their domain's
        definition: no domain, no record of a teardown, not ours to serve, and not locked
        by a start or teardown in progress (in this or another process), and unchanged for
        :data:`SWEEP_MIN_AGE` seconds. The names swept."""
        root = self.settings.effective_snapshot_dir
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except FileNotFoundError:
            return []
        swept = []
        for entry in entries:
            name = entry.name
            if not name.startswith(DOMAIN_PREFIX) or self.get(name) is not None:
                continue
            path = Path(entry.path)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue  # a symlink, or handed over to its owner: a finished VM's
            if time.time() - st.st_mtime < SWEEP_MIN_AGE:
                continue  # perhaps between a start's mkdir and its lock
            if os.path.lexists(VmFiles(path).record) or self._domain_exists(name):
                continue
            held = lock_vm_dir(path, blocking=False)
            if held is None:
                continue  # a start or a teardown is working on it right now
            try:
                if os.path.lexists(VmFiles(path).record) or self._domain_exists(name):
                    continue
                shutil.rmtree(path)
            except OSError as exc:
                log.warning("cannot remove the half-made VM directory %s: %s", path, exc)
                continue
            finally:
                os.close(held)
            reason = "left half-made by a crash before its domain existed"
            log.warning("swept %s: %s", path, reason)
            self.events.record(events.SWEPT, name, reason=reason)
            swept.append(name)
        return swept

    def _domain_exists(self, name: str) -> bool:
        try:
            self.host.conn.lookupByName(name)
        except libvirt.libvirtError as exc:
            return bool(exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN)
        return True

    def drop_dead_leases(self) -> int:
        """Remove cache leases whose holder died (a service killed before it could release)."""
        try:
            return ImageCache(self.settings).drop_dead_leases()
        except OSError as exc:
            log.warning("cannot check the cache leases: %s", exc)
            return 0

    def _expire_finished(self) -> None:
        cutoff = time.time() - FINISHED_RETENTION
        with self._lock:
            old = [name for name, f in self._finished.items() if f.at < cutoff]
            for name in old:
                del self._finished[name]
                self._teardown_locks.pop(name, None)
        for name in old:
            (self.state_dir / f"{name}.json").unlink(missing_ok=True)

    # -- restart -----------------------------------------------------------------------------

    def recover(self, *, orphans_only: bool = False) -> None:
        """Adopt the domains this service made before a restart; finish what it left half done.

        With ``orphans_only`` (one user's own runs, which share a state directory with that
        user's other runs going on at the same time): only VMs whose owning process is gone
        are adopted, and only their states settled; a live run's VMs are its own business."""
        states = self._read_states()
        snapshot_dir = self.settings.effective_snapshot_dir.resolve()
        for dom, meta in self.host.our_domains():
            if meta is None or Path(meta.vm_dir).resolve().parent != snapshot_dir:
                continue  # another instance's (or a hand-made) domain: not ours to touch
            name = dom.name()
            state = states.pop(name, None)
            try:
                if state is not None:
                    record = self._record_from_state(state, dom)
                else:
                    record = self._record_from_metadata(dom, meta)
            except (KeyError, TypeError, ValueError, OSError, libvirt.libvirtError) as exc:
                log.error("cannot adopt %s (%s); it will only be reaped by hand", name, exc)
                continue
            if orphans_only and _owner_alive(record.starter_pid, record.starter_start):
                continue
            self.add(record)
            self._keep_leased(record)
            log.info(
                "adopted %s (job %s of uid %d)%s",
                name,
                record.vm.request.job_id,
                record.owner_uid,
                ": state lost, teardown only" if record.state_lost else "",
            )
        for name, state in states.items():
            if orphans_only and _owner_alive(state.get("starter_pid"), state.get("starter_start")):
                continue
            self._settle_orphan_state(name, state)

    def reap_orphans(self) -> list[ReapedVm]:
        """Reap the VMs of this state directory whose owning process is gone (a ``glite-vm
        run`` killed with SIGKILL): what every local run does first, and ``glite-vm reap`` where
        no service runs. VMs of runs still going are left alone."""
        self.recover(orphans_only=True)
        return self.reap_once()

    def _keep_leased(self, record: VmRecord) -> None:
        """An adopted VM's base image keeps a live lease (bound to its QEMU): the service may
        have died before it could move the lease it took from itself to QEMU."""
        sha = record.vm.image.sha256
        pid = qemu_pid(record.name)
        if not sha or pid is None:
            return
        job = record.lease_job_id or f"{record.vm.request.job_id}/{record.name}"
        try:
            leases_dir = ImageCache(self.settings).leases
            if any(r.job_id == job and r.alive for r in read_leases(leases_dir, sha)):
                return
            write_lease(leases_dir, sha, job, pid=pid)
        except OSError as exc:
            log.warning("cannot lease the base image of %s again: %s", record.name, exc)
            return
        record.lease_job_id = job
        self.persist(record)
        log.info("%s: its base image is leased again, to its QEMU process %d", record.name, pid)

    def _settle_orphan_state(self, name: str, state: dict[str, Any]) -> None:
        finished = state.get("finished")
        if isinstance(finished, dict):
            try:
                remembered = FinishedVm(
                    name=name,
                    owner_uid=int(state["owner_uid"]),
                    outcome=TeardownOutcome(**finished["outcome"]),
                    at=float(finished["at"]),
                    reason=finished.get("reason"),
                )
            except (KeyError, TypeError, ValueError):
                (self.state_dir / f"{name}.json").unlink(missing_ok=True)
                return
            with self._lock:
                self._finished[name] = remembered
            return
        # Started before the restart, but its domain is gone: finish the teardown.
        try:
            record = self._record_from_state(state, None)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("unreadable state of %s (%s); removing it", name, exc)
            (self.state_dir / f"{name}.json").unlink(missing_ok=True)
            return
        self.add(record)
        reason = "its domain disappeared while the service was down"
        log.warning("finishing %s: %s", name, reason)
        self.teardown(record, failed=True, reason=reason)

    def _record_from_state(self, state: dict[str, Any], dom: libvirt.virDomain | None) -> VmRecord:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r}")
        req = dict(state["request"])
        req["keep_snapshot"] = KeepSnapshot(req["keep_snapshot"])
        request = VMRequest(**req)
        image = StoredImage.from_dict(state["image"])
        vm = Vm(
            self.host,
            str(state["vm"]),
            Path(state["vm_dir"]),
            request,
            image,
            owner_uid=int(state["owner_uid"]),
        )
        vm.domain = dom
        timings = state.get("timings") or {}
        vm.timings = Timings(**{k: timings.get(k) for k in Timings.__dataclass_fields__})
        record = VmRecord(
            vm,
            owner_uid=int(state["owner_uid"]),
            scratch_dir=state.get("scratch_dir"),
            starter_pid=state.get("starter_pid"),
            starter_start=state.get("starter_start"),
            lease_job_id=state.get("lease_job_id"),
            created=float(state["created"]),
            state_lost=bool(state.get("state_lost")),
            adopted=True,
            managed=state.get("managed") is not False,
        )
        record.ad_attributes = dict(state.get("ad_attributes") or {})
        return record

    def _record_from_metadata(self, dom: libvirt.virDomain, meta: JobMetadata) -> VmRecord:
        """A domain without a state file (the service died between its start and the state
        file): enough to reap and tear it down, not to run anything in it."""
        base_path, base_format = _base_image(dom.XMLDesc(0))
        request = VMRequest(
            image=meta.image,
            cpus=1,
            memory_mib=0,
            disk_bytes=0,
            root=False,
            keep_snapshot=KeepSnapshot(meta.keep_snapshot),
            job_id=meta.job_id,
            owner=meta.owner,
        )
        image = StoredImage(meta.image, base_path, base_format, meta.image_sha256, 0)
        vm = Vm(self.host, dom.name(), Path(meta.vm_dir), request, image, owner_uid=meta.owner_uid)
        vm.domain = dom
        return VmRecord(
            vm,
            owner_uid=meta.owner_uid,
            scratch_dir=meta.scratch_dir,
            starter_pid=meta.starter_pid,
            starter_start=None,
            lease_job_id=None,
            created=meta.created,
            state_lost=True,
            adopted=True,
        )

    # -- state files -------------------------------------------------------------------------

    def _write_state(self, name: str, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.state_dir.chmod(0o700)
        tmp = self.state_dir / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1)
            f.write("\n")
        tmp.replace(self.state_dir / f"{name}.json")

    def _read_states(self) -> dict[str, dict[str, Any]]:
        states: dict[str, dict[str, Any]] = {}
        try:
            names = sorted(os.listdir(self.state_dir))
        except FileNotFoundError:
            return states
        for entry in names:
            path = self.state_dir / entry
            if entry.startswith("."):
                path.unlink(missing_ok=True)  # a write interrupted by a crash
                continue
            if not entry.endswith(".json"):
                continue
            try:
                data = json.loads(path.read_text())
                states[str(data["vm"])] = data
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("ignoring unreadable state file %s: %s", path, exc)
        return states


def _handed_over(record: VmRecord) -> bool:
    """Was the VM's directory already given to its owner (a teardown the service did not live
    to record)? Then nothing may be written into it as root any more: the owner controls its
    names and could point them anywhere."""
    if record.owner_uid == os.geteuid():
        return False
    try:
        return os.lstat(record.vm.dir).st_uid == record.owner_uid
    except OSError:
        return False


def _finish_handed_over(record: VmRecord) -> TeardownResult:
    vm = record.vm
    with contextlib.suppress(libvirt.libvirtError):  # gone already, as expected
        destroy_domain(vm.host.conn.lookupByName(vm.name))
    snapshot: Path | None = vm.snapshot
    try:
        if not stat.S_ISREG(os.lstat(vm.snapshot).st_mode):
            snapshot = None
    except OSError:
        snapshot = None
    return TeardownResult(snapshot, vm.boot_log, vm.record, 0.0)


def _owner_alive(pid: object, start: object) -> bool:
    """Whether the process a VM lives for still runs (a VM for no process counts as orphaned
    only by the other reaper rules)."""
    if not isinstance(pid, int) or isinstance(pid, bool):
        return True
    return _alive(pid, start if isinstance(start, int) and not isinstance(start, bool) else None)


def _alive(pid: int, start: int | None) -> bool:
    """The process runs (a zombie whose parent has not reaped it yet counts as gone)."""
    if not process_alive(pid, start):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read()
    except OSError:
        return True  # no /proc: trust the pid and start time
    state = fields[fields.rfind(b")") + 2 : fields.rfind(b")") + 3]
    return state not in (b"Z", b"X")


def _finished_state(finished: FinishedVm) -> dict[str, Any]:
    return {
        "outcome": dataclasses.asdict(finished.outcome),
        "at": finished.at,
        "reason": finished.reason,
    }


def _base_image(domain_xml: str) -> tuple[Path, str]:
    """The first backing store of the root disk: the cached base image and its format."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own output
    backing = root.find("./devices/disk/backingStore")
    if backing is None:
        return Path("/nonexistent"), "qcow2"
    source = backing.find("source")
    fmt = backing.find("format")
    path = source.get("file") if source is not None else None
    return Path(path or "/nonexistent"), (fmt.get("type") if fmt is not None else None) or "qcow2"


__all__ = ["FINISHED_RETENTION", "FinishedVm", "StoredImage", "VmRecord", "VmRegistry"]
