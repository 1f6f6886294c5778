"""`glite-vm shell` and `glite-vm console` through a real service, as real users would run them:
one command, an interactive session on a terminal (keys, Ctrl-C, the window size, the exit
status), the VM found from inside the job's sandbox, the console followed to the VM's end; and
the attacks every service call must withstand (another user's VM, a VM after its teardown, a
flood of shells)."""

from __future__ import annotations

import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.conftest import SEND_TIMEOUT
from tests.service.shell_support import GUEST_UID, Terminal, cli, cli_env
from tests.service.svc_support import (
    ROOT_SLOT,
    Account,
    FakeStarter,
    ServiceProcess,
    as_user,
    call,
    job_ad,
    make_scratch,
    ok,
    prepare,
    wait_for,
)

pytestmark = pytest.mark.vm

DENIED = "request error: no VM named"  # AccessDeniedError, as for every other call


def test_one_command_runs_as_the_jobs_user_in_its_guest(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "shell-one")
    prepared = prepare(service, alice, scratch)
    vm = prepared["vm"]
    hostname = prepared["ad_attributes"]["GliteVmGuestHostname"].split(".")[0]
    try:
        done = cli(service, alice, "shell", vm, "--", "sh", "-c", "id -u; hostname; exit 3")
        assert done.returncode == 3, done.stderr
        # input from a pipe: output as the command wrote it (no CR, no echo)
        assert done.stdout == f"{GUEST_UID}\n{hostname}\n", done.stdout
        # inside the job's sandbox (where condor_ssh_to_job leaves its user) no name is needed
        inside = cli(service, alice, "shell", "--", "id", "-u", cwd=str(scratch))
        assert (inside.returncode, inside.stdout) == (0, f"{GUEST_UID}\n"), inside.stderr
        outside = cli(service, alice, "shell", "--", "id", "-u", cwd="/")
        assert outside.returncode == 125
        assert "no VM of yours serves /" in outside.stderr
    finally:
        ok(call(service, alice, "teardown", vm=vm, failed=False))


def test_an_interactive_session_is_a_real_terminal(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "shell-tty")
    vm = prepare(service, alice, scratch)["vm"]
    term = Terminal(service, alice, "shell", cwd=str(scratch))
    try:
        term.expect(b"$ ")
        term.type(b"id -u; tty; stty size; echo TERM=$TERM\r")
        term.expect(b"TERM=xterm")
        assert f"{GUEST_UID}\r\n/dev/ttyS1\r\n24 80\r\n".encode() in term.screen
        # Ctrl-C reaches the foreground program in the guest, not the client
        # (the program says when it runs: by then it is the terminal's foreground)
        term.type(b"sh -c 'echo sleeping; exec sleep 300'\r")
        term.expect(b"sleeping\r\n")
        term.type(b"\x03")
        term.expect(b"$ ", after=b"sleeping\r\n")
        term.type(b"echo status=$?\r")
        term.expect(b"status=130")
        # the window size follows the local terminal's
        term.resize(40, 132)
        time.sleep(1.0)
        term.type(b"stty size\r")
        term.expect(b"40 132")
        term.type(b"exit 5\r")
        assert term.wait() == 5
    finally:
        term.close() if term.proc.poll() is None else None
        ok(call(service, alice, "teardown", vm=vm, failed=False))


def test_the_console_follows_the_vm_until_it_ends(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "console")
    vm = prepare(service, alice, scratch)["vm"]
    follower = subprocess.Popen(
        [*as_user(alice), sys.executable, "-m", "glite_vm", "console", vm],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(service),
        cwd="/",
    )
    try:
        time.sleep(3)
        assert follower.poll() is None  # following, while the VM runs
        ok(call(service, alice, "teardown", vm=vm, failed=False))
        out, err = follower.communicate(timeout=30)
        assert follower.returncode == 0, err
        assert b"glite-guest: agent started" in out  # the boot, from its first lines
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_another_users_vm_and_a_torn_down_vm_are_refused(
    service: ServiceProcess, svc_root: Path, alice: Account, bob: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "shell-bob")
    vm = prepare(service, alice, scratch)["vm"]
    try:
        for args in (("shell", vm, "--", "id", "-u"), ("console", vm)):
            theirs = cli(service, bob, *args)
            nobodys = cli(service, bob, *(a if a != vm else f"{vm}x" for a in args))
            assert theirs.returncode == 125 and DENIED in theirs.stderr, theirs.stderr
            assert GUEST_UID not in theirs.stdout
            # the same answer as for a VM that does not exist: names cannot be probed
            assert theirs.stderr.replace(vm, "?") == nobodys.stderr.replace(f"{vm}x", "?")
        # bob inside alice's sandbox is no closer (he cannot even enter it)
        assert cli(service, bob, "shell", "--", "id", cwd="/").returncode == 125
    finally:
        ok(call(service, alice, "teardown", vm=vm, failed=False))
    for args in (("shell", vm, "--", "id", "-u"), ("console", vm)):
        late = cli(service, alice, *args)
        assert late.returncode == 125
        assert "already torn down" in late.stderr, late.stderr


