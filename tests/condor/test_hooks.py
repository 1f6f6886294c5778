"""PREPARE_JOB, JOB_EXIT and the launcher against a stand-in for the service boundary.

``ScriptedService`` plays the bootstrapper (the socket client's side of ``VmService``): it
records what the hooks and the launcher hand over and answers as told. What is asserted is the
hook/launcher side of the contract: the ad lines HTCondor reads, the chirped attributes, what
goes into the guest and what comes back into the sandbox, exit codes and signals, and that no
VM is left behind. Ad parsing is checked against ads written by the real ``condor_submit``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import classad2
import pytest

from glite_vm.api.submit_language import submit_words
from glite_vm.condor import hooks, launcher, under_starter
from glite_vm.condor.config import (
    HOOK_ENTRY_POINTS,
    PORTABLE_INTERPRETER,
    default_hooks_dir,
    hook_script,
)
from glite_vm.condor.hooks import HookContext, job_exit, prepare_job
from glite_vm.condor.jobad import HOST_FAILURES_ATTR, HOST_FAILURES_HOLD_CODE, AdValue
from glite_vm.condor.launcher import LAUNCHER_FAILURE_EXIT, LauncherArgs, LauncherContext
from glite_vm.condor.payload import parse_environment, payload_from_job_ad, split_v2_arguments
from glite_vm.config import Settings
from glite_vm.errors import AgentError, BootError, RequestError, UnknownImageError
from glite_vm.request import JobRequest
from glite_vm.service.api import (
    DebugHold,
    DebugHoldEnd,
    ExecOutcome,
    OutputSink,
    PrepareResult,
    TeardownOutcome,
    VmService,
    VmSummary,
)
from glite_vm.slots import SlotFacts

REPO = Path(__file__).resolve().parents[2]
VM = "glite-vm-alice-12.0-abcd"
HTCONDOR_FILES = (".chirp.config", ".job.ad", ".machine.ad", ".update.ad")


# --- the stand-in for the service and for chirp ----------------------------------------------


@dataclasses.dataclass
class ScriptedService:
    """``VmService`` as the hooks see it through the socket client; behaviour set per test."""

    prepare_result: PrepareResult | None = None
    prepare_error: BaseException | None = None
    prepare_blocks: threading.Event | None = None
    vms: list[VmSummary] = dataclasses.field(default_factory=list)
    exec_outcome: ExecOutcome = dataclasses.field(
        default_factory=lambda: ExecOutcome(exit_code=0, signal=None, seconds=1.5)
    )
    exec_output: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    exec_error: BaseException | None = None
    exec_action: Callable[[], None] | None = None
    guest_files: dict[str, bytes] = dataclasses.field(default_factory=dict)
    teardown_blocks: threading.Event | None = None
    calls: list[tuple[str, object]] = dataclasses.field(default_factory=list)  # in order
    pushed: dict[str, bytes] = dataclasses.field(default_factory=dict)
    prepares: list[tuple[JobRequest, str, int | None]] = dataclasses.field(default_factory=list)
    execs: list[tuple[str, list[str], dict[str, str]]] = dataclasses.field(default_factory=list)
    pulls: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    teardowns: list[tuple[str, bool]] = dataclasses.field(default_factory=list)
    # the debug hold: held for this many seconds (None: not held), with this note; a wait
    # ends for debug_end (after debug_wait_action, if any), or raises debug_error
    debug_seconds: float | None = None
    debug_note: str = ""
    debug_end: str = "expired"
    debug_wait_action: Callable[[], None] | None = None
    debug_error: BaseException | None = None

    def prepare(
        self,
        job: JobRequest,
        *,
        scratch_dir: str,
        starter_pid: int | None,
        slot: SlotFacts | None = None,
    ) -> PrepareResult:
        assert slot is None, "the hook states no slot: the service learns it from the starter"
        self.calls.append(("prepare", None))
        self.prepares.append((job, scratch_dir, starter_pid))
        if self.prepare_blocks is not None:
            self.prepare_blocks.wait(30)
        if self.prepare_error is not None:
            raise self.prepare_error
        assert self.prepare_result is not None
        return self.prepare_result

    def push(self, vm: str, src_dir: str) -> int:
        root = Path(src_dir)
        for path in sorted(root.rglob("*")):
            if path.is_file():
                self.pushed[str(path.relative_to(root))] = path.read_bytes()
        self.calls.append(("push", vm))
        return sum(len(b) for b in self.pushed.values())

    def exec(
        self,
        vm: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
    ) -> ExecOutcome:
        self.calls.append(("exec", vm))
        self.execs.append((vm, list(argv), dict(env or {})))
        for stream, data in self.exec_output:
            sink = stdout if stream == "stdout" else stderr
            assert sink is not None
            sink(data)
        if self.exec_action is not None:
            self.exec_action()
        if self.exec_error is not None:
            raise self.exec_error
        return self.exec_outcome

    def pull(self, vm: str, dest_dir: str, *, unchanged_from: str | None = None) -> list[str]:
        self.calls.append(("pull", vm))
        self.pulls.append((vm, unchanged_from))
        for rel, data in self.guest_files.items():
            target = Path(dest_dir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return list(self.guest_files)

    def teardown(self, vm: str, *, failed: bool) -> TeardownOutcome:
        self.calls.append(("teardown", vm))
        self.teardowns.append((vm, failed))
        if self.teardown_blocks is not None:
            self.teardown_blocks.wait(30)
        return TeardownOutcome(
            snapshot_path=f"/var/lib/glite-vm/snapshots/{vm}/overlay.qcow2" if failed else None,
            boot_log_path=f"/var/lib/glite-vm/run/{vm}/boot.log",
            record_path=f"/var/lib/glite-vm/records/{vm}.json",
            ad_attributes={"GliteVmTimeTeardown": 0.4},
        )

    def debug_hold(self, vm: str) -> DebugHold:
        self.calls.append(("debug_hold", vm))
        if self.debug_error is not None:
            raise self.debug_error
        until = None if self.debug_seconds is None else time.time() + self.debug_seconds
        return DebugHold(vm=vm, until=until, note=self.debug_note)

    def debug_wait(self, vm: str) -> DebugHoldEnd:
        self.calls.append(("debug_wait", vm))
        if self.debug_wait_action is not None:
            self.debug_wait_action()
        return DebugHoldEnd(vm=vm, reason=self.debug_end)

    def debug_release(self, vm: str) -> DebugHoldEnd:
        self.calls.append(("debug_release", vm))
        return DebugHoldEnd(vm=vm, reason="released")

    def list_vms(self) -> list[VmSummary]:
        self.calls.append(("list_vms", None))
        return self.vms


class RecordingChirp:
    def __init__(self) -> None:
        self.attributes: dict[str, AdValue] = {}

    def set_attributes(self, attributes: Mapping[str, AdValue]) -> None:
        self.attributes.update(attributes)


def prepared(vm: str = VM) -> PrepareResult:
    return PrepareResult(
        vm=vm,
        ad_attributes={
            "GliteVmDomain": vm,
            "GliteVmHypervisor": "qemu",
            "GliteVmImageDigest": "ab" * 32,
            "GliteVmCacheHit": True,
            "GliteVmTimeBoot": 3.25,
            "NotOurs": "x",
        },
        guest_user="glite",
        boot_log_path=f"/var/lib/glite-vm/run/{vm}/boot.log",
    )


JOB_AD = """ClusterId = 12
ProcId = 0
Owner = "alice"
Cmd = "/home/alice/job/build.sh"
Arguments = "one' 'two three"
Environment = "FOO=bar BAZ='x y'"
GliteVmImage = "debian-12"
RequestMemory = 512
"""


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A scratch directory as PREPARE_JOB finds it: inputs and HTCondor's four files."""
    path = tmp_path / "execute" / "dir_4242"
    path.mkdir(parents=True)
    for name in HTCONDOR_FILES:
        (path / name).write_text("htcondor's\n")
    (path / ".job.ad").write_text(JOB_AD)
    (path / ".machine.ad").write_text("Cpus = 1\nMemory = 2048\nGliteVmRootEnabled = false\n")
    (path / "build.sh").write_text("#!/bin/sh\necho hi\n")
    (path / "in.txt").write_text("input\n")
    (path / ".hidden-input").write_text("dot\n")
    (path / "data").mkdir()
    (path / "data" / "nested.txt").write_text("nested\n")
    return path


