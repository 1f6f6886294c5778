"""glite_vm.api without VMs: job validation, the submit description, and the bookkeeping of
submit/wait/result over a schedd.

The description is checked three ways: as ``htcondor2.Submit`` sees it, through the real
``condor_submit -dry-run`` (marker ``condor``), and through the parsers the launcher and the
hooks apply to the resulting job ad, so what a user writes in Python is what runs in the guest.
The schedd in the bookkeeping tests is a small in-memory one whose constraints are evaluated by
``classad2``; the real schedd is exercised in tests/condor/test_api_pool.py.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import classad2
import pytest

from glite_vm.api.jobdir import LOG_NAME, SCRIPT_NAME, STDERR_NAME, STDOUT_NAME, image_slug
from glite_vm.api.local import run_local
from glite_vm.api.matrix import matrix
from glite_vm.api.pool import (
    JobNotFoundError,
    SchedulerError,
    WaitProgress,
    WaitTimeoutError,
    result,
    submit,
    wait,
)
from glite_vm.api.results import JobHandle, JobState, Result, result_from_ad
from glite_vm.api.vmjob import VmJob
from glite_vm.condor.payload import parse_arguments, parse_environment, split_v2_arguments
from glite_vm.config import Settings
from glite_vm.errors import Disposition, RequestError
from glite_vm.request import KeepSnapshot
from glite_vm.slots import SlotFacts
from glite_vm.units import GIB, KIB, MIB
from tests.support import sized
from tests.unit.test_templates import REPO, condor_submit, dry_run

__all__ = ["condor_submit"]  # the fixture, shared with the template tests

#: Arguments and environment values that each break a naive writer of submit files.
NASTY_ARGS = [
    "two words",
    "it's",
    'say "hi"',
    "back\\slash",
    "trailing\\",
    "",
    "'",
    "#hash",
    "x=1;y",
    "tab\there",
    "$(Cluster)",
    "$ENV(HOME)",
    "$RANDOM_INTEGER(1,9)",
    "$HOME",
    "$$",
    "$",
    "${x}",
    "$((1+2))",
    "$[1]",
    "a$(b)c$(d)",
    "ünïcödé",
]
NASTY_ENV = {
    "SPACES": "x y",
    "QUOTE": "it's",
    "DQUOTE": 'say "hi"',
    "MACRO": "$(HOME)",
    "FUNC": "$ENV(PATH)",
    "EMPTY": "",
    "SEMI": "a;b",
    "BACK": "back\\slash",
    "EQ": "=x=",
}


@pytest.fixture
def files(tmp_path: Path) -> Path:
    d = tmp_path / "files"
    d.mkdir()
    (d / "build.sh").write_text("#!/bin/sh\nmake\n")
    (d / "src.tar.gz").write_bytes(b"x")
    (d / "tree").mkdir()
    (d / "tree" / "a.txt").write_text("a")
    return d


def script_job(**kw: Any) -> VmJob:
    args: dict[str, Any] = {"image": "debian-12", "script": "echo hi"}
    args.update(kw)
    return VmJob(**args)


def attributes(sub: Any) -> dict[str, object]:
    """The ``MY.*`` attributes of a description as the job ad holds them."""
    return {k[3:]: classad2.ExprTree(sub.expand(k)).eval() for k in sub if k.startswith("MY.")}


def v2_words(value: str) -> list[str]:
    """A quoted (V2) arguments/environment value of the submit language, split into words."""
    assert value.startswith('"')
    assert value.endswith('"')
    return split_v2_arguments(value[1:-1].replace('""', '"'))


# --- the job and its validation ---------------------------------------------------------------


def test_defaults_are_the_sites_historical_vm() -> None:
    job = script_job()
    assert (job.cpus, job.memory_mib, job.disk_bytes) == (1, 2048, 30 * GIB)
    assert job.disk_kib == 30 * GIB // KIB
    assert job.root is False
    assert job.keep_snapshot is KeepSnapshot.ON_FAILURE
    assert job.program_name == SCRIPT_NAME


def test_values_are_normalised(files: Path) -> None:
    job = VmJob(
        str(files / "disk.qcow2"),
        executable=files / "build.sh",
        arguments=["a"],
        inputs=[files / "src.tar.gz", str(files / "tree") + "/"],
        outputs=["./out//x.txt"],
        memory="512 MiB",
        disk="1.5GiB",
        keep_snapshot="Always",
        hostname="Build-1.Example.org",
        image_sha256="AB" * 32,
    )
    assert job.image == str(files / "disk.qcow2")
    assert job.executable == str(files / "build.sh")
    assert job.arguments == ("a",)
    assert job.inputs == (str(files / "src.tar.gz"), str(files / "tree") + "/")
    assert job.outputs == ("out/x.txt",)
    assert (job.memory_mib, job.disk_bytes) == (512, 1536 * MIB)
    assert job.keep_snapshot is KeepSnapshot.ALWAYS
    assert job.hostname == "build-1.example.org"
    assert job.image_sha256 == "ab" * 32
    assert job.with_image("alma-9").image == "alma-9"
    assert job.with_image("alma-9").inputs == job.inputs


BAD_JOBS: list[tuple[dict[str, Any], str]] = [
    ({"image": ""}, "image"),
    ({"image": "rel/path.qcow2"}, "image"),
    ({"image": 'a"b'}, "image"),
    ({"image": "a\\b"}, "image"),
    ({"image": "deb ian"}, "image"),
    ({"image": 12}, "image"),
    ({"image_sha256": "xyz"}, "image_sha256"),
    ({"image_sha256": 'a"b'}, "image_sha256"),
    ({"image_sha256": 12}, "image_sha256"),
    ({"executable": "/bin/sh"}, "script"),  # both
    ({"script": None}, "script"),  # neither
    ({"script": "   "}, "script"),
    ({"script": "a\0b"}, "script"),
    ({"script": "true", "transfer_executable": False}, "transfer_executable"),
    ({"script": None, "executable": "/no/such/file"}, "executable"),
    ({"script": None, "executable": "make", "transfer_executable": False}, "executable"),
    ({"arguments": "a b"}, "arguments"),
    ({"arguments": ["a\nb"]}, "arguments"),
    ({"arguments": [1]}, "arguments"),
    ({"arguments": ["$$(Memory)"]}, "arguments"),
    ({"arguments": ["a$(DOLLAR)"]}, "arguments"),
    ({"arguments": ["$$ENV(x)"]}, "arguments"),
    ({"env": {"1X": "a"}}, "env"),
    ({"env": {"A-B": "a"}}, "env"),
    ({"env": {"A": 1}}, "env"),
    ({"env": {"A": "x\ny"}}, "env"),
    ({"env": ["A=1"]}, "env"),
    ({"inputs": "src.tar.gz"}, "inputs"),
    ({"inputs": ["/no/such/input"]}, "inputs"),
    ({"outputs": "x"}, "outputs"),
    ({"outputs": ["/etc/passwd"]}, "outputs"),
    ({"outputs": ["../up"]}, "outputs"),
    ({"outputs": ["a/../../up"]}, "outputs"),
    ({"outputs": ["."]}, "outputs"),
    ({"outputs": ["a,b"]}, "outputs"),
    ({"outputs": [" a"]}, "outputs"),
    ({"outputs": [""]}, "outputs"),
    ({"outputs": [STDOUT_NAME]}, "outputs"),
    ({"outputs": ["x", "./x"]}, "outputs"),
    ({"cpus": 0}, "cpus"),
    ({"cpus": True}, "cpus"),
    ({"cpus": 1.5}, "cpus"),
    ({"memory": 2048}, "memory"),
    ({"memory": "2048"}, "memory"),
    ({"memory": "1MB"}, "memory"),
    ({"memory": "lots"}, "memory"),
    ({"memory": "-2GB"}, "memory"),
    ({"disk": "1KB"}, "disk"),
    ({"disk": "30"}, "disk"),
    ({"keep_snapshot": "sometimes"}, "keep_snapshot"),
    ({"keep_snapshot": 1}, "keep_snapshot"),
    ({"hostname": "under_score"}, "hostname"),
    ({"hostname": "-dash.example.org"}, "hostname"),
    ({"root": "yes"}, "root"),
    ({"root": 1}, "root"),
]


@pytest.mark.parametrize(("kw", "field"), BAD_JOBS)
def test_a_bad_value_is_refused_naming_the_parameter(kw: dict[str, Any], field: str) -> None:
    with pytest.raises(RequestError) as info:
        script_job(**kw)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert info.value.disposition is Disposition.HOLD
    assert isinstance(info.value, ValueError)


def test_inputs_may_not_collide_in_the_guests_working_directory(files: Path) -> None:
    other = files / "other"
    other.mkdir()
    (other / "src.tar.gz").write_bytes(b"y")
    (other / SCRIPT_NAME).write_text("")
    cases = [
        [files / "src.tar.gz", other / "src.tar.gz"],  # same name twice
        [str(other) + "/"],  # its contents include the script's name
        [files / "a,b"],
    ]
    (files / "a,b").write_text("")
    for inputs in cases:
        with pytest.raises(RequestError) as info:
            script_job(inputs=inputs)
        assert info.value.field == "inputs"
    with pytest.raises(RequestError, match="replace the executable"):
        VmJob("debian-12", executable=files / "build.sh", inputs=[other / ".." / "build.sh"])


# --- the submit description -------------------------------------------------------------------


def test_the_description_sets_the_attributes_the_hooks_read(tmp_path: Path, files: Path) -> None:
    job = script_job(
        image="https://images.example.org/vm/x.qcow2",
        image_sha256="ab" * 32,
        root=True,
        inputs=[files / "src.tar.gz", files / "tree"],
        outputs=["report.txt", "out/deep.txt"],
        cpus=2,
        memory="1GiB",
        disk="10GiB",
        keep_snapshot="always",
        hostname="build-1.example.org",
    )
    d = tmp_path / "job"
    sub = job.submit_description(d)
    attrs = attributes(sub)
    assert attrs == {
        "GliteVmImage": "https://images.example.org/vm/x.qcow2",
        "GliteVmImageSha256": "ab" * 32,
        "GliteVmRoot": True,
        "GliteVmKeepSnapshot": "always",
        "GliteVmHostname": "build-1.example.org",
        "WantIOProxy": True,
    }
    assert attrs["GliteVmRoot"] is True  # a ClassAd boolean, which START and the hooks need
    assert sub["request_cpus"] == "2"
    assert sub["request_memory"] == "1024"  # MiB
    assert sub["request_disk"] == str(10 * GIB // KIB)  # KiB
    assert sub["initialdir"] == str(d)
    assert sub["executable"] == str(d / SCRIPT_NAME)
    assert sub["transfer_executable"] == "true"
    assert sub["should_transfer_files"] == "YES"
    assert sub["transfer_input_files"] == f"{files / 'src.tar.gz'}, {files / 'tree'}"
    assert sub["transfer_output_files"] == "report.txt, out/deep.txt"
    assert sub["preserve_relative_paths"] == "true"
    for key, name in (("output", STDOUT_NAME), ("error", STDERR_NAME), ("log", LOG_NAME)):
        assert sub[key] == str(d / name)
    script = d / SCRIPT_NAME
    assert script.read_text() == "#!/bin/sh\necho hi\n"
    assert script.stat().st_mode & 0o111


def test_a_root_false_job_says_so_and_a_plain_job_sets_nothing_extra(tmp_path: Path) -> None:
    sub = script_job(script="#!/bin/bash\necho $BASH_VERSION\n").submit_description(tmp_path)
    attrs = attributes(sub)
    assert attrs["GliteVmRoot"] is False
    assert "GliteVmImageSha256" not in attrs
    assert "GliteVmHostname" not in attrs
    for key in ("arguments", "environment", "transfer_input_files", "transfer_output_files"):
        assert key not in sub
    assert (tmp_path / SCRIPT_NAME).read_text() == "#!/bin/bash\necho $BASH_VERSION\n"


def test_a_program_inside_the_guest_is_not_transferred(tmp_path: Path) -> None:
    job = VmJob("debian-12", executable="/usr/bin/make", transfer_executable=False)
    sub = job.submit_description(tmp_path)
    assert sub["executable"] == "/usr/bin/make"
    assert sub["transfer_executable"] == "false"
    assert not (tmp_path / SCRIPT_NAME).exists()


def test_arguments_and_environment_survive_the_submit_language(tmp_path: Path) -> None:
    sub = script_job(arguments=NASTY_ARGS, env=NASTY_ENV).submit_description(tmp_path / "a$(b)")
    assert v2_words(sub.expand("arguments")) == NASTY_ARGS
    pairs = [w.partition("=") for w in v2_words(sub.expand("environment"))]
    assert {name: value for name, _, value in pairs} == NASTY_ENV
    assert sub.expand("initialdir") == str(tmp_path / "a$(b)")


@pytest.mark.condor
def test_condor_submit_gives_the_launcher_exactly_the_jobs_command(
    tmp_path: Path, files: Path, condor_submit: Path
) -> None:
    job = script_job(
        image="https://images.example.org/vm/a$(b).qcow2",
        arguments=NASTY_ARGS,
        env=NASTY_ENV,
        inputs=[files / "src.tar.gz"],
        outputs=["out/x"],
        memory="512MiB",
        disk="1GiB",
        root=True,
    )
    d = tmp_path / "job $(x) dir"
    sub_file = tmp_path / "job.sub"
    sub_file.write_text(str(job.submit_description(d)))
    (ad,) = dry_run(condor_submit, sub_file, tmp_path)
    # what the launcher reads from $_CONDOR_JOB_AD
    assert parse_arguments(ad) == NASTY_ARGS
    assert parse_environment(ad) == NASTY_ENV
    assert ad["Cmd"] == str(d / SCRIPT_NAME)
    assert ad["Iwd"] == str(d)
    assert ad["TransferInput"] == str(files / "src.tar.gz")
    assert ad["TransferOutput"] == "out/x"
    assert ad["PreserveRelativePaths"] is True
    # what PREPARE_JOB reads
    ad["Owner"] = "alice"
    slot = SlotFacts(root_enabled=True, cpus=1, memory_mib=512, disk_kib=GIB // KIB)
    settings = Settings(custom_image_sources=("https://images.example.org/vm/",))
    request = sized(ad, slot, settings)
    assert request.image == "https://images.example.org/vm/a$(b).qcow2"
    assert request.root is True
    assert (request.memory_mib, request.disk_bytes) == (512, GIB)


def test_image_slugs_are_safe_and_distinct() -> None:
    assert image_slug("debian-12") == "debian-12"
    urls = [
        "https://a.example/x/img.qcow2",
        "https://b.example/x/img.qcow2",
        "/srv/images/img.qcow2",
        "file:///srv/../etc/img.qcow2",
    ]
    slugs = [image_slug(u) for u in urls]
    assert len(set(slugs)) == len(urls)
    for slug in slugs:
        assert "/" not in slug
        assert not slug.startswith(".")
        assert slug.startswith("img.qcow2-")


# --- submit, wait, result over a schedd ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Submitted:
    """What ``Schedd.submit`` returns (``htcondor2.SubmitResult``'s calls the API makes)."""

    cluster_id: int

    def cluster(self) -> int:
        return self.cluster_id

    def first_proc(self) -> int:
        return 0


class FakeSchedd:
    """An in-memory schedd: jobs move through states the test scripts, one step per query."""

    def __init__(self) -> None:
        self.next_cluster = 100
        self.queue: dict[tuple[int, int], classad2.ClassAd] = {}
        self.history_ads: list[classad2.ClassAd] = []
        self.scripts: dict[int, list[dict[str, Any] | None]] = {}
        self.submitted: list[Any] = []
        self.fail_submit_after: int | None = None

    def submit(self, description: Any, count: int = 0) -> Any:
        if self.fail_submit_after is not None and len(self.submitted) >= self.fail_submit_after:
            raise RuntimeError("Failed to connect to schedd")
        warnings.warn("the submit file has an unused line", UserWarning, stacklevel=2)
        self.submitted.append(description)
        cluster = self.next_cluster
        self.next_cluster += 1
        self.queue[(cluster, 0)] = classad2.ClassAd(
            {"ClusterId": cluster, "ProcId": 0, "JobStatus": 1}
        )
        return Submitted(cluster)

    def step(self) -> None:
        """Apply each job's next scripted change: attributes, or ``None`` to leave the queue."""
        for cluster, script in self.scripts.items():
            if not script or (cluster, 0) not in self.queue:
                continue
            change = script.pop(0)
            ad = self.queue[(cluster, 0)]
            if change is None:
                self.history_ads.append(self.queue.pop((cluster, 0)))
            else:
                ad.update(change)

    def _matching(self, ads: list[classad2.ClassAd], constraint: str) -> list[classad2.ClassAd]:
        expr = classad2.ExprTree(constraint)
        return [ad for ad in ads if expr.eval(ad) is True]

    def query(self, constraint: str = "True", projection: list[str] | None = None) -> list[Any]:
        self.step()
        return self._matching(list(self.queue.values()), constraint)

    def history(self, constraint: str, projection: list[str], match: int = -1) -> list[Any]:
        return self._matching(self.history_ads, constraint)[: match if match > 0 else None]


COMPLETED = {
    "JobStatus": 4,
    "ExitCode": 3,
    "ExitBySignal": False,
    "GliteVmDomain": "glite-vm-alice-100.0-abc",
    "GliteVmHypervisor": "qemu",
    "GliteVmImageDigest": "f" * 64,
    "GliteVmCacheHit": True,
    "GliteVmSnapshotPath": "/var/lib/glite-vm/snapshots/d/snapshot.qcow2",
    "GliteVmBootLogPath": "/var/lib/glite-vm/snapshots/d/boot.log",
    "GliteVmRecordPath": "/var/lib/glite-vm/snapshots/d/record.json",
    "GliteVmTimeFetch": 0.01,
    "GliteVmTimeBoot": 0.5,
    "GliteVmTimeReady": 3,
    "GliteVmTimeTransferIn": 0.2,
    "GliteVmTimeTeardown": 0.25,
}
HELD = {
    "JobStatus": 5,
    "HoldReasonCode": 19,
    "HoldReasonSubCode": 11,
    "HoldReason": "Error from slot1@host: PREPARE_JOB (prepare_job) failed (reported status 011):"
    " unknown image 'nope'; known: debian-12",
}


@pytest.fixture
def schedd() -> FakeSchedd:
    return FakeSchedd()


@pytest.fixture
def two_handles(schedd: FakeSchedd, tmp_path: Path) -> Iterator[list[JobHandle]]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape to the caller
        handles = submit(
            [script_job(outputs=["report.txt"]), script_job(image="nope")],
            schedd,
            directory=tmp_path / "runs",
        )
    yield handles


def test_submit_queues_one_cluster_per_job_in_its_own_directory(
    schedd: FakeSchedd,
    two_handles: list[JobHandle],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    assert capfd.readouterr() == ("", "")  # HTCondor's warnings went into the handles
    a, b = two_handles
    assert (a.job_id, b.job_id) == ("100.0", "101.0")
    assert (a.image, b.image) == ("debian-12", "nope")
    assert a.directory.parent == b.directory.parent == tmp_path / "runs"
    assert a.directory.name.startswith("debian-12-")
    assert a.directory != b.directory
    assert (a.directory / SCRIPT_NAME).is_file()
    assert a.submit_warnings == ("the submit file has an unused line",)
    assert [s["initialdir"] for s in schedd.submitted] == [str(a.directory), str(b.directory)]
    assert len({a, b, dataclasses.replace(a, submit_warnings=())}) == 2  # hashable by job id


def test_a_failing_schedd_reports_what_was_queued(schedd: FakeSchedd, tmp_path: Path) -> None:
    schedd.fail_submit_after = 1
    with pytest.raises(SchedulerError) as info:
        submit([script_job(), script_job()], schedd, directory=tmp_path)
    assert "Failed to connect to schedd" in str(info.value)
    assert [h.job_id for h in info.value.submitted] == ["100.0"]
    assert info.value.disposition is Disposition.REQUEUE


def test_wait_returns_when_every_job_completed_or_is_held(
    schedd: FakeSchedd, two_handles: list[JobHandle]
) -> None:
    a, b = two_handles
    (a.directory / "report.txt").write_text("done")  # as HTCondor's output transfer leaves it
    schedd.scripts = {
        100: [{"JobStatus": 2}, {"JobStatus": 2}, COMPLETED, None],
        101: [HELD],
    }
    seen: list[WaitProgress] = []
    results = wait(two_handles, timeout=30, progress=seen.append, poll_interval=0)
    done, held = results
    assert done.state is JobState.COMPLETED
    assert done.exit_code == 3
    assert not done.succeeded
    assert done.exit_signal is None
    assert done.stdout_path == a.directory / STDOUT_NAME
    assert done.stderr_path == a.directory / STDERR_NAME
    assert done.outputs == [a.directory / "report.txt"]
    assert done.missing_outputs == []
    assert done.snapshot_path == Path(str(COMPLETED["GliteVmSnapshotPath"]))
    assert done.boot_log_path == Path(str(COMPLETED["GliteVmBootLogPath"]))
    assert done.cache_hit is True
    assert done.timings == {
        "fetch": 0.01,
        "boot": 0.5,
        "ready": 3.0,
        "transfer_in": 0.2,
        "teardown": 0.25,
    }
    assert done.hold_reason is None
    assert held.state is JobState.HELD
    assert held.finished
    assert held.hold_reason_code == 19
    assert held.hold_reason_subcode == 11
    assert held.hold_reason is not None
    assert "unknown image 'nope'" in held.hold_reason
    assert held.exit_code is None
    # progress: only when something changed, ending with everything finished
    assert seen[0].states == {a: JobState.RUNNING, b: JobState.HELD}
    assert seen[-1].finished == seen[-1].total == 2
    assert len(seen) == len({tuple(p.states.values()) for p in seen})


def test_wait_gives_up_after_its_timeout_and_names_the_pending_jobs(
    schedd: FakeSchedd, two_handles: list[JobHandle]
) -> None:
    schedd.scripts = {101: [HELD]}  # 100 stays idle
    with pytest.raises(WaitTimeoutError) as info:
        wait(two_handles, timeout=0.2, poll_interval=0.05)
    assert info.value.pending == [two_handles[0]]
    assert "100.0" in str(info.value)
    assert isinstance(info.value, TimeoutError)


def test_result_reads_the_queue_then_the_history(
    schedd: FakeSchedd, two_handles: list[JobHandle]
) -> None:
    a, _b = two_handles
    running = result(a)
    assert running.state is JobState.IDLE
    assert not running.finished
    assert running.exit_code is None
    assert running.missing_outputs == ["report.txt"]
    schedd.scripts = {100: [None]}
    schedd.step()
    gone = result(a)
    assert gone.state is JobState.IDLE  # the ad as it left the queue
    schedd.history_ads.clear()
    with pytest.raises(JobNotFoundError):
        result(a)


def test_a_signal_and_a_launcher_failure_are_reported(tmp_path: Path) -> None:
    handle = JobHandle(1, 0, "debian-12", tmp_path, script_job())
    by_signal = result_from_ad(
        handle,
        classad2.ClassAd(
            {
                "JobStatus": 4,
                "ExitBySignal": True,
                "ExitSignal": 9,
                "GliteVmTimePayload": 1.5,
                "GliteVmBootAttempts": 2,
            }
        ),
    )
    assert by_signal.exit_code is None
    assert by_signal.exit_signal == 9
    assert by_signal.timings == {"payload": 1.5}
    assert by_signal.boot_attempts == 2  # its VM was booted again on the host
    launcher = result_from_ad(
        handle,
        {"JobStatus": 4, "ExitCode": 125, "GliteVmLauncherError": "the guest agent stopped"},
    )
    assert launcher.exit_code == 125
    assert launcher.launcher_error == "the guest agent stopped"
    assert launcher.boot_attempts is None  # the ad does not say
    assert launcher.outputs == []  # nothing but the API's own files in the directory
    common: Result = launcher  # what reporting code may rely on for pooled and local results
    assert not common.succeeded


def test_a_pooled_matrix_submits_one_job_per_image_into_its_own_directory(
    schedd: FakeSchedd, tmp_path: Path
) -> None:
    images = ["debian-12", "alma-9", "https://images.example.org/vm/x.qcow2"]
    handles = matrix(images, script_job(outputs=["a.txt"]), schedd=schedd, directory=tmp_path)
    assert list(handles) == images
    for image, handle in handles.items():
        assert handle.image == image
        assert handle.directory == tmp_path / image_slug(image)
        assert handle.job.outputs == ("a.txt",)
    assert [attributes(s)["GliteVmImage"] for s in schedd.submitted] == images
    with pytest.raises(RequestError, match="exists already") as info:
        matrix(["debian-12"], script_job(), schedd=schedd, directory=tmp_path)
    assert info.value.field == "directory"


@pytest.mark.parametrize(
    ("images", "problem"),
    [([], "is empty"), (["a", "b", "a"], "more than once"), ("debian-12", "not one string")],
)
def test_a_bad_matrix_is_refused_before_anything_runs(
    images: Any, problem: str, schedd: FakeSchedd, tmp_path: Path
) -> None:
    with pytest.raises(RequestError, match=problem):
        matrix(images, script_job(), schedd=schedd, directory=tmp_path)
    with pytest.raises(RequestError) as info:
        matrix(["debian-12", "bad image"], script_job(), schedd=schedd, directory=tmp_path)
    assert info.value.field == "image"
    assert schedd.submitted == []


def test_run_local_refuses_what_it_cannot_do_before_touching_libvirt(tmp_path: Path) -> None:
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "old-output.txt").write_text("")
    with pytest.raises(RequestError) as info:
        run_local(script_job(), Settings(state_dir=tmp_path), directory=tmp_path / "used")
    assert info.value.field == "directory"
    for limit in (0, -1, float("nan")):
        with pytest.raises(RequestError) as info:
            run_local(script_job(), Settings(state_dir=tmp_path), timeout=limit)
        assert info.value.field == "timeout"


def test_sizes_and_networks_of_a_job_follow_the_unit_and_name_contracts() -> None:
    for bare in ("2048", "30"):
        with pytest.raises(RequestError, match="has no unit") as info:
            script_job(memory=bare)
        assert info.value.field == "memory"
    with pytest.raises(RequestError) as info:
        script_job(network="two words")
    assert info.value.field == "network"
    items = script_job(network="user").submit_items("/tmp/job")
    assert items["MY.GliteVmNetwork"] == '"user"'
    assert "MY.GliteVmNetwork" not in script_job().submit_items("/tmp/job")


# --- the documentation ---------------------------------------------------------------------------


def test_the_examples_in_docs_api_md_parse_and_import_what_exists() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) >= 3
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom) and node.module:
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module}.{alias.name}"


def test_docs_api_md_describes_every_parameter_of_vmjob() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    table = text.split("| parameter | meaning |", 1)[1].split("\n\n", 1)[0]
    described = {
        name
        for row in table.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(\w+)`", row.split("|")[1])
    }
    assert described == set(inspect.signature(VmJob).parameters)
