"""Kept snapshots: find, show, boot, export and prune what a job's teardown left behind.

Every VM directory ``<snapshot_dir>/<domain>/`` that holds a ``record.json`` is an *entry*: the
job's boot log and record, and ``snapshot.qcow2`` when the policy kept the disk. An entry belongs
to the owner of its directory (teardown gives it to the job's owner, mode 0700/0600); a caller
sees and touches only their own entries, root sees everyone's. Nothing here changes an entry
except :meth:`SnapshotStore.prune`, which removes whole entries.

* :func:`boot_snapshot` starts a throw-away VM on a private copy of the snapshot (QEMU never
  opens the kept file, so it stays byte-identical) over the same base image, optionally with an
  interactive serial console (:class:`ConsoleBridge`).
* :func:`export_snapshot` flattens snapshot + base into one self-contained qcow2.
* :meth:`SnapshotStore.prune` applies a :class:`~glite_vm.config.Retention` (age, total bytes),
  never touching a VM that still runs.
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
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import libvirt

from glite_vm.config import Retention, Settings
from glite_vm.errors import (
    AccessDeniedError,
    GliteVmError,
    HypervisorError,
    RequestError,
    UserError,
)
from glite_vm.images import leases as lease_files
from glite_vm.images.cache import ImageCache
from glite_vm.images.catalogue import load_catalogue
from glite_vm.images.leases import LeaseRecord
from glite_vm.images.sources import NAME_RE
from glite_vm.request import VMRequest
from glite_vm.vm.domain_xml import DOMAIN_PREFIX, with_serial_console
from glite_vm.vm.lifecycle import Vm, VmHost, boot_log_tail, destroy_domain
from glite_vm.vm.qemu_user import qemu_ids

log = logging.getLogger(__name__)

SNAPSHOT_FILE = "snapshot.qcow2"
RECORD_FILE = "record.json"
BOOT_LOG_FILE = "boot.log"
DOMAIN_XML_FILE = "domain.xml"
OVERLAY_FILE = "overlay.qcow2"  # present while the entry's VM runs
BOOTS_DIR = "snapshot-boots"  # throw-away VMs of `snapshots boot`, beside the snapshot dir
ESCAPE = b"\x1d"  # Ctrl-]
QEMU_IMG_TIMEOUT = 3600.0  # a flattening export of a big disk takes a while
_COPY_CHUNK = 1 << 20
EMPTY_DIR_GRACE = 3600.0  # seconds before prune removes an empty VM directory
_QCOW_MAGIC = b"QFI\xfb"
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_AD_TIMINGS = ("fetch", "boot", "ready", "payload", "teardown")


# --- errors ---------------------------------------------------------------------------------


class SnapshotNotFoundError(UserError, LookupError):
    """No entry of the caller matches the identifier."""

    def __init__(self, ident: str, detail: str = "") -> None:
        super().__init__(
            f"no snapshot matches {ident!r}{detail}; `glite-vm snapshots list` shows yours"
        )
        self.ident = ident


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


# --- entries --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SnapshotEntry:
    """One finished VM directory: its record, and the kept disk when there is one."""

    name: str  # the domain name, also the directory's name
    directory: Path
    owner_uid: int  # the directory's owner: the only non-root user who may use the entry
    owner: str  # the job's owner as the record names it
    job_id: str
    image: str
    image_sha256: str
    base_image: Path | None
    base_format: str
    hypervisor: str
    root: bool
    failed: bool
    exit_code: int | None
    signal: int | None
    finished: float  # when teardown ended (epoch seconds)
    timings: Mapping[str, float | None]
    snapshot: Path | None  # snapshot.qcow2 when kept (and still there)
    snapshot_bytes: int  # disk space of snapshot.qcow2 (0 when not kept)
    total_bytes: int  # disk space of the whole directory

    @property
    def boot_log(self) -> Path:
        return self.directory / BOOT_LOG_FILE

    @property
    def record_path(self) -> Path:
        return self.directory / RECORD_FILE

    @property
    def kept(self) -> bool:
        return self.snapshot is not None

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.finished)

    @property
    def exit_status(self) -> str:
        """``"0"``, ``"3"``, ``"signal 9"``, or ``"none"`` when the payload never ended."""
        if self.signal is not None:
            return f"signal {self.signal}"
        if self.exit_code is not None:
            return str(self.exit_code)
        return "none"

    def ad_attributes(self) -> dict[str, object]:
        """The job-ad attributes this VM's job got (see DESIGN.md, "Contracts")."""
        ad: dict[str, object] = {
            "GliteVmDomain": self.name,
            "GliteVmHypervisor": self.hypervisor,
            "GliteVmImageDigest": self.image_sha256,
            "GliteVmBootLogPath": str(self.boot_log),
            "GliteVmRecordPath": str(self.record_path),
        }
        if self.snapshot is not None:
            ad["GliteVmSnapshotPath"] = str(self.snapshot)
        for phase in _AD_TIMINGS:
            value = self.timings.get(phase)
            if value is not None:
                ad[f"GliteVmTime{phase.capitalize()}"] = round(value, 3)
        return ad

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        return {
            "name": self.name,
            "directory": str(self.directory),
            "owner": self.owner,
            "owner_uid": self.owner_uid,
            "job_id": self.job_id,
            "image": self.image,
            "image_sha256": self.image_sha256,
            "base_image": str(self.base_image) if self.base_image else None,
            "base_format": self.base_format,
            "hypervisor": self.hypervisor,
            "root": self.root,
            "failed": self.failed,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "exit_status": self.exit_status,
            "finished": self.finished,
            "age_seconds": round(self.age(now), 1),
            "kept": "snapshot" if self.kept else "boot log only",
            "snapshot_path": str(self.snapshot) if self.snapshot else None,
            "boot_log_path": str(self.boot_log),
            "record_path": str(self.record_path),
            "snapshot_bytes": self.snapshot_bytes,
            "total_bytes": self.total_bytes,
            "timings": dict(self.timings),
        }


