"""The submit templates users copy: they parse, and they set what the hooks read, typed right.

Two readers check every template. ``htcondor2.Submit`` (the bindings, no daemons) parses the
file with its queue statement, and each job's attributes are expanded for its item. The real
``condor_submit -dry-run`` of the release the pool tests use (marker ``condor``) then makes the
actual job ads, which go through the hooks' own parser, ``request_from_job_ad``.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import classad2
import htcondor2
import pytest

from glite_vm.config import Settings
from glite_vm.errors import RootNotPermittedError
from glite_vm.images.sources import NAME_RE
from glite_vm.request import KeepSnapshot, check_image_ref
from glite_vm.slots import SlotFacts
from glite_vm.units import GIB, KIB
from tests.condor.pool import find_tarball, unpack_release
from tests.support import sized

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "submit_templates"
NAMES = [
    "build-as-user.sub",
    "test-as-root.sub",
    "custom-image.sub",
    "platform-matrix.sub",
    "debug-keep-snapshot.sub",
]
#: Input files the templates name; the tests make empty stand-ins.
STAND_INS = ("src.tar.gz", "mypackage.deb")
#: The site's historical slot, which the templates' sizes must fit.
SLOT = SlotFacts(root_enabled=True, cpus=1, memory_mib=2048, disk_kib=30 * GIB // KIB)
CUSTOM_SOURCES = ("https://images.example.org/vm/",)
#: HTCondor's units for request_memory (MiB) and request_disk (KiB).
_UNIT_KIB = {"": 1, "K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}

#: What each template must ask for (beyond image, sizes and WantIOProxy).
EXPECTED: dict[str, dict[str, Any]] = {
    "build-as-user.sub": {"GliteVmKeepSnapshot": "on_failure", "root": False},
    "test-as-root.sub": {"GliteVmKeepSnapshot": "on_failure", "root": True},
    "custom-image.sub": {"GliteVmKeepSnapshot": "on_failure", "root": False},
    "platform-matrix.sub": {"GliteVmKeepSnapshot": "on_failure", "root": False},
    "debug-keep-snapshot.sub": {"GliteVmKeepSnapshot": "always", "root": False},
}


def platforms() -> list[str]:
    return (TEMPLATES / "platforms.txt").read_text().splitlines()


def job_attributes(sub: Any) -> dict[str, object]:
    """The ``+Name``/``MY.Name`` attributes as the job ad will hold them (ClassAd values)."""
    out: dict[str, object] = {}
    for key in sub:
        if key.upper().startswith("MY."):
            out[key[3:]] = classad2.ExprTree(sub.expand(key)).eval()
    return out


def quantity_kib(text: str, default_unit: str) -> int:
    """A submit-language quantity (``2GB``, ``512M``, ``2048``) in KiB, by HTCondor's rules."""
    s = text.strip().upper().removesuffix("B")
    unit = s[-1] if s[-1:] in _UNIT_KIB else ""
    number = float(s[: len(s) - len(unit)])
    return int(number * _UNIT_KIB[unit or default_unit])


def expanded_jobs(name: str, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """One ``htcondor2.Submit`` per job the template queues, with its item variables set."""
    text = (TEMPLATES / name).read_text()
    monkeypatch.chdir(TEMPLATES)  # `queue ... from FILE` reads FILE relative to the cwd
    items = list(htcondor2.Submit(text).itemdata() or [])  # None for a plain `queue`
    jobs = []
    for item in items or [None]:
        sub = htcondor2.Submit(text)
        for key, value in (item or {}).items():
            sub[key] = value
        jobs.append(sub)
    return jobs


# --- the bindings' view ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_each_template_parses_and_sets_what_the_hooks_read(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = expanded_jobs(name, monkeypatch)
    assert len(jobs) == (len(platforms()) if name == "platform-matrix.sub" else 1)
    want = EXPECTED[name]
    for sub in jobs:
        attrs = job_attributes(sub)
        assert attrs["WantIOProxy"] is True  # chirp needs it (docs/condor.md)
        image = attrs["GliteVmImage"]
        assert isinstance(image, str)
        check_image_ref(image)
        keep = attrs["GliteVmKeepSnapshot"]
        assert isinstance(keep, str)
        assert KeepSnapshot.parse(keep).value == want["GliteVmKeepSnapshot"]
        if want["root"]:
            assert attrs["GliteVmRoot"] is True  # the boolean, not the string "True"
        else:
            assert attrs.get("GliteVmRoot", False) is False
        assert sub.expand("should_transfer_files") == "YES"
        assert int(sub.expand("request_cpus")) <= (SLOT.cpus or 0)
        assert quantity_kib(sub.expand("request_memory"), "M") <= (SLOT.memory_mib or 0) * 1024
        assert quantity_kib(sub.expand("request_disk"), "K") <= (SLOT.disk_kib or 0)


def test_the_root_template_only_matches_root_enabled_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (sub,) = expanded_jobs("test-as-root.sub", monkeypatch)
    requirements = classad2.ExprTree(sub.expand("requirements"))
    assert requirements.eval(classad2.ClassAd(), classad2.ClassAd({"GliteVmRootEnabled": True}))
    for slot in ({"GliteVmRootEnabled": False}, {}):
        assert not requirements.eval(classad2.ClassAd(), classad2.ClassAd(slot))


def test_the_custom_image_template_names_a_url_and_its_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (sub,) = expanded_jobs("custom-image.sub", monkeypatch)
    attrs = job_attributes(sub)
    assert str(attrs["GliteVmImage"]).startswith("https://")
    digest = attrs["GliteVmImageSha256"]
    assert isinstance(digest, str)
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")


def test_the_matrix_makes_one_job_per_platform_with_separate_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    names = platforms()
    assert names
    assert all(NAME_RE.match(n) for n in names)  # HTCondor would queue blank/comment lines too
    assert len(set(names)) == len(names)
    jobs = expanded_jobs("platform-matrix.sub", monkeypatch)
    assert [job_attributes(s)["GliteVmImage"] for s in jobs] == names
    outputs = [s.expand("output") for s in jobs]
    remaps = [s.expand("transfer_output_remaps") for s in jobs]
    for image, output, remap in zip(names, outputs, remaps, strict=True):
        assert output == f"results/{image}/build.out"
        assert f"artifacts.tar.gz = results/{image}/artifacts.tar.gz" in remap
        assert f"'{image}'" in jobs[names.index(image)].expand("arguments")
    assert len(set(outputs)) == len(names)  # no two platforms write the same file


@pytest.mark.parametrize("name", NAMES)
def test_every_setting_is_explained_by_a_comment(name: str) -> None:
    lines = (TEMPLATES / name).read_text().splitlines()
    assert lines[0].startswith(f"# {name}:")
    previous = ""
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.startswith("#"):
            # directly under a comment, or under a setting that is: a block starts with a comment
            assert previous.strip(), f"{name}:{number}: {line!r} has no comment above it"
            assert "#" not in line.split("=", 1)[0]
        previous = line
    assert lines[-1].startswith("queue")


@pytest.mark.parametrize("script", ["build.sh", "install-test.sh"])
def test_the_example_scripts_are_executable_shell(script: str) -> None:
    path = TEMPLATES / script
    assert path.stat().st_mode & 0o111
    assert path.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(path)], check=True, timeout=30)