def fresh() -> tuple[ScriptedService, RecordingChirp, io.StringIO]:
    return ScriptedService(prepare_result=prepared()), RecordingChirp(), io.StringIO()


def make_ctx(
    scratch: Path,
    service: VmService,
    chirp: RecordingChirp,
    out: io.StringIO,
    *,
    settings: Settings | None = None,
    param: Callable[[str], str | None] = lambda _name: None,
    warnings: list[str] | None = None,
) -> HookContext:
    collected = warnings if warnings is not None else []
    return HookContext(
        settings=settings
        or Settings(socket_path=Path("/run/glite-vm/test.sock"), max_host_failures=3),
        environ={
            "_CONDOR_SCRATCH_DIR": str(scratch),
            "_CONDOR_MACHINE_AD": str(scratch / ".machine.ad"),
            "_CONDOR_JOB_AD": str(scratch / ".job.ad"),
        },
        stdout=out,
        connect=lambda _settings: service,
        chirp=chirp,
        warn=collected.append,
        hooks_dir=Path("/opt/glite-vm/hooks"),
        starter_pid=4242,
        param=param,
    )


def ad_lines(text: str) -> classad2.ClassAd:
    """Read the hook's stdout the way the starter does: old-syntax ``Name = value`` lines."""
    return classad2.parseOne(text, classad2.ParserType.Old)


