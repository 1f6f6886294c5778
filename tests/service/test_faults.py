"""Faults at each phase of a job, on a real root service with real VMs.

Two kinds of process die with SIGKILL at each phase — during the image download, after the
overlay exists (before its domain does), after the boot started, during the payload, during
the teardown:

* the job's own client (the PREPARE_JOB hook, the launcher, the JOB_EXIT hook): the service
  notices the hang-up, and what the job no longer needs is gone within one reaper period;
* the service itself: the next start adopts what it made, finishes what it left half done,
  resumes the interrupted download and sweeps up what has no owner.

After each: no domain, no overlay (unless kept as a snapshot by policy), no cache lease, and
the next job on the same image works. The service's event log says what happened and why.
libvirtd stopped and started again under a running job is the last fault.

Phases are reached deterministically: the image server stalls the download at a known byte,
a ``qemu-img`` in front of the real one pauses after creating an overlay, and an image whose
guest starts no agent keeps a VM in its boot.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.images.build import CATALOGUE_NAME
from glite_vm.vm.domains import qemu_pid
from tests.images.images_http import Fault, LoopbackServer
from tests.service.conftest import REAP_INTERVAL, check_nothing_left, new_state_dir, service_env
from tests.service.svc_support import (
    Account,
    ServiceProcess,
    admin_cli,
    answer_of,
    as_user,
    background,
    background_exec,
    call,
    domain_running,
    domains_of,
    events_of,
    job_ad,
    leases_in,
    make_scratch,
    ok,
    prepare,
    stdout_of,
    wait_for,
)

pytestmark = pytest.mark.vm

STALL_AT = (1 << 20) + (128 << 10)  # bytes served before the stall: 1 MiB is on disk
SETTLE = REAP_INTERVAL + 10.0  # "within one reaper period", plus a teardown under TCG


class Faulty:
    """A service of its own (it gets killed), with a catalogue whose ``test-http`` image
    comes from a loopback HTTP server and whose ``qemu-img`` can be told to pause."""

    def __init__(
        self, svc: ServiceProcess, root: Path, state: Path, server: LoopbackServer, shim: Path
    ) -> None:
        self.svc = svc
        self.root = root
        self.state = state
        self.server = server
        self.shim = shim
        self._scratches = 0

    def scratch(self, owner: Account) -> Path:
        self._scratches += 1
        return make_scratch(self.root, owner, f"job-{self._scratches}")

    def new_vm(self, owner: Account, starter_pid: int | None = None) -> str:
        """A prepared VM of ``test-http`` for ``owner``'s next job: its name."""
        prepared = prepare(
            self.svc,
            owner,
            self.scratch(owner),
            job_ad=job_ad("test-http"),
            starter_pid=starter_pid,
        )
        return str(prepared["vm"])

    def prepare_in_background(
        self, owner: Account, image: str, starter_pid: int | None = None
    ) -> subprocess.Popen[str]:
        """A PREPARE_JOB hook's call, running while the test does something to it."""
        return background(
            self.svc,
            owner,
            "prepare",
            job_ad=job_ad(image),
            scratch_dir=str(self.scratch(owner)),
            starter_pid=starter_pid,
        )

    def starter(self, owner: Account) -> subprocess.Popen[bytes]:
        """A stand-in for the job's condor_starter: the reaper watches this process."""
        return subprocess.Popen([*as_user(owner), "sleep", "600"])

    def kill_service(self) -> None:
        assert self.svc.proc is not None
        self.svc.proc.send_signal(signal.SIGKILL)
        self.svc.proc.wait(timeout=30)

    def glite_vm(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The admin CLI against this service's state (as root)."""
        return admin_cli(self.svc, *args)

    def vm_dirs(self) -> list[Path]:
        return sorted((self.state / "snapshots").glob("glite-vm-*"))

    def overlays(self) -> list[Path]:
        return sorted((self.state / "snapshots").glob("*/overlay.qcow2"))

    def pause_after_overlay(self) -> None:
        (self.shim / "paused").unlink(missing_ok=True)
        (self.shim / "pause").touch()

    def wait_paused(self) -> None:
        wait_for("qemu-img paused after the overlay", (self.shim / "paused").exists, 60, 0.05)

    def resume(self) -> None:
        (self.shim / "pause").unlink(missing_ok=True)

    def assert_clean(self, owner: Account) -> None:
        """Nothing of ``owner``'s left: domains, overlays, leases (within a reaper period)."""
        wait_for("no domain left", lambda: not domains_of(owner), SETTLE, 0.5)
        wait_for("no overlay left", lambda: not self.overlays(), SETTLE, 0.5)
        wait_for("no cache lease left", lambda: not leases_in(self.state), SETTLE, 0.5)
        assert ok(call(self.svc, owner, "list_vms")) == []

    def run_job(self, owner: Account, image: str = "test-http") -> dict[str, Any]:
        """A whole job on ``image``; it must work (the 'next job' after each fault)."""
        prepared = prepare(self.svc, owner, self.scratch(owner), job_ad=job_ad(image))
        vm = prepared["vm"]
        done = ok(call(self.svc, owner, "exec", vm=vm, argv=["sh", "-c", "echo next-job-ok"]))
        assert stdout_of(done) == "next-job-ok\n"
        outcome = ok(call(self.svc, owner, "teardown", vm=vm, failed=False))
        assert outcome["snapshot_path"] is None  # on_failure: a good job keeps nothing
        result: dict[str, Any] = prepared
        return result


QEMU_IMG_SHIM = """#!/bin/sh
# qemu-img as the fault tests see it: while $GLITE_VM_TEST_SHIM/pause exists, `create` makes
# the overlay and then waits (bounded) before returning, so a test can act in that window.
if [ "$1" = create ] && [ -e "$GLITE_VM_TEST_SHIM/pause" ]; then
    "{real}" "$@" || exit $?
    : > "$GLITE_VM_TEST_SHIM/paused"
    i=0
    while [ -e "$GLITE_VM_TEST_SHIM/pause" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
    exit 0
fi
exec "{real}" "$@"
"""


@pytest.fixture(scope="module")
def faulty(
    svc_root: Path, catalogue: Path, hypervisor_probe: Path, alice: Account
) -> Iterator[Faulty]:
    root = svc_root / "faults"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)

    # test-http: the direct-kernel guest of the shared catalogue, served over HTTP.
    doc = json.loads(catalogue.read_text())
    (direct,) = [e for e in doc["images"] if e["name"] == "test-direct"]
    repo = catalogue.parent
    server = LoopbackServer().start()
    http = json.loads(json.dumps(direct))
    http["name"] = "test-http"
    http["url"] = server.url("disk.qcow2")
    server.put("disk.qcow2", (repo / direct["url"]).read_bytes())
    for key in ("kernel", "initrd"):
        http[key]["url"] = server.url(key)
        server.put(key, (repo / direct[key]["url"]).read_bytes())
    # The file:// images stay where they are: make their URLs absolute for the new place.
    for entry in doc["images"]:
        for part in (entry, entry.get("kernel") or {}, entry.get("initrd") or {}):
            if part.get("url") and "://" not in part["url"]:
                part["url"] = (repo / part["url"]).as_uri()
    doc["images"].append(http)
    own_catalogue = root / CATALOGUE_NAME
    own_catalogue.write_text(json.dumps(doc))

    shim = root / "shim"
    shim.mkdir(mode=0o755)
    real = shutil.which("qemu-img")
    assert real is not None
    (shim / "qemu-img").write_text(QEMU_IMG_SHIM.format(real=real))
    (shim / "qemu-img").chmod(0o755)
    path = os.environ.get("PATH", "/usr/bin:/bin")
    extra = {"PATH": f"{shim}:{path}", "GLITE_VM_TEST_SHIM": str(shim)}
    env = service_env(root, own_catalogue, extra)
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield Faulty(svc, root, state, server, shim)
    finally:
        (shim / "pause").unlink(missing_ok=True)
        server.stop()
        if svc.proc is None or svc.proc.poll() is not None:
            svc.start()  # a test that killed it failed before restarting it
        check_nothing_left(svc, state)