def test_a_flood_of_shells_gets_one_session_and_quick_refusals(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "shell-flood")
    vm = prepare(service, alice, scratch)["vm"]
    first = Terminal(service, alice, "shell", vm, cwd="/")
    try:
        first.expect(b"$ ")
        flood = [
            subprocess.Popen(
                [*as_user(alice), sys.executable, "-m", "glite_vm", "shell", vm, "--", "id"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=cli_env(service),
                cwd="/",
            )
            for _ in range(12)
        ]
        for proc in flood:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 125, (out, err)
            assert b"already has a shell open" in err, err
        # the session that was first is untouched by the flood, and the service still serves
        first.type(b"echo still-here\r")
        first.expect(b"still-here")
        first.type(b"\x1d")  # Ctrl-]: hang up from this side
        assert first.wait() == 130
        # the hung-up session's processes are gone: the next shell gets the terminal
        wait_for(
            "a new shell after the hang-up",
            lambda: cli(service, alice, "shell", vm, "--", "true").returncode == 0,
            timeout=30,
            step=1.0,
        )
    finally:
        first.close() if first.proc.poll() is None else None
        ok(call(service, alice, "teardown", vm=vm, failed=False))


def test_a_root_jobs_shell_is_root_and_an_ordinary_jobs_is_not(
    service: ServiceProcess, svc_root: Path, alice: Account, fake_starter: Path
) -> None:
    starter = FakeStarter(fake_starter, service, ROOT_SLOT[0], slot_type=ROOT_SLOT[1])
    scratch = make_scratch(svc_root, alice, "shell-root")
    try:
        prepared = ok(
            starter.call(
                alice, "prepare", job_ad=job_ad(GliteVmRoot=True), scratch_dir=str(scratch)
            )
        )
        vm = prepared["vm"]
        try:
            done = cli(service, alice, "shell", vm, "--", "id", "-u")
            assert (done.returncode, done.stdout) == (0, "0\n"), done.stderr
        finally:
            ok(starter.call(alice, "teardown", vm=vm, failed=False))
    finally:
        starter.stop()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_client_that_stops_reading_a_flood_of_output_costs_the_service_nothing(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    """alice's guest writes without end to the shell's terminal while her client reads
    nothing (its own output goes to a pipe nobody reads): the service must neither buffer the
    flood nor keep the session's slot, thread and VM terminal forever (it gives a client
    ``GLITE_VM_SERVICE_SEND_TIMEOUT`` to read: :data:`SEND_TIMEOUT` here, not the default 120 s,
    which the wait below stays short of, so the setting is shown to count)."""
    scratch = make_scratch(svc_root, alice, "shell-stall")
    vm = prepare(service, alice, scratch)["vm"]
    before = _rss_kib(service.pid)
    stalled = subprocess.Popen(
        [
            *as_user(alice),
            sys.executable,
            "-m",
            "glite_vm",
            "shell",
            vm,
            "--",
            "sh",
            "-c",
            "while :; do cat /bin/busybox; done",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,  # never read
        stderr=subprocess.DEVNULL,
        env=cli_env(service),
        cwd="/",
    )
    try:
        # the flood reaches the client (whose pipe then fills): the session is open
        assert stalled.stdout is not None
        ready, _, _ = select.select([stalled.stdout], [], [], 120)
        assert ready and stalled.poll() is None
        busy = cli(service, alice, "shell", vm, "--", "true")
        assert busy.returncode == 125 and "already has a shell open" in busy.stderr, busy.stderr
        # the session is dropped by the service, so the next one may start
        wait_for(
            "a new shell while the stalled client still lives",
            lambda: cli(service, alice, "shell", vm, "--", "true").returncode == 0,
            timeout=SEND_TIMEOUT + 80,  # under the default 120 s: the setting is what let go
            step=5.0,
        )
        assert stalled.poll() is None  # it never read: the service let go, not the client
        grown = _rss_kib(service.pid) - before
        assert grown < 64 << 10, f"the service grew by {grown} KiB"
        # the flood in the guest was hung up with its session
        left = cli(service, alice, "shell", vm, "--", "sh", "-c", "ps | grep -c '[c]at /bin'")
        assert left.stdout.strip() == "0", left.stdout
    finally:
        stalled.kill()
        stalled.wait()
        ok(call(service, alice, "teardown", vm=vm, failed=False))