# --- PREPARE_JOB ------------------------------------------------------------------------------


def test_prepare_job_makes_the_starter_run_the_launcher_on_the_inputs(scratch: Path) -> None:
    service, chirp, out = fresh()
    assert prepare_job(make_ctx(scratch, service, chirp, out), JOB_AD) == 0

    ad = ad_lines(out.getvalue())
    assert ad["Cmd"] == "/opt/glite-vm/hooks/launcher"
    assert ad["TransferExecutable"] is False
    # the launcher learns the socket, the VM and exactly the inputs (not HTCondor's files)
    assert split_v2_arguments(ad["Arguments"]) == [
        "--socket=/run/glite-vm/test.sock",
        "--",
        VM,
        ".hidden-input",
        "build.sh",
        "data",
        "in.txt",
    ]
    assert ad["GliteVmDomain"] == VM
    assert ad["GliteVmBootLogPath"] == f"/var/lib/glite-vm/run/{VM}/boot.log"
    assert ad["GliteVmCacheHit"] is True
    assert "NotOurs" not in ad
    # the service got the job's request (never the ad), the scratch directory and the starter
    ((request, scratch_dir, starter),) = service.prepares
    assert (request.image, request.job_id) == ("debian-12", "12.0")
    assert (scratch_dir, starter) == (str(scratch), 4242)
    # the schedd learns the GliteVm* attributes, never the rewritten command
    assert chirp.attributes["GliteVmDomain"] == VM
    assert chirp.attributes["GliteVmHypervisor"] == "qemu"
    assert isinstance(chirp.attributes["GliteVmTimePrepare"], float)
    assert not {"Cmd", "Arguments", "TransferExecutable"} & set(chirp.attributes)


def test_the_launcher_path_comes_from_the_configuration_when_set(scratch: Path) -> None:
    service, chirp, out = fresh()
    param = {"GLITE_VM_LAUNCHER": "/srv/launcher"}.get
    assert prepare_job(make_ctx(scratch, service, chirp, out, param=param), JOB_AD) == 0
    assert ad_lines(out.getvalue())["Cmd"] == "/srv/launcher"


def test_a_user_error_holds_with_the_services_message(scratch: Path) -> None:
    error = UnknownImageError("debian-13", ["debian-12", "alma-9"])
    service = ScriptedService(prepare_error=error)
    chirp, out = RecordingChirp(), io.StringIO()
    assert prepare_job(make_ctx(scratch, service, chirp, out), JOB_AD) == 1
    ad = ad_lines(out.getvalue())
    assert ad["HookStatusCode"] == 11
    assert ad["HookStatusMessage"] == str(error)
    assert "Cmd" not in ad
    assert HOST_FAILURES_ATTR not in chirp.attributes  # not the host's fault


def test_host_failures_requeue_then_hold_with_the_earlier_reasons(scratch: Path) -> None:
    error = BootError("the guest agent did not answer", boot_log=Path("/var/run/x/boot.log"))
    first_ad = JOB_AD
    service, chirp, out = ScriptedService(prepare_error=error), RecordingChirp(), io.StringIO()
    assert prepare_job(make_ctx(scratch, service, chirp, out), first_ad) == 1
    ad = ad_lines(out.getvalue())
    assert ad["HookStatusCode"] == 305  # requeue
    assert ad["HookStatusMessage"].startswith("host failure 1 of at most 3")
    history = chirp.attributes[HOST_FAILURES_ATTR]
    assert isinstance(history, str) and history.endswith(str(error).splitlines()[0])
    assert chirp.attributes["GliteVmBootLogPath"] == "/var/run/x/boot.log"

    # the third attempt: two earlier StarterErrors, and their reasons in the ad
    third_ad = (
        JOB_AD + "NumVacatesByReason = [ StarterError = 2 ]\n"
        f'{HOST_FAILURES_ATTR} = "hostA: no agent || hostB: no agent"\n'
    )
    chirp, out = RecordingChirp(), io.StringIO()
    assert prepare_job(make_ctx(scratch, service, chirp, out), third_ad) == 1
    ad = ad_lines(out.getvalue())
    assert ad["HookStatusCode"] == HOST_FAILURES_HOLD_CODE
    message = ad["HookStatusMessage"]
    assert "held after 3 host failures" in message
    assert "earlier: hostA: no agent || hostB: no agent" in message
    assert chirp.attributes[HOST_FAILURES_ATTR].startswith(  # type: ignore[union-attr]
        "hostA: no agent || hostB: no agent || "
    )