@dataclasses.dataclass(frozen=True)
class PruneDecision:
    entry: SnapshotEntry
    reason: str  # "older than 7d", "over the 50GiB budget"


@dataclasses.dataclass(frozen=True)
class PruneReport:
    retention: Retention
    dry_run: bool
    removed: tuple[PruneDecision, ...]  # (would be) removed, oldest first
    kept: tuple[SnapshotEntry, ...]
    in_use: tuple[str, ...]  # directories of VMs that still run: never touched
    freed_bytes: int
    failures: tuple[str, ...]  # entries that could not be (fully) removed, with the reason
    empty_dirs_removed: tuple[str, ...] = ()  # directories users had emptied (root's prune)


class SnapshotStore:
    """The entries under ``settings.effective_snapshot_dir`` as ``caller_uid`` may see them."""

    def __init__(self, settings: Settings, *, caller_uid: int | None = None) -> None:
        self.settings = settings
        self.root = settings.effective_snapshot_dir
        self.caller_uid = os.geteuid() if caller_uid is None else caller_uid

    @property
    def privileged(self) -> bool:
        return self.caller_uid == 0

    def _dirs(self) -> Iterator[tuple[Path, os.stat_result]]:
        """Every VM directory (never a symlink), with its lstat."""
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return
        except PermissionError as exc:
            raise AccessDeniedError(
                f"cannot list the snapshot directory {self.root}: {exc.strerror}; "
                "it must be listable (0755) for users to find their snapshots"
            ) from None
        for name in names:
            if not name.startswith(DOMAIN_PREFIX):
                continue
            path = self.root / name
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                yield path, st

    def _may_use(self, st: os.stat_result) -> bool:
        return self.privileged or st.st_uid == self.caller_uid

    def entries(self, *, all_users: bool = False) -> list[SnapshotEntry]:
        """Finished entries, oldest first: the caller's own, or everyone's (root only)."""
        if all_users and not self.privileged:
            raise AccessDeniedError("only root may list every user's snapshots (--all)")
        out = []
        for path, st in self._dirs():
            if st.st_uid != self.caller_uid and not all_users:
                continue
            entry = self._read(path, st)
            if entry is not None:
                out.append(entry)
        return sorted(out, key=lambda e: (e.finished, e.name))

    def _read(self, path: Path, st: os.stat_result) -> SnapshotEntry | None:
        try:
            data = _read_record(path / RECORD_FILE)
        except FileNotFoundError:
            return None  # still running, or torn down by a crash before the record
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: unreadable %s: %s", path, RECORD_FILE, exc)
            return None
        return _entry_from_record(path, st, data)

    def find(self, ident: str) -> SnapshotEntry:
        """The one entry ``ident`` names: domain name, job id (``1234.0``, or ``1234`` when
        the cluster has one such entry), or a unique prefix of a domain name.

        Root may name anyone's entry. Another user's entry is an AccessDeniedError (the names of
        VM directories are visible to everyone; their contents are not).
        """
        ident = ident.strip()
        if not ident:
            raise RequestError("ID", "is empty; give a domain name, a prefix of one or a job id")
        mine = self.entries(all_users=self.privileged)
        exact = [e for e in mine if e.name == ident]
        if exact:
            return exact[0]
        by_job = [e for e in mine if e.job_id == ident]
        if not by_job:  # "1234" for the job 1234.0 (HTCondor's cluster.proc)
            by_job = [e for e in mine if e.job_id.startswith(ident + ".")]
        if len(by_job) == 1:
            return by_job[0]
        if len(by_job) > 1:
            raise RequestError("ID", _ambiguous(ident, [e.name for e in by_job], "job id"))
        by_prefix = [e for e in mine if e.name.startswith(ident)]
        if len(by_prefix) == 1:
            return by_prefix[0]
        if len(by_prefix) > 1:
            raise RequestError("ID", _ambiguous(ident, [e.name for e in by_prefix], "prefix"))
        others = [
            path.name
            for path, st in self._dirs()
            if not self._may_use(st) and (path.name == ident or path.name.startswith(ident))
        ]
        if others:
            raise AccessDeniedError(
                f"permission denied: snapshot {others[0]} belongs to another user; "
                "only its owner (or root) may list, show, boot or export it"
            )
        raise SnapshotNotFoundError(ident)

    # -- prune ---------------------------------------------------------------------------------

    def prune(
        self,
        retention: Retention | None = None,
        *,
        dry_run: bool = False,
        all_users: bool = False,
        running: Collection[str] = (),
        now: float | None = None,
    ) -> PruneReport:
        """Remove entries older than ``retention.max_age``, then the oldest ones until the rest
        fit in ``retention.max_bytes``. ``running``: names of domains that exist (libvirt);
        an entry whose VM still runs, or whose directory still holds a live overlay, is never
        touched. Root with ``all_users`` prunes everyone's entries against one budget."""
        policy = self.settings.snapshot_retention if retention is None else retention
        now = time.time() if now is None else now
        in_use: list[str] = []
        candidates: list[SnapshotEntry] = []
        for entry in self.entries(all_users=all_users):
            if entry.name in running or (entry.directory / OVERLAY_FILE).exists():
                in_use.append(entry.name)
            else:
                candidates.append(entry)
        removed: list[PruneDecision] = []
        kept: list[SnapshotEntry] = []
        for entry in candidates:
            if policy.max_age is not None and entry.age(now) > policy.max_age:
                removed.append(PruneDecision(entry, f"older than {_retention_age(policy)}"))
            else:
                kept.append(entry)
        if policy.max_bytes is not None:
            total = sum(e.total_bytes for e in kept)
            budget = str(Retention(None, policy.max_bytes))
            while kept and total > policy.max_bytes:
                oldest = kept.pop(0)
                total -= oldest.total_bytes
                removed.append(PruneDecision(oldest, f"over the {budget} budget"))
        failures: list[str] = []
        freed = 0
        emptied = [] if dry_run else self._remove_empty_dirs(all_users, now)
        for decision in removed:
            if dry_run:
                freed += decision.entry.total_bytes
                continue
            problem = _remove_entry(decision.entry)
            if problem:
                failures.append(f"{decision.entry.name}: {problem}")
            else:
                freed += decision.entry.total_bytes
        return PruneReport(
            retention=policy,
            dry_run=dry_run,
            removed=tuple(removed),
            kept=tuple(kept),
            in_use=tuple(in_use),
            freed_bytes=freed,
            failures=tuple(failures),
            empty_dirs_removed=tuple(emptied),
        )

    def _remove_empty_dirs(self, all_users: bool, now: float) -> list[str]:
        """VM directories emptied by their owner's prune (a user may empty but not remove
        their directory in root's snapshot dir). Only old ones: a VM directory is empty for a
        moment while its VM is being created."""
        out = []
        for path, st in self._dirs():
            if st.st_uid != self.caller_uid and not all_users:
                continue
            if now - st.st_mtime < EMPTY_DIR_GRACE:
                continue
            try:
                path.rmdir()  # only succeeds when empty
            except OSError:
                continue
            out.append(path.name)
        return out


