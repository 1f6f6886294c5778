"""One VM directory as an entry: what its record (or, without one, its domain XML) tells, read
safely from a directory its owner controls.

A directory with a readable ``record.json`` is a *finished* entry; one without a usable record
is *incomplete* (its VM still runs, or its run ended without a teardown), listed with what is
known. Everything is read by descriptor (:mod:`glite_vm._dirfd`): never through a link, never
blocking on a FIFO, bounded; strings from the owner's files are made printable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import stat
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from pathlib import Path

from glite_vm import _dirfd
from glite_vm.vm.domain_xml import METADATA_NS
from glite_vm.vm.record import (
    BOOT_LOG,
    DOMAIN_XML,
    MAX_RECORD_BYTES,
    RECORD,
    SNAPSHOT,
    JobRecord,
    Timings,
    VmFiles,
    ad_attributes,
    text,
)

MAX_DOMAIN_XML_BYTES = 1 << 20
_PHASES = frozenset(f.name for f in dataclasses.fields(Timings))
FINISHED = "finished"
INCOMPLETE = "incomplete"


@dataclasses.dataclass(frozen=True)
class SnapshotEntry:
    """One VM directory: its record, and the kept disk when there is one."""

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
    finished: float  # when teardown ended (incomplete: the last change in the directory)
    timings: Mapping[str, float | None]
    snapshot: Path | None  # snapshot.qcow2 when kept (and still there)
    snapshot_bytes: int  # disk space of snapshot.qcow2 (0 when not kept)
    total_bytes: int  # disk space of the whole directory
    state: str = FINISHED  # or INCOMPLETE: no usable record.json (see detail)
    detail: str = ""  # why an entry is incomplete
    size_complete: bool = True  # False: the tree is too deep or too large to count it all

    @property
    def boot_log(self) -> Path:
        return VmFiles(self.directory).boot_log

    @property
    def record_path(self) -> Path:
        return VmFiles(self.directory).record

    @property
    def kept(self) -> bool:
        return self.snapshot is not None

    @property
    def complete(self) -> bool:
        return self.state == FINISHED

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

    @property
    def kept_text(self) -> str:
        if not self.complete:
            return INCOMPLETE
        return "snapshot" if self.kept else "boot log only"

    def ad_attributes(self) -> dict[str, object]:
        """The job-ad attributes this VM's job got (see DESIGN.md, "Contracts")."""
        known = {k: v for k, v in self.timings.items() if k in _PHASES}
        return dict(
            ad_attributes(
                domain=self.name,
                hypervisor=self.hypervisor,
                image_digest=self.image_sha256,
                boot_log=self.boot_log,
                record=self.record_path,
                snapshot=self.snapshot,
                timings=known,
            )
        )

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        return {
            "name": self.name,
            "state": self.state,
            "detail": self.detail,
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
            "kept": self.kept_text,
            "snapshot_path": str(self.snapshot) if self.snapshot else None,
            "boot_log_path": str(self.boot_log),
            "record_path": str(self.record_path),
            "snapshot_bytes": self.snapshot_bytes,
            "total_bytes": self.total_bytes,
            "size_complete": self.size_complete,
            "timings": dict(self.timings),
        }