@pytest.fixture
def fresh_cache(faulty: Faulty) -> Iterator[None]:
    """test-http not cached yet (so the job downloads it) and the server well-behaved."""
    evicted = faulty.glite_vm("cache", "prune", "--to", "0B", "--yes")
    assert evicted.returncode == 0, evicted.stderr
    faulty.server.fault("disk.qcow2", None)
    faulty.server.unstall.clear()
    faulty.server.stalled.clear()
    faulty.server.clear_log()
    yield
    faulty.server.unstall.set()


def _stall_download(faulty: Faulty) -> None:
    faulty.server.fault("disk.qcow2", Fault(stall_after=STALL_AT, then_continue=True, times=1))


def _partial_bytes(faulty: Faulty) -> int:
    return sum(p.stat().st_size for p in (faulty.state / "cache" / "partial").glob("*.part"))


def _cache_verifies(faulty: Faulty) -> None:
    verify = faulty.glite_vm("cache", "verify")
    assert verify.returncode == 0 and " 0 bad" in verify.stdout, verify.stdout + verify.stderr


# -- the job's own processes killed -----------------------------------------------------------


@pytest.mark.usefixtures("fresh_cache")
def test_hook_killed_during_the_download(faulty: Faulty, alice: Account) -> None:
    _stall_download(faulty)
    hook = faulty.prepare_in_background(alice, "test-http")
    try:
        assert faulty.server.stalled.wait(60), "the download never started"
    finally:
        hook.kill()
        hook.wait(timeout=10)
    faulty.server.unstall.set()  # the download finishes for the next job; no VM is started
    faulty.assert_clean(alice)
    assert events_of(faulty.state, "") == [] and faulty.vm_dirs() == [], "a VM was started"
    _cache_verifies(faulty)
    before = len(faulty.server.requests("disk.qcow2"))
    prepared = faulty.run_job(alice)
    assert prepared["ad_attributes"]["GliteVmCacheHit"] is True
    assert len(faulty.server.requests("disk.qcow2")) == before  # not fetched again