def test_a_hung_prepare_is_abandoned_and_its_vm_torn_down(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "PREPARE_MARGIN", 0.5)
    release = threading.Event()
    service = ScriptedService(
        prepare_blocks=release,
        prepare_result=prepared(),
        vms=[
            VmSummary(VM, "alice", 1000, "12.0", "debian-12", 0.2, True),
            VmSummary("older-vm", "alice", 1000, "12.0", "debian-12", 3600.0, True),
            VmSummary("other-job", "alice", 1000, "13.0", "debian-12", 0.2, True),
        ],
    )
    settings = Settings(lock_timeout=0.0, boot_timeout=0.0, max_host_failures=3)
    chirp, out = RecordingChirp(), io.StringIO()
    started = time.monotonic()
    try:
        code = prepare_job(make_ctx(scratch, service, chirp, out, settings=settings), JOB_AD)
    finally:
        release.set()
    assert code == 1
    assert time.monotonic() - started < 5
    ad = ad_lines(out.getvalue())
    assert ad["HookStatusCode"] >= 300
    assert "did not finish within" in ad["HookStatusMessage"]
    # only the VM this attempt made goes: same job, younger than the attempt
    assert service.teardowns == [(VM, True)]


def test_a_stop_signal_during_prepare_cleans_up_and_requeues(scratch: Path) -> None:
    release = threading.Event()
    service = ScriptedService(
        prepare_blocks=release,
        prepare_result=prepared(),
        vms=[VmSummary(VM, "alice", 1000, "12.0", "debian-12", 0.1, True)],
    )
    chirp, out = RecordingChirp(), io.StringIO()
    previous = {sig: signal.getsignal(sig) for sig in under_starter.STOP_SIGNALS}
    under_starter.raise_on_stop_signals()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        code = prepare_job(make_ctx(scratch, service, chirp, out), JOB_AD)
    finally:
        release.set()
        timer.cancel()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert code == 1
    ad = ad_lines(out.getvalue())
    assert ad["HookStatusCode"] >= 300
    assert "SIGTERM" in ad["HookStatusMessage"]
    assert service.teardowns == [(VM, True)]


def test_an_input_name_the_ad_cannot_carry_holds_before_any_vm(scratch: Path) -> None:
    (scratch / "two\nlines").write_text("x")
    service, chirp, out = fresh()
    assert prepare_job(make_ctx(scratch, service, chirp, out), JOB_AD) == 1
    ad = ad_lines(out.getvalue())
    assert 1 <= ad["HookStatusCode"] < 300
    assert "rename it" in ad["HookStatusMessage"]
    assert service.calls == []


def test_an_unreadable_job_ad_requeues(scratch: Path) -> None:
    service, chirp, out = fresh()
    assert prepare_job(make_ctx(scratch, service, chirp, out), "") == 1
    assert ad_lines(out.getvalue())["HookStatusCode"] >= 300
    assert service.calls == []


def test_the_starter_is_found_above_the_hook(tmp_path: Path) -> None:
    def process(pid: int, comm: str, ppid: int) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm} x) S {ppid} 1 1\n")

    process(100, "condor_starter", 50)
    process(200, "sh", 100)
    process(300, "bash", 1)
    assert hooks.find_starter_pid(100, tmp_path) == 100
    assert hooks.find_starter_pid(200, tmp_path) == 100  # a wrapper shell is skipped
    assert hooks.find_starter_pid(300, tmp_path) is None


# --- JOB_EXIT ---------------------------------------------------------------------------------


EXIT_AD = JOB_AD + f'GliteVmDomain = "{VM}"\nExitBySignal = false\n'


@pytest.mark.parametrize(
    ("reason", "extra", "failed"),
    [
        ("exit", "ExitCode = 0\n", False),
        ("exit", "ExitCode = 3\n", True),
        ("exit", "ExitCode = 0\nExitBySignal = true\nExitSignal = 9\n", True),
        ("evict", "ExitCode = 143\n", True),
        ("evict", "ExitCode = 0\n", True),
    ],
)
def test_job_exit_tears_down_with_the_failure_for_the_snapshot_policy(
    scratch: Path, reason: str, extra: str, failed: bool
) -> None:
    service, chirp, out = ScriptedService(), RecordingChirp(), io.StringIO()
    ad = EXIT_AD.replace("ExitBySignal = false\n", "") if "ExitBySignal" in extra else EXIT_AD
    assert job_exit(make_ctx(scratch, service, chirp, out), reason, ad + extra) == 0
    assert service.teardowns == [(VM, failed)]
    if reason == "exit":
        assert chirp.attributes["GliteVmTimeTeardown"] == 0.4
        assert chirp.attributes["GliteVmRecordPath"] == f"/var/lib/glite-vm/records/{VM}.json"
        assert ("GliteVmSnapshotPath" in chirp.attributes) is failed
    else:
        assert chirp.attributes == {}  # the chirp server is gone on evict


