"""The interactive serial console that ``glite-vm snapshots boot`` attaches to a terminal."""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from pathlib import Path

import libvirt

from glite_vm.errors import HypervisorError

ESCAPE = b"\x1d"  # Ctrl-]


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
