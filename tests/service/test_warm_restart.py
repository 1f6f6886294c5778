"""Warm start across restarts of the service (a real root ``glite-vm serve``): a restarted
service adopts a warm-started VM as any other, and one killed in the middle of a restore leaves
nothing behind once it runs again. One template of the test guest serves the module (made ahead
of time, ``GLITE_VM_WARM_IMAGES``, for slot 1's VMs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from glite_vm.service.events import ADOPTED, REAPED, STARTED, SWEPT, TORN_DOWN
from glite_vm.vm.guest_run import GUEST_WORKDIR
from glite_vm.vm.record import SAVED_STATE, SNAPSHOT, TEMPLATE_LAYER, JobRecord
from tests.service.conftest import USERS, check_nothing_left, service_env
from tests.service.svc_support import (
    Account,
    FakeStarter,
    ServiceProcess,
    admin_cli,
    call,
    domain_running,
    domains_of,
    events_of,
    job_ad,
    leases_in,
    make_scratch,
    ok,
    stdout_of,
    wait_for,
)
from tests.support import domains_under, traversable

pytestmark = pytest.mark.vm
TEMPLATE_WAIT = 300.0  # seconds the template made at the service's start may take, loaded
SETTLE = 90.0  # seconds a restarted service may take to clean up after a crash (sweep: 10 s)


@pytest.fixture(scope="module")
def warm_service(
    svc_root: Path, catalogue: Path, alice: Account, bob: Account
) -> Iterator[ServiceProcess]:
    root = svc_root / "warm-restart"
    root.mkdir(mode=0o711)
    env = service_env(root, catalogue, {"GLITE_VM_WARM_IMAGES": "test-direct"})
    state = traversable(Path(env["GLITE_VM_STATE_DIR"]))
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        wait_for("the template made ahead of time", lambda: len(templates(svc)) == 1, TEMPLATE_WAIT)
        yield svc
    finally:
        if svc.proc is None or svc.proc.poll() is not None:
            svc.start()  # a test that failed with the service down: let it clean up first
        check_nothing_left(svc, state, USERS)


def state_dir(svc: ServiceProcess) -> Path:
    return Path(svc.env["GLITE_VM_STATE_DIR"])


def templates(svc: ServiceProcess) -> list[Path]:
    return sorted((state_dir(svc) / "cache" / "templates").glob("*/template.json"))


def vm_dirs(svc: ServiceProcess) -> Path:
    return state_dir(svc) / "snapshots"


def state_file(svc: ServiceProcess, vm: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        (state_dir(svc) / "service" / "vms" / f"{vm}.json").read_text()
    )
    return data


def qemu_img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)],
        capture_output=True,
        check=True,
        text=True,
        timeout=60,
    )
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def cached_image(svc: ServiceProcess) -> Path:
    """The cached test guest disk the template's layer backs onto."""
    (meta,) = templates(svc)
    return Path(json.loads(meta.read_text())["image_path"])


def leases_of(svc: ServiceProcess, job_prefix: str) -> list[Path]:
    """Cache leases taken for a job (their job id starts with the job's)."""
    return [
        p
        for p in leases_in(state_dir(svc))
        if str(json.loads(p.read_text()).get("job_id", "")).startswith(job_prefix)
    ]


def lock_free(svc: ServiceProcess, key: str) -> bool:
    """No process holds the cache lock ``key`` (the template's, or the image's)."""
    from glite_vm.config import Settings  # noqa: PLC0415
    from glite_vm.images.cache import ImageCache  # noqa: PLC0415

    lock = ImageCache(Settings(state_dir=state_dir(svc))).try_lock(key)
    if lock is None:
        return False
    lock.release()
    return True