def test_hook_killed_after_the_overlay_before_the_domain(faulty: Faulty, alice: Account) -> None:
    before = set(faulty.vm_dirs())
    faulty.pause_after_overlay()
    hook = faulty.prepare_in_background(alice, "test-http")
    try:
        faulty.wait_paused()
        assert len(faulty.overlays()) == 1
    finally:
        hook.kill()
        hook.wait(timeout=10)
        faulty.resume()
    faulty.assert_clean(alice)
    (vm_dir,) = set(faulty.vm_dirs()) - before
    (started, abandoned) = events_of(faulty.state, vm_dir.name)
    assert started.event == "started"
    assert abandoned.event == "abandoned" and "hung up" in (abandoned.reason or "")
    assert abandoned.snapshot is None
    faulty.run_job(alice)


def test_hook_killed_while_the_guest_boots(faulty: Faulty, alice: Account) -> None:
    hook = faulty.prepare_in_background(alice, "test-noagent")
    try:
        wait_for("the VM is defined", lambda: bool(domains_of(alice)), 60)
        (name,) = domains_of(alice)
        wait_for("the VM runs", lambda: domain_running(name), 60, 0.05)
    finally:
        hook.kill()
        hook.wait(timeout=10)
    # Not the boot timeout (120 s here): the service stops waiting when its caller goes.
    took = wait_for("the booting VM is gone", lambda: not domains_of(alice), SETTLE, 0.2)
    assert took < SETTLE
    faulty.assert_clean(alice)
    assert [e.event for e in events_of(faulty.state, name)] == ["started", "abandoned"]
    faulty.run_job(alice)


def test_launcher_and_starter_killed_during_the_payload(faulty: Faulty, alice: Account) -> None:
    """The job's process tree dies mid-payload (SIGKILL of the launcher, then of the starter):
    the reaper takes the VM within a period, keeps its disk (a failed job, on_failure) and
    says why in the event log."""
    starter = faulty.starter(alice)
    try:
        vm = faulty.new_vm(alice, starter.pid)
        launcher = background_exec(faulty.svc, alice, vm, "echo started; sleep 300")
        time.sleep(3.0)  # the payload is running (one exec at a time: it cannot be asked)
        assert launcher.poll() is None
        launcher.kill()
        launcher.wait(timeout=10)
        time.sleep(REAP_INTERVAL + 1)
        assert domain_running(vm), "the VM went with the launcher while its starter lived"
        starter.kill()
        starter.wait(timeout=10)
        took = wait_for("the VM is reaped", lambda: not domains_of(alice), SETTLE, 0.2)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(timeout=10)
    assert took <= REAP_INTERVAL + 10
    faulty.assert_clean(alice)
    reaped = events_of(faulty.state, vm)[-1]
    assert (
        reaped.event == "reaped" and reaped.reason == f"its starter process {starter.pid} is gone"
    )
    assert reaped.snapshot is not None and Path(reaped.snapshot).stat().st_uid == alice.uid
    shown = faulty.glite_vm("events", "--vm", vm)
    assert shown.returncode == 0 and f"starter process {starter.pid} is gone" in shown.stdout
    # The JOB_EXIT hook that comes late gets the reaper's outcome.
    late = ok(call(faulty.svc, alice, "teardown", vm=vm, failed=True))
    assert late["snapshot_path"] == reaped.snapshot
    faulty.run_job(alice)


