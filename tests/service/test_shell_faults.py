"""`glite-vm shell` when things go wrong, through a real service and real VMs: the VM torn
down under an open shell (libvirtd keeps answering), the client killed mid-session, the
service stopped or killed mid-session; and the shell's Unix socket on the host, which no local
user can reach (not even the VM's owner) and which is gone after a teardown and after a crash
(the reaper sweeps sockets whose domain is gone)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.shell_support import cli, open_shell, socket_of
from tests.service.svc_support import (
    Account,
    ServiceProcess,
    as_user,
    call,
    make_scratch,
    ok,
    prepare,
    wait_for,
)
from tests.support import virsh

pytestmark = pytest.mark.vm


def libvirtd_answers() -> bool:
    return virsh("list", "--name", check=False).returncode == 0


def count_in_guest(pattern: str) -> str:
    """A guest command: how many processes have ``pattern`` in their command line."""
    return f"cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c '{pattern}'"


def test_a_vm_torn_down_under_a_shell_ends_it_with_a_clear_error(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with open_shell(service, svc_root, alice, "shell-teardown") as (vm, path, term):
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        ok(call(service, alice, "teardown", vm=vm, failed=False))
        assert term.wait(timeout=60) == 125
        assert b"glite-vm: host error:" in term.screen, term.screen
        assert b"was torn down during the shell session" in term.screen, term.screen
        # libvirtd lives on (a console stream closed under a destroy once deadlocked it), and
        # the socket went with its domain
        assert libvirtd_answers()
        assert not path.exists()


def test_a_vm_destroyed_from_outside_under_a_shell_ends_it_and_is_reaped(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with open_shell(service, svc_root, alice, "shell-destroyed") as (vm, path, term):
        # an administrator (or a crash) ends the VM behind the service's back
        virsh("destroy", vm)
        assert term.wait(timeout=60) == 125
        # the shell sees the stop itself, or the reaper tears the VM down first and says why
        said = (b"stopped during the shell session", b"shell session: its domain stopped")
        assert any(s in term.screen for s in said), term.screen
        assert libvirtd_answers()
        # the reaper finishes it: no domain, no socket
        wait_for("the reaper tears it down", lambda: not domains_named(vm), timeout=120)
        assert not path.exists()


def test_a_vm_reaped_under_a_shell_tells_its_owner_why(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with open_shell(service, svc_root, alice, "shell-reaped") as (vm, path, term):
        # the job's scratch directory goes (its starter cleaned up): the reaper's next pass
        # tears the VM down, and the open shell says why rather than only that it ended
        shutil.rmtree(svc_root / "shell-reaped")
        assert term.wait(timeout=60) == 125
        assert b"was torn down during the shell session: its scratch directory" in term.screen
        assert b"is gone" in term.screen, term.screen
        assert not domains_named(vm)
        assert not path.exists()


def domains_named(name: str) -> list[str]:
    return [n for n in virsh("list", "--all", "--name").stdout.split() if n == name]


def test_the_shell_socket_is_out_of_every_local_users_reach(
    service: ServiceProcess, svc_root: Path, alice: Account, bob: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "shell-socket")
    vm = prepare(service, alice, scratch)["vm"]
    path = socket_of(svc_root / "state", vm)
    try:
        st = os.stat(path.parent)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        for who in (alice, bob):  # the VM's owner too: her way in is the service's shell
            probe = subprocess.run(
                [*as_user(who), sys.executable, "-c", CONNECT, str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert probe.stdout.strip() == "PermissionError", (who, probe.stdout, probe.stderr)
        done = cli(service, alice, "shell", vm, "--", "id", "-u")
        assert (done.returncode, done.stdout) == (0, "1000\n"), done.stderr
    finally:
        ok(call(service, alice, "teardown", vm=vm, failed=False))
    assert not path.exists()


# Tries the socket and says what came of it (run as a test user).
CONNECT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print("connected")
except OSError as exc:
    print(type(exc).__name__)
"""


def test_a_killed_client_ends_its_session_and_the_vm_takes_the_next_shell(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with open_shell(service, svc_root, alice, "shell-killed") as (vm, _, term):
        term.type(b"sh -c 'echo sleeping; exec sleep 4321'\r")
        term.expect(b"sleeping\r\n")
        term.proc.send_signal(signal.SIGKILL)
        term.wait(timeout=30)
        # the service notices, hangs the guest's terminal up, and serves the next shell
        count = count_in_guest("sleep 432[1]")
        wait_for(
            "a new shell after the client was killed",
            lambda: cli(service, alice, "shell", vm, "--", "sh", "-c", count).stdout == "0\n",
            timeout=60,
            step=2.0,
        )


def test_a_stopped_service_ends_the_session_clearly_and_leaves_nothing(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with open_shell(service, svc_root, alice, "shell-stop") as (vm, path, term):
        assert service.stop() == 0
        assert term.wait(timeout=60) == 125
        assert b"the glite-vm service is stopping: the shell session was ended" in term.screen
        service.start()
        # the VM was adopted with its shell port: a new shell works, then the teardown
        done = cli(service, alice, "shell", vm, "--", "true")
        assert done.returncode == 0, done.stderr
    assert not path.exists()
    assert libvirtd_answers()


def test_a_crashed_services_sockets_are_swept_and_its_vm_serves_shells_again(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with open_shell(service, svc_root, alice, "shell-crash") as (vm, path, term):
        assert service.proc is not None
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait(timeout=30)
        assert term.wait(timeout=60) == 125
        assert b"the service closed the connection during shell" in term.screen, term.screen
        # what a libvirtd that died with its VM would leave: a socket of no domain
        stale = path.parent / ("0" * 32)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(stale))
        listener.close()
        service.start()
        wait_for("the reaper sweeps the stale socket", lambda: not stale.exists(), timeout=60)
        assert path.exists()  # the live VM's socket is left alone, and serves the next shell
        done = cli(service, alice, "shell", vm, "--", "true")
        assert done.returncode == 0, done.stderr
    assert not path.exists()
