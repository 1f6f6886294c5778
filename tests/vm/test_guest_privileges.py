"""A non-root payload cannot become root in its guest, nor read what root keeps there, through
anything glite-vm sets up: no sudo, no agent channel, no readable host key, no root-owned step
that follows a link the payload planted.

One VM (a non-root job's, with a CA-minted host identity) serves the module. Its state is taken
as root right after the agent answers, before glite-vm touches the guest, and compared at the
end. The last test turns the guest kernel's link protections off, as on older distributions
(fs.protected_symlinks and fs.protected_hardlinks arrived in Linux 3.6 and are off unless the
distribution or systemd turns them on), because glite-vm must not rely on them.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.errors import AgentError
from glite_vm.identity.ca_files import init_ca
from glite_vm.identity.guest import (
    GRID_SECURITY_DIR,
    HOSTKEY_PATH,
    GuestSetup,
    prepare_guest_identity,
)
from glite_vm.request import VMRequest
from glite_vm.vm.agent import GUEST_PATH
from glite_vm.vm.guest_run import GUEST_STATE, GUEST_WORKDIR, run_payload
from glite_vm.vm.guest_setup import apply_guest_setup
from glite_vm.vm.lifecycle import Vm, VmHost
from tests.support import LocalImage
from tests.vm.guest_calls import Output, payload
from tests.vm.guest_calls import as_root as root_bytes

pytestmark = pytest.mark.vm

AGENT_CHANNEL = "org.qemu.guest_agent.0"
# What a guest says about privileges, as root; compared before glite-vm's setup and after jobs.
PRIVILEGE_STATE = r"""
for f in /etc/sudoers /etc/sudoers.d /etc/sudoers.d/* /etc/doas.conf /etc/group /etc/passwd; do
    [ -e "$f" ] || continue
    ls -ld "$f"
    [ -f "$f" ] && sha256sum "$f"
done
echo "setuid and setgid files:"
find / \( -path /proc -o -path /sys -o -path /dev -o -path /run \) -prune -o \
    -type f \( -perm -4000 -o -perm -2000 \) -print | sort
"""


def as_root(vm: Vm, script: str) -> str:
    """Run ``script`` as root through the agent: the host's view, not the job's."""
    return root_bytes(vm, script).decode()


def key_material(key_pem: bytes) -> list[bytes]:
    lines = [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]
    return [*lines, base64.b64encode(key_pem), b"PRIVATE KEY"]


def files_under(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@dataclasses.dataclass
class Guest:
    vm: Vm
    setup: GuestSetup
    before: str  # PRIVILEGE_STATE before glite-vm did anything in the guest
    user: str
    uid: int


@pytest.fixture(scope="module")
def guest(
    vm_host: VmHost,
    direct_image: LocalImage,
    guests: dict[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Guest]:
    ca = init_ca(tmp_path_factory.mktemp("ca") / "ca", name="glite-vm privilege test CA")
    settings = dataclasses.replace(vm_host.settings, ca_cert=ca.cert_path, ca_key=ca.key_path)
    job_id = f"{os.getpid()}.77"
    setup = prepare_guest_identity(
        settings, host="node1.example.org", slot="slot1_1@node1", job_id=job_id, requested=None
    )
    request = VMRequest.create(
        settings, image="test", job_id=job_id, owner="tester", keep_snapshot="never"
    )
    assert request.root is False
    vm = vm_host.start(request, direct_image)
    with vm:
        vm.wait_ready()
        before = as_root(vm, PRIVILEGE_STATE)
        apply_guest_setup(vm, setup)
        inputs = tmp_path_factory.mktemp("inputs")
        (inputs / "input.txt").write_text("input\n")
        vm.push(inputs)
        yield Guest(vm, setup, before, guests["user"], guests["uid"])


def run_argv(vm: Vm, *argv: str) -> str:
    out = bytearray()
    result = vm.run(list(argv), stdout=out.extend, timeout=120)
    assert result.exit_code == 0, (argv, result)
    return out.decode()


def test_the_payload_runs_as_the_guest_user_not_root(guest: Guest) -> None:
    # argv with options of their own, as jobs have them: the switch to the user (busybox su
    # here) must pass them on, not take them (su -l would even give a login shell)
    uid, gid, name = (run_argv(guest.vm, "id", flag).strip() for flag in ("-u", "-g", "-un"))
    groups = run_argv(guest.vm, "id", "-G").split()
    assert (int(uid), name) == (guest.uid, guest.user)
    assert guest.uid != 0
    assert "0" not in [gid, *groups]
    echoed = run_argv(guest.vm, "sh", "-c", 'printf "%s|" "$0" "$@"', "a0", "-l", "-c", "x y")
    assert echoed == "a0|-l|-c|x y|"


def test_sudo_gives_nothing_and_the_setup_adds_no_privilege(guest: Guest) -> None:
    out = payload(
        guest.vm,
        "if command -v sudo >/dev/null; then sudo -n true && echo SUDO-WORKED; "
        "else echo no-sudo; fi; su -c 'id -u' root </dev/null 2>/dev/null; true",
    )
    assert "SUDO-WORKED" not in out.text
    assert out.text.split("\n")[0] in ("no-sudo", "")
    assert "0" not in out.text.split("\n")[1:]  # su did not make it root
    after = as_root(guest.vm, PRIVILEGE_STATE)
    assert after == guest.before, "glite-vm's setup changed sudoers, accounts or setuid files"
    sudoers = as_root(
        guest.vm, "cat /etc/sudoers /etc/sudoers.d/* /etc/doas.conf 2>/dev/null; true"
    )
    assert guest.user not in sudoers


def test_agent_channel_and_transfer_disk_are_out_of_the_users_reach(guest: Guest) -> None:
    """Whoever can talk to qemu-ga is root in the guest; the transfer disk carries the job's
    files both ways and must not be writable behind the host's back."""
    devices = as_root(
        guest.vm,
        f"""
        for d in /sys/class/virtio-ports/*; do
            [ "$(cat "$d/name")" = {AGENT_CHANNEL} ] && echo "/dev/${{d##*/}}"
        done
        [ -e /dev/virtio-ports/{AGENT_CHANNEL} ] && echo /dev/virtio-ports/{AGENT_CHANNEL}
        for d in /sys/block/*; do
            [ "$(cat "$d/serial" 2>/dev/null)" = glitevm-xfer ] && echo "/dev/${{d##*/}}"
        done
        true
        """,
    ).split()
    assert len(devices) >= 2, devices  # the agent's port and the transfer disk were found
    script = "; ".join(
        f'r=-; w=-; [ -r {d} ] && r=r; [ -w {d} ] && w=w; echo "{d} $r$w"' for d in devices
    )
    out = payload(guest.vm, script)
    assert out.text.splitlines() == [f"{d} --" for d in devices]
    modes = as_root(guest.vm, "stat -L -c '%a %u' " + " ".join(devices)).split("\n")
    for line in filter(None, modes):
        mode, owner = line.split()
        assert owner == "0" and int(mode, 8) & 0o066 == 0, line


def test_what_the_tool_puts_in_the_guest_is_protected(guest: Guest) -> None:
    key_pem = guest.setup.file(HOSTKEY_PATH).data()
    out = payload(
        guest.vm,
        f"""
        stat -L -c '%a %u %n' . input.txt {GUEST_STATE} {GRID_SECURITY_DIR} {HOSTKEY_PATH}
        ls {GUEST_STATE} >/dev/null 2>&1 && echo STATE-LISTED
        cat {HOSTKEY_PATH} 2>/dev/null && echo KEY-READ
        for d in $(echo "{GUEST_PATH}" | tr : ' ') /etc {GRID_SECURITY_DIR}; do
            [ -w "$d" ] && echo "WRITABLE $d"
        done
        true
        """,
    )
    work, pushed, state, grid, key, *rest = out.text.splitlines()
    assert rest == [], rest  # nothing listed, read or writable
    for line in (work, pushed):
        mode, owner, _ = line.split()
        assert int(mode, 8) & 0o002 == 0, line  # nobody else may write the job's files
        assert owner in ("0", str(guest.uid)), line
    assert pushed.split()[1] == str(guest.uid)
    assert state == f"700 0 {GUEST_STATE}"  # where root keeps the payload's output streams
    assert grid == f"755 0 {GRID_SECURITY_DIR}"
    assert key == f"400 0 {HOSTKEY_PATH}"
    assert not [piece for piece in key_material(key_pem) if piece in out.stdout + out.stderr]


# -- links planted by the payload, with the kernel's link protections off ----------------------

# On the work dir's own mount, as /etc/shadow is on a one-file-system image.
ROOT_ONLY = "/var/tmp/glite-vm-root-only"
PWNED = "glite-vm-pwned"


@pytest.fixture
def unprotected(guest: Guest) -> Iterator[str]:
    """The guest with fs.protected_symlinks/_hardlinks off and a root-only file (0400) on the
    work dir's mount; yields the file's secret content."""
    secret = f"ROOT-ONLY-{secrets.token_hex(8)}"
    as_root(
        guest.vm,
        f"echo {secret} > {ROOT_ONLY} && chmod 0400 {ROOT_ONLY} && "
        "echo 0 > /proc/sys/fs/protected_symlinks && echo 0 > /proc/sys/fs/protected_hardlinks",
    )
    try:
        yield secret
    finally:
        as_root(
            guest.vm,
            f"rm -f {ROOT_ONLY} /etc/{PWNED} {GRID_SECURITY_DIR}/{PWNED}; "
            "echo 1 > /proc/sys/fs/protected_symlinks; echo 1 > /proc/sys/fs/protected_hardlinks",
        )


def test_a_hard_link_to_a_root_only_file_does_not_come_out(
    guest: Guest, unprotected: str, tmp_path: Path
) -> None:
    planted = payload(guest.vm, f"ln {ROOT_ONLY} hardlink && echo PLANTED")
    assert "PLANTED" in planted.text, planted.stderr  # the link exists: the rest means something
    try:
        with contextlib.suppress(AgentError):
            guest.vm.pull(tmp_path, refused=[])
        pulled = b"".join(files_under(tmp_path).values())
        assert unprotected.encode() not in pulled, "a root-only file came out through a link"
    finally:
        payload(guest.vm, "rm -f hardlink")


def test_files_copied_in_do_not_follow_a_planted_symlink(guest: Guest, tmp_path: Path) -> None:
    planted = payload(guest.vm, "ln -s /etc escape && echo PLANTED")
    assert "PLANTED" in planted.text, planted.stderr
    try:
        (tmp_path / "escape").mkdir()
        (tmp_path / "escape" / PWNED).write_text("written through a link\n")
        with contextlib.suppress(AgentError):  # the job's own doing; /etc is what matters
            guest.vm.push(tmp_path)
        assert PWNED not in as_root(guest.vm, "ls -A /etc").split()
    finally:
        payload(guest.vm, "rm -rf escape")


def test_swapping_the_work_dir_for_a_link_gains_nothing(
    guest: Guest, unprotected: str, tmp_path: Path
) -> None:
    """The payload replaces its work dir by a link to the host key's directory: copying files
    out must not read the key, and preparing the next run must not give the user that
    directory."""
    vm = guest.vm
    key_pem = guest.setup.file(HOSTKEY_PATH).data()
    payload(vm, f"cd / && rm -rf {GUEST_WORKDIR}; ln -s {GRID_SECURITY_DIR} {GUEST_WORKDIR}")
    with contextlib.suppress(AgentError):
        vm.pull(tmp_path, refused=[])
    pulled = b"".join(files_under(tmp_path).values())
    assert not [p for p in key_material(key_pem) if p in pulled], "the host key came out"
    with contextlib.suppress(AgentError):
        payload(vm, f"touch {GRID_SECURITY_DIR}/{PWNED}")
    owners = as_root(vm, f"stat -c '%u %a' {GRID_SECURITY_DIR} /etc; ls -A {GRID_SECURITY_DIR}")
    grid, etc, *names = owners.split("\n")
    assert grid == "0 755" and etc.startswith("0 ")
    assert PWNED not in names
    assert as_root(vm, f"cat {HOSTKEY_PATH}").encode() == key_pem  # still the host's key
    # and the job still runs in a work dir of its own
    after = payload(vm, "pwd; echo ok > result.txt; cat result.txt")
    assert after.result.exit_code == 0, after.stderr
    assert after.text.split() == [GUEST_WORKDIR, "ok"]


# -- what a run keeps between runs, and what says that its preparation failed -------------------


def test_a_payload_cannot_forge_a_failed_preparation_nor_what_later_runs_rely_on(
    guest: Guest,
) -> None:
    """The run script's notes (how users are switched, the work dir made) and its failure
    reason live in root's state directory: the payload writes none of them, and its own exit
    status 126 is its exit status, not a host error."""
    notes = [f"{GUEST_STATE}/{name}" for name in ("prepare-error", "setpriv", "workdir")]
    forged = payload(
        guest.vm,
        "; ".join(f"echo forged > {path} 2>/dev/null || echo DENIED" for path in notes)
        + "; exit 126",
    )
    assert forged.result.exit_code == 126  # the payload's own status, no AgentError
    assert forged.text.split() == ["DENIED"] * len(notes)
    kept = as_root(guest.vm, f"stat -c '%a %u' {GUEST_STATE}; cat {' '.join(notes[1:])}")
    assert kept.split("\n")[0] == "700 0"
    assert "forged" not in kept
    after = payload(guest.vm, "id -u")  # and the next run goes as before
    assert after.result.exit_code == 0 and after.text.split() == [str(guest.uid)]


def test_no_run_reads_an_earlier_runs_output(guest: Guest) -> None:
    loud = payload(guest.vm, "echo EARLIER-OUT; echo EARLIER-ERR >&2")
    assert (loud.stdout, loud.stderr) == (b"EARLIER-OUT\n", b"EARLIER-ERR\n")
    quiet = payload(guest.vm, "true")
    assert (quiet.result.exit_code, quiet.stdout, quiet.stderr) == (0, b"", b"")


def test_a_work_dir_that_cannot_be_made_is_a_host_error_saying_so(guest: Guest) -> None:
    """Root's steps before the payload fail (here: /var/tmp read-only, the work dir hidden):
    the job is told that preparing the guest failed (a host error: requeued), not that its
    payload exited 126."""
    as_root(guest.vm, "mount -t tmpfs -o ro tmpfs /var/tmp")
    try:
        with pytest.raises(AgentError) as failed:
            payload(guest.vm, "echo never")
        assert str(failed.value) == (
            "preparing the guest failed in the guest: "
            f"cannot make the working directory {GUEST_WORKDIR}"
        )
    finally:
        as_root(guest.vm, "umount /var/tmp")
    again = payload(guest.vm, "pwd; echo back > back.txt; cat back.txt")
    assert again.result.exit_code == 0 and again.text.split() == [GUEST_WORKDIR, "back"]


# -- attacks on the run script's steps: a payload left running, a root job's forged reason -------


def root_payload(vm: Vm, script: str) -> Output:
    """``script`` as a root job's payload: GUEST_RUN itself, with the guest user root."""
    out, err = bytearray(), bytearray()
    argv = ["sh", "-c", script]
    result = run_payload(
        vm.agent, "root", argv, ids="0:0", stdout=out.extend, stderr=err.extend, timeout=120
    )
    return Output(result, bytes(out), bytes(err))