def _ambiguous(ident: str, names: list[str], what: str) -> str:
    return f"{ident!r} matches {len(names)} snapshots as a {what}: {', '.join(names)}"


def _retention_age(policy: Retention) -> str:
    return str(Retention(policy.max_age, None))


def _read_record(path: Path) -> dict[str, Any]:
    # O_NOFOLLOW: the directory is its owner's, and root reads it for them.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        raw = f.read(1 << 20)
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _entry_from_record(path: Path, st: os.stat_result, data: Mapping[str, Any]) -> SnapshotEntry:
    def text(key: str, default: str = "") -> str:
        value = data.get(key)
        return value if isinstance(value, str) else default

    def number(key: str) -> int | None:
        value = data.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    snapshot = path / SNAPSHOT_FILE
    try:
        snap_st: os.stat_result | None = os.lstat(snapshot)
    except OSError:
        snap_st = None
    kept = snap_st is not None and stat.S_ISREG(snap_st.st_mode)
    raw_timings = data.get("timings")
    timings: dict[str, float | None] = {}
    if isinstance(raw_timings, dict):
        for key, value in raw_timings.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                timings[str(key)] = float(value)
            elif value is None:
                timings[str(key)] = None
    finished = data.get("finished")
    if not isinstance(finished, int | float) or isinstance(finished, bool):
        finished = os.lstat(path / RECORD_FILE).st_mtime
    base = text("base_image")
    return SnapshotEntry(
        name=path.name,
        directory=path,
        owner_uid=st.st_uid,
        owner=text("owner", "?"),
        job_id=text("job_id", "?"),
        image=text("image", "?"),
        image_sha256=text("image_sha256"),
        base_image=Path(base) if base else None,
        base_format=text("base_format", "qcow2"),
        hypervisor=text("hypervisor", "?"),
        root=data.get("root") is True,
        failed=data.get("failed") is True,
        exit_code=number("exit_code"),
        signal=number("signal"),
        finished=float(finished),
        timings=timings,
        snapshot=snapshot if kept else None,
        snapshot_bytes=_allocated(snap_st) if kept and snap_st else 0,
        total_bytes=_du(path),
    )