@contextlib.contextmanager
def open_entry(entry: SnapshotEntry) -> Iterator[int]:
    """A descriptor of the entry's directory, reached from the snapshot directory without
    following a link."""
    root_fd = os.open(entry.directory.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        dir_fd = _dirfd.open_dir(entry.name, dir_fd=root_fd)
    finally:
        os.close(root_fd)
    try:
        yield dir_fd
    finally:
        os.close(dir_fd)


def read_entry_file(entry: SnapshotEntry, name: str, limit: int) -> bytes:
    """The whole of regular file ``name`` in the entry's directory (at most ``limit`` bytes);
    OSError when it is not there, not a regular file, or larger."""
    with open_entry(entry) as dir_fd:
        return _dirfd.read_small(dir_fd, name, limit)[0]


def open_entry_file(entry: SnapshotEntry, name: str) -> int:
    """A read-only descriptor of regular file ``name`` in the entry's directory (never a link,
    never blocking on a FIFO)."""
    with open_entry(entry) as dir_fd:
        return _dirfd.open_regular(dir_fd, name)[0]


def read_record(entry: SnapshotEntry) -> JobRecord | None:
    """The entry's record (``None`` when there is none that can be used)."""
    try:
        return JobRecord.from_json(read_entry_file(entry, RECORD, MAX_RECORD_BYTES))
    except (OSError, ValueError):
        return None


def boot_log_text(entry: SnapshotEntry, lines: int) -> str:
    """The last ``lines`` lines of the entry's boot log ('' when there is none)."""
    try:
        with open_entry(entry) as dir_fd:
            raw = _dirfd.read_tail(dir_fd, BOOT_LOG, 16384)
    except OSError:
        return ""
    text = raw.decode("utf-8", errors="replace").replace("\r", "")
    # What the guest printed is the job's: no terminal escapes reach the reader's terminal.
    tail = text.splitlines()[-lines:] if lines > 0 else []
    return "\n".join(
        "".join(c if c.isprintable() or c == "\t" else "?" for c in line) for line in tail
    )


def read_entry(path: Path, dir_fd: int) -> SnapshotEntry:
    st = os.fstat(dir_fd)
    usage = _dirfd.disk_usage(dir_fd)
    try:
        raw, record_st = _dirfd.read_small(dir_fd, RECORD, MAX_RECORD_BYTES)
        record = JobRecord.from_json(raw)
    except FileNotFoundError:
        why = "no record.json: its VM still runs, or its run ended without a teardown"
        return incomplete_entry(path, st, usage, _job_metadata(dir_fd), why)
    except _dirfd.NotRegularError:
        return incomplete_entry(path, st, usage, _job_metadata(dir_fd), "record.json is no file")
    except _dirfd.TooLargeError:
        why = f"record.json is larger than {MAX_RECORD_BYTES} bytes"
        return incomplete_entry(path, st, usage, _job_metadata(dir_fd), why)
    except OSError as exc:
        why = f"record.json cannot be read: {exc.strerror}"
        return incomplete_entry(path, st, usage, _job_metadata(dir_fd), why)
    except ValueError:
        why = "record.json is not a JSON object"
        return incomplete_entry(path, st, usage, _job_metadata(dir_fd), why)
    snap = _dirfd.lstat_at(dir_fd, SNAPSHOT)
    return _entry_from_record(path, st, usage, record, record_mtime=record_st.st_mtime, snap=snap)


def _entry_from_record(
    path: Path,
    st: os.stat_result,
    usage: _dirfd.Usage,
    record: JobRecord,
    *,
    record_mtime: float,
    snap: os.stat_result | None,
) -> SnapshotEntry:
    kept = snap is not None and stat.S_ISREG(snap.st_mode)
    finished = record.finished
    if not 0 < finished <= time.time() + 86400:
        finished = record_mtime
    return SnapshotEntry(
        name=path.name,
        directory=path,
        owner_uid=st.st_uid,
        owner=record.owner,
        job_id=record.job_id,
        image=record.image,
        image_sha256=record.image_sha256,
        base_image=Path(record.base_image) if record.base_image else None,
        base_format=record.base_format,
        hypervisor=record.hypervisor,
        root=record.root,
        failed=record.failed,
        exit_code=record.exit_code,
        signal=record.signal,
        finished=finished,
        timings=dict(record.timings),
        snapshot=VmFiles(path).snapshot if kept else None,
        snapshot_bytes=snap.st_blocks * 512 if kept and snap is not None else 0,
        total_bytes=usage.bytes,
        size_complete=usage.complete,
    )


def incomplete_entry(
    path: Path, st: os.stat_result, usage: _dirfd.Usage, meta: Mapping[str, str], why: str
) -> SnapshotEntry:
    return SnapshotEntry(
        name=path.name,
        directory=path,
        owner_uid=st.st_uid,
        owner=text(meta.get("owner"), account_name(st.st_uid)),
        job_id=text(meta.get("job_id")),
        image=text(meta.get("image")),
        image_sha256=text(meta.get("image_sha256"), ""),
        base_image=None,
        base_format="qcow2",
        hypervisor="?",
        root=False,
        failed=True,
        exit_code=None,
        signal=None,
        finished=usage.newest,
        timings={},
        snapshot=None,
        snapshot_bytes=0,
        total_bytes=usage.bytes,
        state=INCOMPLETE,
        detail=why,
        size_complete=usage.complete,
    )


def read_domain_xml(dir_fd: int) -> ET.Element | None:
    """The VM's ``domain.xml`` in the directory ``dir_fd``, parsed (None when it cannot be)."""
    try:
        raw, _st = _dirfd.read_small(dir_fd, DOMAIN_XML, MAX_DOMAIN_XML_BYTES)
        return ET.fromstring(raw)  # noqa: S314 - bounded; expat refuses entity expansion bombs
    except (OSError, ET.ParseError, ValueError, RecursionError):
        return None


def _job_metadata(dir_fd: int) -> dict[str, str]:
    """What the VM's ``domain.xml`` says about its job ({} when it says nothing usable)."""
    root = read_domain_xml(dir_fd)
    job = None if root is None else root.find(f"metadata/{{{METADATA_NS}}}job")
    if job is None:
        return {}
    return {child.tag.rsplit("}", 1)[-1]: child.text or "" for child in job}


def account_name(uid: int) -> str:
    """The name of ``uid``'s account, or ``uid<N>`` when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"
