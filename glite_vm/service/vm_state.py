"""What the service knows of each of its VMs, in memory and in the VM's state file.

In memory a live VM is a :class:`VmRecord` (the :class:`~glite_vm.vm.lifecycle.Vm`, its owner,
the starter and scratch directory its life is bound to, its cache lease), and a torn-down one a
:class:`FinishedVm` (the outcome a second teardown gets again). On disk each is one state file
``<state dir>/service/vms/<domain>.json`` (:class:`StateDir`), whose format is defined here
only: :meth:`VmRecord.to_state` writes it, :func:`record_from_state` and :func:`finished_from_state`
read it back after a restart. A domain whose state file is missing is rebuilt from its libvirt
metadata (:func:`record_from_metadata`), enough for teardown and the reaper only.

Invariants. The state directory is root's, 0700, and each file 0600. A state file appears only
by ``rename`` of a complete temporary file created with ``O_EXCL | O_NOFOLLOW``, so a reader
never sees half a state and a planted link is never written through; a temporary file a crash
left behind (its name starts with a dot) is removed by the next read. A state file carries
:data:`STATE_VERSION`; one of another version is not adopted. Once a VM is torn down its state
file holds ``finished`` (outcome, time, reason) and nothing is served from it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import libvirt

from glite_vm.images.acquire import ImageLease
from glite_vm.request import DebugHoldGrant, KeepSnapshot, VMRequest
from glite_vm.service.api import TeardownOutcome
from glite_vm.service.debug_hold import DebugHoldState
from glite_vm.vm.domain_xml import JobMetadata
from glite_vm.vm.lifecycle import BaseImage, Vm, VmHost
from glite_vm.vm.record import Timings, VmFiles

log = logging.getLogger(__name__)

STATE_VERSION = 1


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
        debug: DebugHoldGrant | None = None,
    ) -> None:
        self.vm = vm
        self.owner_uid = owner_uid
        self.scratch_dir = scratch_dir
        self.starter_pid = starter_pid
        self.starter_start = starter_start
        self.lease_job_id = lease_job_id
        self.created = created
        self.lease = lease
        # adopted without a state file, or before its preparation ended: teardown and reaping
        # only (nothing runs in a guest whose refresh, account or identity may be missing)
        self.state_lost = state_lost
        self.adopted = adopted
        self.managed = managed  # started for a HTCondor job (else: capped per user, and in age)
        self.ad_attributes: dict[str, object] = {}
        self.io_lock = threading.Lock()  # push, exec and pull share the transfer disk
        self.debug = DebugHoldState(debug)  # kept running after a failed payload?

    @property
    def name(self) -> str:
        return self.vm.name

    @property
    def booting(self) -> bool:
        """Is this process's prepare still waiting for the VM (its ad attributes, written when
        it is ready, are not there yet)? That prepare watches the domain and ends it itself."""
        return not self.adopted and not self.ad_attributes

    @property
    def owner(self) -> str:
        return self.vm.request.owner

    def running(self) -> bool:
        try:
            return self.vm.domain is not None and bool(self.vm.domain.isActive())
        except libvirt.libvirtError:
            return False

    def to_state(self, finished: FinishedVm | None = None) -> dict[str, Any]:
        """The record's state file (``finished``: it was torn down so)."""
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
            "debug_hold": {"seconds": self.debug.grant.seconds, "note": self.debug.grant.note},
            "finished": _finished_state(finished) if finished is not None else None,
        }


@dataclasses.dataclass(frozen=True)
class FinishedVm:
    """A torn-down VM, remembered so that teardown stays idempotent."""

    name: str
    owner_uid: int
    outcome: TeardownOutcome
    at: float
    reason: str | None  # why the reaper took it; None for an ordinary teardown


def finished_from_state(name: str, state: dict[str, Any]) -> FinishedVm | None:
    """The torn-down VM a state file remembers; ``None`` while its VM was not torn down.
    Raises KeyError, TypeError or ValueError for a state that cannot be read."""
    finished = state.get("finished")
    if not isinstance(finished, dict):
        return None
    return FinishedVm(
        name=name,
        owner_uid=int(state["owner_uid"]),
        outcome=TeardownOutcome(**finished["outcome"]),
        at=float(finished["at"]),
        reason=finished.get("reason"),
    )


