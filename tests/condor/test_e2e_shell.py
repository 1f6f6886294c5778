"""Debugging a running job the way a user would: ``condor_ssh_to_job`` into a running glite-vm
job, then ``glite-vm shell`` (no VM named: it picks the job's VM from the sandbox) in its guest.

A real personal pool with glite-vm's hooks and configuration, the real service, a real VM of
the direct-kernel test guest (busybox and qemu-guest-agent only, no getty on its second serial
port). For ``condor_ssh_to_job`` HTCondor's starter runs ``/usr/sbin/sshd`` as the job's owner
(keys from ``ssh-keygen``; ``scripts/dev`` installs openssh-server without starting it as a
system service). The pool's daemons see terminals as a standard host makes them
(``tests.condor.pool.STANDARD_DEVPTS``: this machine's own /dev/pts makes an interactive
``condor_ssh_to_job`` fail). Jobs are submitted as the unprivileged test user; another local
user is refused by HTCondor and by the service. An interactive session is driven with tmux.
"""

from __future__ import annotations

import pwd
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from glite_vm.slots import SlotLayout
from glite_vm.units import GIB
from glite_vm.vm.guest_run import GUEST_WORKDIR
from tests.condor.pool import (
    PersonalPool,
    glite_vm_pool,
    pool_service,
    submit_with_files,
    vm_job_description,
    wait_until,
)
from tests.service.svc_support import ServiceProcess, as_user, ensure_account

pytestmark = [pytest.mark.condor, pytest.mark.vm]

LAYOUT = SlotLayout(slots=2, root_slots=0, cpus=1, memory_mib=512, disk_bytes=2 * GIB)
JOB_TIMEOUT = 300.0
GUEST_UID = "1000"  # the test guest's job account (tests/guest/build.sh)
GLITE_VM = Path(sys.executable).parent / "glite-vm"
PAYLOAD = """#!/bin/sh
echo "guest-uid=$(id -u)"
echo "guest-hostname=$(hostname)"
sleep 900
"""


@pytest.fixture(scope="module")
def service(root: Path, guest_dir: Path) -> Iterator[ServiceProcess]:
    with pool_service(root, guest_dir, LAYOUT, {"GLITE_VM_GUEST_IDENTITY": "true"}) as svc:
        yield svc


@pytest.fixture(scope="module")
def pool(
    root: Path, service: ServiceProcess, test_user: pwd.struct_passwd
) -> Iterator[PersonalPool]:
    with glite_vm_pool(
        root,
        service,
        test_user,
        standard_devpts=True,
        layout=LAYOUT,
        advertise_period=5,
        reap_period=30,
    ) as p:
        yield p


@pytest.fixture(scope="module")
def job(pool: PersonalPool) -> Iterator[tuple[int, str]]:
    """A running job (cluster, domain) whose payload said who and where it is, then sleeps."""
    cluster = submit_with_files(pool, "debugme", vm_job_description(), {"payload.sh": PAYLOAD})

    def running() -> str | None:
        ad = pool.queue_ad(cluster)
        if ad is None or ad.get("JobStatus") != 2 or "GliteVmDomain" not in ad:
            return None
        return str(ad["GliteVmDomain"])

    domain: str = wait_until("the job to run in its VM", running, JOB_TIMEOUT, interval=2.0)
    try:
        yield cluster, domain
    finally:
        pool.run(["condor_rm", str(cluster)], check=False)
        pool.wait_for_history(cluster, 120)