def at_the_moment(
    svc: ServiceProcess, conn: libvirt.virConnect, moment: str, caller: threading.Thread
) -> str:
    """Wait for ``moment`` of a restore for alice's job; the VM's name."""
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # "no domain" while it polls
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and caller.is_alive():
        copies = list(vm_dirs(svc).glob(f"*-gvm-alice-*/{SAVED_STATE}"))
        for copy in copies:
            name = copy.parent.name
            if moment == "copying the state":
                return name
            try:
                conn.lookupByName(name)
            except libvirt.libvirtError:
                continue
            if copy.exists():  # the restore call has not returned yet
                return name
        time.sleep(0.001)
    raise AssertionError(f"{moment}: not seen in a restore")


def test_a_restarted_service_adopts_a_warm_started_vm(
    warm_service: ServiceProcess, svc_root: Path, alice: Account, fake_starter: Path
) -> None:
    """A HTCondor job's warm-started VM (its starter lives on) across ``glite-vm serve``'s
    stop and start: the new service knows it as the job's and tears it down on request, its
    kept snapshot merged onto the cached image; nothing of it is left."""
    svc = warm_service
    starter = FakeStarter(fake_starter, svc, "slot1", slot_type=1)
    try:
        scratch = make_scratch(svc_root / "warm-restart", alice, "adopt")
        ad = job_ad(GliteVmKeepSnapshot="always")
        prepared = ok(starter.call(alice, "prepare", job_ad=ad, scratch_dir=str(scratch)))
        vm = prepared["vm"]
        assert prepared["ad_attributes"]["GliteVmWarmStart"] is True
        wrote = ok(call(svc, alice, "exec", vm=vm, argv=["sh", "-c", "echo before > f; sync"]))
        assert wrote["outcome"]["exit_code"] == 0

        svc.restart()
        assert f"adopted {vm}" in svc.log()
        assert domain_running(vm)
        assert [v["vm"] for v in ok(call(svc, alice, "list_vms"))] == [vm]
        listed = admin_cli(svc, "vms", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = {r["name"]: r for r in json.loads(listed.stdout)}
        assert rows[vm]["state"] == "running" and rows[vm]["job"] == f"{ad['ClusterId']}.0"
        # the warm start is still a fact of the VM's (its state, its boot log)
        assert state_file(svc, vm)["ad_attributes"]["GliteVmWarmStart"] is True
        assert (
            (vm_dirs(svc) / vm / "boot.log")
            .read_bytes()
            .startswith(b"glite-vm: warm start from template ")
        )
        # the adopted VM serves its job as before
        after = ok(call(svc, alice, "exec", vm=vm, argv=["sh", "-c", "cat f; echo after"]))
        assert stdout_of(after) == "before\nafter\n"

        done = ok(starter.call(alice, "teardown", vm=vm, failed=False))
    finally:
        starter.stop()
    assert not domains_of(alice)
    kinds = [e.event for e in events_of(state_dir(svc), vm)]
    assert kinds == [STARTED, ADOPTED, TORN_DOWN], kinds
    # the kept snapshot holds the template's layer and backs onto the cached image alone
    snapshot = Path(done["snapshot_path"])
    assert qemu_img_info(snapshot)["backing-filename"] == str(cached_image(svc))
    assert not (snapshot.parent / TEMPLATE_LAYER).exists()
    assert not (snapshot.parent / SAVED_STATE).exists()
    record = JobRecord.from_json((snapshot.parent / "record.json").read_bytes())
    assert record.template_layer is None and record.snapshot == str(snapshot)
    booted = admin_cli(svc, "snapshots", "boot", vm, "--", "cat", f"{GUEST_WORKDIR}/f")
    assert (booted.returncode, booted.stdout) == (0, "before\n"), booted.stderr
    (meta,) = templates(svc)
    assert lock_free(svc, meta.parent.name)
    assert not leases_of(svc, f"{ad['ClusterId']}.0/")


@pytest.mark.parametrize("moment", ["copying the state", "libvirt restoring"])
def test_a_service_killed_in_a_warm_restore_leaves_nothing(
    warm_service: ServiceProcess, svc_root: Path, alice: Account, fake_starter: Path, moment: str
) -> None:
    """SIGKILL in the middle of a restore: while the VM's copy of the template's state is
    written, or once libvirt has the restored domain (before the service defined it); the
    starter then goes, as HTCondor's does when its hook fails. The next start leaves no
    domain, no copy of the state, no VM directory but what a teardown hands over, no lease
    and no lock; and the template still serves."""
    svc = warm_service
    starter = FakeStarter(fake_starter, svc, "slot1", slot_type=1)
    answer: dict[str, Any] = {}
    job = job_ad()
    conn = libvirt.open("qemu:///system")
    try:
        scratch = make_scratch(svc_root / "warm-restart", alice, f"killed-{moment[:7]}")

        def run() -> None:
            answer.update(starter.call(alice, "prepare", job_ad=job, scratch_dir=str(scratch)))

        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        vm = at_the_moment(svc, conn, moment, caller)
        assert svc.proc is not None
        svc.proc.kill()
        svc.proc.wait(timeout=30)
        caller.join(timeout=120)
        assert not caller.is_alive()
        assert answer and not answer["ok"], answer
    finally:
        starter.stop()
        conn.close()
    svc.start()

    def clean() -> bool:
        return not domains_of(alice) and not list(vm_dirs(svc).glob(f"*/{SAVED_STATE}"))

    wait_for("the restarted service cleans up", clean, SETTLE, 0.5)
    kinds = [e.event for e in events_of(state_dir(svc), vm)]
    vm_dir = vm_dirs(svc) / vm
    if moment == "copying the state":  # a VM directory without a domain: swept
        assert kinds == [SWEPT]
        assert not vm_dir.exists()
    else:
        # libvirt went on restoring: the domain is adopted without a state (the service died
        # before it wrote one) and reaped, its starter gone. A reap is a failure: the default
        # policy (on_failure) keeps the snapshot, merged onto the cached image as always.
        assert kinds == [ADOPTED, REAPED]
        left = sorted(os.listdir(vm_dir))
        assert left == ["boot.log", "domain.xml", "record.json", SNAPSHOT], left
        info = qemu_img_info(vm_dir / SNAPSHOT)
        assert info["backing-filename"] == str(cached_image(svc)), info
        record = JobRecord.from_json((vm_dir / "record.json").read_bytes())
        assert record.base_image == str(cached_image(svc)), record
        check = subprocess.run(
            ["qemu-img", "check", "-U", str(vm_dir / SNAPSHOT)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    assert not leases_of(svc, f"{job['ClusterId']}.0/")
    (meta,) = templates(svc)
    assert lock_free(svc, meta.parent.name)

    again = FakeStarter(fake_starter, svc, "slot1", slot_type=1)
    try:
        scratch = make_scratch(svc_root / "warm-restart", alice, f"after-{moment[:7]}")
        prepared = ok(again.call(alice, "prepare", job_ad=job_ad(), scratch_dir=str(scratch)))
        assert prepared["ad_attributes"]["GliteVmWarmStart"] is True
        ok(again.call(alice, "teardown", vm=prepared["vm"], failed=False))
    finally:
        again.stop()


def test_a_warm_start_cut_short_by_a_crash_is_never_served(
    warm_service: ServiceProcess, svc_root: Path, alice: Account, fake_starter: Path
) -> None:
    """SIGKILL after the restored VM was recorded but before its preparation ended (the
    refresh that gives it its own clock, random numbers and machine id; its account and
    identity): the next start adopts it for teardown only. Its owner cannot run anything in a
    guest that may still hold the template's random state."""
    svc = warm_service
    starter = FakeStarter(fake_starter, svc, "slot1", slot_type=1)
    answer: dict[str, Any] = {}
    try:
        scratch = make_scratch(svc_root / "warm-restart", alice, "unfinished")

        def run() -> None:
            answer.update(starter.call(alice, "prepare", job_ad=job_ad(), scratch_dir=str(scratch)))

        caller = threading.Thread(target=run, daemon=True)
        caller.start()
        vm = recorded_unprepared(svc, caller)
        assert svc.proc is not None
        svc.proc.kill()
        svc.proc.wait(timeout=30)
        caller.join(timeout=120)
        assert answer and not answer["ok"], answer
        svc.start()  # its starter still runs: the VM is not reaped at once
        try:
            assert f"adopted {vm}" in svc.log()
            refused = call(svc, alice, "exec", vm=vm, argv=["cat", "/proc/sys/kernel/random/uuid"])
            assert not refused["ok"], refused
            assert refused["type"] == "HostError", refused
            assert "can only be torn down" in refused["message"]
        finally:
            ok(starter.call(alice, "teardown", vm=vm, failed=True))
    finally:
        starter.stop()
    assert not domains_of(alice)


def recorded_unprepared(svc: ServiceProcess, caller: threading.Thread) -> str:
    """Wait until one of alice's VMs has a state file but no ad attributes yet (recorded, not
    prepared); its name."""
    vms = state_dir(svc) / "service" / "vms"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and caller.is_alive():
        for path in vms.glob("glite-vm-gvm-alice-*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not state.get("ad_attributes") and not state.get("finished"):
                return str(state["vm"])
        time.sleep(0.002)
    raise AssertionError("no VM was seen between its record and its preparation")


def building(svc: ServiceProcess) -> list[str]:
    """The domains of template builds under way in ``svc``'s state directory."""
    return [d for d in domains_under(state_dir(svc)) if "-warm-template-" in d]


def restarted_into_a_build(svc: ServiceProcess) -> tuple[Path, str]:
    """Stop ``svc``, remove its template (as eviction would) and start it again: it builds the
    template again at its start. The removed template's directory and the running build's VM."""
    (meta,) = templates(svc)
    svc.stop()
    shutil.rmtree(meta.parent)
    svc.start()
    wait_for("the template's VM", lambda: len(building(svc)) == 1, 120, 0.05)
    (vm,) = building(svc)
    wait_for("the template's VM runs", lambda: domain_running(vm), 60, 0.05)
    return meta.parent, vm


def test_a_template_build_cut_short_by_a_crash_leaves_no_vm(warm_service: ServiceProcess) -> None:
    """The service builds a template again at its start (here: it was removed, as eviction
    would) and is killed while the template's VM boots. The next start takes that VM down
    (its builder is gone), removes the half-made build and builds the template again."""
    svc = warm_service
    _, vm = restarted_into_a_build(svc)
    assert svc.proc is not None
    svc.proc.kill()
    svc.proc.wait(timeout=30)
    svc.start()
    wait_for("the killed build's VM goes", lambda: vm not in building(svc), SETTLE, 0.5)
    wait_for("the template is made again", lambda: len(templates(svc)) == 1, TEMPLATE_WAIT)
    wait_for("no build's VM is left", lambda: not building(svc), 60, 0.5)
    assert not list((state_dir(svc) / "cache" / "templates").glob(".build-*"))
    left = sorted(os.listdir(vm_dirs(svc) / vm)) if (vm_dirs(svc) / vm).exists() else []
    assert set(left) <= {"boot.log", "domain.xml", "record.json"}, left


def test_a_template_build_ends_when_the_service_stops(warm_service: ServiceProcess) -> None:
    """A template's VM is nobody's job: a service stopped (SIGTERM) while it builds one takes
    that VM down before it exits, rather than leaving it running until the next start."""
    svc = warm_service
    removed, _ = restarted_into_a_build(svc)
    assert svc.stop() == 0
    assert building(svc) == []  # gone when the service has exited, not at its next start
    assert not removed.exists()
    svc.start()
    wait_for("the template is made again", lambda: len(templates(svc)) == 1, TEMPLATE_WAIT)
