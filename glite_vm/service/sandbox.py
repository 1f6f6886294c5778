"""Moving a job's files with the job owner's rights, not the service's.

The service runs as root; a job's input directory is the owner's. Reading it as root would let
a hard link (or a ``..`` path) to a root-only file carry that file into the guest, and writing
output as root would let a symlink in the destination redirect it. So the copy runs in a child
process under the caller's uid, gid and supplementary groups
(:mod:`glite_vm.service._sandbox_io`), which writes the tar stream into a pipe or reads it
from one; the service itself moves the bytes between that pipe and the VM's transfer disk,
never past the disk's size. The child holds no descriptor of the transfer disk: it runs as the
caller, who may take any descriptor of it (``pidfd_getfd`` needs only ptrace rights over one's
own processes), and a writable descriptor of that root-owned file would let the caller grow it
without end, on no quota of hers, even after the VM is gone. When the caller is the service's
own user (a single user's in-process service, or root) the same code runs in-process on the
transfer disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pwd
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glite_vm.errors import GliteVmError, HostError
from glite_vm.service import _sandbox_io
from glite_vm.service.protocol import error_from_wire

log = logging.getLogger(__name__)

#: Bound on one copy in either direction (a 30 GB sandbox at ~40 MB/s takes ~13 min).
COPY_TIMEOUT = 4 * 3600.0
PUMP_GRACE = 30.0  # seconds the pump may take to finish once the copy process is done
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
        limit = os.fstat(fd).st_size
        if identity.is_this_process:
            written = _sandbox_io.pack_into(fd, src, limit)
        else:
            written = _pack_through_pipe(identity, fd, src, limit)
        os.fsync(fd)
        return written
    finally:
        os.close(fd)


def unpack_as(
    identity: Identity, xfer: Path, dest: Path, unchanged_from: Path | None
) -> tuple[list[str], list[str]]:
    """Unpack the guest's output from ``xfer`` into ``dest`` writing as ``identity``; the files
    written and the members refused."""
    fd = _open_xfer(xfer, os.O_RDONLY)
    try:
        limit = os.fstat(fd).st_size
        if identity.is_this_process:
            refused: list[str] = []
            return _sandbox_io.unpack_from(fd, dest, unchanged_from, refused, limit), refused
        request = {
            "op": "unpack",
            "dest": str(dest),
            "unchanged_from": str(unchanged_from) if unchanged_from else None,
            "limit": limit,
        }
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        pump = _Pump(_disk_to_pipe, fd, write_end, limit, own=write_end)
        result = _run_child(identity, {**request, "fd": read_end}, read_end, pump)
        return [str(n) for n in result["files"]], [str(r) for r in result["refused"]]
    finally:
        os.close(fd)


def _pack_through_pipe(identity: Identity, fd: int, src: Path, limit: int) -> int:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pump = _Pump(_pipe_to_disk, read_end, fd, limit, own=read_end)
    request = {"op": "pack", "src": str(src), "limit": limit, "fd": write_end}
    result = _run_child(identity, request, write_end, pump)
    if pump.overflow:  # the child's own bound should have said so first; the service's holds
        raise _sandbox_io.too_big(limit)
    if int(result["bytes"]) != pump.moved:
        raise HostError(
            f"the copy as uid {identity.uid} reported {result['bytes']} bytes, "
            f"but {pump.moved} arrived"
        )
    return pump.moved


class _Pump(threading.Thread):
    """Moves bytes between the child's pipe and the transfer disk while the child runs. The
    pump owns this process's end of the pipe (``own``) and closes it when it stops, so that the
    child sees the end of its input, or EPIPE on its output, instead of waiting."""

    def __init__(
        self,
        move: Callable[[_Pump, int, int, int], None],
        source: int,
        sink: int,
        limit: int,
        *,
        own: int,
    ) -> None:
        super().__init__(daemon=True)
        self._move = move
        self.source = source
        self.sink = sink
        self.limit = limit
        self.own = own
        self.moved = 0
        self.overflow = False

    def run(self) -> None:
        try:
            self._move(self, self.source, self.sink, self.limit)
        except OSError as exc:  # the child went away (EPIPE) or the disk failed
            log.debug("copy pump stopped: %s", exc)
        finally:
            os.close(self.own)


def _pipe_to_disk(pump: _Pump, pipe: int, disk: int, limit: int) -> None:
    """What the child packs, onto the start of the disk; at most ``limit`` bytes, after which
    the pipe is closed on the child (it gets EPIPE)."""
    while True:
        data = os.read(pipe, 1 << 20)
        if not data:
            return
        if pump.moved + len(data) > limit:
            pump.overflow = True
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(disk, view, pump.moved)
            pump.moved += n
            view = view[n:]


def _disk_to_pipe(pump: _Pump, disk: int, pipe: int, limit: int) -> None:
    """The disk's bytes into the pipe, until the disk ends or the child stops reading."""
    while pump.moved < limit:
        n = os.sendfile(pipe, disk, pump.moved, min(1 << 20, limit - pump.moved))
        if n == 0:
            return
        pump.moved += n


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


def _run_child(
    identity: Identity, request: dict[str, Any], child_fd: int, pump: _Pump
) -> dict[str, Any]:
    """Run the copy as ``identity`` with ``child_fd`` (its end of the pipe, closed here once
    the child has its copy), ``pump`` moving the bytes meanwhile; the child's result."""
    try:
        proc = start_child(identity, "glite_vm.service._sandbox_io", pass_fds=(child_fd,))
    except BaseException:
        os.close(pump.own)  # the pump never runs
        raise
    finally:
        os.close(child_fd)  # else the pump would never see the end of the stream, nor EPIPE
    pump.start()
    try:
        stdout, stderr = proc.communicate(json.dumps(request).encode(), timeout=COPY_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        proc.kill()
        proc.communicate()
        raise HostError(f"copying the job's files took longer than {COPY_TIMEOUT:g} s") from exc
    finally:
        pump.join(timeout=PUMP_GRACE)
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
