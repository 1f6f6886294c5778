"""The Python API and the submit templates against a real personal pool with glite-vm's hooks,
the real bootstrapper service and real VMs.

The API runs where build frameworks run it: in the process of an ordinary user (the pool's
``glitevm-test``), here this very file run as a script by that user (see :func:`driver`). It
submits a matrix over the two test guests plus a job for an image that does not exist, waits,
and reports every result as JSON. The test then checks what a user would look at (exit codes,
streams, outputs kept apart per image, snapshot and boot-log paths that exist, the hold reason)
and that :func:`glite_vm.api.local.run_local` of the same job gives the same exit code, stdout and
outputs. The templates from ``submit_templates/`` are submitted with ``condor_submit`` after
changing only the values their comments mark ``CHANGE`` (image, sizes, URL and digest; the
example build and test scripts are replaced by stand-ins that the busybox test guests can run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.api.jobdir import image_slug
from glite_vm.api.local import run_local
from glite_vm.api.matrix import matrix
from glite_vm.api.pool import WaitProgress, submit, wait
from glite_vm.api.results import LocalResult, PoolResult
from glite_vm.api.vmjob import VmJob
from glite_vm.config import Settings
from glite_vm.slots import SlotLayout
from glite_vm.units import GIB
from tests.condor.pool import JobAd, PersonalPool, glite_vm_pool
from tests.service.svc_support import ServiceProcess, running_service, wait_for
from tests.support import guest_catalogue, scratch_root, traversable

pytestmark = [pytest.mark.condor, pytest.mark.vm]

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "submit_templates"
#: 4 user slots and the last one root-enabled; VMs of 512 MiB and 2 GiB of disk.
LAYOUT = SlotLayout(slots=5, root_slots=1, cpus=1, memory_mib=512, disk_bytes=2 * GIB)
IMAGES = ["test-direct", "test-disk"]
GUEST_USER_UID = 1000  # the test guests' unprivileged account (tests/guest/build.sh)
WAIT_TIMEOUT = 900.0  # every job of this module shares 5 slots of a loaded 2-core machine
JOB_TIMEOUT = 900.0

PAYLOAD = """\
echo "uid=$(id -u)"
echo "args=[$1][$2]"
echo "greeting=$GREETING"
tr a-z A-Z < in.txt > result.txt
mkdir -p made/deeper && echo deep > made/deeper/file.txt
echo "not asked for" > extra.txt
echo "to stderr" >&2
exit 3
"""


def api_job(inputs: Path) -> VmJob:
    """The job the API submits on the pool and runs locally (same values both ways)."""
    return VmJob(
        image="test-disk",
        script=PAYLOAD,
        arguments=["two words", "$HOME"],
        env={"GREETING": "hello there"},
        inputs=[inputs / "in.txt"],
        outputs=["result.txt", "made/deeper/file.txt"],
        memory="512MiB",
        disk="1GiB",
    )


# --- the driver: the API in an ordinary user's process ----------------------------------------


def _as_json(result: PoolResult) -> dict[str, Any]:
    return {
        "job_id": result.handle.job_id,
        "image": result.image,
        "directory": str(result.directory),
        "state": result.state.name,
        "exit_code": result.exit_code,
        "exit_signal": result.exit_signal,
        "stdout_path": str(result.stdout_path),
        "stderr_path": str(result.stderr_path),
        "outputs": [str(p) for p in result.outputs],
        "missing_outputs": result.missing_outputs,
        "snapshot_path": str(result.snapshot_path) if result.snapshot_path else None,
        "boot_log_path": str(result.boot_log_path) if result.boot_log_path else None,
        "domain": result.domain,
        "hypervisor": result.hypervisor,
        "timings": result.timings,
        "hold_reason": result.hold_reason,
        "hold_reason_code": result.hold_reason_code,
        "hold_reason_subcode": result.hold_reason_subcode,
        "launcher_error": result.launcher_error,
        "submit_warnings": list(result.handle.submit_warnings),
    }


def driver(request: dict[str, Any]) -> dict[str, Any]:
    """Submit the matrix and an unknown image, wait, report (run as the pool's user)."""
    job = api_job(Path(request["inputs"]))
    base = Path(request["directory"])
    handles = matrix(IMAGES, job, directory=base / "matrix")
    (held,) = submit(job.with_image("no-such-image"), directory=base / "held")
    seen: list[WaitProgress] = []
    results = wait([*handles.values(), held], timeout=request["timeout"], progress=seen.append)
    return {
        "uid": os.getuid(),
        "matrix": {image: _as_json(r) for image, r in zip(IMAGES, results, strict=False)},
        "held": _as_json(results[-1]),
        "progress": [{"finished": p.finished, "total": p.total} for p in seen],
    }


# --- the pool, the service, the catalogue ------------------------------------------------------


@pytest.fixture(scope="module")
def root_dir() -> Iterator[Path]:
    """QEMU's user, the condor user and the test user must traverse it; nobody lists it.
    GLITE_VM_KEEP_API_POOL keeps it for a post-mortem: jobs, logs, snapshots."""
    with scratch_root("glite-vm-api-pool-", "GLITE_VM_KEEP_API_POOL") as path:
        yield path


@pytest.fixture(scope="module")
def repo(root_dir: Path, guest_dir: Path) -> Path:
    """A file:// repository with both test guests; the direct one boots a kernel and initrd."""
    path = root_dir / "repo"
    guest_catalogue(guest_dir, path, direct={"test-direct": ""}, disk="test-disk")
    return path


@pytest.fixture(scope="module")
def service(root_dir: Path, repo: Path) -> Iterator[ServiceProcess]:
    extra = {
        "GLITE_VM_CUSTOM_IMAGE_SOURCES": repo.as_uri() + "/",
        "GLITE_VM_BOOT_TIMEOUT": "180",
        **LAYOUT.knobs(),  # the service knows the pool's slots as glite-vm config wrote them
    }
    with running_service(root_dir, repo / "catalogue.json", extra) as svc:
        yield svc


@pytest.fixture(scope="module")
def pool(
    root_dir: Path, service: ServiceProcess, test_user: pwd.struct_passwd
) -> Iterator[PersonalPool]:
    with glite_vm_pool(
        root_dir, service, test_user, layout=LAYOUT, advertise_period=30, reap_period=30
    ) as the_pool:
        yield the_pool


def _give(pool: PersonalPool, *paths: Path) -> None:
    for path in paths:
        os.chown(path, pool.user.pw_uid, pool.user.pw_gid)


@pytest.fixture(scope="module")
def inputs(pool: PersonalPool) -> Path:
    directory = pool.job_dir("api-inputs")
    (directory / "in.txt").write_text("input text\n")
    _give(pool, directory / "in.txt")
    return directory


@dataclasses.dataclass
class Driver:
    proc: subprocess.Popen[str]
    directory: Path

    def answer(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=WAIT_TIMEOUT + 120)
        assert self.proc.returncode == 0, err[-4000:]
        answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        return answer


@pytest.fixture(scope="module")
def api_run(pool: PersonalPool, inputs: Path) -> Iterator[Driver]:
    """The driver, started at once as the pool's user; it runs while the templates run."""
    directory = pool.job_dir("api")
    request = {"inputs": str(inputs), "directory": str(directory), "timeout": WAIT_TIMEOUT}
    env = {
        "CONDOR_CONFIG": pool.env["CONDOR_CONFIG"],
        "PATH": pool.env["PATH"],
        "PYTHONPATH": str(REPO),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LC_ALL": "C.UTF-8",
    }
    command = [
        "runuser",
        "-u",
        pool.user.pw_name,
        "--",
        "env",
        *(f"{k}={v}" for k, v in env.items()),
    ]
    proc = subprocess.Popen(
        [*command, sys.executable, str(Path(__file__)), json.dumps(request)],
        cwd=directory,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    driver = Driver(proc, directory)
    yield driver
    if proc.poll() is None:
        proc.kill()
        proc.communicate(timeout=30)


@pytest.fixture(scope="module")
def answer(api_run: Driver, template_jobs: TemplateJobs) -> dict[str, Any]:
    """The driver's report; the templates' jobs are queued first, so that all run together."""
    return api_run.answer()


# --- the API ----------------------------------------------------------------------------------


def test_the_api_round_trip_gives_results_per_image(
    answer: dict[str, Any], api_run: Driver, service: ServiceProcess, pool: PersonalPool
) -> None:
    assert answer["uid"] == pool.user.pw_uid  # the API ran as the ordinary user
    state_dir = Path(service.env["GLITE_VM_STATE_DIR"])
    directories = set()
    for image in IMAGES:
        r = answer["matrix"][image]
        directory = Path(r["directory"])
        directories.add(directory)
        assert r["image"] == image
        assert directory == api_run.directory / "matrix" / image_slug(image)
        assert r["state"] == "COMPLETED", r
        out = Path(r["stdout_path"]).read_text()
        assert r["exit_code"] == 3, (out, Path(r["stderr_path"]).read_text(), r)
        assert r["launcher_error"] is None
        assert f"uid={GUEST_USER_UID}\n" in out
        assert "args=[two words][$HOME]\n" in out
        assert "greeting=hello there\n" in out
        assert Path(r["stderr_path"]).read_text().startswith("to stderr\n")
        assert r["outputs"] == [
            str(directory / "result.txt"),
            str(directory / "made" / "deeper" / "file.txt"),
        ]
        assert (directory / "result.txt").read_text() == "INPUT TEXT\n"
        assert (directory / "made" / "deeper" / "file.txt").read_text() == "deep\n"
        assert not (directory / "extra.txt").exists()  # only the declared outputs
        assert r["missing_outputs"] == []
        # the post-mortem material the hooks put into the job ad, on the execute host
        snapshot = Path(r["snapshot_path"])  # exit 3 and keep_snapshot = on_failure
        assert snapshot.is_file()
        assert snapshot.is_relative_to(state_dir / "snapshots")
        assert "Linux version" in Path(r["boot_log_path"]).read_text(errors="replace")
        assert r["hypervisor"] in ("kvm", "qemu")
        for phase in ("fetch", "boot", "ready", "payload", "teardown"):
            assert r["timings"][phase] >= 0, r["timings"]
    assert len(directories) == len(IMAGES)
    progress = answer["progress"]
    assert progress[-1] == {"finished": 3, "total": 3}
    assert [p["finished"] for p in progress] == sorted(p["finished"] for p in progress)


def test_the_api_reports_a_held_job_with_the_reason(answer: dict[str, Any]) -> None:
    held = answer["held"]
    assert held["state"] == "HELD"
    assert held["hold_reason_code"] == 19
    assert held["hold_reason_subcode"] == 11  # unknown image (docs/users.md)
    assert "unknown image 'no-such-image'" in held["hold_reason"]
    assert "test-direct" in held["hold_reason"]  # it names what exists
    assert held["exit_code"] is None


def test_run_local_gives_what_the_pool_gave(
    answer: dict[str, Any], inputs: Path, repo: Path, root_dir: Path
) -> None:
    settings = Settings(
        state_dir=traversable(root_dir / "local-state"),
        catalogue=(repo / "catalogue.json").as_uri(),
        cache_min_free_bytes=0,
        boot_timeout=180.0,
    )
    local = run_local(api_job(inputs), settings, directory=root_dir / "local")
    assert isinstance(local, LocalResult)
    pooled = answer["matrix"]["test-disk"]
    assert local.exit_code == pooled["exit_code"]
    assert local.stdout_path.read_bytes() == Path(pooled["stdout_path"]).read_bytes()
    assert local.stderr_path.read_bytes().startswith(b"to stderr\n")
    pooled_dir = Path(pooled["directory"])
    assert [p.relative_to(local.directory) for p in local.outputs] == [
        Path(p).relative_to(pooled_dir) for p in pooled["outputs"]
    ]
    for path in local.outputs:
        assert path.read_bytes() == (pooled_dir / path.relative_to(local.directory)).read_bytes()
    assert (local.snapshot_path is None) == (pooled["snapshot_path"] is None)


# --- the templates, end to end ------------------------------------------------------------------

STAND_IN_BUILD = """#!/bin/sh
# the test guests have no make: the template's build.sh minus the build itself
set -eu
mkdir -p src
tar -xzf "$1" -C src
echo "built on ${2:-$(uname -m)}: $(uname -sr)" > build-report.txt
tar -czf artifacts.tar.gz -C src .
"""
STAND_IN_INSTALL = """#!/bin/sh
set -eu
echo "running as uid $(id -u)"
echo "installed $1" > install-report.txt
"""


def _adapt(text: str, image: str, url: str = "", digest: str = "") -> str:
    """Change what the templates mark CHANGE: image, sizes (this pool's slots are small)."""
    changes = {
        "+GliteVmImageSha256": f'+GliteVmImageSha256 = "{digest}"',
        "request_memory": "request_memory = 512MB",
        "request_disk": "request_disk = 1GB",
    }
    out = []
    for line in text.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "+GliteVmImage" and "$(Image)" not in line:
            out.append(f'+GliteVmImage = "{url or image}"')
        else:
            out.append(changes.get(key, line))
    return "\n".join(out) + "\n"


@dataclasses.dataclass(frozen=True)
class TemplateJobs:
    clusters: dict[str, int]
    directories: dict[str, Path]


@pytest.fixture(scope="module")
def template_jobs(pool: PersonalPool, repo: Path, api_run: Driver) -> TemplateJobs:
    digest = json.loads((repo / "catalogue.json").read_text())
    disk_sha = next(i["sha256"] for i in digest["images"] if i["name"] == "test-disk")
    clusters: dict[str, int] = {}
    directories: dict[str, Path] = {}
    for name in (
        "build-as-user.sub",
        "test-as-root.sub",
        "custom-image.sub",
        "platform-matrix.sub",
        "debug-keep-snapshot.sub",
    ):
        stem = name.removesuffix(".sub")
        directory = pool.job_dir(stem)
        (directory / "build.sh").write_text(STAND_IN_BUILD)
        (directory / "install-test.sh").write_text(STAND_IN_INSTALL)
        (directory / "mypackage.deb").write_bytes(b"not really a package")
        (directory / "platforms.txt").write_text("".join(f"{i}\n" for i in IMAGES))
        src = directory / "src-tree"
        src.mkdir()
        (src / "hello.c").write_text("int main(void) { return 0; }\n")
        subprocess.run(
            ["tar", "-czf", str(directory / "src.tar.gz"), "-C", str(src), "."], check=True
        )
        for image in IMAGES:  # what platform-matrix.sub's header says to do first
            (directory / "results" / image).mkdir(parents=True)
        for path in [*directory.rglob("*")]:
            _give(pool, path)
        (directory / "build.sh").chmod(0o755)
        (directory / "install-test.sh").chmod(0o755)
        text = _adapt(
            (TEMPLATES / name).read_text(),
            "test-disk",
            url=(repo / "test-disk.qcow2").as_uri() if name == "custom-image.sub" else "",
            digest=disk_sha,
        )
        clusters[stem] = pool.submit(stem, text)
        directories[stem] = directory
    return TemplateJobs(clusters, directories)


def _history(pool: PersonalPool, cluster: int, count: int) -> list[JobAd]:
    def done() -> list[JobAd] | None:
        text = pool.run(["condor_history", "-json", str(cluster)]).stdout.strip()
        ads: list[JobAd] = json.loads(text) if text else []
        return sorted(ads, key=lambda a: a["ProcId"]) if len(ads) == count else None

    found: list[JobAd] = []

    def check() -> bool:
        nonlocal found
        found = done() or []
        return bool(found)

    wait_for(f"cluster {cluster} to leave the queue", check, JOB_TIMEOUT, step=5)
    return found


def test_build_as_user_template_runs_and_brings_the_artifacts_back(
    pool: PersonalPool, template_jobs: TemplateJobs
) -> None:
    (ad,) = _history(pool, template_jobs.clusters["build-as-user"], 1)
    d = template_jobs.directories["build-as-user"]
    assert ad["ExitCode"] == 0, (d / "build.err").read_text()
    assert (d / "build-report.txt").read_text().startswith("built on ")
    listing = subprocess.run(
        ["tar", "-tzf", str(d / "artifacts.tar.gz")], capture_output=True, text=True, check=True
    ).stdout
    assert "hello.c" in listing
    assert Path(ad["GliteVmBootLogPath"]).is_file()
    assert "GliteVmSnapshotPath" not in ad  # on_failure, and it succeeded


def test_root_template_runs_as_root_on_the_root_slot(
    pool: PersonalPool, template_jobs: TemplateJobs
) -> None:
    (ad,) = _history(pool, template_jobs.clusters["test-as-root"], 1)
    d = template_jobs.directories["test-as-root"]
    assert ad["ExitCode"] == 0, (d / "install-test.err").read_text()
    assert "running as uid 0\n" in (d / "install-test.out").read_text()
    assert (d / "install-report.txt").read_text() == "installed mypackage.deb\n"
    assert str(ad["LastRemoteHost"]).startswith(f"slot{LAYOUT.slots}@")  # the root-enabled one


def test_custom_image_template_runs_the_verified_image(
    pool: PersonalPool, template_jobs: TemplateJobs, repo: Path
) -> None:
    (ad,) = _history(pool, template_jobs.clusters["custom-image"], 1)
    d = template_jobs.directories["custom-image"]
    assert ad["ExitCode"] == 0, (d / "custom-image.err").read_text()
    assert ad["GliteVmImage"] == (repo / "test-disk.qcow2").as_uri()
    assert ad["GliteVmImageDigest"] == ad["GliteVmImageSha256"]


def test_platform_matrix_template_keeps_each_platforms_results_apart(
    pool: PersonalPool, template_jobs: TemplateJobs
) -> None:
    ads = _history(pool, template_jobs.clusters["platform-matrix"], len(IMAGES))
    d = template_jobs.directories["platform-matrix"]
    assert [ad["GliteVmImage"] for ad in ads] == IMAGES
    for ad in ads:
        image = ad["GliteVmImage"]
        results = d / "results" / image
        assert ad["ExitCode"] == 0, (results / "build.err").read_text()
        assert (results / "build-report.txt").read_text().startswith(f"built on {image}: ")
        assert (results / "artifacts.tar.gz").is_file()
        assert (results / "build.out").exists()
    assert not (d / "artifacts.tar.gz").exists()  # remapped, not dropped at the top


def test_debug_template_keeps_the_snapshot_of_a_successful_job(
    pool: PersonalPool, template_jobs: TemplateJobs
) -> None:
    (ad,) = _history(pool, template_jobs.clusters["debug-keep-snapshot"], 1)
    d = template_jobs.directories["debug-keep-snapshot"]
    assert ad["ExitCode"] == 0, (d / "debug.err").read_text()
    assert ad["GliteVmKeepSnapshot"] == "always"
    assert Path(ad["GliteVmSnapshotPath"]).is_file()
    assert Path(ad["GliteVmBootLogPath"]).is_file()


def test_no_vm_is_left_behind(
    answer: dict[str, Any], template_jobs: TemplateJobs, pool: PersonalPool, service: ServiceProcess
) -> None:
    for stem, cluster in template_jobs.clusters.items():
        _history(pool, cluster, len(IMAGES) if stem == "platform-matrix" else 1)
    client = service.client()
    wait_for("the service to hold no VM", lambda: client.list_vms() == [], 60, step=1)


if __name__ == "__main__":  # the driver, as the pool's user runs it (see api_run)
    print(json.dumps(driver(json.loads(sys.argv[1]))))
