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

A VM is reaped when its job is gone, by the rules of :mod:`glite_vm.service.reaper`; what the
service keeps of each VM, and its state file's format, are :mod:`glite_vm.service.vm_state`'s.
Torn-down VMs are remembered for
:data:`FINISHED_RETENTION` seconds so that a second teardown (a JOB_EXIT hook after the reaper)
gets the same outcome.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt

from glite_vm.config import Settings
from glite_vm.errors import AccessDeniedError, HypervisorError
from glite_vm.images.acquire import release_job_leases
from glite_vm.images.cache import ImageCache
from glite_vm.images.leases import read_leases, write_lease
from glite_vm.service import debug_hold, events, metrics
from glite_vm.service.api import ReapedVm, TeardownOutcome
from glite_vm.service.metrics import ServiceMetrics
from glite_vm.service.reaper import owner_alive, reap_reason, sweep_half_made
from glite_vm.service.shell import SESSIONS
from glite_vm.service.vm_state import (
    FinishedVm,
    StateDir,
    VmRecord,
    finished_from_state,
    record_from_metadata,
    record_from_state,
)
from glite_vm.vm.domains import destroy_domain, qemu_pid
from glite_vm.vm.lifecycle import VmHost
from glite_vm.vm.record import TeardownResult, ad_attributes
from glite_vm.vm.shell_port import sweep_sockets

log = logging.getLogger(__name__)

FINISHED_RETENTION = 3600.0


@dataclasses.dataclass(eq=False)
class Admission:
    """A prepare under way: for the claim of ``starter`` (pid, start time), or, with ``starter``
    ``None``, outside HTCondor for ``uid`` with at most ``limit`` such VMs (``None``: no cap).
    ``registered``: its VM is in the registry now, and counts there.
    ``root``: the job runs as root in its guest."""

    uid: int
    starter: tuple[int, int | None] | None
    limit: int | None
    registered: bool = False
    root: bool = False  # the job runs as root in its guest (its owner class in the metrics)


