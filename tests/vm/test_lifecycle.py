"""The life of one VM on real libvirtd + QEMU with the real test guests: what a job notices."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.errors import BootError, Disposition
from glite_vm.vm.guest_run import ExecResult
from glite_vm.vm.lifecycle import Vm, VmHost
from tests.support import LocalImage, glite_vm_domains, sha256_of
from tests.vm.guest_calls import boot, vm_request

pytestmark = pytest.mark.vm


class Captured:
    def __init__(self) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.first_stdout_at: float | None = None

    def out(self, data: bytes) -> None:
        if self.first_stdout_at is None:
            self.first_stdout_at = time.monotonic()
        self.stdout += data

    def err(self, data: bytes) -> None:
        self.stderr += data


def run(vm: Vm, script: str, **kw: object) -> tuple[ExecResult, Captured]:
    cap = Captured()
    result = vm.run(["sh", "-c", script], stdout=cap.out, stderr=cap.err, **kw)  # type: ignore[arg-type]
    return result, cap


@pytest.fixture(scope="module")
def user_vm(vm_host: VmHost, direct_image: LocalImage) -> Iterator[Vm]:
    vm = boot(vm_host, direct_image, keep_snapshot="never")
    yield vm
    vm.teardown(failed=False)


@pytest.fixture(scope="module")
def root_vm(vm_host: VmHost, direct_image: LocalImage) -> Iterator[Vm]:
    vm = boot(vm_host, direct_image, root=True, keep_snapshot="never")
    yield vm
    vm.teardown(failed=False)


@pytest.mark.parametrize("code", [0, 1, 7])
def test_exit_codes_come_back_as_they_are(user_vm: Vm, code: int) -> None:
    result, _ = run(user_vm, f"exit {code}")
    assert (result.exit_code, result.signal) == (code, None)


def test_missing_command_is_127(user_vm: Vm) -> None:
    cap = Captured()
    result = user_vm.run(["no-such-command-here"], stdout=cap.out, stderr=cap.err)
    assert result.exit_code == 127
    assert b"no-such-command-here" in cap.stderr


def test_signal_is_preserved(user_vm: Vm) -> None:
    result, _ = run(user_vm, "kill -TERM $$")
    assert result.signal == 15
    assert result.shell_status == 143


def test_stdout_and_stderr_are_separate_and_binary_safe(user_vm: Vm) -> None:
    result, cap = run(user_vm, r"printf 'o\000\377\001ut'; printf 'e\000r\nr' >&2")
    assert result.exit_code == 0
    assert bytes(cap.stdout) == b"o\x00\xff\x01ut"
    assert bytes(cap.stderr) == b"e\x00r\nr"


def test_large_output_arrives_complete(user_vm: Vm) -> None:
    result, cap = run(user_vm, "yes 0123456789abcdef | head -c 3000000")
    assert result.exit_code == 0
    assert bytes(cap.stdout) == (b"0123456789abcdef\n" * 200000)[:3000000]


def test_output_is_streamed_while_the_payload_runs(user_vm: Vm) -> None:
    result, cap = run(user_vm, "echo first; sleep 3; echo second")
    end = time.monotonic()
    assert result.exit_code == 0
    assert bytes(cap.stdout) == b"first\nsecond\n"
    assert cap.first_stdout_at is not None
    assert end - cap.first_stdout_at > 2.0, "first line arrived only at the end"


def test_user_and_root(user_vm: Vm, root_vm: Vm) -> None:
    _, user = run(user_vm, "id -u; echo $HOME; pwd")
    uid, home, cwd = bytes(user.stdout).decode().split()
    assert uid != "0" and int(uid) > 0
    assert home == "/home/glite"
    assert cwd == "/var/tmp/glite-vm-job"
    _, root = run(root_vm, "id -u")
    assert bytes(root.stdout) == b"0\n"


def test_environment_reaches_the_payload(user_vm: Vm) -> None:
    cap = Captured()
    user_vm.run(
        ["sh", "-c", 'printf %s "$GREETING"'], env={"GREETING": "hi 'there' $x"}, stdout=cap.out
    )
    assert bytes(cap.stdout) == b"hi 'there' $x"


def test_50mib_in_and_out_byte_identical(user_vm: Vm, tmp_path: Path) -> None:
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(50 << 20)
    (src / "big.bin").write_bytes(big)
    (src / "sub" / "small.txt").write_text("hello\n")
    (src / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "run.sh").chmod(0o755)
    user_vm.push(src)
    result, cap = run(
        user_vm,
        "./run.sh && cp big.bin copy.bin && sha256sum big.bin > sum.txt "
        "&& echo changed >> sub/small.txt && ls -la sub >&2",
    )
    assert result.exit_code == 0, bytes(cap.stderr)
    assert bytes(cap.stdout) == b"ran\n"
    out = tmp_path / "out"
    out.mkdir()
    copied = user_vm.pull(out, unchanged_from=src)
    assert sorted(copied) == ["copy.bin", "sub/small.txt", "sum.txt"]
    assert (out / "copy.bin").read_bytes() == big
    assert (out / "sum.txt").read_text().split()[0] == hashlib.sha256(big).hexdigest()
    assert (out / "sub" / "small.txt").read_text() == "hello\nchanged\n"


def test_sandbox_symlinks_travel_as_links_never_followed(user_vm: Vm, tmp_path: Path) -> None:
    canary = tmp_path / "canary-secret"
    canary.write_text("TOP-SECRET-CANARY\n")
    canary.chmod(0o600)
    src = tmp_path / "in"
    src.mkdir()
    (src / "leak").symlink_to(canary)
    (src / "up").symlink_to("../canary-secret")
    user_vm.push(src)
    result, cap = run(user_vm, "cat leak up 2>&1; readlink leak")
    assert b"TOP-SECRET-CANARY" not in cap.stdout
    assert str(canary).encode() in cap.stdout  # the link itself arrived, unresolved
    assert result.exit_code == 0


def test_links_out_of_the_guest_are_refused(user_vm: Vm, tmp_path: Path) -> None:
    run(user_vm, "ln -sf /etc/passwd abs-link; ln -sf ../../../etc/passwd rel-link; echo ok > f")
    out = tmp_path / "out"
    out.mkdir()
    refused: list[str] = []
    copied = user_vm.pull(out, refused=refused)
    assert "f" in copied
    assert not (out / "abs-link").exists() and not (out / "abs-link").is_symlink()
    assert not (out / "rel-link").is_symlink()
    assert any("abs-link" in r for r in refused)


def test_boot_log_holds_everything_from_the_first_byte(user_vm: Vm) -> None:
    text = user_vm.boot_log.read_bytes().decode(errors="replace")
    head = text[:400]
    assert "SeaBIOS" in head, "the firmware's first output is missing"
    lines = text.splitlines()
    kernel = [i for i, line in enumerate(lines) if "Linux version" in line]
    assert kernel and kernel[0] < 10
    assert "glite-guest: agent started" in text


def test_base_image_unchanged_after_a_job_that_writes_everywhere(
    vm_host: VmHost, direct_image: LocalImage
) -> None:
    before = sha256_of(direct_image.path)
    vm = boot(vm_host, direct_image, root=True, keep_snapshot="never")
    with vm:
        result, cap = run(
            vm,
            "for d in / /root /home /tmp /var/tmp /data; do echo junk > $d/junk; done; "
            "dd if=/dev/zero of=/dev/vda bs=1M count=8 2>&1; sync",
        )
        assert result.exit_code == 0, bytes(cap.stdout)
    assert sha256_of(direct_image.path) == before


@pytest.mark.parametrize(
    ("policy", "code", "kept"),
    [("on_failure", 0, False), ("on_failure", 3, True), ("never", 3, False)],
)
def test_snapshot_kept_or_discarded_by_policy(
    vm_host: VmHost, direct_image: LocalImage, policy: str, code: int, kept: bool
) -> None:
    vm = boot(vm_host, direct_image, keep_snapshot=policy)
    with vm:
        run(vm, f"exit {code}")
    done = vm.torn_down
    assert done is not None
    assert (done.snapshot_path is not None) is kept
    assert vm.snapshot.exists() is kept
    assert not vm.overlay.exists()
    assert not vm.xfer.exists()
    assert done.boot_log_path.stat().st_size > 0
    assert vm.name not in glite_vm_domains()


def test_snapshot_is_valid_qcow2_that_boots_again(
    vm_host: VmHost, direct_image: LocalImage
) -> None:
    vm = boot(vm_host, direct_image, root=True, keep_snapshot="always")
    with vm:
        run(vm, "echo left-behind > /root/marker; sync")
    snapshot = vm.torn_down.snapshot_path if vm.torn_down else None
    assert snapshot is not None
    check = subprocess.run(
        ["qemu-img", "check", str(snapshot)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    digest = sha256_of(snapshot)
    # The kept file is private (0600 in a 0700 directory), as `snapshots boot` finds it: QEMU's
    # user boots a copy, as there (glite_vm.snapshots.boot).
    copy = vm_host.settings.state_dir / f"{snapshot.parent.name}.qcow2"
    shutil.copyfile(snapshot, copy)
    copy.chmod(0o644)
    again = dataclasses.replace(
        direct_image, name="snapshot", path=copy, format="qcow2", sha256=digest
    )
    vm2 = vm_host.start(
        vm_request(vm_host.settings, root=True, keep_snapshot="never"),
        again,
        base_chain=((direct_image.path, direct_image.format),),
    )
    with vm2:
        vm2.wait_ready()
        result, cap = run(vm2, "cat /root/marker")
    assert bytes(cap.stdout) == b"left-behind\n"
    assert result.exit_code == 0
    assert sha256_of(snapshot) == digest


def test_guest_without_agent_is_a_bounded_requeue(
    vm_host: VmHost, direct_image: LocalImage
) -> None:
    silent = dataclasses.replace(direct_image, cmdline=f"{direct_image.cmdline} glite_noagent")
    vm = vm_host.start(vm_request(vm_host.settings), silent)
    start = time.monotonic()
    with pytest.raises(BootError) as info, vm:
        vm.wait_ready(timeout=15)
    assert time.monotonic() - start < 25
    err = info.value
    assert err.disposition is Disposition.REQUEUE
    assert str(vm.boot_log) in str(err)
    assert "Linux version" in err.tail or "glite-guest" in err.tail
    assert vm.name not in glite_vm_domains()
    assert not vm.overlay.exists()


def test_teardown_happens_when_the_caller_fails(vm_host: VmHost, direct_image: LocalImage) -> None:
    vm = boot(vm_host, direct_image, keep_snapshot="on_failure")
    with pytest.raises(RuntimeError), vm:
        raise RuntimeError("the build framework crashed")
    assert vm.name not in glite_vm_domains()
    assert vm.torn_down is not None and vm.torn_down.snapshot_path is not None  # failure kept


def test_disk_boot_guest_reaches_agent_and_runs(vm_host: VmHost, disk_image: LocalImage) -> None:
    vm = boot(vm_host, disk_image, keep_snapshot="never")
    with vm:
        result, cap = run(vm, "id -u; cat /proc/cmdline")
    assert result.exit_code == 0
    uid, cmdline = bytes(cap.stdout).decode().split("\n", 1)
    assert uid == "1000"
    assert "root=" in cmdline  # booted by the bootloader on the disk, not by libvirt
    assert vm.timings.ready is not None and vm.timings.boot is not None