# --- the real condor_submit --------------------------------------------------------------------


@pytest.fixture(scope="module")
def condor_submit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``condor_submit`` of the HTCondor release the pool tests use (tools only, no daemon)."""
    try:
        tarball = find_tarball()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    prefix = tmp_path_factory.mktemp("htcondor")
    unpack_release(tarball, prefix)
    (prefix / "dry-run.conf").write_text("CONDOR_HOST = 127.0.0.1\n")
    yield prefix / "bin" / "condor_submit"


def dry_run(condor_submit: Path, sub_file: Path, cwd: Path) -> list[classad2.ClassAd]:
    """The job ads ``condor_submit -dry-run`` makes of ``sub_file``, one per job."""
    env = {
        "CONDOR_CONFIG": str(condor_submit.parent.parent / "dry-run.conf"),
        "PATH": "/usr/bin:/bin",
    }
    proc = subprocess.run(
        [str(condor_submit), "-dry-run", "-", str(sub_file)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    header, _, rest = proc.stdout.partition("\n")
    assert header.startswith("Dry-Run job(s)"), proc.stdout
    blocks = [b for b in rest.split("\n.\n") if "=" in b and "dry-run to cluster" not in b]
    first = classad2.parseOne(blocks[0], classad2.ParserType.Old)
    ads = [first]
    for block in blocks[1:]:  # later jobs are printed as their differences from the first
        ad = classad2.parseOne(str(first), classad2.ParserType.New)
        ad.update(classad2.parseOne(block, classad2.ParserType.Old))
        ads.append(ad)
    return ads


@pytest.fixture
def template_dir(tmp_path: Path) -> Path:
    """A copy of the templates, with the stand-in inputs and the matrix's result directories."""
    work = tmp_path / "templates"
    shutil.copytree(TEMPLATES, work)
    for name in STAND_INS:
        (work / name).write_bytes(b"")
    for image in platforms():
        (work / "results" / image).mkdir(parents=True)
    return work


@pytest.mark.condor
@pytest.mark.parametrize("name", NAMES)
def test_condor_submit_makes_job_ads_the_hooks_accept(
    name: str, condor_submit: Path, template_dir: Path
) -> None:
    ads = dry_run(condor_submit, template_dir / name, template_dir)
    assert len(ads) == (len(platforms()) if name == "platform-matrix.sub" else 1)
    settings = Settings(custom_image_sources=CUSTOM_SOURCES)
    want = EXPECTED[name]
    for ad in ads:
        assert ad["WantIOProxy"] is True
        assert isinstance(ad["RequestMemory"], int)
        assert isinstance(ad["RequestDisk"], int)
        ad["Owner"] = "alice"
        request = sized(ad, SLOT, settings)
        assert request.image == ad["GliteVmImage"]
        assert request.root is want["root"]
        assert request.keep_snapshot.value == want["GliteVmKeepSnapshot"]
        assert (request.cpus, request.memory_mib, request.disk_bytes) == (1, 2048, 30 * GIB)
        assert ad["RequestMemory"] == 2048  # MiB
        assert ad["RequestDisk"] == 30 * GIB // KIB  # KiB
    if name == "custom-image.sub":
        assert request.image_sha256 == "0" * 64
    if name == "platform-matrix.sub":
        assert [ad["GliteVmImage"] for ad in ads] == platforms()
        assert len({ad["Out"] for ad in ads}) == len(ads)


@pytest.mark.condor
def test_the_root_template_is_refused_on_a_user_slot(
    condor_submit: Path, template_dir: Path
) -> None:
    (ad,) = dry_run(condor_submit, template_dir / "test-as-root.sub", template_dir)
    ad["Owner"] = "alice"
    assert ad["GliteVmRoot"] is True
    user_slot = SlotFacts(root_enabled=False, cpus=1, memory_mib=2048, disk_kib=SLOT.disk_kib)
    with pytest.raises(RootNotPermittedError):
        sized(ad, user_slot, Settings())
