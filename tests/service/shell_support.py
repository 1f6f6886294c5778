"""Running `glite-vm shell` and `glite-vm console` as a user would, for the service tests:
with input from /dev/null (:func:`cli`) or on a terminal of its own (:class:`Terminal`)."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from tests.service.svc_support import Account, ServiceProcess, as_user

GUEST_UID = "1000"  # the test guests' job account (tests/guest/build.sh)


def shell_dir(state: Path) -> Path:
    """Where a service with state directory ``state`` keeps its VMs' shell sockets."""
    return state / "run" / "shells"


def cli_env(service: ServiceProcess) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "GLITE_VM_SOCKET_PATH": str(service.socket_path),
        "GLITE_VM_CONFIG": "/nonexistent/glite-vm.toml",
        "TERM": "xterm",
    }


def cli(
    service: ServiceProcess, who: Account, *args: str, cwd: str = "/", timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``glite-vm ARGS`` as ``who``, input from /dev/null (not a terminal)."""
    return subprocess.run(
        [*as_user(who), sys.executable, "-m", "glite_vm", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=cli_env(service),
        check=False,
    )


class Terminal:
    """``glite-vm ARGS`` as ``who`` on a terminal of its own (a pty this test types into)."""

    def __init__(self, service: ServiceProcess, who: Account, *args: str, cwd: str) -> None:
        self.master, slave = os.openpty()
        self.resize(24, 80)
        self.proc = subprocess.Popen(
            ["setsid", "-c", *as_user(who), sys.executable, "-m", "glite_vm", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=cli_env(service),
        )
        os.close(slave)
        self.screen = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, text: bytes, timeout: float = 60.0, after: bytes = b"") -> bytes:
        """Read until ``text`` shows up (after the last ``after``); everything shown so far."""
        deadline = time.monotonic() + timeout
        while text not in (self.screen.rpartition(after)[2] if after else self.screen):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not shown within {timeout:g} s: {self.screen!r}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:  # EIO: the program ended
                    if self.proc.poll() is not None:
                        raise AssertionError(
                            f"the program ended before showing {text!r}: {self.screen!r}"
                        ) from None
        return self.screen

    def wait(self, timeout: float = 60.0) -> int:
        """The program's exit status, once it ended; what it showed last is in the screen."""
        try:
            status = self.proc.wait(timeout=timeout)
            while True:  # the rest of what it wrote, until the terminal is closed (EIO)
                ready, _, _ = select.select([self.master], [], [], 5.0)
                if not ready:
                    break
                try:
                    self.screen += os.read(self.master, 65536)
                except OSError:
                    break
            return status
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)
