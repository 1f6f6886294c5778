"""Debug holds for real: a root service, real guests, the real launcher run as a real user.

The service allows holds of up to :data:`MAX_HOLD` seconds (``GLITE_VM_MAX_DEBUG_HOLD``) and
serves its metrics on loopback. Each job is prepared through a
:class:`~tests.service.svc_support.FakeStarter` (a HTCondor job's VM, bound to its starter) and
then run by the real launcher as ``gvm-alice``, in the background, as the starter runs it: its
chirps go to a file the test reads while it runs. What is checked is what the job's owner sees:
the job stays running while its VM is held, the ad says until when, the job ends with the same
exit status and output files as without the hold, the owner (and nobody else) ends the hold
early, and a launcher killed during the hold leaves no VM behind. The last test uses the
session's service, where holds are off (the default), to see what a job that asks is told.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import check_nothing_left, new_state_dir, service_env
from tests.service.svc_support import (
    THREE_SLOTS,
    USER_SLOT,
    Account,
    FakeStarter,
    ServiceProcess,
    answer_of,
    as_user,
    background,
    call,
    denied,
    domain_running,
    events_of,
    job_ad,
    make_scratch,
    ok,
    wait_for,
)
from tests.support import domains_under

pytestmark = pytest.mark.vm

MAX_HOLD = 30  # seconds this host grants at most; jobs below ask for 5 or for 600
SHORT_HOLD = 5
#: The payload: an output file, a line on stdout and on stderr, then a failure (or success).
FAILING = "echo made in the guest > out.txt; echo partial; echo boom >&2; exit 3"
SUCCEEDING = "echo made in the guest > out.txt; echo fine"
BOUND = 180.0  # seconds any one job may take here, hold included (TCG on a busy host)


class Held:
    def __init__(
        self, svc: ServiceProcess, root: Path, state: Path, starter: Path, port: int
    ) -> None:
        self.svc = svc
        self.root = root
        self.state = state
        self.starter_binary = starter
        self.port = port
        self.jobs = 0

    def starter(self) -> FakeStarter:
        return FakeStarter(self.starter_binary, self.svc, USER_SLOT[0], slot_type=USER_SLOT[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def held(
    svc_root: Path, catalogue: Path, hypervisor_probe: Path, fake_starter: Path, alice: Account
) -> Iterator[Held]:
    root = svc_root / "debughold"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)
    port = free_port()
    extra = {
        **THREE_SLOTS.knobs(),
        "GLITE_VM_MAX_DEBUG_HOLD": str(MAX_HOLD),
        "GLITE_VM_METRICS_ADDRESS": f"127.0.0.1:{port}",
    }
    env = service_env(root, catalogue, extra)
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield Held(svc, root, state, fake_starter, port)
    finally:
        check_nothing_left(svc, state)
        assert domains_under(root) == []


class Job:
    """One job: its scratch directory (with the job ad the launcher reads) and its VM."""

    def __init__(self, h: Held, who: Account, starter: FakeStarter, script: str, **ad: Any):
        h.jobs += 1
        ad_text = (
            f'ClusterId = {h.jobs}\nProcId = 0\nOwner = "{who.name}"\nCmd = "/bin/sh"\n'
            f"Arguments = \"-c '{script}'\"\nTransferExecutable = false\n"
            + "".join(f"{name} = {value}\n" for name, value in ad.items())
        )
        self.h = h
        self.who = who
        self.scratch = make_scratch(h.root, who, f"job{h.jobs}", {".job.ad": ad_text})
        self.chirp_file = self.scratch / ".chirp.json"
        answer = starter.call(who, "prepare", job_ad=job_ad(**ad), scratch_dir=str(self.scratch))
        self.vm: str = ok(answer)["vm"]

    def launch(self) -> subprocess.Popen[str]:
        """The launcher, as the starter starts it once PREPARE_JOB is done."""
        return background(
            self.h.svc,
            self.who,
            "launch",
            vm=self.vm,
            scratch_dir=str(self.scratch),
            inputs=[],
            chirp_file=str(self.chirp_file),
        )

    def ad(self) -> dict[str, Any]:
        """What the launcher put into the job ad so far."""
        try:
            data: dict[str, Any] = json.loads(self.chirp_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data

    def held_until(self) -> int:
        wait_for(
            "the ad names the end of the hold", lambda: "GliteVmDebugUntil" in self.ad(), BOUND
        )
        until: int = self.ad()["GliteVmDebugUntil"]
        return until

    def teardown(self) -> dict[str, Any]:
        """What JOB_EXIT does once the launcher has ended."""
        done: dict[str, Any] = ok(call(self.h.svc, self.who, "teardown", vm=self.vm, failed=True))
        return done

    def events(self) -> list[tuple[str, str | None]]:
        return [(e.event, e.reason) for e in events_of(self.h.state, self.vm)]


def finished(proc: subprocess.Popen[str]) -> dict[str, Any]:
    result: dict[str, Any] = ok(answer_of(proc, BOUND))
    return result


def debug_held_vms(port: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "glite_vm_vms" and s.labels.get("state") == "debug-held"
    )


def glite_vm_cli(
    who: Account, svc: ServiceProcess, *args: str, cwd: Path = Path("/")
) -> subprocess.CompletedProcess[str]:
    """``glite-vm ARGS`` as ``who`` types it on the execute host, in ``cwd``."""
    return subprocess.run(
        [
            *as_user(who),
            sys.executable,
            "-c",
            "import sys; from glite_vm.cli.main import main; sys.exit(main())",
            *args,
            "--socket",
            str(svc.socket_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        check=False,
    )


def test_a_failed_payload_keeps_its_vm_until_the_hold_ends_and_the_job_ends_as_without(
    held: Held, alice: Account
) -> None:
    starter = held.starter()
    try:
        # the same job without a hold, for comparison
        plain = Job(held, alice, starter, FAILING)
        without = finished(plain.launch())
        plain.teardown()

        job = Job(held, alice, starter, FAILING, GliteVmDebugHold=SHORT_HOLD)
        proc = job.launch()
        until = job.held_until()
        # held: the job (the launcher) still runs, its VM too, and the service says so
        assert proc.poll() is None
        assert domain_running(job.vm)
        assert until <= time.time() + SHORT_HOLD + 1
        assert debug_held_vms(held.port) == 1
        assert ("debug_held", f"its payload failed; kept running for {SHORT_HOLD} s") in (
            job.events()
        )
        with_hold = finished(proc)
        # it lasted until the hold's end, then ended exactly as without the hold
        assert time.time() >= until - 1
        assert with_hold["status"] == without["status"] == 3
        assert with_hold["stdout"] == without["stdout"] == "partial\n"
        assert with_hold["stderr"] == without["stderr"] == "boom\n"
        assert (job.scratch / "out.txt").read_text() == (plain.scratch / "out.txt").read_text()
        assert (job.scratch / "out.txt").read_text() == "made in the guest\n"
        assert job.ad()["GliteVmDebugHoldNote"] == "the debug hold ended: expired"
        assert job.ad()["GliteVmTimePayload"] > 0  # the usual attributes are all there
        assert "GliteVmDebugUntil" not in plain.ad()
        assert ("debug_hold_ended", "expired") in job.events()
        assert debug_held_vms(held.port) == 0
        job.teardown()
        assert not domain_running(job.vm)
    finally:
        starter.stop()
    assert domains_under(held.root) == []


def test_a_payload_that_succeeded_is_not_held(held: Held, alice: Account) -> None:
    starter = held.starter()
    try:
        job = Job(held, alice, starter, SUCCEEDING, GliteVmDebugHold=600)
        result = finished(job.launch())
        assert (result["status"], result["stdout"]) == (0, "fine\n")
        assert not any(name.startswith("GliteVmDebug") for name in job.ad())
        # asked directly, the service refuses to hold a VM whose payload succeeded
        answer = ok(call(held.svc, alice, "debug_hold", vm=job.vm))
        assert answer["until"] is None
        assert "did not fail" in answer["note"]
        assert not any(event.startswith("debug_held") for event, _ in job.events())
        job.teardown()
    finally:
        starter.stop()


def test_the_owner_ends_the_hold_early_and_nobody_else_can(
    held: Held, alice: Account, bob: Account
) -> None:
    starter = held.starter()
    try:
        job = Job(held, alice, starter, FAILING, GliteVmDebugHold=600)
        proc = job.launch()
        until = job.held_until()
        # asked for 600 s, granted this host's maximum, and told so
        assert until <= time.time() + MAX_HOLD + 1
        assert "was cut to 30 s" in job.ad()["GliteVmDebugHoldNote"]

        # bob, through the CLI and through the socket: refused as for a VM that does not exist
        theft = glite_vm_cli(bob, held.svc, "vms", "release", job.vm)
        assert theft.returncode != 0
        assert f"no VM named {job.vm!r} belongs to uid {bob.uid}" in theft.stderr
        assert "no VM named" in denied(call(held.svc, bob, "debug_release", vm=job.vm))
        assert "no VM named" in denied(call(held.svc, bob, "debug_hold", vm=job.vm))
        assert proc.poll() is None and domain_running(job.vm)  # still held

        # in the job's sandbox, as condor_ssh_to_job leaves her, no VM needs naming
        released = glite_vm_cli(alice, held.svc, "vms", "release", cwd=job.scratch)
        assert released.returncode == 0, released.stderr
        assert f"released {job.vm}" in released.stdout
        result = finished(proc)
        assert time.time() < until  # ended well before the hold would have
        assert (result["status"], result["stdout"], result["stderr"]) == (3, "partial\n", "boom\n")
        assert job.ad()["GliteVmDebugHoldNote"] == "the debug hold ended: released"
        assert ("debug_hold_ended", "released") in job.events()
        # a hold is ended once: releasing again is a clear error, and no new hold starts
        again = call(held.svc, alice, "debug_release", vm=job.vm)
        assert not again["ok"] and "not held for debugging" in again["message"]
        assert ok(call(held.svc, alice, "debug_hold", vm=job.vm))["until"] is None
        job.teardown()
    finally:
        starter.stop()


def test_condor_rm_during_the_hold_tears_the_vm_down_at_once(held: Held, alice: Account) -> None:
    """condor_rm and condor_vacate_job reach the launcher as SIGTERM."""
    starter = held.starter()
    try:
        job = Job(held, alice, starter, FAILING, GliteVmDebugHold=600)
        proc = job.launch()
        job.held_until()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=BOUND) == -signal.SIGTERM  # dies by it, as the payload would
        assert not domain_running(job.vm)  # torn down before the launcher died
        assert ("debug_hold_ended", "torn_down") in job.events()
        # the kept disk of a failed job, named in the ad as after any removal
        assert job.ad()["GliteVmSnapshotPath"].endswith("snapshot.qcow2")
        assert job.teardown()["snapshot_path"] == job.ad()["GliteVmSnapshotPath"]  # JOB_EXIT
    finally:
        starter.stop()
    assert domains_under(held.root) == []


def test_a_launcher_killed_outright_during_the_hold_leaves_no_vm(
    held: Held, alice: Account
) -> None:
    """SIGKILL gives the launcher no chance to tear down: the hold ends with its connection,
    and the VM goes with its job (here: the starter is gone, so the reaper takes it)."""
    starter = held.starter()
    job = Job(held, alice, starter, FAILING, GliteVmDebugHold=600)
    proc = job.launch()
    job.held_until()
    proc.kill()
    proc.wait(timeout=30)
    wait_for(
        "the hold ends with the launcher's connection",
        lambda: ("debug_hold_ended", "stopped") in job.events(),
        60,
    )
    starter.stop()
    wait_for(
        "the reaper tears the VM down",
        lambda: any(event == "reaped" for event, _ in job.events()),
        120,
    )
    assert not domain_running(job.vm)
    assert domains_under(held.root) == []


def test_a_payload_killed_by_a_signal_is_held_and_the_job_still_dies_by_it(
    held: Held, alice: Account
) -> None:
    starter = held.starter()
    try:
        job = Job(held, alice, starter, "echo partial; kill -SEGV $$", GliteVmDebugHold=600)
        proc = job.launch()
        job.held_until()
        assert proc.poll() is None and domain_running(job.vm)
        ok(call(held.svc, alice, "debug_release", vm=job.vm))
        # the launcher ends as the payload did: by its signal, as HTCondor's ExitSignal shows
        assert proc.wait(timeout=BOUND) == -signal.SIGSEGV
        assert job.ad()["GliteVmPayloadSignal"] == signal.SIGSEGV
        assert job.ad()["GliteVmDebugHoldNote"] == "the debug hold ended: released"
        job.teardown()
    finally:
        starter.stop()


def test_where_holds_are_off_a_job_that_asks_gets_a_note_and_ends_at_once(
    service: ServiceProcess, svc_root: Path, fake_starter: Path, alice: Account
) -> None:
    """The session's service runs with the default GLITE_VM_MAX_DEBUG_HOLD = 0."""
    assert "GLITE_VM_MAX_DEBUG_HOLD" not in service.env
    off = Held(service, svc_root, svc_root / "state", fake_starter, port=0)
    off.jobs = 900  # job numbers of their own beside the other tests' in this directory
    starter = off.starter()
    try:
        job = Job(off, alice, starter, FAILING, GliteVmDebugHold=600)
        result = finished(job.launch())
        assert (result["status"], result["stdout"]) == (3, "partial\n")
        note = job.ad()["GliteVmDebugHoldNote"]
        assert note == (
            "GliteVmDebugHold = 600 was not granted: debug holds are off on this host "
            "(GLITE_VM_MAX_DEBUG_HOLD = 0)"
        )
        assert "GliteVmDebugUntil" not in job.ad()
        assert ("debug_not_held", note) in job.events()
        job.teardown()
    finally:
        starter.stop()