def test_a_payload_left_running_cannot_swap_the_work_dir_between_runs(guest: Guest) -> None:
    """A payload leaves a process behind that keeps trying, while later runs start, to move
    the work dir away and put a link to /etc (or a directory of its own) in its place, and to
    plant root's notes: every later run still starts in root's own work dir, and nothing lands
    in /etc."""
    vm = guest.vm
    left = payload(
        vm,
        f"""
        cd /
        (
            i=0
            while [ $i -lt 400 ]; do
                mv -f {GUEST_WORKDIR} /var/tmp/gvm-moved 2>/dev/null && echo MOVED
                rm -rf {GUEST_WORKDIR} 2>/dev/null
                ln -sfn /etc {GUEST_WORKDIR} 2>/dev/null
                [ -L {GUEST_WORKDIR} ] && echo LINKED
                mkdir -p /var/tmp/gvm-own; mv -f /var/tmp/gvm-own {GUEST_WORKDIR} 2>/dev/null
                [ -O {GUEST_WORKDIR} ] && echo OWN
                echo "/etc {guest.user}" > {GUEST_STATE}/workdir 2>/dev/null && echo NOTED
                i=$((i + 1))
                sleep 0.05
            done > /var/tmp/gvm-swapper.log 2>&1
        ) </dev/null >/dev/null 2>&1 &
        echo $! > /var/tmp/gvm-swapper.pid
        echo STARTED
        """,
    )
    assert "STARTED" in left.text, left.stderr
    try:
        for n in range(5):
            run = payload(vm, f"pwd; stat -c '%u %a' .; touch {PWNED}-{n}; echo ran")
            assert run.result.exit_code == 0, run.stderr
            where, owner, ran = run.text.split("\n")[:3]
            assert (where, owner, ran) == (GUEST_WORKDIR, "0 770", "ran"), run.text
        etc = as_root(vm, "ls -A /etc")
        assert PWNED not in etc, "a run's work dir was /etc"
        state = as_root(vm, f"stat -c '%F %u %a' {GUEST_WORKDIR}; cat /var/tmp/gvm-swapper.log")
        assert state.split("\n")[0] == "directory 0 770"
        assert not {"MOVED", "LINKED", "OWN", "NOTED"} & set(state.split()), state
    finally:
        as_root(
            vm,
            "kill $(cat /var/tmp/gvm-swapper.pid) 2>/dev/null; "
            f"rm -rf /var/tmp/gvm-swapper.* /var/tmp/gvm-moved /var/tmp/gvm-own "
            f"{GUEST_WORKDIR}/{PWNED}-* {GUEST_WORKDIR}/etc {GUEST_WORKDIR}/gvm-own; true",
        )