def test_job_exit_without_a_vm_does_nothing(scratch: Path) -> None:
    service, chirp, out = ScriptedService(), RecordingChirp(), io.StringIO()
    assert job_exit(make_ctx(scratch, service, chirp, out), "evict", JOB_AD) == 0
    assert service.calls == []


def test_job_exit_keeps_within_the_hooks_timeout(scratch: Path) -> None:
    release = threading.Event()
    service, chirp, out = ScriptedService(teardown_blocks=release), RecordingChirp(), io.StringIO()
    warnings: list[str] = []
    param = {"GLITE_VM_HOOK_JOB_EXIT_TIMEOUT": "4"}.get
    ctx = make_ctx(scratch, service, chirp, out, param=param, warnings=warnings)
    started = time.monotonic()
    try:
        assert job_exit(ctx, "exit", EXIT_AD + "ExitCode = 0\n") == 1
    finally:
        release.set()
    assert time.monotonic() - started < 3
    assert any("did not finish within" in w for w in warnings)


# --- the launcher -----------------------------------------------------------------------------


@pytest.fixture
def running(scratch: Path) -> Path:
    """The scratch directory once the starter has started the launcher."""
    (scratch / "_condor_stdout").write_text("")
    (scratch / "_condor_stderr").write_text("")
    (scratch / "var" / "tmp").mkdir(parents=True)
    return scratch


INPUTS = (".hidden-input", "build.sh", "data", "in.txt")


def launch(
    scratch: Path, service: ScriptedService, chirp: RecordingChirp
) -> tuple[int, bytes, bytes]:
    stdout, stderr = bytearray(), bytearray()
    ctx = LauncherContext(
        settings=Settings(teardown_timeout=2.0),
        environ={"_CONDOR_SCRATCH_DIR": str(scratch), "_CONDOR_JOB_AD": str(scratch / ".job.ad")},
        connect=lambda _settings: service,
        chirp=chirp,
        stdout=stdout.extend,
        stderr=stderr.extend,
    )
    code = launcher.run(ctx, LauncherArgs(vm=VM, inputs=INPUTS, socket_path=None))
    return code, bytes(stdout), bytes(stderr)


def test_the_launcher_runs_the_payload_in_the_guest_and_brings_files_back(running: Path) -> None:
    service = ScriptedService(
        exec_output=[("stdout", b"out 1\n"), ("stderr", b"err\n"), ("stdout", b"\x00bin")],
        exec_outcome=ExecOutcome(exit_code=7, signal=None, seconds=2.5),
        guest_files={
            "result.txt": b"made in the guest\n",
            "data/new/deep.txt": b"deep\n",
            "in.txt": b"changed\n",
            "_condor_stdout": b"the guest must not replace the job's stdout\n",
            "var/tmp/x": b"nor HTCondor's directories\n",
        },
    )
    chirp = RecordingChirp()
    code, stdout, stderr = launch(running, service, chirp)
    assert code == 7
    assert stdout == b"out 1\n\x00bin"
    assert stderr.startswith(b"err\n")
    # exactly the inputs went in, HTCondor's files did not; the scratch directory is as before
    assert sorted(service.pushed) == [".hidden-input", "build.sh", "data/nested.txt", "in.txt"]
    assert not list(running.glob(".glite-vm-*"))
    # the transferred executable runs from the guest's working directory, with the job's
    # arguments and environment as submitted
    ((vm, argv, env),) = service.execs
    assert vm == VM
    assert argv == ["./build.sh", "one two", "three"]
    assert env == {"FOO": "bar", "BAZ": "x y"}
    ((_vm, unchanged_from),) = service.pulls
    assert unchanged_from == str(running)
    assert (running / "result.txt").read_bytes() == b"made in the guest\n"
    assert (running / "data" / "new" / "deep.txt").read_bytes() == b"deep\n"
    assert (running / "in.txt").read_bytes() == b"changed\n"
    assert (running / "_condor_stdout").read_text() == ""
    assert not (running / "var" / "tmp" / "x").exists()
    assert b"_condor_stdout" in stderr  # the user is told what did not come back
    assert chirp.attributes["GliteVmTimePayload"] == 2.5
    assert service.teardowns == []  # JOB_EXIT's job


