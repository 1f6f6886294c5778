"""VMRequest validation: what a user sees when a job asks for something impossible."""

from __future__ import annotations

from pathlib import Path

import pytest

from glite_vm.config import Settings
from glite_vm.errors import Disposition, RequestError
from glite_vm.request import KeepSnapshot, VMRequest
from glite_vm.units import GIB, MIB, parse_size

SETTINGS = Settings(max_cpus=8, max_memory_mib=16384, max_disk_bytes=100 * GIB)


def make(**kw: object) -> VMRequest:
    args: dict[str, object] = {"image": "debian-12", "job_id": "12.0", "owner": "alice"}
    args.update(kw)
    return VMRequest.create(SETTINGS, **args)  # type: ignore[arg-type]


def test_defaults_are_the_sites_historical_vm() -> None:
    r = make()
    assert (r.cpus, r.memory_mib, r.disk_bytes) == (1, 2048, 30 * GIB)
    assert r.root is False
    assert r.keep_snapshot is KeepSnapshot.ON_FAILURE


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"cpus": 0}, "RequestCpus"),
        ({"cpus": 9}, "RequestCpus"),
        ({"cpus": 1.5}, "RequestCpus"),
        ({"cpus": True}, "RequestCpus"),
        ({"memory_mib": 10}, "RequestMemory"),
        ({"memory_mib": 10**9}, "RequestMemory"),
        ({"disk": "1KB"}, "RequestDisk"),
        ({"disk": "1000TB"}, "RequestDisk"),
        ({"disk": "-5GB"}, "RequestDisk"),
        ({"disk": "lots"}, "RequestDisk"),
        ({"root": "yes"}, "GliteVmRoot"),
        ({"keep_snapshot": "sometimes"}, "GliteVmKeepSnapshot"),
        ({"image": ""}, "GliteVmImage"),
        ({"image": "a\x00b"}, "GliteVmImage"),
        ({"image": "x" * 5000}, "GliteVmImage"),
        ({"image_sha256": "abc"}, "GliteVmImageSha256"),
        ({"job_id": "../../etc"}, "job id"),
        ({"owner": "a b"}, "Owner"),
    ],
)
def test_invalid_values_hold_and_name_the_field(kw: dict[str, object], field: str) -> None:
    with pytest.raises(RequestError) as info:
        make(**kw)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":")
    assert info.value.disposition is Disposition.HOLD
    assert isinstance(info.value, ValueError)


def test_bounds_are_inclusive_and_sizes_parse() -> None:
    r = make(cpus=8, memory_mib=16384, disk="100GB", keep_snapshot="always", root=True)
    assert (r.cpus, r.memory_mib, r.disk_bytes, r.root) == (8, 16384, 100 * GIB, True)
    assert r.keep_snapshot is KeepSnapshot.ALWAYS


def test_sha256_is_normalised() -> None:
    assert make(image_sha256="AB" * 32).image_sha256 == "ab" * 32


@pytest.mark.parametrize(
    ("policy", "failed", "kept"),
    [
        ("always", False, True),
        ("always", True, True),
        ("on_failure", False, False),
        ("on_failure", True, True),
        ("never", True, False),
        ("on-failure", True, True),
    ],
)
def test_keep_snapshot_policy(policy: str, failed: bool, kept: bool) -> None:
    assert KeepSnapshot.parse(policy).keeps(failed) is kept


@pytest.mark.parametrize(
    ("text", "value"),
    [("30GB", 30 * GIB), ("512 MiB", 512 * MIB), ("1024B", 1024), ("1.5G", 3 * GIB // 2)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_settings_from_environment_and_bad_values() -> None:
    s = Settings.load(
        {
            "GLITE_VM_MAX_CPUS": "4",
            "GLITE_VM_ROOT_USERS": "alice, bob",
            "GLITE_VM_CACHE_MAX_BYTES": "2GB",
            "GLITE_VM_CONFIG": "/nonexistent",
        }
    )
    assert s.max_cpus == 4
    assert s.root_users == ("alice", "bob")
    assert s.cache_max_bytes == 2 * GIB
    with pytest.raises(ValueError, match="GLITE_VM_MAX_CPUS"):
        Settings.load({"GLITE_VM_MAX_CPUS": "many", "GLITE_VM_CONFIG": "/nonexistent"})


def test_a_config_file_is_read_and_a_bad_one_is_named(tmp_path: Path) -> None:
    good = tmp_path / "config.toml"
    good.write_text('max_cpus = 3\nroot_users = ["carol"]\n')
    s = Settings.load({"GLITE_VM_CONFIG": str(good), "GLITE_VM_MAX_CPUS": "5"})
    assert (s.max_cpus, s.root_users) == (5, ("carol",))  # the environment wins
    bad = tmp_path / "bad.toml"
    bad.write_text("max_cpus = = 3\n")
    with pytest.raises(ValueError, match=r"bad\.toml is not valid TOML"):
        Settings.load({"GLITE_VM_CONFIG": str(bad)})
