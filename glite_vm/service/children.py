"""Child processes the service runs with a caller's rights, and what it takes from them.

The service hands work on a caller's behalf (copying the job's files, reading its job ad) to
``python -I -m MODULE`` running with the caller's uid, gid and groups. Such a child is the
caller's own process: the caller may trace it, and take any descriptor it holds
(``pidfd_getfd`` needs only ptrace rights over one's own processes), its stdout and stderr
among them. So nothing the service reads from a child is trusted in size or in time:
:func:`collect` keeps at most a bound of its answer, stops at the child's end (whoever else
still holds its pipes), and kills a child that overruns its time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import select
import subprocess
import sys
import threading
import time
from typing import IO, Any

from glite_vm.errors import HostError

_CHILD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STDERR_KEPT = 64 << 10  # bytes of a child's stderr kept for the log; the rest is dropped
DRAIN_GRACE = 1.0  # seconds to take what a child left in its pipes once it has exited


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


@dataclasses.dataclass(frozen=True)
class Collected:
    """What :func:`collect` took from a child."""

    stdout: bytes
    stderr: bytes
    returncode: int
    overran: bool  # its stdout passed the bound: it was killed and its answer is void
    timed_out: bool  # it was killed at the time bound


def collect(
    proc: subprocess.Popen[bytes], request: bytes, *, timeout: float, limit: int
) -> Collected:
    """Send ``request`` to the child's stdin, then take at most ``limit`` bytes of its stdout
    (and :data:`STDERR_KEPT` of its stderr) until it exits. A child past ``limit`` or past
    ``timeout`` seconds is killed. Once the child has exited, what is left in its pipes is
    taken for at most :data:`DRAIN_GRACE` seconds: someone else holding its pipes open does
    not keep the service waiting. The child's pipes are closed on return."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    writer = threading.Thread(target=_feed, args=(proc.stdin, request), daemon=True)
    writer.start()
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    poller = select.poll()
    for fd in streams:
        os.set_blocking(fd, False)
        poller.register(fd, select.POLLIN)
    overran = timed_out = False
    drain_until: float | None = None
    try:
        while streams and not overran:
            now = time.monotonic()
            if drain_until is None and proc.poll() is not None:
                drain_until = now + DRAIN_GRACE
            if drain_until is not None and now >= drain_until:
                break
            if now >= deadline:
                timed_out = True
                break
            wait = min(deadline, drain_until if drain_until is not None else deadline) - now
            for fd, _mask in poller.poll(min(wait, 0.2) * 1000):
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    poller.unregister(fd)
                    del streams[fd]
                    continue
                kept = streams[fd]
                if kept is out:
                    if len(out) + len(data) > limit:
                        overran = True
                        break
                    out += data
                elif len(err) < STDERR_KEPT:
                    err += data[: STDERR_KEPT - len(err)]
    finally:
        if proc.poll() is None:
            proc.kill()  # overran, timed out, or still running with its pipes closed
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                pipe.close()
        writer.join(timeout=10)
    return Collected(bytes(out), bytes(err), proc.returncode, overran, timed_out)


def _feed(stdin: IO[bytes], request: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):  # the child went, or its pipe was closed
        stdin.write(request)
        stdin.close()