def _failing_service(**debug: object) -> ScriptedService:
    return ScriptedService(
        exec_output=[("stdout", b"partial\n"), ("stderr", b"boom\n")],
        exec_outcome=ExecOutcome(exit_code=3, signal=None, seconds=1.0),
        guest_files={"result.txt": b"made before the failure\n"},
        **debug,  # type: ignore[arg-type]
    )


def asks_for_a_hold(scratch: Path, seconds: int = 60) -> None:
    with (scratch / ".job.ad").open("a") as ad:
        ad.write(f"GliteVmDebugHold = {seconds}\n")


def _sandbox(scratch: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(scratch)): p.read_bytes()
        for p in sorted(scratch.rglob("*"))
        if p.is_file()
    }


def test_a_debug_hold_keeps_the_job_running_and_then_ends_it_as_without(
    running: Path, tmp_path: Path
) -> None:
    """The same failing job, held and not: the same exit status, output and sandbox; the held
    one waited for the hold, and its ad says until when and how the hold ended."""
    plain_dir = tmp_path / "plain"
    shutil.copytree(running, plain_dir)
    plain = _failing_service(debug_seconds=60)
    plain_code, plain_out, plain_err = launch(plain_dir, plain, RecordingChirp())
    assert not [c for c, _ in plain.calls if c.startswith("debug")]  # the job asked for none

    asks_for_a_hold(running)

    waited = threading.Event()
    held = _failing_service(debug_seconds=60, debug_end="released", debug_wait_action=waited.set)
    chirp = RecordingChirp()
    before = time.time()
    code, out, err = launch(running, held, chirp)
    assert waited.is_set()
    assert [c for c, _ in held.calls][-3:] == ["pull", "debug_hold", "debug_wait"]
    assert (code, out, err) == (plain_code, plain_out, plain_err) == (3, b"partial\n", b"boom\n")
    assert _sandbox(running) == {
        **_sandbox(plain_dir),
        ".job.ad": (running / ".job.ad").read_bytes(),
    }
    # the end of the hold as it happened (released early), and why
    until = chirp.attributes["GliteVmDebugUntil"]
    assert isinstance(until, int)  # epoch seconds, as condor_q -af shows them
    assert before - 1 <= until <= time.time() + 1
    assert chirp.attributes["GliteVmDebugHoldNote"] == "the debug hold ended: released"
    assert held.teardowns == []  # JOB_EXIT's job, as without a hold


def test_a_debug_hold_puts_its_end_into_the_ad_before_waiting(running: Path) -> None:
    asks_for_a_hold(running)
    seen: dict[str, AdValue] = {}
    chirp = RecordingChirp()
    service = _failing_service(
        debug_seconds=600,
        debug_note="GliteVmDebugHold = 3600 was cut to 600 s",
        debug_wait_action=lambda: seen.update(chirp.attributes),
    )
    before = time.time()
    launch(running, service, chirp)
    until = seen["GliteVmDebugUntil"]
    assert isinstance(until, int)
    assert before + 599 <= until <= time.time() + 601
    assert seen["GliteVmDebugHoldNote"] == "GliteVmDebugHold = 3600 was cut to 600 s"


def test_a_payload_that_succeeded_is_never_held(running: Path) -> None:
    asks_for_a_hold(running)
    service = ScriptedService(debug_seconds=60)
    chirp = RecordingChirp()
    code, _out, _err = launch(running, service, chirp)
    assert code == 0
    assert not [c for c, _ in service.calls if c.startswith("debug")]
    assert "GliteVmDebugUntil" not in chirp.attributes


def test_a_hold_the_site_did_not_grant_is_a_note_in_the_ad_not_a_wait(running: Path) -> None:
    asks_for_a_hold(running)
    note = "GliteVmDebugHold = 600 was not granted: debug holds are off on this host"
    service = _failing_service(debug_note=note)
    chirp = RecordingChirp()
    code, _out, err = launch(running, service, chirp)
    assert code == 3
    assert err == b"boom\n"  # not in the job's error file: that stays the payload's
    assert chirp.attributes["GliteVmDebugHoldNote"] == note
    assert "GliteVmDebugUntil" not in chirp.attributes
    assert ("debug_wait", VM) not in service.calls


def test_a_debug_hold_that_fails_leaves_the_jobs_end_alone(running: Path) -> None:
    asks_for_a_hold(running)
    service = _failing_service(debug_error=AgentError("the service went away"))
    chirp = RecordingChirp()
    code, out, err = launch(running, service, chirp)
    assert (code, out, err) == (3, b"partial\n", b"boom\n")
    assert "the service went away" in str(chirp.attributes["GliteVmDebugHoldNote"])