def record_from_state(
    host: VmHost, state: dict[str, Any], dom: libvirt.virDomain | None
) -> VmRecord:
    """The record a state file describes, adopted (its domain ``dom``, or ``None`` when the
    domain is gone). Raises KeyError, TypeError or ValueError for a state that cannot be read."""
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"state version {state.get('version')!r}")
    req = dict(state["request"])
    req["keep_snapshot"] = KeepSnapshot(req["keep_snapshot"])
    request = VMRequest(**req)
    image = StoredImage.from_dict(state["image"])
    vm = Vm(
        host,
        str(state["vm"]),
        Path(state["vm_dir"]),
        request,
        image,
        owner_uid=int(state["owner_uid"]),
    )
    vm.domain = dom
    timings = state.get("timings") or {}
    vm.timings = Timings(**{k: timings.get(k) for k in Timings.__dataclass_fields__})
    # Ad attributes are written once the VM is ready: a state without them is of a VM whose
    # preparation the service did not finish (a warm start perhaps not yet refreshed).
    prepared = bool(state.get("ad_attributes"))
    record = VmRecord(
        vm,
        owner_uid=int(state["owner_uid"]),
        scratch_dir=state.get("scratch_dir"),
        starter_pid=state.get("starter_pid"),
        starter_start=state.get("starter_start"),
        lease_job_id=state.get("lease_job_id"),
        created=float(state["created"]),
        state_lost=bool(state.get("state_lost")) or not prepared,
        adopted=True,
        managed=state.get("managed") is not False,
    )
    record.ad_attributes = dict(state.get("ad_attributes") or {})
    debug = state.get("debug_hold")
    if isinstance(debug, dict):  # absent in states of older releases
        grant = DebugHoldGrant(int(debug.get("seconds") or 0), str(debug.get("note") or ""))
        record.debug = DebugHoldState(grant)
    return record


def record_from_metadata(host: VmHost, dom: libvirt.virDomain, meta: JobMetadata) -> VmRecord:
    """A domain without a state file (the service died between its start and the state
    file): enough to reap and tear it down, not to run anything in it."""
    base_path, base_format = _base_image(dom.XMLDesc(0), VmFiles(Path(meta.vm_dir)))
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
    vm = Vm(host, dom.name(), Path(meta.vm_dir), request, image, owner_uid=meta.owner_uid)
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


class StateDir:
    """The directory of state files, one per VM (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, name: str, state: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path.chmod(0o700)
        tmp = self.path / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, indent=1)
            f.write("\n")
        tmp.replace(self.path / f"{name}.json")

    def remove(self, name: str) -> None:
        (self.path / f"{name}.json").unlink(missing_ok=True)

    def read_all(self) -> dict[str, dict[str, Any]]:
        """Every readable state, by VM name (unreadable ones are logged and skipped)."""
        states: dict[str, dict[str, Any]] = {}
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return states
        for entry in names:
            path = self.path / entry
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


def _finished_state(finished: FinishedVm) -> dict[str, Any]:
    return {
        "outcome": dataclasses.asdict(finished.outcome),
        "at": finished.at,
        "reason": finished.reason,
    }


def _base_image(domain_xml: str, files: VmFiles) -> tuple[Path, str]:
    """The cached base image of the root disk and its format: the first backing store, or for
    a warm-started VM the one under its template layer (``files.template_layer``), which a
    kept snapshot is merged onto at teardown."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - libvirt's own output
    parent = root.find("./devices/disk")
    backing = parent.find("backingStore") if parent is not None else None
    while backing is not None:
        source = backing.find("source")
        path = source.get("file") if source is not None else None
        if path is None or Path(path) != files.template_layer:
            fmt = backing.find("format")
            kind = (fmt.get("type") if fmt is not None else None) or "qcow2"
            return Path(path or "/nonexistent"), kind
        backing = backing.find("backingStore")
    return Path("/nonexistent"), "qcow2"


__all__ = [
    "STATE_VERSION",
    "FinishedVm",
    "StateDir",
    "StoredImage",
    "VmRecord",
    "finished_from_state",
    "record_from_metadata",
    "record_from_state",
]