def test_a_root_jobs_junk_failure_reason_reaches_the_host_bounded_and_quoted(
    guest: Guest,
) -> None:
    """A root job's payload writes terminal escapes, or megabytes, or a link to /dev/zero as
    root's failure reason and exits 126: the host says the preparation failed (the root job's
    own guest, its own doing) in one bounded, printable line, and does not read on and on."""
    vm = guest.vm
    reason = f"{GUEST_STATE}/prepare-error"
    forged = {
        "escapes": f"printf 'BAD\\033]0;title\\007\\033[2J\\r\\nline2\\001%04000d' 0 > {reason}",
        "megabytes": f"head -c 3000000 /dev/urandom > {reason}",
        "endless": f"rm -f {reason}; ln -s /dev/zero {reason}",
    }
    said = {}
    try:
        for name, script in forged.items():
            with pytest.raises(AgentError) as failed:
                root_payload(vm, f"{script}; exit 126")
            said[name] = str(failed.value)
    finally:
        as_root(vm, f"rm -f {reason}")
    for name, message in said.items():
        assert message.startswith("preparing the guest failed in the guest"), (name, message)
        assert len(message) < 1024, (name, len(message))
        assert message.isprintable() and "\033" not in message, (name, message)
    assert "BAD" in said["escapes"] and "line2" in said["escapes"]
    assert "larger than" in said["megabytes"] and "larger than" in said["endless"]
    # and the next run goes as before
    after = root_payload(vm, "id -u")
    assert (after.result.exit_code, after.text) == (0, "0\n")