def test_qemu_killed_under_a_running_job(faulty: Faulty, alice: Account) -> None:
    """QEMU dies (here: SIGKILL, as the OOM killer would) while the starter lives: the reaper
    tears the VM down within a period, keeps its disk and says why."""
    starter = faulty.starter(alice)
    try:
        vm = faulty.new_vm(alice, starter.pid)
        qemu = qemu_pid(vm)
        assert qemu is not None, f"no QEMU process for {vm}"
        os.kill(qemu, signal.SIGKILL)
        wait_for("the VM is reaped", lambda: not domains_of(alice), SETTLE, 0.2)
        faulty.assert_clean(alice)
    finally:
        starter.kill()
        starter.wait(timeout=10)
    reaped = events_of(faulty.state, vm)[-1]
    assert reaped.event == "reaped" and "its domain stopped" in (reaped.reason or ""), reaped
    assert reaped.snapshot is not None and Path(reaped.snapshot).is_file()
    faulty.run_job(alice)


def test_job_exit_hook_killed_during_the_teardown(faulty: Faulty, alice: Account) -> None:
    vm = faulty.new_vm(alice)
    hook = background(faulty.svc, alice, "teardown", vm=vm, failed=True)
    wait_for("the teardown started", lambda: not domain_running(vm), 30, 0.01)
    hook.kill()
    hook.wait(timeout=10)
    faulty.assert_clean(alice)
    (*_, done) = events_of(faulty.state, vm)
    assert (done.event, done.failed) == ("torn_down", True)
    again = ok(call(faulty.svc, alice, "teardown", vm=vm, failed=True))
    assert again["snapshot_path"] == done.snapshot is not None
    faulty.run_job(alice)


# -- the service itself killed ----------------------------------------------------------------


@pytest.mark.usefixtures("fresh_cache")
def test_service_killed_during_the_download_resumes_it(faulty: Faulty, alice: Account) -> None:
    _stall_download(faulty)
    hook = faulty.prepare_in_background(alice, "test-http")
    assert faulty.server.stalled.wait(60), "the download never started"
    wait_for("the first MiB is on disk", lambda: _partial_bytes(faulty) >= 1 << 20, 30, 0.05)
    faulty.kill_service()
    answer = answer_of(hook, timeout=30)
    assert answer["disposition"] == "requeue", answer
    faulty.server.unstall.set()
    faulty.svc.start()
    faulty.assert_clean(alice)
    faulty.server.clear_log()
    faulty.run_job(alice)
    (resumed,) = faulty.server.requests("disk.qcow2")
    assert resumed.headers.get("Range", "").startswith("bytes="), resumed.headers
    assert resumed.body_bytes < len(faulty.server.files["/disk.qcow2"].data)
    _cache_verifies(faulty)


def test_service_killed_between_overlay_and_domain(faulty: Faulty, alice: Account) -> None:
    before = set(faulty.vm_dirs())
    faulty.pause_after_overlay()
    hook = faulty.prepare_in_background(alice, "test-http")
    try:
        faulty.wait_paused()
        faulty.kill_service()
    finally:
        faulty.resume()
    assert answer_of(hook, timeout=30)["disposition"] == "requeue"
    (vm_dir,) = set(faulty.vm_dirs()) - before
    assert (vm_dir / "overlay.qcow2").exists()
    faulty.svc.start()
    # Swept once it has been still for a while (a start in progress is never taken).
    wait_for("the half-made VM directory is swept", lambda: not vm_dir.exists(), 40, 0.5)
    faulty.assert_clean(alice)
    (swept,) = [e for e in events_of(faulty.state, vm_dir.name) if e.event == "swept"]
    assert "crash" in (swept.reason or "")
    faulty.run_job(alice)


