"""The user's side of ``glite-vm shell`` and ``glite-vm console``: which VM is meant, and a
local terminal joined to a :class:`~glite_vm.service.client.ShellSession`.

Invariants. A VM is chosen only among the caller's own (the service's ``list_vms``); without
a name, the one whose job's scratch directory holds the working directory (where
``condor_ssh_to_job`` lands) — never a guess between several. A terminal put into raw mode is
restored however the session ends. Keys go to the guest as typed, Ctrl-C included; only
:data:`ESCAPE` (Ctrl-], as in ``virsh console`` and ``telnet``) stays here and hangs up.
Nothing here prints: bytes go to the descriptors the caller gives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import signal
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType

from glite_vm.errors import RequestError
from glite_vm.service.api import VmSummary
from glite_vm.service.client import ServiceClient, ShellSession

ESCAPE = b"\x1d"  # Ctrl-]
#: What a session that the user hung up with :data:`ESCAPE` exits with (as after Ctrl-C).
EXIT_HUNG_UP = 130
#: Bytes of the boot log shown before following it (the rest of a chatty boot is on disk).
CONSOLE_BACKLOG = 1 << 20
_TERM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


def choose_vm(
    vms: Sequence[VmSummary], target: str | None, cwd: str, scratch_dir: str | None = None
) -> str:
    """The VM ``target`` means among the caller's ``vms``: a VM's name, or a job id
    (``12.0``); with no target, the VM whose job's scratch directory is ``scratch_dir`` (the
    job's ``_CONDOR_SCRATCH_DIR``) or holds ``cwd``. A name that is none of these is returned
    as it is, for the service to refuse (it says the same for someone else's VM as for none)."""
    if target:
        if any(v.vm == target for v in vms):
            return target
        jobs = [v.vm for v in vms if v.job_id == target]
        if len(jobs) == 1:
            return jobs[0]
        if len(jobs) > 1:
            raise RequestError("vm", f"job {target} has several VMs ({', '.join(jobs)}); name one")
        return target
    here = [os.path.realpath(p) for p in (scratch_dir, cwd) if p]
    found = sorted(
        {
            v.vm
            for v in vms
            if v.scratch_dir and any(_within(p, os.path.realpath(v.scratch_dir)) for p in here)
        }
    )
    if len(found) == 1:
        return found[0]
    if found:
        raise RequestError("vm", f"several VMs serve this directory ({', '.join(found)}); name one")
    mine = ", ".join(v.vm for v in vms) or "none"
    raise RequestError(
        "vm",
        f"no VM of yours serves {cwd} (run it inside a job's sandbox, as condor_ssh_to_job "
        f"leaves you, or name the VM; yours: {mine})",
    )


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def terminal_type(environ: dict[str, str] | None = None) -> str:
    """``$TERM`` when it is plainly a terminal type's name, else ``vt100``."""
    term = (environ if environ is not None else dict(os.environ)).get("TERM", "")
    return term if _TERM_NAME.fullmatch(term) else "vt100"


def window_size(fd: int) -> tuple[int, int]:
    """(rows, columns) of the terminal on ``fd``; 24 x 80 when it is none."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 24, 80
    return max(1, min(size.lines, 1000)), max(1, min(size.columns, 1000))


def open_session(
    client: ServiceClient, vm: str, argv: Sequence[str] | None, in_fd: int, out_fd: int
) -> ShellSession:
    """A session in ``vm`` for the terminal (or pipe) on ``in_fd``/``out_fd``."""
    interactive = os.isatty(in_fd)
    rows, cols = window_size(in_fd if interactive else out_fd)
    return client.open_shell(
        vm, argv=argv, term=terminal_type(), rows=rows, cols=cols, interactive=interactive
    )


def join(session: ShellSession, in_fd: int, out_fd: int) -> int:
    """Join the local terminal (or pipe) ``in_fd``/``out_fd`` to ``session`` until it ends;
    its exit status, or :data:`EXIT_HUNG_UP` after Ctrl-]. A terminal is in raw mode
    meanwhile (the guest's terminal does the echo and the line editing) and follows the local
    window's size. Input that ends (a pipe) ends the guest's input with one Ctrl-D."""
    interactive = os.isatty(in_fd)
    resized = [False]

    def on_winch(_signum: int, _frame: FrameType | None) -> None:
        resized[0] = True

    with _raw(in_fd, interactive), _signal(signal.SIGWINCH, on_winch, interactive):
        reading = True
        while session.outcome is None:
            watched: list[int] = [session.fileno()] + ([in_fd] if reading else [])
            try:
                ready, _, _ = select.select(watched, [], [], 0.5)
            except InterruptedError:
                ready = []
            if resized[0]:
                resized[0] = False
                session.resize(*window_size(in_fd))
            if in_fd in ready:
                data = os.read(in_fd, 4096)
                if not data:
                    reading = False
                    if not interactive:
                        session.send(b"\x04")
                elif interactive and ESCAPE in data:
                    head = data.partition(ESCAPE)[0]
                    if head:
                        session.send(head)
                    return EXIT_HUNG_UP
                else:
                    session.send(data)
            if session.fileno() in ready or not ready:
                _write_all(out_fd, session.read(0.01))
    code = session.outcome.exit_code
    return 255 if code is None else code


def follow_console(
    path: str, out_fd: int, running: Callable[[], bool], *, poll: float = 0.2, check: float = 2.0
) -> None:
    """Copy the boot log ``path`` (its last :data:`CONSOLE_BACKLOG` bytes, then what the
    guest writes) to ``out_fd`` until ``running()`` (asked every ``check`` seconds) says the
    VM stopped. The log is opened with the caller's own rights, never through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size > CONSOLE_BACKLOG:
            os.lseek(fd, size - CONSOLE_BACKLOG, os.SEEK_SET)
        next_check = time.monotonic() + check
        alive = True
        while True:
            block = os.read(fd, 65536)
            if block:
                _write_all(out_fd, block)
                continue
            if not alive:
                return
            time.sleep(poll)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + check
                alive = running()  # one more read after it stopped: its last words
    finally:
        os.close(fd)


@contextlib.contextmanager
def _raw(fd: int, on: bool) -> Iterator[None]:
    if not on:
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


@contextlib.contextmanager
def _signal(
    signum: int, handler: Callable[[int, FrameType | None], None], on: bool
) -> Iterator[None]:
    if not on:
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, previous)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            select.select([], [fd], [], 1.0)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                return
            raise


def scratch_dir_of_job(environ: dict[str, str] | None = None) -> str | None:
    """The job's scratch directory as HTCondor tells a job (and ``condor_ssh_to_job``)."""
    value = (environ if environ is not None else dict(os.environ)).get("_CONDOR_SCRATCH_DIR")
    return value if value and Path(value).is_absolute() else None


__all__ = [
    "CONSOLE_BACKLOG",
    "ESCAPE",
    "EXIT_HUNG_UP",
    "choose_vm",
    "follow_console",
    "join",
    "open_session",
    "scratch_dir_of_job",
    "terminal_type",
    "window_size",
]
