"""The bootstrapper service end to end: a real root service, real users, real VMs.

What a job owner and an admin would notice: a job's whole life through the socket, one user
unable to touch another's VM, sandbox links that cannot reach root-only files, the reaper, a
restart that keeps track, and failures that leave nothing behind.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import REAP_INTERVAL, USERS
from tests.service.shell_support import cli
from tests.service.svc_support import (
    Account,
    FakeStarter,
    ServiceProcess,
    answer_of,
    as_user,
    background,
    background_exec,
    call,
    denied,
    domain_running,
    domains_of,
    events_of,
    job_ad,
    leases_in,
    make_scratch,
    ok,
    our_domains,
    prepare,
    read_as,
    run_as,
    stdout_of,
    wait_for,
)

pytestmark = pytest.mark.vm


# -- a job's life ----------------------------------------------------------------------------


def test_job_life_through_the_socket(
    service: ServiceProcess, svc_root: Path, alice: Account, bob: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "life", {"in.txt": "hello\n", "sub/deep.txt": "x"})
    prepared = prepare(service, alice, scratch)
    vm = prepared["vm"]
    attrs = prepared["ad_attributes"]
    # Outside any HTCondor job: the VM is named after no slot ("local").
    assert attrs["GliteVmGuestHostname"].split(".")[0].endswith("-local")
    assert "GliteVmHostname" not in attrs  # that one is the job's request, not ours
    assert attrs["GliteVmGuestNetwork"] == "none"  # what it used; GliteVmNetwork is the job's
    assert "GliteVmNetwork" not in attrs
    assert attrs["GliteVmDomain"] == vm
    assert attrs["GliteVmHypervisor"] in ("qemu", "kvm")
    assert len(attrs["GliteVmImageDigest"]) == 64
    assert isinstance(attrs["GliteVmCacheHit"], bool)
    assert attrs["GliteVmBootLogPath"] == prepared["boot_log_path"]
    assert attrs["GliteVmTimeBoot"] > 0 and attrs["GliteVmTimeReady"] > 0
    assert prepared["guest_user"] == "glite"
    assert domain_running(vm)

    # The VM is alice's (not "mallory"'s, whatever the ad said) and only alice sees it.
    mine = ok(call(service, alice, "list_vms"))
    assert [(v["vm"], v["owner"], v["owner_uid"]) for v in mine] == [(vm, alice.name, alice.uid)]
    assert ok(call(service, bob, "list_vms")) == []

    # Bob can do nothing with it, and the answer does not even confirm that it exists.
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("exec", {"argv": ["true"]}),
        ("push", {"src_dir": "/tmp"}),
        ("pull", {"dest_dir": "/tmp/gvm-bob-loot"}),
        ("teardown", {"failed": False}),
    ]
    for op, args in attempts:
        message = denied(call(service, bob, op, vm=vm, **args))
        assert f"belongs to uid {bob.uid}" in message
    assert not Path("/tmp/gvm-bob-loot").exists()
    assert domain_running(vm)

    # The boot log: alice may read it while the VM runs, bob may not.
    boot_log = prepared["boot_log_path"]
    assert b"Linux version" in base64.b64decode(ok(read_as(alice, boot_log)))
    assert read_as(bob, boot_log)["errno"] == 13

    # Files in, the payload with its output streamed and its exit code, files out.
    assert ok(call(service, alice, "push", vm=vm, src_dir=str(scratch))) > 0
    script = (
        "cat in.txt sub/deep.txt; echo; echo to-err >&2; sleep 2; echo after; "
        "echo result > out.txt; id -un; hostname; exit 7"
    )
    ran = ok(call(service, alice, "exec", vm=vm, argv=["sh", "-c", script]))
    assert ran["outcome"]["exit_code"] == 7
    assert ran["outcome"]["signal"] is None
    lines = stdout_of(ran).splitlines()
    assert lines[:3] == ["hello", "x", "after"]
    assert lines[3] == "glite"  # the guest user, not root
    assert attrs["GliteVmGuestHostname"].startswith(lines[4])
    assert stdout_of(ran, "stderr") == "to-err\n"
    first = min(c["t"] for c in ran["chunks"] if "hello" in c["data"])
    assert ran["end"] - first >= 1.5, "output arrived only at the end, not as it happened"

    out = scratch / "out"
    pulled = ok(call(service, alice, "pull", vm=vm, dest_dir=str(out), unchanged_from=str(scratch)))
    assert pulled == ["out.txt"]
    assert (out / "out.txt").read_text() == "result\n"
    assert (out / "out.txt").stat().st_uid == alice.uid
    assert out.stat().st_uid == alice.uid

    # Teardown keeps the snapshot of a failed job; snapshot and boot log are alice's alone.
    done = ok(call(service, alice, "teardown", vm=vm, failed=True))
    assert not domain_running(vm)
    snapshot = Path(done["snapshot_path"])
    assert done["ad_attributes"]["GliteVmSnapshotPath"] == str(snapshot)
    assert done["ad_attributes"]["GliteVmTimeTeardown"] >= 0
    for kept in (snapshot, Path(done["boot_log_path"]), Path(done["record_path"])):
        st = kept.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, 0o600), kept
        assert read_as(bob, kept)["errno"] == 13
    assert read_as(alice, snapshot)["ok"]
    # A second teardown (JOB_EXIT after the launcher) gets the same outcome; bob gets nothing.
    assert ok(call(service, alice, "teardown", vm=vm, failed=False)) == done
    denied(call(service, bob, "teardown", vm=vm, failed=False))


# -- sandbox links ---------------------------------------------------------------------------


def test_sandbox_links_cannot_reach_root_only_files(
    service: ServiceProcess, svc_root: Path, alice: Account, canary: tuple[Path, bytes]
) -> None:
    canary_path, secret = canary
    before = canary_path.read_bytes()
    seen: list[str] = []

    def remember(answer: dict[str, Any]) -> dict[str, Any]:
        seen.append(repr(answer))
        return answer

    scratch = make_scratch(svc_root, alice, "links", {"data.txt": "mine\n"})
    (scratch / "link").symlink_to(canary_path)
    os.chown(scratch / "link", alice.uid, alice.gid, follow_symlinks=False)
    hard = make_scratch(svc_root, alice, "hardlinks", {"ok.txt": "fine\n"})
    os.link(canary_path, hard / "hard")  # root can; the file stays root's, 0600

    vm = prepare(service, alice, scratch)["vm"]
    # A hard link to a root-only file: the copy runs as alice, who cannot read it.
    message = denied(remember(call(service, alice, "push", vm=vm, src_dir=str(hard))))
    assert "'hard'" in message and "permission denied" in message.lower()
    # A '..' path out of the sandbox into a directory alice cannot read.
    escape = f"{scratch}/../canary"
    denied(remember(call(service, alice, "push", vm=vm, src_dir=escape)))
    # The symlink travels as a link: in the guest it points at nothing of the host's.
    assert ok(remember(call(service, alice, "push", vm=vm, src_dir=str(scratch)))) > 0
    script = (
        "cat link; readlink link; cat data.txt; "
        "ln -s /etc/hostname abs; ln -s ../../../../../etc/passwd up; echo out > fine.txt"
    )
    ran = remember(ok(call(service, alice, "exec", vm=vm, argv=["sh", "-c", script])))
    assert stdout_of(ran) == f"{canary_path}\nmine\n"

    # Output lands as alice: not through '..' into a root-only place, not through her links.
    denied(remember(call(service, alice, "pull", vm=vm, dest_dir=f"{scratch}/../canary/out")))
    assert sorted(p.name for p in canary_path.parent.iterdir()) == ["secret.txt"]
    out = make_scratch(svc_root, alice, "links-out")
    (out / "fine.txt").symlink_to(canary_path)
    os.chown(out / "fine.txt", alice.uid, alice.gid, follow_symlinks=False)
    pulled = ok(remember(call(service, alice, "pull", vm=vm, dest_dir=str(out))))
    assert "fine.txt" in pulled
    assert not (out / "fine.txt").is_symlink()
    assert (out / "fine.txt").read_text() == "out\n"
    for p in out.rglob("*"):  # links leaving the directory were refused
        assert not (p.is_symlink() and os.path.isabs(os.readlink(p))), p
        assert p.lstat().st_uid == alice.uid
    assert not (out / "up").exists() and not (out / "abs").exists()
    done = ok(call(service, alice, "teardown", vm=vm, failed=False))

    assert canary_path.read_bytes() == before
    assert stat.S_IMODE(canary_path.stat().st_mode) == 0o600 and canary_path.stat().st_uid == 0
    text = secret.decode()
    for where, content in [
        ("client answers", "\n".join(seen)),
        ("service log", service.log()),
        ("boot log", Path(done["boot_log_path"]).read_text(errors="replace")),
        *[(str(p), p.read_text(errors="replace")) for p in out.rglob("*") if p.is_file()],
    ]:
        assert text not in content, f"the canary leaked into the {where}"


# -- who may prepare -------------------------------------------------------------------------


def test_prepare_refuses_a_scratch_dir_the_caller_does_not_own(
    service: ServiceProcess, svc_root: Path, alice: Account, bob: Account
) -> None:
    bobs = make_scratch(svc_root, bob, "bobs")
    alices = make_scratch(svc_root, alice, "alices")
    alias = svc_root / "alices-alias"
    alias.symlink_to(alices)
    domains_before = our_domains(USERS)
    for scratch in (str(bobs), f"{alices}/../{bobs.name}"):
        message = denied(call(service, alice, "prepare", job_ad=job_ad(), scratch_dir=scratch))
        assert f"belongs to uid {bob.uid}" in message
    assert "symlink" in denied(
        call(service, alice, "prepare", job_ad=job_ad(), scratch_dir=str(alias))
    )
    for scratch in (str(svc_root / "missing"), "relative/dir"):
        answer = call(service, alice, "prepare", job_ad=job_ad(), scratch_dir=scratch)
        assert answer["type"] == "RequestError" and answer["disposition"] == "hold", answer
    unknown = call(
        service, alice, "prepare", job_ad=job_ad("no-such-image"), scratch_dir=str(alices)
    )
    assert unknown["type"] == "UnknownImageError" and "test-direct" in unknown["message"]
    assert our_domains(USERS) == domains_before
    assert [v for v in service.client().list_vms() if v.owner_uid in (alice.uid, bob.uid)] == []


# -- the reaper ------------------------------------------------------------------------------


def test_reaper_takes_vms_whose_job_is_gone(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    starter = subprocess.Popen([*as_user(alice), "sleep", "600"])
    try:
        killed_vm = prepare(
            service, alice, make_scratch(svc_root, alice, "reap-a"), starter_pid=starter.pid
        )["vm"]
        scratch_b = make_scratch(svc_root, alice, "reap-b")
        removed_vm = prepare(service, alice, scratch_b)["vm"]
        assert domain_running(killed_vm) and domain_running(removed_vm)
        time.sleep(REAP_INTERVAL + 0.5)
        assert domain_running(killed_vm), "reaped while its starter was alive"

        starter.send_signal(signal.SIGKILL)
        starter.wait(timeout=10)
        took = wait_for(
            "VM of the killed starter gone",
            lambda: killed_vm not in our_domains(USERS),
            REAP_INTERVAL + 15,
        )
        assert took <= REAP_INTERVAL + 10
        assert domain_running(removed_vm)

        shutil.rmtree(scratch_b)
        wait_for(
            "VM of the removed scratch dir gone",
            lambda: removed_vm not in our_domains(USERS),
            REAP_INTERVAL + 15,
        )
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(timeout=10)
    log = service.log()
    assert f"{killed_vm} (job" in log and f"starter process {starter.pid} is gone" in log
    assert f"{removed_vm} (job" in log and "scratch directory" in log
    # The event log says the same, one line per VM, for `glite-vm events`.
    (reaped,) = [e for e in events_of(svc_root / "state", killed_vm) if e.event == "reaped"]
    assert reaped.reason == f"its starter process {starter.pid} is gone", reaped
    assert (reaped.uid, reaped.failed) == (alice.uid, True)
    # The job's own teardown after the reaper gets the reaper's outcome: snapshot kept.
    done = ok(call(service, alice, "teardown", vm=killed_vm, failed=False))
    assert Path(done["snapshot_path"]).stat().st_uid == alice.uid
    assert ok(call(service, alice, "list_vms")) == []


def test_glite_vm_reap_runs_a_pass_now(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    """``glite-vm reap`` (here by alice) talks to the service and prints nothing on stdout."""
    proc = subprocess.run(
        [*as_user(alice), sys.executable, "-m", "glite_vm.cli.service", "reap"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "GLITE_VM_SOCKET_PATH": str(service.socket_path)},
        check=False,
    )
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stderr
    gone = subprocess.run(
        [*as_user(alice), sys.executable, "-m", "glite_vm.cli.service", "reap"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "GLITE_VM_SOCKET_PATH": str(svc_root / "none.sock")},
        check=False,
    )
    assert gone.returncode == 125 and "not running" in gone.stderr, gone.stderr
    assert "host error" in gone.stderr


def test_a_second_service_on_the_same_socket_refuses_to_start(service: ServiceProcess) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "glite_vm.cli.service", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env=service.env,
        cwd="/",
        check=False,
    )
    assert second.returncode == 125, second.stderr
    assert "host error: another glite-vm service is already serving" in second.stderr
    assert service.client().ping().pid == service.pid


# -- restart ---------------------------------------------------------------------------------


def test_restart_keeps_track_of_running_vms(
    service: ServiceProcess, svc_root: Path, alice: Account, fake_starter: Path
) -> None:
    # A root job on the root-enabled slot3 (the default layout: 3 slots, the last for root).
    starter = FakeStarter(fake_starter, service, "slot3", slot_type=2)
    try:
        ad = job_ad(GliteVmRoot=True)
        scratch = str(make_scratch(svc_root, alice, "restart"))
        vm = ok(starter.call(alice, "prepare", job_ad=ad, scratch_dir=scratch))["vm"]
        before = ok(
            call(service, alice, "exec", vm=vm, argv=["sh", "-c", "echo before > f; id -u"])
        )
        assert stdout_of(before) == "0\n"  # a root job on a root-enabled slot

        # A restart while a payload runs: its client learns at once, the VM lives on.
        running = background_exec(service, alice, vm, "sleep 30")
        time.sleep(1.5)
        service.restart()
        interrupted = answer_of(running, timeout=30)
        assert interrupted["type"] == "ServiceUnavailableError", interrupted
        assert "stopping" in interrupted["message"]
        assert domain_running(vm), "stopping the service must not stop VMs"
        assert f"adopted {vm}" in service.log()
        assert [v["vm"] for v in ok(call(service, alice, "list_vms"))] == [vm]

        # The adopted VM serves as before; a silent payload longer than the client's idle
        # timeout survives thanks to the heartbeats.
        after = ok(
            call(
                service,
                alice,
                "exec",
                vm=vm,
                argv=["sh", "-c", "sleep 7; cat f; echo after; exit 3"],
                idle_timeout=6.0,
            )
        )
        assert after["outcome"]["exit_code"] == 3
        assert stdout_of(after) == "before\nafter\n"

        # A launcher killed mid-payload frees the VM for the next call at once.
        abandoned = background_exec(service, alice, vm, "sleep 30")
        time.sleep(1.5)
        abandoned.kill()
        abandoned.wait(timeout=10)
        start = time.monotonic()
        quick = ok(call(service, alice, "exec", vm=vm, argv=["echo", "quick"]))
        assert stdout_of(quick) == "quick\n"
        assert time.monotonic() - start < 15

        done = ok(call(service, alice, "teardown", vm=vm, failed=False))
        assert done["snapshot_path"] is None
        assert vm not in our_domains(USERS)
    finally:
        starter.stop()


def test_a_restart_never_writes_into_a_directory_already_given_to_its_owner(
    service: ServiceProcess, svc_root: Path, alice: Account, canary: tuple[Path, bytes]
) -> None:
    """The service died after handing a torn-down VM's directory to its owner but before it
    recorded the teardown: on restart it finishes the books without writing there (the owner
    could have put a link to a root-only file under any name)."""
    canary_path, _secret = canary
    before = canary_path.read_bytes()
    name = "glite-vm-gvm-alice-999.0-c0ffee"
    vm_dir = svc_root / "state" / "snapshots" / name
    vm_dir.parent.mkdir(mode=0o755, exist_ok=True)
    vm_dir.mkdir(mode=0o700)
    (vm_dir / "boot.log").write_text("boot\n")
    for trap in ("record.tmp", "record.json", "snapshot.qcow2", "overlay.qcow2", "xfer.img"):
        (vm_dir / trap).symlink_to(canary_path)
    for p in [vm_dir, *vm_dir.iterdir()]:
        os.chown(p, alice.uid, alice.gid, follow_symlinks=False)
    listing = sorted((p.name, p.lstat().st_mtime_ns) for p in vm_dir.iterdir())
    state = {
        "version": 1,
        "vm": name,
        "vm_dir": str(vm_dir),
        "owner_uid": alice.uid,
        "scratch_dir": None,
        "starter_pid": None,
        "starter_start": None,
        "lease_job_id": "999.0/deadbeef",
        "created": time.time() - 60,
        "state_lost": False,
        "request": {
            "image": "test-direct",
            "cpus": 1,
            "memory_mib": 512,
            "disk_bytes": 1 << 30,
            "root": False,
            "keep_snapshot": "always",
            "job_id": "999.0",
            "owner": alice.name,
            "image_sha256": None,
            "hostname": None,
        },
        "image": {
            "name": "test-direct",
            "path": "/nonexistent",
            "format": "qcow2",
            "sha256": "0" * 64,
            "virtual_size": 1 << 30,
        },
        "timings": {},
        "ad_attributes": {},
        "finished": None,
    }
    state_file = svc_root / "state" / "service" / "vms" / f"{name}.json"
    state_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    state_file.write_text(json.dumps(state))
    state_file.chmod(0o600)

    service.restart()
    assert f"finishing {name}" in service.log()
    assert canary_path.read_bytes() == before
    assert sorted((p.name, p.lstat().st_mtime_ns) for p in vm_dir.iterdir()) == listing
    assert vm_dir.stat().st_uid == alice.uid
    done = ok(call(service, alice, "teardown", vm=name, failed=False))
    assert done["boot_log_path"] == str(vm_dir / "boot.log")
    assert done["snapshot_path"] is None  # a link is no snapshot
    shutil.rmtree(vm_dir)  # the planted links, not the service's leftovers


# -- failures leave nothing behind -----------------------------------------------------------


def test_a_boot_that_fails_leaves_no_vm_and_no_lease(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "noagent")
    client = background(
        service, alice, "prepare", job_ad=job_ad("test-noagent"), scratch_dir=str(scratch)
    )
    try:
        wait_for("the VM is defined", lambda: bool(domains_of(alice)), 60)
        (name,) = domains_of(alice)
        wait_for("the VM runs", lambda: domain_running(name), 60, step=0.05)
        assert leases_in(svc_root / "state"), "the booting VM holds a cache lease"
        # The guest dies before its agent answers (as a crashing guest would).
        subprocess.run(
            ["virsh", "-c", "qemu:///system", "destroy", name], check=True, capture_output=True
        )
    finally:
        answer = answer_of(client, timeout=60)
    assert answer["type"] == "BootError" and answer["disposition"] == "requeue", answer
    assert "boot log:" in answer["message"]
    assert domains_of(alice) == []
    assert leases_in(svc_root / "state") == []
    vm_dir = svc_root / "state" / "snapshots" / name
    assert not (vm_dir / "overlay.qcow2").exists() and not (vm_dir / "snapshot.qcow2").exists()
    assert (vm_dir / "boot.log").stat().st_uid == alice.uid


def test_a_vm_still_being_prepared_serves_its_owner_nothing(
    service: ServiceProcess, svc_root: Path, alice: Account, bob: Account
) -> None:
    """While alice's VM boots (its agent never answers: its prepare keeps waiting), she uses it
    through the socket as its owner may once it is ready: exec, push, pull, debug hold and a
    shell are refused, saying why; a reaper pass leaves it to its
    prepare; bob learns nothing of it. Its prepare then fails as it would have."""
    scratch = make_scratch(svc_root, alice, "early-use", {"in/early.txt": "early\n"})
    client = background(
        service, alice, "prepare", job_ad=job_ad("test-noagent"), scratch_dir=str(scratch)
    )
    name = ""
    try:
        wait_for("the VM is defined", lambda: bool(domains_of(alice)), 60)
        (name,) = domains_of(alice)
        wait_for("the VM runs", lambda: domain_running(name), 60, step=0.05)
        said = {
            "exec": call(service, alice, "exec", vm=name, argv=["sh", "-c", "echo ran early"]),
            "push": call(service, alice, "push", vm=name, src_dir=str(scratch / "in")),
            "pull": call(service, alice, "pull", vm=name, dest_dir=str(scratch / "out")),
            "debug_hold": call(service, alice, "debug_hold", vm=name),
        }
        shell = cli(service, alice, "shell", name, "--", "sh", "-c", "echo shell early")
        reaped = ok(call(service, alice, "reap"))
        by_bob = call(service, bob, "exec", vm=name, argv=["true"])
        still = domain_running(name)
    finally:
        if name:  # the guest dies (its prepare then fails), as in the test above
            subprocess.run(
                ["virsh", "-c", "qemu:///system", "destroy", name], capture_output=True, check=False
            )
        answer = answer_of(client, timeout=120)
    for op, refused in said.items():
        assert not refused["ok"] and refused["type"] == "HostError", (op, refused)
        assert "still being prepared" in refused["message"], (op, refused)
    assert shell.returncode != 0 and "still being prepared" in shell.stderr, shell
    assert "shell early" not in shell.stdout
    assert reaped == [] and still
    assert "no VM named" in denied(by_bob)
    assert answer["type"] == "BootError", answer
    assert domains_of(alice) == []
    assert leases_in(svc_root / "state") == []


def test_a_caller_that_hangs_up_during_prepare_leaves_no_vm(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    scratch = make_scratch(svc_root, alice, "hangup")
    client = background(service, alice, "prepare", job_ad=job_ad(), scratch_dir=str(scratch))
    try:
        wait_for("the VM is defined", lambda: bool(domains_of(alice)), 60)
    finally:
        client.kill()  # the hook died (killed by its own timeout, say) mid-boot
        client.wait(timeout=10)
    (name,) = domains_of(alice)
    wait_for("the orphaned VM is gone", lambda: not domains_of(alice), 60, step=0.5)
    started, abandoned = events_of(svc_root / "state", name)
    assert (started.event, started.uid) == ("started", alice.uid)
    assert abandoned.event == "abandoned" and "hung up" in (abandoned.reason or ""), abandoned
    assert leases_in(svc_root / "state") == []
    assert ok(call(service, alice, "list_vms")) == []


# -- an unavailable service ------------------------------------------------------------------


def test_a_dead_or_stuck_service_fails_fast_with_a_requeue_error(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    missing = run_as(alice, {"op": "list_vms", "socket": str(svc_root / "none.sock")})
    assert missing["type"] == "ServiceUnavailableError" and missing["disposition"] == "requeue"
    assert "not running" in missing["message"]
    assert missing["seconds"] < 2.0

    os.kill(service.pid, signal.SIGSTOP)  # alive, accepting into its backlog, never answering
    try:
        stuck = run_as(
            alice, {"op": "list_vms", "socket": str(service.socket_path), "idle_timeout": 2.0}
        )
    finally:
        os.kill(service.pid, signal.SIGCONT)
    assert stuck["type"] == "ServiceUnavailableError" and stuck["disposition"] == "requeue"
    assert 1.5 <= stuck["seconds"] < 6.0, stuck
    assert ok(call(service, alice, "list_vms")) == []  # and it recovers