def test_a_failure_of_glite_vm_is_not_the_payloads_exit_code(running: Path) -> None:
    service = ScriptedService(exec_error=AgentError("the guest agent stopped answering"))
    chirp = RecordingChirp()
    code, _out, stderr = launch(running, service, chirp)
    assert code == LAUNCHER_FAILURE_EXIT
    assert b"the guest agent stopped answering" in stderr
    assert chirp.attributes["GliteVmLauncherError"] == "the guest agent stopped answering"
    assert sorted(os.listdir(running)) == sorted(
        [*HTCONDOR_FILES, *INPUTS, "_condor_stdout", "_condor_stderr", "var"]
    )


def test_a_non_transferred_executable_runs_by_its_path_in_the_guest(tmp_path: Path) -> None:
    ad = classad2.parseOne(
        'Cmd = "/usr/bin/make"\nArgs = "-j 2 all"\nTransferExecutable = false\n'
        'Env = "A=1;B=x=y"\nEnvDelim = ";"\n',
        classad2.ParserType.Old,
    )
    payload = payload_from_job_ad(ad, ["make"])
    assert payload.argv == ("/usr/bin/make", "-j", "2", "all")
    assert payload.env == {"A": "1", "B": "x=y"}
    assert payload.executable == ""


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("a b\tc", ["a", "b", "c"]),
        ("a' 'b cd", ["a b", "cd"]),
        ("'' x", ["", "x"]),
        ("'it''s'", ["it's"]),
        ("it''''s", ["it's"]),
        ("  ", []),
        ('back\\slash "q"', ["back\\slash", '"q"']),
    ],
)
def test_v2_arguments_split_as_htcondor_writes_them(text: str, words: list[str]) -> None:
    assert split_v2_arguments(text) == words


def test_an_unbalanced_quote_is_a_request_error() -> None:
    with pytest.raises(RequestError, match="Arguments"):
        split_v2_arguments("a 'b")


def test_environment_items_must_be_name_value() -> None:
    with pytest.raises(RequestError, match="Environment"):
        parse_environment({"Environment": "A=1 novalue"})
    assert parse_environment({"Environment": "A= B=='x'"}) == {"A": "", "B": "=x"}
    assert parse_environment({}) == {}


SUBMITTED_ARGS = ["-c", 'echo "$1" it\'s', "x  y", "back\\slash", "é"]


def test_ads_written_by_condor_submit_give_back_the_submitted_command(
    htcondor_release: Path, tmp_path: Path
) -> None:
    """The real condor_submit's encodings of tricky arguments and environments."""
    config = tmp_path / "condor_config"
    config.write_text(f"RELEASE_DIR = {htcondor_release}\nLOCAL_DIR = {tmp_path}\n")
    env = {"CONDOR_CONFIG": str(config), "PATH": "/usr/bin:/bin"}

    def dump(lines: list[str]) -> classad2.ClassAd:
        sub = tmp_path / "job.sub"
        sub.write_text("\n".join([*lines, "queue", ""]))
        out = tmp_path / "job.ad"
        subprocess.run(
            [str(htcondor_release / "bin" / "condor_submit"), "-dump", str(out), str(sub)],
            env=env,
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=60,
        )
        return classad2.parseOne(out.read_text(), classad2.ParserType.Old)

    # new syntax: double quotes around it all, single quotes group, doubled quotes escape
    new = dump(
        [
            "executable = /bin/sh",
            f"arguments = {submit_words(SUBMITTED_ARGS)}",
            "environment = \"A=1 B='two  words' C='it''s' D=x=y\"",
        ]
    )
    payload = payload_from_job_ad(new, ["sh"])
    assert payload.argv == ("./sh", *SUBMITTED_ARGS)
    assert payload.env == {"A": "1", "B": "two  words", "C": "it's", "D": "x=y"}

    old = dump(["executable = /bin/sh", "arguments = old  style args", "env = X=1;Y=a b"])
    payload = payload_from_job_ad(old, [])
    assert payload.argv == ("/bin/sh", "old", "style", "args")
    assert payload.env == {"X": "1", "Y": "a b"}


# --- exit codes and signals, in a child process -----------------------------------------------