def test_a_root_jobs_fifo_as_failure_reason_does_not_hang_the_host(guest: Guest) -> None:
    """A root job's payload makes root's failure reason a FIFO, with no writer or with an idle
    one holding it open, and exits 126: the host's read of it comes back (an error, or
    nothing: the root job's own exit status 126), and the agent answers the next run."""
    vm = guest.vm
    reason = f"{GUEST_STATE}/prepare-error"
    holder = "/var/tmp/gvm-fifo-holder.pid"
    plants = {
        "no writer": f"rm -f {reason}; mkfifo {reason} || exit 1",
        "idle writer": f"rm -f {reason}; mkfifo {reason} || exit 1; "
        f"(exec 3<>{reason}; exec sleep 600) </dev/null >/dev/null 2>&1 & echo $! > {holder}",
    }
    try:
        for name, plant in plants.items():
            try:
                came = root_payload(vm, f"{plant}; exit 126")
            except AgentError as exc:
                assert str(exc).startswith("preparing the guest failed in the guest"), (name, exc)
            else:
                assert came.result.exit_code == 126, (name, came)
            assert vm.agent.ping(timeout=10), f"{name}: the agent no longer answers"
            # (a FIFO left there would block the next run's own steps: the root job's doing)
            as_root(vm, f"rm -f {reason}")
    finally:
        as_root(vm, f"[ -f {holder} ] && kill $(cat {holder}); rm -f {reason} {holder}; true")
    after = root_payload(vm, "id -u")
    assert (after.result.exit_code, after.text) == (0, "0\n")


