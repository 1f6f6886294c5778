"""Opening a file with another user's rights: a child process under that user opens it and
hands the open descriptor back over a socket pair (``SCM_RIGHTS``).

The service is root; a job's ``file://`` image must be a file the job's owner could read
themselves. Checking permissions by hand would miss directories on the way, ACLs and races; the
kernel's answer to an ``open`` by that user is the answer. The child
(``python -I -m glite_vm.images._open_as FD PATH``, standard library only) opens the path
read-only and non-blocking (a FIFO cannot stall it) and sends back either the descriptor or the
errno it got.
"""

from __future__ import annotations

import errno as errnos
import json
import os
import socket
import subprocess
import sys
from typing import Protocol

OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
OPEN_TIMEOUT = 60.0  # bound on the child (start, one open); a hung network mount fails it
_ANSWER_BYTES = 256


class Reader(Protocol):
    """Whose rights open a file: a uid, its primary gid and its supplementary groups
    (:class:`glite_vm.service.sandbox.Identity` is one)."""

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...

    @property
    def groups(self) -> tuple[int, ...]: ...


def open_as(reader: Reader | None, path: str) -> int:
    """``path`` opened read-only (non-blocking) with ``reader``'s rights (None or this
    process's own uid: in-process); the descriptor. Raises OSError as the open failed."""
    if reader is None or reader.uid == os.geteuid():
        return os.open(path, OPEN_FLAGS)
    if os.geteuid() != 0:
        raise PermissionError(
            errnos.EPERM, f"a process of uid {os.geteuid()} cannot open files as uid {reader.uid}"
        )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-m", __name__, str(theirs.fileno()), path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                user=reader.uid,
                group=reader.gid,
                extra_groups=list(reader.groups),
                cwd="/",
                env={"LC_ALL": "C.UTF-8"},
            )
        finally:
            theirs.close()
        try:
            ours.settimeout(OPEN_TIMEOUT)
            message, fds, _flags, _addr = socket.recv_fds(ours, _ANSWER_BYTES, 1)
        except OSError as exc:  # includes the timeout
            proc.kill()
            raise OSError(errnos.EIO, f"opening {path} as uid {reader.uid}: {exc}") from None
        finally:
            try:
                proc.wait(timeout=OPEN_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if fds:
        for extra in fds[1:]:
            os.close(extra)
        return fds[0]
    try:
        code = int(json.loads(message)["errno"])
    except (ValueError, KeyError, TypeError):
        raise OSError(
            errnos.EIO, f"opening {path} as uid {reader.uid} failed (status {proc.returncode})"
        ) from None
    raise OSError(code, os.strerror(code), path)


def _child(sock_fd: int, path: str) -> int:
    with socket.socket(fileno=sock_fd) as sock:
        try:
            fd = os.open(path, OPEN_FLAGS)
        except OSError as exc:
            sock.sendall(json.dumps({"errno": exc.errno or errnos.EIO}).encode())
            return 0
        socket.send_fds(sock, [b"{}"], [fd])
    return 0


if __name__ == "__main__":
    sys.exit(_child(int(sys.argv[1]), sys.argv[2]))
