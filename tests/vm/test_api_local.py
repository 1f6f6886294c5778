"""``glite_vm.api.local.run_local`` and the local ``matrix`` on real libvirt + QEMU with the test
guests.

What a developer reproducing a failing platform sees: the exit code, stdout and stderr in
files, the outputs by the same rule as on a pool, and a snapshot and a boot log that exist.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.api.jobdir import SCRIPT_NAME, STDERR_NAME, STDOUT_NAME, image_slug
from glite_vm.api.local import run_local
from glite_vm.api.matrix import matrix
from glite_vm.api.results import LocalResult, Result
from glite_vm.api.vmjob import VmJob
from glite_vm.config import Settings
from glite_vm.errors import PayloadTimeoutError, RequestError, UnknownImageError
from tests.conftest import world_traversable_tmpdir
from tests.support import glite_vm_domains, guest_catalogue, sha256_of

pytestmark = pytest.mark.vm

GUEST_USER_UID = 1000  # the test guests' unprivileged account (tests/guest/build.sh)

PAYLOAD = """\
echo "uid=$(id -u)"
echo "args=[$1][$2]"
echo "greeting=$GREETING"
tr a-z A-Z < in.txt > result.txt
mkdir -p made/deeper && echo deep > made/deeper/file.txt
echo "not asked for" > extra.txt
cat tree/leaf.txt
echo "to stderr" >&2
exit "${EXIT_WITH:-0}"
"""


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    d = tmp_path / "inputs"
    (d / "tree").mkdir(parents=True)
    (d / "in.txt").write_text("input text\n")
    (d / "tree" / "leaf.txt").write_text("leaf\n")
    return d


def small(**kw: Any) -> VmJob:
    """A job sized for the test machine (the site default of 2 GB / 30 GB is too big here)."""
    args: dict[str, Any] = {"memory": "512MiB", "disk": "2GiB"}
    args.update(kw)
    return VmJob(**args)


def test_run_local_gives_exit_code_streams_outputs_snapshot_and_boot_log(
    vm_settings: Settings,
    guest_dir: Path,
    inputs: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    job = small(
        image=str(guest_dir / "disk-boot.qcow2"),
        script=PAYLOAD,
        arguments=["two words", "$HOME"],
        env={"GREETING": "hello there", "EXIT_WITH": "3"},
        inputs=[inputs / "in.txt", inputs / "tree"],
        outputs=["result.txt", "made/deeper/file.txt"],
    )
    directory = tmp_path / "run"
    result = run_local(job, vm_settings, directory=directory)

    assert capfd.readouterr() == ("", "")  # the job's streams went to files, nothing printed
    assert result.exit_code == 3
    assert not result.succeeded
    assert result.signal is None
    assert result.directory == directory
    out = result.stdout_path.read_text()
    assert result.stdout_path == directory / STDOUT_NAME
    assert f"uid={GUEST_USER_UID}\n" in out  # the guest's ordinary user: root was not asked for
    assert "args=[two words][$HOME]\n" in out
    assert "greeting=hello there\n" in out
    assert "leaf\n" in out  # a directory input arrives as a directory
    assert result.stderr_path.read_text() == "to stderr\n"
    # declared outputs, with their relative paths; nothing else
    assert result.outputs == [directory / "result.txt", directory / "made/deeper/file.txt"]
    assert (directory / "result.txt").read_text() == "INPUT TEXT\n"
    assert (directory / "made" / "deeper" / "file.txt").read_text() == "deep\n"
    assert result.missing_outputs == []
    assert not (directory / "extra.txt").exists()
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [SCRIPT_NAME, STDOUT_NAME, STDERR_NAME, "result.txt", "made"]
    )  # the staging directories are gone
    # the post-mortem material
    assert result.snapshot_path is not None  # exit 3 and keep_snapshot = on_failure
    assert result.snapshot_path.is_file()
    assert "Linux version" in result.boot_log_path.read_text(errors="replace")
    record = json.loads(result.record_path.read_text())
    assert record["exit_code"] == 3
    assert result.hypervisor in ("kvm", "qemu")
    assert result.image_digest == sha256_of(guest_dir / "disk-boot.qcow2")
    for phase in ("boot", "ready", "payload", "teardown"):
        assert result.timings[phase] >= 0
    assert result.domain not in glite_vm_domains()


def test_run_local_as_root_brings_back_new_top_level_files_and_keeps_no_snapshot(
    vm_settings: Settings, guest_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    job = small(
        image=str(guest_dir / "disk-boot.qcow2"),
        script=PAYLOAD,
        inputs=[str(inputs) + "/"],  # the directory's contents
        root=True,
        keep_snapshot="never",
    )
    result = run_local(job, vm_settings, directory=tmp_path / "root")
    assert result.exit_code == 0, result.stderr_path.read_text()
    assert result.succeeded
    assert "uid=0\n" in result.stdout_path.read_text()
    # HTCondor's rule without transfer_output_files: new and changed top-level files only
    names = sorted(p.name for p in result.outputs)
    assert names == ["extra.txt", "result.txt"]
    assert not (result.directory / "made").exists()
    assert not (result.directory / "in.txt").exists()  # unchanged inputs do not come back
    assert result.snapshot_path is None


def test_a_declared_output_the_job_did_not_make_is_reported_and_the_vm_has_its_hostname(
    vm_settings: Settings, guest_dir: Path, tmp_path: Path
) -> None:
    job = small(
        image=str(guest_dir / "disk-boot.qcow2"),
        executable="/bin/sh",
        transfer_executable=False,
        arguments=["-c", "hostname > there.txt"],
        outputs=["there.txt", "missing.txt"],
        keep_snapshot="never",
        hostname="build01.example.org",  # one's own VM: named whatever the site's policy
    )
    result: Result = run_local(job, vm_settings, directory=tmp_path / "missing")
    assert result.exit_code == 0, result.stderr_path.read_text()
    assert result.outputs == [tmp_path / "missing" / "there.txt"]
    assert result.missing_outputs == ["missing.txt"]
    assert result.outputs[0].read_text().strip() in ("build01", "build01.example.org")


# --- the matrix over both test guests, from a catalogue ----------------------------------------


@pytest.fixture(scope="module")
def catalogue(guest_dir: Path) -> Iterator[Path]:
    """A file:// repository with both test guests; the direct one boots a kernel and initrd."""
    repo = world_traversable_tmpdir("glite-vm-api-repo-")
    repo.chmod(0o755)
    yield guest_catalogue(guest_dir, repo, direct={"test-direct": ""}, disk="test-disk")
    shutil.rmtree(repo, ignore_errors=True)