def ssh_to_job(
    pool: PersonalPool, who: str, cluster: int, command: str, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """``condor_ssh_to_job CLUSTER.0 COMMAND`` as the local user ``who``."""
    return subprocess.run(
        [
            "runuser",
            "-u",
            who,
            "--",
            "env",
            *user_env(pool),
            "condor_ssh_to_job",
            f"{cluster}.0",
            command,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        check=False,
    )


def user_env(pool: PersonalPool) -> list[str]:
    return [f"{k}={pool.env[k]}" for k in ("CONDOR_CONFIG", "PATH")]


def shell_command(service: ServiceProcess, *words: str) -> str:
    """``glite-vm shell`` with no VM named, run where condor_ssh_to_job lands (the sandbox)."""
    argv = [str(GLITE_VM), "shell", "--socket", str(service.socket_path), *words]
    return shlex.join(argv)


def payload_said(pool: PersonalPool, cluster: int) -> dict[str, str]:
    """What the payload printed about itself, read in its sandbox through condor_ssh_to_job
    (tried again while the starter is not ready for it: a job that just started)."""
    said: dict[str, str] = {}
    tries: list[str] = []

    def printed() -> bool:
        done = ssh_to_job(pool, pool.user.pw_name, cluster, "cat _condor_stdout")
        tries.append(done.stderr)
        for line in done.stdout.splitlines() if done.returncode == 0 else ():
            key, _, value = line.partition("=")
            said[key] = value
        return "guest-hostname" in said

    try:
        wait_until("the payload's first lines", printed, 120, interval=3.0)
    except Exception as exc:
        raise AssertionError(f"condor_ssh_to_job failed: {tries[-3:]}") from exc
    return said


def test_condor_ssh_to_job_then_glite_vm_shell_reaches_the_jobs_guest(
    pool: PersonalPool, service: ServiceProcess, job: tuple[int, str]
) -> None:
    cluster, _domain = job
    said = payload_said(pool, cluster)
    done = ssh_to_job(
        pool,
        pool.user.pw_name,
        cluster,
        shell_command(service, "--", "sh", "-c", "id -u; hostname"),
    )
    assert done.returncode == 0, done.stderr
    uid, hostname = done.stdout.split()
    assert uid == said["guest-uid"] == GUEST_UID
    assert hostname == said["guest-hostname"]
    ad = pool.queue_ad(cluster)
    assert ad is not None
    assert str(ad["GliteVmGuestHostname"]).startswith(hostname)


def test_another_user_reaches_neither_the_job_nor_its_vm(
    pool: PersonalPool, service: ServiceProcess, job: tuple[int, str]
) -> None:
    cluster, domain = job
    bob = ensure_account("gvm-bob")
    theirs = ssh_to_job(pool, bob.name, cluster, "id -u")
    assert theirs.returncode != 0
    assert GUEST_UID not in theirs.stdout
    direct = subprocess.run(
        [
            *as_user(bob),
            str(GLITE_VM),
            "shell",
            "--socket",
            str(service.socket_path),
            domain,
            "--",
            "id",
            "-u",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert direct.returncode == 125
    assert "no VM named" in direct.stderr, direct.stderr
    assert direct.stdout == ""


def test_an_interactive_shell_through_condor_ssh_to_job_in_tmux(
    pool: PersonalPool, service: ServiceProcess, job: tuple[int, str]
) -> None:
    cluster, _domain = job
    payload_said(pool, cluster)  # the starter is ready for condor_ssh_to_job
    tmux = Tmux(pool, "gvm-shell")
    try:
        tmux.start(f"condor_ssh_to_job {cluster}.0", rows=40, cols=120)
        tmux.wait_for(lambda s: prompts(s) == 1, "the sandbox's shell prompt")
        tmux.type(shell_command(service))
        # the guest's login shell starts in the job's working directory
        tmux.wait_for(lambda s: f"{GUEST_WORKDIR} $" in s, "the guest's prompt")
        tmux.type("echo size=$(stty size) uid=$(id -u) tty=$(tty)")
        tmux.wait_for(
            lambda s: f"size=40 120 uid={GUEST_UID} tty=/dev/ttyS1" in s, "the guest's answer"
        )
        tmux.type("sleep 300")
        time.sleep(2)
        tmux.keys("C-c")  # reaches the guest's foreground program, not ssh or glite-vm
        tmux.type("echo after=$?")
        tmux.wait_for(lambda s: "after=130" in s, "the interrupted sleep's status")
        tmux.type("exit 7")
        tmux.wait_for(
            lambda s: "exit 7" in s and prompts(s.split("exit 7")[-1]) == 1,
            "the sandbox's prompt again",
        )
        tmux.type("echo back=$?")
        tmux.wait_for(lambda s: "back=7" in s, "glite-vm shell's exit status in the sandbox")
    finally:
        tmux.kill()


def prompts(screen: str) -> int:
    """Shell prompts waiting on the screen (lines that end with ``$``)."""
    return sum(1 for line in screen.splitlines() if line.rstrip().endswith("$"))


class Tmux:
    """A tmux session of the pool's user, driven by keys, read by its screen."""

    def __init__(self, pool: PersonalPool, name: str) -> None:
        self.pool = pool
        self.name = name

    def _tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                "runuser",
                "-u",
                self.pool.user.pw_name,
                "--",
                "env",
                *user_env(self.pool),
                "TERM=xterm",
                "tmux",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            check=False,
        )

    def start(self, command: str, *, rows: int, cols: int) -> None:
        started = self._tmux(
            "new-session", "-d", "-s", self.name, "-x", str(cols), "-y", str(rows), command
        )
        assert started.returncode == 0, started.stderr
        self._tmux("set-option", "-t", self.name, "status", "off")

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", self.name).stdout

    def type(self, line: str) -> None:
        self._tmux("send-keys", "-t", self.name, "-l", line)
        self.keys("Enter")

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", self.name, *keys)

    def wait_for(self, seen: Callable[[str], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not seen(self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not shown within {timeout:g} s:\n{self.screen()}")
            time.sleep(1.0)

    def kill(self) -> None:
        self._tmux("kill-server")