def test_service_killed_while_the_guest_boots(faulty: Faulty, alice: Account) -> None:
    starter = faulty.starter(alice)
    try:
        hook = faulty.prepare_in_background(alice, "test-noagent", starter_pid=starter.pid)
        wait_for("the VM is defined", lambda: bool(domains_of(alice)), 60)
        (name,) = domains_of(alice)
        wait_for("the VM runs", lambda: domain_running(name), 60, 0.05)
        faulty.kill_service()
        assert answer_of(hook, timeout=30)["disposition"] == "requeue"
        faulty.svc.start()
        assert domain_running(name), "the restart lost a VM whose job was still there"
        assert leases_in(faulty.state), "the adopted VM's base image has no lease"
        # The failed PREPARE_JOB makes HTCondor give up on the job: its starter goes.
        starter.kill()
        starter.wait(timeout=10)
        wait_for("the adopted VM is reaped", lambda: not domains_of(alice), SETTLE, 0.2)
    finally:
        if starter.poll() is None:
            starter.kill()
            starter.wait(timeout=10)
    faulty.assert_clean(alice)
    kinds = [e.event for e in events_of(faulty.state, name)]
    assert kinds == ["started", "adopted", "reaped"], kinds
    faulty.run_job(alice)


def test_service_killed_during_the_payload(faulty: Faulty, alice: Account) -> None:
    vm = faulty.new_vm(alice)
    launcher = background_exec(faulty.svc, alice, vm, "sleep 3; echo done > /tmp/marker")
    time.sleep(1.0)
    faulty.kill_service()
    answer = answer_of(launcher, timeout=30)
    assert answer["disposition"] == "requeue", answer
    faulty.svc.start()
    assert domain_running(vm)
    # The payload ran on inside the VM; the adopted VM still serves its job.
    wait_for(
        "the payload finished",
        lambda: (
            "done"
            in stdout_of(ok(call(faulty.svc, alice, "exec", vm=vm, argv=["cat", "/tmp/marker"])))
        ),
        30,
        1.0,
    )
    outcome = ok(call(faulty.svc, alice, "teardown", vm=vm, failed=True))
    assert outcome["snapshot_path"] is not None
    faulty.assert_clean(alice)
    faulty.run_job(alice)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15])
def test_service_killed_during_the_teardown(faulty: Faulty, alice: Account, delay: float) -> None:
    vm = faulty.new_vm(alice)
    hook = background(faulty.svc, alice, "teardown", vm=vm, failed=True)
    wait_for("the teardown started", lambda: not domain_running(vm), 30, 0.005)
    time.sleep(delay)
    faulty.kill_service()
    answer_of(hook, timeout=30)  # done or requeue: either way the next call settles it
    faulty.svc.start()
    outcome = ok(call(faulty.svc, alice, "teardown", vm=vm, failed=True))
    faulty.assert_clean(alice)
    snapshot = outcome["snapshot_path"]
    assert snapshot is not None and Path(snapshot).stat().st_uid == alice.uid
    assert ok(call(faulty.svc, alice, "teardown", vm=vm, failed=True)) == outcome
    faulty.run_job(alice)


# -- libvirtd --------------------------------------------------------------------------------


@pytest.mark.alone  # other tests' VMs and connections would lose libvirtd under them
def test_libvirtd_restarted_under_a_running_job(faulty: Faulty, alice: Account) -> None:
    """The job either completes or fails with a requeue error that says what happened; the
    VM is torn down afterwards either way and nothing leaks."""
    vm = faulty.new_vm(alice)
    launcher = background_exec(faulty.svc, alice, vm, "sleep 6; echo survived")
    time.sleep(1.0)
    _restart_libvirtd()
    answer = answer_of(launcher, timeout=120)
    if answer["ok"]:
        assert stdout_of(answer["result"]) == "survived\n"
    else:
        assert answer["disposition"] == "requeue", answer
        assert "lost the connection to libvirtd" in answer["message"], answer
    outcome = ok(call(faulty.svc, alice, "teardown", vm=vm, failed=not answer["ok"]))
    assert outcome["boot_log_path"]
    faulty.assert_clean(alice)
    faulty.run_job(alice)


def _restart_libvirtd() -> None:
    subprocess.run(["pkill", "-TERM", "-x", "libvirtd"], check=False, timeout=10)
    wait_for(
        "libvirtd stopped",
        lambda: (
            subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True, check=False).returncode
            != 0
        ),
        30,
    )
    reaper = Path(__file__).resolve().parents[2] / "scripts" / "subreaper"
    subprocess.Popen(
        ["setsid", str(reaper), "libvirtd", "-d"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(
        "libvirtd answers again",
        lambda: (
            subprocess.run(
                ["virsh", "-c", "qemu:///system", "version"], capture_output=True, check=False
            ).returncode
            == 0
        ),
        30,
    )