def _allocated(st: os.stat_result) -> int:
    return st.st_blocks * 512


def _du(path: Path) -> int:
    """Disk space of a VM directory (its files are flat; sub-directories are counted too)."""
    total = 0
    try:
        with os.scandir(path) as it:
            for item in it:
                try:
                    st = item.stat(follow_symlinks=False)
                except OSError:
                    continue
                total += _allocated(st)
                if stat.S_ISDIR(st.st_mode):
                    total += _du(Path(item.path))
    except OSError:
        pass
    return total


def _remove_entry(entry: SnapshotEntry) -> str:
    """Delete an entry's directory; an error text, or "" when it is gone."""
    problems: list[str] = []

    def note(_func: object, path: str, exc_info: tuple[type, BaseException, object]) -> None:
        problems.append(f"{path}: {exc_info[1]}")

    # rmtree never follows symlinks inside the directory.
    shutil.rmtree(entry.directory, onerror=note)
    if entry.directory.exists() and any(entry.directory.iterdir()):
        return "; ".join(problems) or "not removed"
    # A user may not remove their (emptied) directory from root's snapshot dir: harmless.
    return ""


def boot_log_text(entry: SnapshotEntry, lines: int) -> str:
    """The last ``lines`` lines of the entry's boot log ('' when there is none)."""
    if os.path.islink(entry.boot_log):
        return ""
    return boot_log_tail(entry.boot_log, lines)


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
    direct-kernel boot at all, its command line and its size.
    """
    original = _original_domain(entry)
    record = _read_record_quietly(entry)
    kernel = _path_or_none(record.get("kernel"))
    initrd = _path_or_none(record.get("initrd"))
    cmdline = record.get("cmdline") if isinstance(record.get("cmdline"), str) else None
    cmdline = cmdline or original.cmdline
    guest_user = record.get("guest_user") if isinstance(record.get("guest_user"), str) else None
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
    path = entry.directory / DOMAIN_XML_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            root = ET.fromstring(f.read(1 << 20))  # noqa: S314 - our own domain XML
    except (OSError, ET.ParseError):
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


def _read_record_quietly(entry: SnapshotEntry) -> dict[str, Any]:
    try:
        return _read_record(entry.record_path)
    except (OSError, ValueError):
        return {}


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
    """An fd of the kept snapshot, refusing symlinks and anything but a plain qcow2 without an
    external data file (which would make QEMU open another host file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise SnapshotUnusableError(entry.name, f"cannot open {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotUnusableError(entry.name, f"{path} is not a regular file")
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


def _chain_json(snapshot: str, base: Path, base_format: str) -> str:
    """A qemu ``json:`` filename pinning the chain: the snapshot's header does not choose its
    backing file or probe formats."""
    doc = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": snapshot},
        "backing": {"driver": base_format, "file": {"driver": "file", "filename": str(base)}},
    }
    return "json:" + json.dumps(doc)


def _qemu_img(argv: list[str], what: str, *, fd: int | None = None) -> str:
    try:
        proc = subprocess.run(
            ["qemu-img", *argv],
            capture_output=True,
            text=True,
            timeout=QEMU_IMG_TIMEOUT,
            check=False,
            pass_fds=(fd,) if fd is not None else (),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HypervisorError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        raise HypervisorError(f"{what}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of a qcow2 file we made (format pinned, backing not opened)."""
    out = _qemu_img(["info", "-U", "--output=json", "-f", "qcow2", str(path)], f"inspecting {path}")
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

    The image is written beside ``dest`` under a temporary name, checked with ``qemu-img
    check``, and only then moved into place (mode 0600: it holds the job's data), so ``dest``
    never holds half an image. Refuses to replace ``dest`` unless ``force``.
    """
    t0 = time.monotonic()
    snapshot, base = _require_disk(entry)
    dest = Path(os.path.abspath(dest))
    if dest.is_dir():
        raise RequestError("FILE", f"{dest} is a directory; name the image file to write")
    if not force and os.path.lexists(dest):
        raise ExportExistsError(dest)
    if not dest.parent.is_dir():
        raise RequestError("FILE", f"the directory {dest.parent} does not exist")
    fd = _open_snapshot(entry, snapshot)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(4)}.part"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        argv = ["convert", "-O", "qcow2", *(["-c"] if compress else [])]
        argv += [_chain_json(f"/dev/fd/{fd}", base, entry.base_format), str(tmp)]
        _qemu_img(argv, f"exporting {entry.name}", fd=fd)
        _qemu_img(["check", "-q", "-f", "qcow2", str(tmp)], f"checking the export of {entry.name}")
        info = qemu_img_info(tmp)
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise HypervisorError(f"the export of {entry.name} still has a backing file")
        if force:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)  # fails rather than replace a file that appeared meanwhile
            except FileExistsError:
                raise ExportExistsError(dest) from None
            tmp.unlink()
    finally:
        os.close(fd)
        tmp.unlink(missing_ok=True)
    return ExportResult(
        path=dest,
        virtual_size=int(info.get("virtual-size", 0)),
        file_bytes=dest.stat().st_size,
        seconds=time.monotonic() - t0,
    )


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
        copy = workspace / SNAPSHOT_FILE
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
