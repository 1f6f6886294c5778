"""Fixtures of the service tests: two real users, a catalogue of the test guest, the service.

The service runs as a real root process (``python -m glite_vm.cli.service serve``) with its
own state directory, catalogue (a ``file://`` repository holding the direct-kernel test guest)
and socket; clients run as the real users ``gvm-alice`` and ``gvm-bob`` through ``setpriv``.
At the end no domain of these users, no overlay and no cache lease may remain.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.images import build_catalogue, write_catalogue
from glite_vm.images.inspect import Limits
from glite_vm.vm.hypervisor import detect_cached
from tests.service.svc_support import Account, ServiceProcess, ensure_account, our_domains

REAP_INTERVAL = 2.0
USERS = ("gvm-alice", "gvm-bob")


@pytest.fixture(scope="session")
def alice() -> Account:
    return ensure_account(USERS[0])


@pytest.fixture(scope="session")
def bob() -> Account:
    return ensure_account(USERS[1])


@pytest.fixture(scope="session")
def svc_root() -> Iterator[Path]:
    """A directory QEMU's user and the test users can traverse (not list)."""
    path = Path(tempfile.mkdtemp(prefix="glite-vm-svc-", dir="/var/tmp"))
    path.chmod(0o711)
    yield path
    if not os.environ.get("GLITE_VM_TEST_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def catalogue(svc_root: Path, guest_dir: Path, guests: dict[str, Any]) -> Path:
    """``test-direct`` (the direct-kernel guest) and ``test-noagent`` (the same guest told not
    to start its agent), published the way a central repository publishes images."""
    repo = svc_root / "repo"
    repo.mkdir(mode=0o755)
    direct = guests["direct"]
    for name in (direct["kernel"], direct["initrd"]):
        shutil.copyfile(guest_dir / name, repo / name)
    variants = {
        "test-direct": direct["cmdline"],
        "test-noagent": f"{direct['cmdline']} {guests['noagent_flag']}",
    }
    for name, cmdline in variants.items():
        disk = repo / f"{name}.qcow2"
        shutil.copyfile(guest_dir / direct["disk"], disk)
        sidecar = {
            "name": name,
            "boot": "kernel",
            "kernel": direct["kernel"],
            "initrd": direct["initrd"],
            "cmdline": cmdline,
            "guest_user": guests["user"],
        }
        (repo / f"{name}.qcow2.json").write_text(json.dumps(sidecar))
    doc = build_catalogue(repo, limits=Limits(max_virtual_bytes=64 << 30, max_file_bytes=1 << 30))
    return write_catalogue(doc, repo / "catalogue.json")


@pytest.fixture(scope="session")
def hypervisor_probe(svc_root: Path) -> Path:
    """The accelerator probe (seconds under TCG), run once and copied into each state dir."""
    path = svc_root / "hypervisor.json"
    detect_cached("auto", path)
    return path


def new_state_dir(path: Path, probe: Path) -> Path:
    path.mkdir(mode=0o711)
    shutil.copyfile(probe, path / "hypervisor.json")
    return path


@pytest.fixture(scope="session")
def canary(svc_root: Path) -> tuple[Path, bytes]:
    """A root-only file (0600) with a secret no test output may ever contain."""
    directory = svc_root / "canary"
    directory.mkdir(mode=0o711)
    secret = f"CANARY-{secrets.token_hex(16)}".encode()
    path = directory / "secret.txt"
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path, secret


def service_env(
    state: Path, run: Path, catalogue: Path, extra: dict[str, str] | None = None
) -> dict[str, str]:
    """The environment of a test service with its own state dir, catalogue and socket."""
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LC_ALL": "C.UTF-8",
        "GLITE_VM_CONFIG": str(state.parent / "no-config.toml"),
        "GLITE_VM_STATE_DIR": str(state),
        "GLITE_VM_CATALOGUE": str(catalogue),
        "GLITE_VM_SOCKET_PATH": str(run / "glite-vm.sock"),
        "GLITE_VM_BOOT_TIMEOUT": "120",
        "GLITE_VM_DEFAULT_MEMORY_MIB": "512",
        "GLITE_VM_DEFAULT_DISK_BYTES": "1GiB",
        "GLITE_VM_CACHE_MIN_FREE_BYTES": "0",
        "GLITE_VM_REAP_INTERVAL": str(REAP_INTERVAL),
        "GLITE_VM_GUEST_IDENTITY": "true",
        **(extra or {}),
    }


def check_nothing_left(svc: ServiceProcess, state: Path) -> None:
    """Tear down what tests left running, stop the service, and fail on anything left over:
    VMs, domains, overlays, cache leases, or an unexpected error in the service's log."""
    client = svc.client()
    leftovers = [v.vm for v in client.list_vms()] if svc.proc and svc.proc.poll() is None else []
    for name in leftovers:
        client.teardown(name, failed=False)
    if svc.proc is not None and svc.proc.poll() is None:
        svc.stop()
    domains = our_domains(USERS)
    overlays = list((state / "snapshots").glob("*/overlay.qcow2"))
    leases = list((state / "cache" / "leases").rglob("*.json"))
    assert not leftovers, f"tests left VMs running: {leftovers}"
    assert not domains, f"domains left behind: {domains}"
    assert not overlays, f"overlays left behind: {overlays}"
    assert not leases, f"cache leases left behind: {leases}"
    log = svc.log()
    assert "Traceback" not in log, f"the service hit an unexpected error:\n{log[-5000:]}"


@pytest.fixture(scope="session")
def service(
    svc_root: Path, catalogue: Path, hypervisor_probe: Path, alice: Account, bob: Account
) -> Iterator[ServiceProcess]:
    state = new_state_dir(svc_root / "state", hypervisor_probe)
    run = svc_root / "run"
    run.mkdir(mode=0o755)
    svc = ServiceProcess(
        run / "glite-vm.sock", service_env(state, run, catalogue), svc_root / "service.log"
    )
    svc.start()
    try:
        yield svc
    finally:
        check_nothing_left(svc, state)
