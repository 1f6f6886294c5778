"""Moving a job's files with the job owner's rights, not the service's.

The service runs as root; a job's input directory is the owner's. Reading it as root would let
a hard link (or a ``..`` path) to a root-only file carry that file into the guest, and writing
output as root would let a symlink in the destination redirect it. So the service opens the
VM's transfer disk itself and runs the copy in a child process under the caller's uid, gid and
supplementary groups, which receives only that one open descriptor
(:mod:`glite_vm.service._sandbox_io`). When the caller is the service's own user (a single
user's in-process service, or root) the same code runs in-process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pwd
import subprocess
import sys
from pathlib import Path
from typing import Any

from glite_vm.errors import GliteVmError, HostError
from glite_vm.service import _sandbox_io
from glite_vm.service.protocol import error_from_wire

log = logging.getLogger(__name__)

#: Bound on one copy in either direction (a 30 GB sandbox at ~40 MB/s takes ~13 min).
COPY_TIMEOUT = 4 * 3600.0
_CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclasses.dataclass(frozen=True)
class Identity:
    """Whose rights file I/O uses: a uid, its primary gid and its supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def current(cls) -> Identity:
        return cls(os.geteuid(), os.getegid(), tuple(os.getgroups()))

    @classmethod
    def of_user(cls, uid: int) -> Identity:
        """The account's gid and groups from the user database (when peer groups are unknown)."""
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(uid, uid, ())
        return cls(uid, entry.pw_gid, tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))

    @property
    def is_this_process(self) -> bool:
        return self.uid == os.geteuid()


def pack_as(identity: Identity, xfer: Path, src: Path) -> int:
    """Pack ``src`` onto the transfer disk ``xfer`` reading as ``identity``; bytes written."""
    fd = _open_xfer(xfer, os.O_RDWR)
    try:
        if identity.is_this_process:
            return _sandbox_io.pack_into(fd, src)
        result = _run_child(identity, {"op": "pack", "src": str(src), "fd": fd}, fd)
        return int(result["bytes"])
    finally:
        os.close(fd)


def unpack_as(
    identity: Identity, xfer: Path, dest: Path, unchanged_from: Path | None
) -> tuple[list[str], list[str]]:
    """Unpack the guest's output from ``xfer`` into ``dest`` writing as ``identity``; the files
    written and the members refused."""
    fd = _open_xfer(xfer, os.O_RDONLY)
    try:
        if identity.is_this_process:
            refused: list[str] = []
            return _sandbox_io.unpack_from(fd, dest, unchanged_from, refused), refused
        request = {
            "op": "unpack",
            "dest": str(dest),
            "unchanged_from": str(unchanged_from) if unchanged_from else None,
            "fd": fd,
        }
        result = _run_child(identity, request, fd)
        return [str(n) for n in result["files"]], [str(r) for r in result["refused"]]
    finally:
        os.close(fd)


def _open_xfer(xfer: Path, flags: int) -> int:
    try:
        return os.open(xfer, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open the VM's transfer disk {xfer}: {exc.strerror}") from exc


def start_child(
    identity: Identity, module: str, *, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    """``python -I -m MODULE`` with ``identity``'s rights (its uid, gid and groups; this
    process's own when it is this process's user), a fixed environment, ``/`` as its working
    directory, pipes for stdin, stdout and stderr, and no descriptor but ``pass_fds``."""
    switch: dict[str, Any] = {}
    if not identity.is_this_process:
        if os.geteuid() != 0:
            raise HostError(
                f"this glite-vm service runs as uid {os.geteuid()} and cannot act as uid "
                f"{identity.uid}"
            )
        switch = {
            "user": identity.uid,
            "group": identity.gid,
            "extra_groups": list(identity.groups),
        }
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            umask=0o022,
            cwd="/",
            env={"PATH": _CHILD_PATH, "LC_ALL": "C.UTF-8"},
            **switch,
        )
    except OSError as exc:
        raise HostError(f"cannot start {module} as uid {identity.uid}: {exc}") from exc


def _run_child(identity: Identity, request: dict[str, Any], fd: int) -> dict[str, Any]:
    proc = start_child(identity, "glite_vm.service._sandbox_io", pass_fds=(fd,))
    try:
        stdout, stderr = proc.communicate(json.dumps(request).encode(), timeout=COPY_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise HostError(f"copying the job's files took longer than {COPY_TIMEOUT:g} s") from exc
    if stderr:
        log.debug("copy as uid %d: %s", identity.uid, stderr.decode(errors="replace"))
    try:
        answer = json.loads(stdout)
        ok = answer["ok"]
    except (ValueError, KeyError, TypeError):
        raise HostError(
            f"copying the job's files as uid {identity.uid} failed (status {proc.returncode})"
        ) from None
    if ok is True and isinstance(answer.get("result"), dict):
        result: dict[str, Any] = answer["result"]
        return result
    error: GliteVmError = error_from_wire(
        {"type": answer.get("type"), "message": answer.get("message"), "disposition": "requeue"}
    )
    raise error