class VmRegistry:
    """The VMs of one service instance (thread-safe), persisted for restarts; ``metrics``
    (default: a new, unexported set) count what happens to them."""

    def __init__(
        self, settings: Settings, host: VmHost, metrics: ServiceMetrics | None = None
    ) -> None:
        self.settings = settings
        self.host = host
        self.metrics = metrics if metrics is not None else ServiceMetrics(process=False)
        self.states = StateDir(settings.state_dir / "service" / "vms")
        self.started = time.monotonic()
        self._active: dict[str, VmRecord] = {}
        self._finished: dict[str, FinishedVm] = {}
        self._lock = threading.Lock()
        self._teardown_locks: dict[str, threading.Lock] = {}
        self._admitted: dict[int, Admission] = {}  # prepares under way, by a token
        self.events = events.EventLog(events.event_log_path(settings.state_dir))
        self.metrics.watch_vms(self.vm_facts)

    # -- lookup ------------------------------------------------------------------------------

    def get(self, name: str) -> VmRecord | FinishedVm | None:
        with self._lock:
            return self._active.get(name) or self._finished.get(name)

    def active(self) -> list[VmRecord]:
        with self._lock:
            return list(self._active.values())

    def vm_facts(self) -> list[tuple[str, str]]:
        """(state, owner class) of each VM, prepares under way included (for the metrics)."""
        with self._lock:
            records = list(self._active.values())
            pending = [a for a in self._admitted.values() if not a.registered]
        facts = [
            (metrics.PREPARING, metrics.owner_class(managed=a.starter is not None, root=a.root))
            for a in pending
        ]
        for r in records:
            if r.state_lost:
                state = metrics.TEARDOWN_ONLY
            elif r.debug.held:
                state = metrics.DEBUG_HELD
            else:
                state = metrics.READY if r.ad_attributes else metrics.BOOTING
            facts.append((state, metrics.owner_class(managed=r.managed, root=r.vm.request.root)))
        return facts

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

    def persist(self, record: VmRecord, finished: FinishedVm | None = None) -> None:
        self.states.write(record.name, record.to_state(finished))

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
        if record.debug.end(debug_hold.TORN_DOWN):  # its owner's wait ends with it
            self.events.record(
                events.DEBUG_HOLD_ENDED,
                record.name,
                job=record.vm.request.job_id,
                uid=record.owner_uid,
                reason=debug_hold.TORN_DOWN,
            )
        with guard:
            done = self.get(record.name)
            if isinstance(done, FinishedVm):
                return done.outcome
            # A shell never holds up a teardown: its connection is shut, it ends by itself.
            if SESSIONS.end(record.name, reason):
                log.info("%s: ending its shell session for the teardown", record.name)
            if _handed_over(record):
                result = _finish_handed_over(record)
            else:
                result = record.vm.teardown(failed=failed, keep_override=keep_override)
                self.metrics.note_teardown(result.seconds)
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
            self.persist(record, finished)
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

    def reap_once(self) -> list[ReapedVm]:
        """Tear down every VM whose job is gone; forget old finished VMs."""
        reaped: list[ReapedVm] = []
        self.ensure_connection()
        for record in self.active():
            reap = reap_reason(self.settings, self.host.conn, record)
            if reap is None:
                continue
            log.warning(
                "reaping %s (job %s of uid %d): %s",
                record.name,
                record.vm.request.job_id,
                record.owner_uid,
                reap.text,
            )
            try:
                self.teardown(record, failed=True, reason=reap.text)
            except Exception:
                log.exception("reaping %s failed", record.name)
                continue
            self.metrics.note_reap(reap.kind)
            reaped.append(ReapedVm(record.name, record.owner_uid, reap.text))
        self._expire_finished()
        sweep_half_made(
            self.settings, self.host.conn, lambda name: self.get(name) is not None, self.events
        )
        self.drop_dead_leases()
        for path in sweep_sockets(self.settings, self.host.conn):
            log.info("removed the shell socket %s of a domain that is gone", path.name)
        return reaped

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
            self.states.remove(name)

    # -- restart -----------------------------------------------------------------------------

    def recover(self, *, orphans_only: bool = False) -> None:
        """Adopt the domains this service made before a restart; finish what it left half done.

        With ``orphans_only`` (one user's own runs, which share a state directory with that
        user's other runs going on at the same time): only VMs whose owning process is gone
        are adopted, and only their states settled; a live run's VMs are its own business."""
        states = self.states.read_all()
        snapshot_dir = self.settings.effective_snapshot_dir.resolve()
        for dom, meta in self.host.our_domains():
            if meta is None or Path(meta.vm_dir).resolve().parent != snapshot_dir:
                continue  # another instance's (or a hand-made) domain: not ours to touch
            name = dom.name()
            state = states.pop(name, None)
            try:
                if state is not None:
                    record = record_from_state(self.host, state, dom)
                else:
                    record = record_from_metadata(self.host, dom, meta)
            except (KeyError, TypeError, ValueError, OSError, libvirt.libvirtError) as exc:
                log.error("cannot adopt %s (%s); it will only be reaped by hand", name, exc)
                continue
            if orphans_only and owner_alive(record.starter_pid, record.starter_start):
                continue
            self.add(record)
            self._keep_leased(record)
            log.info(
                "adopted %s (job %s of uid %d)%s",
                name,
                record.vm.request.job_id,
                record.owner_uid,
                ": state lost or not ready, teardown only" if record.state_lost else "",
            )
        for name, state in states.items():
            if orphans_only and owner_alive(state.get("starter_pid"), state.get("starter_start")):
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
        try:
            remembered = finished_from_state(name, state)
        except (KeyError, TypeError, ValueError):
            self.states.remove(name)
            return
        if remembered is not None:
            with self._lock:
                self._finished[name] = remembered
            return
        # Started before the restart, but its domain is gone: finish the teardown.
        try:
            record = record_from_state(self.host, state, None)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("unreadable state of %s (%s); removing it", name, exc)
            self.states.remove(name)
            return
        self.add(record)
        reason = "its domain disappeared while the service was down"
        log.warning("finishing %s: %s", name, reason)
        self.teardown(record, failed=True, reason=reason)
        self.metrics.note_reap("gone_while_down")


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


__all__ = ["FINISHED_RETENTION", "Admission", "VmRegistry"]