def test_a_root_job_that_removes_or_replaces_the_state_dir_harms_only_its_own_runs(
    guest: Guest,
) -> None:
    """A root job's payload removes root's state directory, or puts a link to a directory of
    forged files (an output, a failure reason, the notes) in its place: the host neither
    crashes nor takes the forged failure reason; the next runs remake the directory (root's,
    0700, no link) and go as before."""
    vm = guest.vm
    removed = root_payload(vm, f"rm -rf {GUEST_STATE}; echo gone")
    assert removed.result.exit_code == 0
    after = payload(vm, "id -u; pwd")
    assert after.result.exit_code == 0 and after.text.split() == [str(guest.uid), GUEST_WORKDIR]
    decoy = "/run/gvm-decoy"
    try:
        root_payload(
            vm,
            f"mkdir -p {decoy} && for f in stdout stderr prepare-error; do "
            f"echo FORGED > {decoy}/$f; done && echo '/etc {guest.user}' > {decoy}/workdir && "
            f"echo setpriv > {decoy}/setpriv && rm -rf {GUEST_STATE} && "
            f"ln -s {decoy} {GUEST_STATE}",
        )
        outcomes = []
        for _ in range(2):  # the first run may read the decoy's output: the root job's doing
            try:
                run = payload(vm, "echo real; exit 126")
                outcomes.append((run.result.exit_code, run.text))
            except AgentError as exc:
                outcomes.append((-1, str(exc)))
        assert all("FORGED" not in text for _, text in outcomes), outcomes
        assert outcomes[-1] == (126, "real\n"), outcomes
        state = as_root(vm, f"stat -c '%F %a %u' {GUEST_STATE}; ls -A /etc")
        assert state.split("\n")[0] == "directory 700 0", state
        assert PWNED not in state
    finally:
        as_root(vm, f"rm -rf {decoy}")
    again = payload(vm, "pwd; stat -c '%u %a' .")
    assert again.text.split("\n")[:2] == [GUEST_WORKDIR, "0 770"], again.text


def test_a_payload_left_writing_to_its_output_cannot_touch_a_later_runs(guest: Guest) -> None:
    """A background process of an earlier run keeps writing to the output it inherited: the
    later runs' output is exactly their own (each run writes files of its own)."""
    started = payload(
        guest.vm,
        "(i=0; while [ $i -lt 100000 ]; do echo OLD-$i; echo OLD-$i >&2; i=$((i+1)); done) &"
        " echo started",
    )
    assert started.text.startswith("started\n")
    try:
        for n in range(3):
            later = payload(guest.vm, f"echo RUN-{n}; echo ERR-{n} >&2")
            assert (later.stdout, later.stderr) == (f"RUN-{n}\n".encode(), f"ERR-{n}\n".encode())
    finally:
        payload(guest.vm, "pkill -f 'echo OLD' || true")
