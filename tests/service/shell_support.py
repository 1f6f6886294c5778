"""Running `glite-vm shell` and `glite-vm console` as a user would, for the service tests:
with input from /dev/null (:func:`cli`) or on a terminal of its own (:class:`Terminal`)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tests.service.svc_support import (
    Account,
    ServiceProcess,
    as_user,
    call,
    make_scratch,
    ok,
    prepare,
)
from tests.support import virsh

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


def socket_of(state: Path, vm: str) -> Path:
    """The VM's shell socket, named after its domain's UUID (glite_vm.vm.shell_port)."""
    uuid = virsh("domuuid", vm).stdout.strip()
    return shell_dir(state) / uuid.replace("-", "")


class OpenShell(NamedTuple):
    vm: str
    socket: Path  # the VM's shell socket on the host
    terminal: Terminal  # `glite-vm shell VM` on it, at the guest's prompt


@contextlib.contextmanager
def open_shell(service: ServiceProcess, root: Path, who: Account, name: str) -> Iterator[OpenShell]:
    """A VM of ``who`` (scratch directory ``root/name``) with ``glite-vm shell`` open on it at
    the guest's prompt. Afterwards the terminal is closed, the service runs again if the test
    stopped it, and the VM is torn down unless the test (or the reaper) already ended it: that
    teardown must succeed."""
    vm = prepare(service, who, make_scratch(root, who, name))["vm"]
    path = socket_of(Path(service.env["GLITE_VM_STATE_DIR"]), vm)
    term = Terminal(service, who, "shell", vm, cwd="/")
    try:
        term.expect(b"$ ")
        yield OpenShell(vm, path, term)
    finally:
        if term.proc.poll() is None:
            term.close()
        if service.proc is None or service.proc.poll() is not None:
            service.start()
        if vm in (v.vm for v in service.client().list_vms()):
            ok(call(service, who, "teardown", vm=vm, failed=False))
