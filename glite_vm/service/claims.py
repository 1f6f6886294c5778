"""Which HTCondor claim a caller of the service acts for, as the kernel shows it.

A call from inside a job (the PREPARE_JOB hook, the launcher, a ``condor_ssh_to_job`` shell)
comes from a descendant of that job's ``condor_starter``, which the startd runs as root with the
slot's name in its arguments (measured on HTCondor 25.0: ``condor_starter -f -local-name
slot_type_2 -a slot3 <address>``). :func:`find_claim` walks up from the caller's pid (from
``SO_PEERCRED``: the caller cannot choose it) to the first ``condor_starter`` and believes it
only when its *real* uid is 0, which no local user can give a process of their own. The slot's
facts then come from the service's own :class:`~glite_vm.slots.SlotLayout`, never from a machine
ad the caller sends.

Everything here reads ``/proc`` (the service runs as root and may read every process's
``exe``); a process that vanishes meanwhile simply ends the walk.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Final

from glite_vm.images.leases import process_start_time

STARTER: Final = "condor_starter"
MAX_HOPS: Final = 16  # processes between a caller and its starter (hook, shells, sshd, ...)
_PROC = Path("/proc")


@dataclasses.dataclass(frozen=True)
class Claim:
    """The slot a caller's job runs in, and the starter whose life is the job's."""

    slot: str  # "slot3", or "slot1_2" for a dynamic slot
    starter_pid: int
    starter_start: int | None  # its start time, so a recycled pid is not taken for it


def find_claim(pid: int, proc: Path = _PROC) -> Claim | None:
    """The claim of the root-run ``condor_starter`` that ``pid`` descends from, if any.

    ``None`` when no ancestor (within :data:`MAX_HOPS`) is a starter, when the first starter
    found is not run by root (anyone can copy a binary and call it condor_starter), or when
    its arguments name no slot."""
    for _ in range(MAX_HOPS):
        if pid <= 1:
            return None
        status = _status(proc, pid)
        if status is None:
            return None
        if _exe_name(proc, pid) == STARTER:
            if status.get("Uid", "").split()[:1] != ["0"]:
                return None
            slot = slot_argument(_cmdline(proc, pid))
            if slot is None:
                return None
            return Claim(slot, pid, process_start_time(pid))
        try:
            pid = int(status.get("PPid", "0"))
        except ValueError:
            return None
    return None


def process_uids(pid: int, proc: Path = _PROC) -> tuple[int, ...]:
    """The real, effective, saved and file-system uids of process ``pid`` (empty if gone)."""
    status = _status(proc, pid)
    if status is None:
        return ()
    try:
        return tuple(int(u) for u in status.get("Uid", "").split())
    except ValueError:
        return ()


def slot_argument(argv: list[str]) -> str | None:
    """The slot name a starter's arguments give after ``-a`` (the first one only)."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-a":
            return argv[i + 1] or None
    return None


def _status(proc: Path, pid: int) -> dict[str, str] | None:
    try:
        text = (proc / str(pid) / "status").read_text(errors="replace")
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def _exe_name(proc: Path, pid: int) -> str | None:
    try:
        target = os.readlink(proc / str(pid) / "exe")
    except OSError:
        return None
    return os.path.basename(target.removesuffix(" (deleted)"))  # a binary replaced by an upgrade


def _cmdline(proc: Path, pid: int) -> list[str]:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0")[:-1]]


__all__ = ["Claim", "find_claim", "process_uids", "slot_argument"]
