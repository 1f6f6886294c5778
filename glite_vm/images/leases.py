"""Leases: who is using a cached file. One small JSON file per lease, removed on release.

A lease names the job, the process that holds it (pid plus the process's start time, so a
recycled pid does not keep a dead lease alive) and when it was taken. Eviction never removes a
file with a live lease; leases whose process is gone are deleted whenever they are looked at.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import time
from pathlib import Path

from glite_vm.errors import CacheFullError
from glite_vm.images._fsutil import is_disk_full, unlink_quietly


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    lease_id: str
    sha256: str
    job_id: str
    pid: int
    pid_start: int | None
    created: float
    path: Path

    @property
    def alive(self) -> bool:
        return process_alive(self.pid, self.pid_start)

    def as_dict(self) -> dict[str, object]:
        return {
            "lease_id": self.lease_id,
            "sha256": self.sha256,
            "job_id": self.job_id,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "created": self.created,
            "host": socket.gethostname(),
        }


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields follow the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start: int | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is None:
        return True
    now = process_start_time(pid)
    return now is None or now == start


def write_lease(directory: Path, sha256: str, job_id: str, pid: int | None = None) -> LeaseRecord:
    """Record a lease on ``sha256`` under ``directory`` (the cache's leases/ directory)."""
    owner = os.getpid() if pid is None else pid
    lease_id = f"{owner}-{secrets.token_hex(6)}"
    record = LeaseRecord(
        lease_id=lease_id,
        sha256=sha256,
        job_id=job_id,
        pid=owner,
        pid_start=process_start_time(owner),
        created=time.time(),
        path=directory / sha256 / f"{lease_id}.json",
    )
    _store(record)
    return record


def rebind_lease(record: LeaseRecord, pid: int) -> LeaseRecord:
    """The same lease, now held by process ``pid`` (e.g. the VM's QEMU process)."""
    moved = dataclasses.replace(record, pid=pid, pid_start=process_start_time(pid))
    _store(moved)
    return moved


def _store(record: LeaseRecord) -> None:
    data = json.dumps(record.as_dict()).encode()
    tmp = record.path.with_name(f".{record.path.name}.tmp")
    try:
        record.path.parent.mkdir(parents=True, exist_ok=True)
        # Not fsynced: after a power cut every holder is dead anyway.
        tmp.write_bytes(data)
        os.replace(tmp, record.path)
    except OSError as exc:
        unlink_quietly(tmp)
        if is_disk_full(exc):
            raise CacheFullError("the disk under the image cache is full") from exc
        raise


def remove_lease(record: LeaseRecord) -> bool:
    """Delete the lease; True when it still existed. Safe to call any number of times."""
    # The directory stays: removing it could race with a lease being written (the cache removes
    # it together with the file, under the file's lock).
    try:
        record.path.unlink()
    except FileNotFoundError:
        return False
    return True


def read_leases(directory: Path, sha256: str) -> list[LeaseRecord]:
    out: list[LeaseRecord] = []
    try:
        names = os.listdir(directory / sha256)
    except (FileNotFoundError, NotADirectoryError):
        return out
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        record = _parse(directory / sha256 / name, sha256)
        if record is not None:
            out.append(record)
    return out


def _parse(path: Path, sha256: str) -> LeaseRecord | None:
    try:
        data = json.loads(path.read_bytes())
        pid_start = data.get("pid_start")
        return LeaseRecord(
            lease_id=str(data["lease_id"]),
            sha256=sha256,
            job_id=str(data["job_id"]),
            pid=int(data["pid"]),
            pid_start=int(pid_start) if pid_start is not None else None,
            created=float(data["created"]),
            path=path,
        )
    except FileNotFoundError:
        return None  # released while we looked
    except (OSError, ValueError, KeyError, TypeError):
        # A torn write cannot happen (rename), so this is junk: treat it as a dead lease.
        return LeaseRecord(path.stem, sha256, "?", 0, None, 0.0, path)


def live_leases(directory: Path, sha256: str, *, reap: bool = True) -> list[LeaseRecord]:
    """Leases on ``sha256`` whose holder is alive; dead ones are deleted when ``reap``."""
    live = []
    for record in read_leases(directory, sha256):
        if record.alive:
            live.append(record)
        elif reap:
            remove_lease(record)
    return live


def all_lease_keys(directory: Path) -> list[str]:
    try:
        return [n for n in os.listdir(directory) if not n.startswith(".")]
    except FileNotFoundError:
        return []