def test_a_local_matrix_runs_each_image_and_keeps_results_apart(
    vm_settings: Settings, catalogue: Path, guest_dir: Path, tmp_path: Path
) -> None:
    settings = dataclasses.replace(
        vm_settings, catalogue=catalogue.as_uri(), cache_min_free_bytes=0
    )
    job = small(
        image="test-disk",  # replaced by each image of the matrix
        script='cat /proc/cmdline > report.txt\necho "on $(uname -r)"\n',
        outputs=["report.txt"],
        keep_snapshot="always",
    )
    images = ["test-direct", "test-disk", "no-such-image"]
    outcomes = matrix(images, job, local=True, settings=settings, directory=tmp_path / "m")

    assert list(outcomes) == images
    missing = outcomes["no-such-image"]
    assert isinstance(missing, UnknownImageError)  # one bad platform does not stop the others
    assert "test-direct" in str(missing)
    reports: dict[str, str] = {}
    results: dict[str, LocalResult] = {}
    for image in ("test-direct", "test-disk"):
        result = outcomes[image]
        assert isinstance(result, LocalResult), result
        results[image] = result
        assert result.exit_code == 0, result.stderr_path.read_text()
        assert result.image == image
        assert result.directory == tmp_path / "m" / image_slug(image)
        assert result.outputs == [result.directory / "report.txt"]
        reports[image] = (result.directory / "report.txt").read_text()
        assert result.stdout_path.read_text().startswith("on ")
        assert result.snapshot_path is not None  # keep_snapshot = always
        assert result.snapshot_path.is_file()
        assert result.boot_log_path.stat().st_size > 0
    assert "root=LABEL=glite-root" in reports["test-disk"]
    assert "root=" not in reports["test-direct"]  # each image's own kernel command line
    assert results["test-direct"].image_digest == sha256_of(guest_dir / "direct-disk.qcow2")
    assert not (tmp_path / "m" / "no-such-image" / "report.txt").exists()


def test_run_local_names_its_parameters_and_stops_a_payload_at_its_timeout(
    vm_settings: Settings, guest_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = str(guest_dir / "disk-boot.qcow2")
    too_big = small(image=image, script="true", memory="1TiB")
    with pytest.raises(RequestError) as info:
        run_local(too_big, vm_settings, directory=tmp_path / "big")
    assert info.value.field == "memory" and "RequestMemory" not in str(info.value)
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where its own directory would go
    with pytest.raises(RequestError) as info:
        run_local(small(image=image, script="true", network="user"), vm_settings)
    assert info.value.field == "network" and "'none'" in str(info.value)
    assert list(temp.iterdir()) == []  # a refused run leaves no directory nobody can name

    slow = small(image=image, script="echo started; sleep 120", keep_snapshot="on_failure")
    with pytest.raises(PayloadTimeoutError) as stopped:
        run_local(slow, vm_settings, directory=tmp_path / "slow", timeout=3)
    assert stopped.value.limit == 3 and stopped.value.is_user_error  # the job's own limit
    assert (tmp_path / "slow" / STDOUT_NAME).read_text() == "started\n"
