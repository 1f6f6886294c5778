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

import json
import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glite_vm.errors import GliteVmError, HostError
from glite_vm.service import _sandbox_io
from glite_vm.service.children import Identity, collect, start_child
from glite_vm.service.protocol import error_from_wire
from glite_vm.vm import transfer

log = logging.getLogger(__name__)

#: Bound on one copy in either direction (a 30 GB sandbox at ~40 MB/s takes ~13 min).
COPY_TIMEOUT = 4 * 3600.0
PUMP_GRACE = 30.0  # seconds the pump may take to finish once the copy process is done
#: Bytes of the copy's answer (the output files' names, bounded by transfer.MAX_OUTPUT_NAMES,
#: and at most transfer.MAX_REFUSED_SHOWN refused ones).
ANSWER_LIMIT = 16 << 20
PIPE_LEFTOVER = 4 << 20  # bytes the pack pump takes once the child is done (a pipe holds less)


def pack_as(identity: Identity, xfer: Path, src: Path) -> int:
    """Pack ``src`` onto the transfer disk ``xfer`` reading as ``identity``; bytes written."""
    fd = _open_xfer(xfer, os.O_RDWR)
    try:
        limit = os.fstat(fd).st_size
        if identity.is_this_process:
            written = transfer.pack_into(fd, src, limit)
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
        pump = _Pump(_disk_to_pipe, pipe=write_end, disk=fd, limit=limit)
        result = _run_child(identity, {**request, "fd": read_end}, read_end, pump)
        return [str(n) for n in result["files"]], [str(r) for r in result["refused"]]
    finally:
        os.close(fd)


def _pack_through_pipe(identity: Identity, fd: int, src: Path, limit: int) -> int:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pump = _Pump(_pipe_to_disk, pipe=read_end, disk=fd, limit=limit)
    request = {"op": "pack", "src": str(src), "limit": limit, "fd": write_end}
    result = _run_child(identity, request, write_end, pump)
    if pump.overflow:  # the child's own bound should have said so first; the service's holds
        raise transfer.too_big(limit)
    if int(result["bytes"]) != pump.moved:
        raise HostError(
            f"the copy as uid {identity.uid} reported {result['bytes']} bytes, "
            f"but {pump.moved} arrived"
        )
    return pump.moved


class _Pump(threading.Thread):
    """Moves bytes between the child's pipe and the transfer disk while the child runs.

    The pump owns this process's end of the pipe (made non-blocking) and its own duplicate of
    the disk's descriptor, and closes both when it stops: when the stream ends, at ``limit``,
    or once ``stop`` is set (the child is done) and the pipe holds nothing more of it. So the
    child sees the end of its input or EPIPE instead of waiting, someone else holding the
    pipe open keeps nothing of the service's, and the disk's descriptor cannot be closed
    under the pump."""

    def __init__(self, move: Callable[[_Pump], None], *, pipe: int, disk: int, limit: int) -> None:
        super().__init__(daemon=True)
        self._move = move
        self.pipe = pipe
        self.limit = limit
        self.moved = 0
        self.overflow = False
        self.stop = threading.Event()
        os.set_blocking(pipe, False)
        self.disk = os.dup(disk)

    def run(self) -> None:
        try:
            self._move(self)
        except OSError as exc:  # the child went away (EPIPE) or the disk failed
            log.debug("copy pump stopped: %s", exc)
        finally:
            self.close()

    def close(self) -> None:
        for fd in (self.pipe, self.disk):
            os.close(fd)

    def ready(self, event: int) -> bool:
        """Wait until the pipe is ready for ``event``; False once ``stop`` is set and it is
        not."""
        poller = select.poll()
        poller.register(self.pipe, event)
        while not poller.poll(200):
            if self.stop.is_set():
                return False
        return True


def _pipe_to_disk(pump: _Pump) -> None:
    """What the child packs, onto the start of the disk; at most ``limit`` bytes. Once the
    child is done, at most :data:`PIPE_LEFTOVER` more bytes are taken (what it left in the
    pipe; whoever else writes there is not waited for)."""
    after_stop = 0
    while True:
        try:
            data = os.read(pump.pipe, 1 << 20)
        except BlockingIOError:
            if pump.ready(select.POLLIN):
                continue
            return
        if not data:
            return
        if pump.stop.is_set():
            after_stop += len(data)
            if after_stop > PIPE_LEFTOVER:
                return
        if pump.moved + len(data) > pump.limit:
            pump.overflow = True
            return
        view = memoryview(data)
        while view:
            n = os.pwrite(pump.disk, view, pump.moved)
            pump.moved += n
            view = view[n:]


def _disk_to_pipe(pump: _Pump) -> None:
    """The disk's bytes into the pipe, until the disk ends or the child stops reading."""
    while pump.moved < pump.limit and not pump.stop.is_set():
        try:
            n = os.sendfile(pump.pipe, pump.disk, pump.moved, min(1 << 20, pump.limit - pump.moved))
        except BlockingIOError:
            if pump.ready(select.POLLOUT):
                continue
            return
        if n == 0:
            return
        pump.moved += n


def _open_xfer(xfer: Path, flags: int) -> int:
    try:
        return os.open(xfer, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open the VM's transfer disk {xfer}: {exc.strerror}") from exc


def _run_child(
    identity: Identity, request: dict[str, Any], child_fd: int, pump: _Pump
) -> dict[str, Any]:
    """Run the copy as ``identity`` with ``child_fd`` (its end of the pipe, closed here once
    the child has its copy), ``pump`` moving the bytes meanwhile; the child's result."""
    try:
        proc = start_child(identity, "glite_vm.service._sandbox_io", pass_fds=(child_fd,))
    except BaseException:
        pump.close()  # it never runs
        raise
    finally:
        os.close(child_fd)  # else the pump would never see the end of the stream, nor EPIPE
    pump.start()
    try:
        done = collect(proc, json.dumps(request).encode(), timeout=COPY_TIMEOUT, limit=ANSWER_LIMIT)
    finally:
        pump.stop.set()
        pump.join(timeout=PUMP_GRACE)
    if done.stderr:
        log.debug("copy as uid %d: %s", identity.uid, done.stderr.decode(errors="replace"))
    if done.timed_out:
        raise HostError(f"copying the job's files took longer than {COPY_TIMEOUT:g} s")
    try:
        answer = json.loads(done.stdout)
        ok = answer["ok"]
    except (ValueError, KeyError, TypeError):
        why = "its answer was too long" if done.overran else f"status {done.returncode}"
        raise HostError(f"copying the job's files as uid {identity.uid} failed ({why})") from None
    if ok is True and isinstance(answer.get("result"), dict):
        result: dict[str, Any] = answer["result"]
        return result
    error: GliteVmError = error_from_wire(
        {"type": answer.get("type"), "message": answer.get("message"), "disposition": "requeue"}
    )
    raise error
