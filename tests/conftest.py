"""Shared fixtures: real libvirtd, real QEMU, the test guests built by tests/guest/build.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.config import Settings
from glite_vm.vm.connect import open_host
from glite_vm.vm.lifecycle import VmHost
from tests.support import (
    LocalImage,
    direct_image_in,
    install_guests,
    local_image,
    shell_sockets_left,
)

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))

#: The lane of ``scripts/dev test`` (pytest-xdist's ``--dist loadgroup``, one worker a lane)
#: each test directory runs in: the HTCondor pools mostly wait on their daemons' cycles, so
#: they share a lane with the in-process VM tests, and the service's tests take the other.
#: In one process the first lane's tests took about 1,200 s and the other's 950 s. Every test
#: already keeps to its own state directory, users' VMs and ports, as if another run shared
#: the machine; those that restart libvirtd are marked ``alone`` and run before both lanes,
#: by themselves.
LANES = {"condor": "pools", "vm": "pools", "service": "host", "unit": "host", "images": "host"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tests = REPO / "tests"
    for item in items:
        top = item.path.relative_to(tests).parts[0] if item.path.is_relative_to(tests) else ""
        item.add_marker(pytest.mark.xdist_group(LANES.get(top, "host")))


@pytest.fixture(scope="session")
def guest_dir(state_dir: Path) -> Path:
    """The test guests, copied where QEMU's own user can read them (the checkout may not be)."""
    manifest = GUEST_DIR / "guests.json"
    if not manifest.exists():
        subprocess.run(["bash", str(REPO / "tests/guest/build.sh"), str(GUEST_DIR)], check=True)
    dest = state_dir / "guests"
    install_guests(GUEST_DIR, dest)
    return dest


@pytest.fixture(scope="session")
def guests(guest_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((guest_dir / "guests.json").read_text())
    return data


@pytest.fixture(scope="session")
def direct_image(guests: dict[str, Any], guest_dir: Path) -> LocalImage:
    return direct_image_in(guest_dir, guests, "test-direct")


@pytest.fixture(scope="session")
def disk_image(guests: dict[str, Any], guest_dir: Path) -> LocalImage:
    return local_image(
        guest_dir / guests["disk"]["disk"], name="test-disk", guest_user=guests["user"]
    )


def world_traversable_tmpdir(prefix: str) -> Path:
    """QEMU runs as its own user under qemu:///system: our directories must be traversable."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    path.chmod(0o711)
    return path


@pytest.fixture(scope="session")
def state_dir() -> Iterator[Path]:
    path = world_traversable_tmpdir("glite-vm-test-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vm_settings(state_dir: Path) -> Settings:
    return Settings(
        state_dir=state_dir, boot_timeout=120.0, default_memory_mib=512, default_disk_bytes=2 << 30
    )


@pytest.fixture(scope="session")
def vm_host(vm_settings: Settings) -> Iterator[VmHost]:
    host = open_host(vm_settings)
    yield host
    # Only this run's domains: other runs and other users may share the libvirtd.
    leftovers = [
        d.name()
        for d, m in host.our_domains()
        if m is None or Path(m.vm_dir).is_relative_to(vm_settings.state_dir)
    ]
    overlays = list(vm_settings.effective_snapshot_dir.glob("*/overlay.qcow2"))
    sockets = shell_sockets_left(vm_settings.state_dir)
    host.conn.close()
    assert not leftovers, f"domains left behind: {leftovers}"
    assert not overlays, f"overlays left outside kept snapshots: {overlays}"
    assert not sockets, f"shell sockets left behind: {sockets}"
