"""The reaper's rules: when a VM's job is gone, and which VM directories a crash left half made.

A VM is reaped (:func:`reap_reason`) when it was started outside HTCondor longer ago than such a
VM may live, its starter process is gone (pid plus the process's start time, so a recycled pid
does not keep it alive; a zombie counts as gone), its scratch directory is gone or no longer the
owner's directory, or its domain disappeared or stopped running (not while this process's prepare
still waits for it to boot: that prepare ends it, saying why; a warm-start template's VM
has its building process as its starter: a build that died with the service is reaped at the
next start, one that a live ``glite-vm images warm`` runs is not). Nothing here tears anything
down: :class:`~glite_vm.service.registry.VmRegistry` does, by these rules.

A VM directory is swept (:func:`sweep_half_made`) only when no domain has its name, it holds no
job record, the registry does not know it, it is root's (not handed over to its owner), has not
changed for :data:`SWEEP_MIN_AGE` seconds, and its lock can be taken without waiting (no start
or teardown in this or another process works on it); the last checks are made again under the
lock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable
from pathlib import Path

import libvirt

from glite_vm.config import Settings
from glite_vm.images.leases import process_alive
from glite_vm.service import events
from glite_vm.service.vm_state import VmRecord
from glite_vm.vm.domain_xml import DOMAIN_PREFIX
from glite_vm.vm.record import VmFiles
from glite_vm.vm.vm_dir import lock_vm_dir

log = logging.getLogger(__name__)

SWEEP_MIN_AGE = 10.0  # seconds a VM directory must be unchanged before a sweep may take it


@dataclasses.dataclass(frozen=True)
class Reap:
    """Why a VM is reaped: ``kind``, one of :data:`REAP_KINDS` (a metric's label), and ``text``,
    the sentence the log, the event log and the caller of ``reap`` read."""

    kind: str
    text: str


#: The kinds of :class:`Reap`, in the order :func:`reap_reason` tries them; the last one is a
#: VM found finished off at a restart (its domain vanished while the service was down).
REAP_KINDS = (
    "unmanaged_lifetime",
    "starter_gone",
    "scratch_gone",
    "scratch_replaced",
    "domain_stopped",
    "domain_gone",
    "gone_while_down",
)


def reap_reason(
    settings: Settings, conn: libvirt.virConnect, record: VmRecord, now: float | None = None
) -> Reap | None:
    """Why ``record``'s job is gone, or ``None`` while it may still need its VM."""
    lifetime = settings.unmanaged_vm_lifetime
    age = (time.time() if now is None else now) - record.created
    if not record.managed and lifetime > 0 and age > lifetime:
        return Reap(
            "unmanaged_lifetime",
            f"it was started outside HTCondor {age:.0f} s ago, longer than such a VM may "
            f"live (GLITE_VM_UNMANAGED_VM_LIFETIME = {lifetime:g} s)",
        )
    pid = record.starter_pid
    if pid is not None and not _process_runs(pid, record.starter_start):
        return Reap("starter_gone", f"its starter process {pid} is gone")
    if record.scratch_dir is not None:
        try:
            st = os.lstat(record.scratch_dir)
        except FileNotFoundError:
            return Reap("scratch_gone", f"its scratch directory {record.scratch_dir} is gone")
        except OSError:
            st = None
        if st is not None and (not stat.S_ISDIR(st.st_mode) or st.st_uid != record.owner_uid):
            return Reap(
                "scratch_replaced", f"its scratch directory {record.scratch_dir} was replaced"
            )
    if record.booting:
        # its prepare sees the domain stop, says why (a crash is booted again, a panic is the
        # image's fault) and tears it down: a reap now would take that from it
        return None
    try:
        dom = conn.lookupByName(record.name)
        if not dom.isActive():
            return Reap("domain_stopped", "its domain stopped (the guest powered off or QEMU died)")
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return Reap("domain_gone", "its domain disappeared")
    return None


def sweep_half_made(
    settings: Settings,
    conn: libvirt.virConnect,
    known: Callable[[str], bool],
    event_log: events.EventLog,
) -> list[str]:
    """Remove VM directories a crash left between their creation and their domain's
    definition: no domain, no record of a teardown, not ``known`` to the registry, not locked by
    a start or teardown in progress (in this or another process), and unchanged for
    :data:`SWEEP_MIN_AGE` seconds. The names swept (each one recorded in ``event_log``)."""
    root = settings.effective_snapshot_dir
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    swept = []
    for entry in entries:
        name = entry.name
        if not name.startswith(DOMAIN_PREFIX) or known(name):
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
        if os.path.lexists(VmFiles(path).record) or _domain_exists(conn, name):
            continue
        held = lock_vm_dir(path, blocking=False)
        if held is None:
            continue  # a start or a teardown is working on it right now
        try:
            if os.path.lexists(VmFiles(path).record) or _domain_exists(conn, name):
                continue
            shutil.rmtree(path)
        except OSError as exc:
            log.warning("cannot remove the half-made VM directory %s: %s", path, exc)
            continue
        finally:
            os.close(held)
        reason = "left half-made by a crash before its domain existed"
        log.warning("swept %s: %s", path, reason)
        event_log.record(events.SWEPT, name, reason=reason)
        swept.append(name)
    return swept


def _domain_exists(conn: libvirt.virConnect, name: str) -> bool:
    try:
        conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        return bool(exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN)
    return True


def owner_alive(pid: object, start: object) -> bool:
    """Whether the process a VM lives for still runs (a VM for no process counts as orphaned
    only by the other reaper rules)."""
    if not isinstance(pid, int) or isinstance(pid, bool):
        return True
    known_start = start if isinstance(start, int) and not isinstance(start, bool) else None
    return _process_runs(pid, known_start)


def _process_runs(pid: int, start: int | None) -> bool:
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


__all__ = ["REAP_KINDS", "SWEEP_MIN_AGE", "Reap", "owner_alive", "reap_reason", "sweep_half_made"]