def _child(code: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.mark.parametrize(
    ("outcome", "returncode"),
    [
        ("ExecOutcome(7, None, 1.0)", 7),
        ("ExecOutcome(0, None, 1.0)", 0),
        ("ExecOutcome(None, signal.SIGTERM, 1.0)", -signal.SIGTERM),
        ("ExecOutcome(None, signal.SIGSEGV, 1.0)", -signal.SIGSEGV),
        ("ExecOutcome(None, signal.SIGKILL, 1.0)", -signal.SIGKILL),
    ],
)
def test_the_launcher_ends_as_the_payload_did(
    outcome: str, returncode: int, tmp_path: Path
) -> None:
    code = (
        "import signal, sys\n"
        "from glite_vm.condor.launcher import die_like\n"
        "from glite_vm.service.api import ExecOutcome\n"
        f"sys.exit(die_like({outcome}))\n"
    )
    assert _child(code, tmp_path).returncode == returncode
    assert list(tmp_path.iterdir()) == []  # no core file in the sandbox


def test_condor_rm_during_the_payload_tears_the_vm_down_at_once(running: Path) -> None:
    """SIGTERM mid-exec: a fresh connection asks for teardown(failed=True), then the launcher
    dies by SIGTERM (run in a child process: it really does die)."""
    record = running.parent / "calls.json"
    code = f"""
import json, os, signal, sys, time
from pathlib import Path
from glite_vm.condor import launcher, under_starter
from glite_vm.config import Settings
from tests.condor.test_hooks import ScriptedService, RecordingChirp, INPUTS, VM

def payload():
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)

class Recorded(ScriptedService):
    def teardown(self, vm, *, failed):
        outcome = super().teardown(vm, failed=failed)
        record = {{"calls": self.calls, "teardowns": self.teardowns}}
        Path({str(record)!r}).write_text(json.dumps(record))
        return outcome

class Chirped(RecordingChirp):
    def set_attributes(self, attributes):
        super().set_attributes(attributes)
        record = {{"calls": service.calls, "teardowns": service.teardowns,
                  "chirped": self.attributes}}
        Path({str(record)!r}).write_text(json.dumps(record))

service = Recorded(exec_action=payload)
under_starter.raise_on_stop_signals()
ctx = launcher.LauncherContext(
    settings=Settings(teardown_timeout=2.0),
    environ={{"_CONDOR_SCRATCH_DIR": {str(running)!r}}},
    connect=lambda _s: service,
    chirp=Chirped(),
)
launcher.run(ctx, launcher.LauncherArgs(vm=VM, inputs=INPUTS, socket_path=None))
"""
    started = time.monotonic()
    result = _child(code, running.parent)
    assert result.returncode == -signal.SIGTERM, result.stderr.decode()
    assert time.monotonic() - started < 20
    recorded = json.loads(record.read_text())
    assert [name for name, _vm in recorded["calls"]] == ["push", "exec", "teardown"]
    assert recorded["teardowns"] == [[VM, True]]
    assert b"tearing down the VM" in result.stderr
    # the snapshot the policy kept is named in the job ad (chirped before dying)
    assert recorded["chirped"]["GliteVmSnapshotPath"].endswith("/overlay.qcow2")


# --- the executables --------------------------------------------------------------------------


def test_the_source_trees_hooks_are_the_installed_ones_with_a_portable_interpreter() -> None:
    for name in HOOK_ENTRY_POINTS:
        path = default_hooks_dir() / name
        assert path.read_text() == hook_script(name, PORTABLE_INTERPRETER)
        mode = path.stat().st_mode
        assert mode & 0o111 == 0o111
        assert mode & 0o022 == 0  # the starter refuses hooks others can write


def test_hook_install_writes_runnable_hooks_naming_this_python(tmp_path: Path) -> None:
    from glite_vm.cli.main import main as cli  # noqa: PLC0415

    target = tmp_path / "hooks"
    assert cli(["hook", "install", str(target), "--python", sys.executable]) == 0
    for name in HOOK_ENTRY_POINTS:
        path = target / name
        assert path.read_text().startswith(f"#!{sys.executable} -I\n")
        assert path.stat().st_mode & 0o777 == 0o755
    # the installed launcher runs (without the starter it can only say what is wrong)
    result = subprocess.run(
        [str(target / "launcher")], capture_output=True, timeout=60, check=False, env={}
    )
    assert result.returncode == LAUNCHER_FAILURE_EXIT
    assert b"the launcher cannot start" in result.stderr
    # a PREPARE_JOB without a service requeues with the reason, in HTCondor's format
    result = subprocess.run(
        [str(target / "prepare_job")],
        input=JOB_AD.encode(),
        capture_output=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"GLITE_VM_SOCKET_PATH": str(tmp_path / "none.sock"), "GLITE_VM_CONFIG": "/none"},
    )
    ad = ad_lines(result.stdout.decode())
    assert ad["HookStatusCode"] == 307
    assert "none.sock" in ad["HookStatusMessage"]

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert cli(["hook", "install", str(shared)]) == 125
    assert list(shared.iterdir()) == []
