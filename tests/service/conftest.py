"""Fixtures of the service tests: two real users, a catalogue of the test guest, the service.

The service runs as a real root process (``python -m glite_vm.cli.service serve``) with its
own state directory, catalogue (a ``file://`` repository holding the direct-kernel test guest)
and socket; clients run as the real users ``gvm-alice`` and ``gvm-bob`` through ``setpriv``.
At the end no domain of these users, no overlay and no cache lease may remain.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.vm.hypervisor import detect_cached
from tests.service import svc_support
from tests.service.svc_support import (
    Account,
    ServiceProcess,
    build_fake_starter,
    ensure_account,
    our_domains,
)
from tests.support import BROKEN_GUESTS, guest_catalogue
from tests.support import service_env as support_service_env

REAP_INTERVAL = 2.0
#: GLITE_VM_SERVICE_SEND_TIMEOUT of the session's service (default 120 s): how long it waits for
#: a client that reads nothing before dropping it; short, so that the test of such a client
#: does not wait two minutes (clients that read are never near it: the service only blocks on
#: a full socket buffer)
SEND_TIMEOUT = 20
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
    svc_support.RUN_ROOT[:] = [path]
    yield path
    if not os.environ.get("GLITE_VM_TEST_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def catalogue(svc_root: Path, guest_dir: Path, guests: dict[str, Any]) -> Path:
    """``test-direct`` (the direct-kernel guest), ``test-noagent`` (the same guest told not
    to start its agent) and the broken guests of tests/support.py, published the way a central
    repository publishes images."""
    direct = {"test-direct": "", "test-noagent": guests["noagent_flag"]}
    return guest_catalogue(guest_dir, svc_root / "repo", direct=direct, variants=BROKEN_GUESTS)


@pytest.fixture(scope="session")
def custom_images(svc_root: Path) -> Path:
    """Where the ``service`` fixture takes custom images from (``file://`` URLs under it)."""
    path = svc_root / "custom"
    path.mkdir(mode=0o755, exist_ok=True)
    return path


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
def fake_starter(svc_root: Path) -> Path:
    """A stand-in for condor_starter (svc_support.FakeStarter), compiled once."""
    return build_fake_starter(svc_root / "bin")


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


def service_env(root: Path, catalogue: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a test service whose state and socket live under ``root``."""
    return support_service_env(
        root,
        catalogue,
        {
            "GLITE_VM_DEFAULT_MEMORY_MIB": "512MiB",
            "GLITE_VM_DEFAULT_DISK_BYTES": "1GiB",
            "GLITE_VM_REAP_INTERVAL": str(REAP_INTERVAL),
            "GLITE_VM_GUEST_IDENTITY": "true",
            **(extra or {}),
        },
    )


def check_nothing_left(svc: ServiceProcess, state: Path, owners: tuple[str, ...] = USERS) -> None:
    """Tear down what tests left running, stop the service, and fail on anything left over:
    VMs, domains, overlays, cache leases, or an unexpected error in the service's log."""
    client = svc.client()
    leftovers = [v.vm for v in client.list_vms()] if svc.proc and svc.proc.poll() is None else []
    for name in leftovers:
        client.teardown(name, failed=False)
    if svc.proc is not None and svc.proc.poll() is None:
        svc.stop()
    domains = our_domains(owners)
    overlays = list((state / "snapshots").glob("*/overlay.qcow2"))
    leases = list((state / "cache" / "leases").rglob("*.json"))
    shells = state / "run" / "shells"
    sockets = os.listdir(shells) if shells.is_dir() else []
    assert not leftovers, f"tests left VMs running: {leftovers}"
    assert not domains, f"domains left behind: {domains}"
    assert not overlays, f"overlays left behind: {overlays}"
    assert not leases, f"cache leases left behind: {leases}"
    assert not sockets, f"shell sockets left behind: {sockets}"
    log = svc.log()
    assert "Traceback" not in log, f"the service hit an unexpected error:\n{log[-5000:]}"


@pytest.fixture(autouse=True)
def no_vm_outlives_its_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test of the session's service that left a VM running fails on its own, with the VM
    torn down, instead of failing every later test that counts the users' domains."""
    yield
    if "service" not in request.fixturenames:
        return
    svc: ServiceProcess = request.getfixturevalue("service")
    if svc.proc is None or svc.proc.poll() is not None:
        return
    client = svc.client()
    left = [v.vm for v in client.list_vms()]
    for name in left:
        client.teardown(name, failed=False)
    assert not left, f"the test left VMs running (torn down now): {left}"


@pytest.fixture(scope="session")
def service(
    svc_root: Path, catalogue: Path, hypervisor_probe: Path, alice: Account, bob: Account
) -> Iterator[ServiceProcess]:
    state = new_state_dir(svc_root / "state", hypervisor_probe)
    extra = {
        "GLITE_VM_CUSTOM_IMAGE_SOURCES": (svc_root / "custom").as_uri() + "/",
        "GLITE_VM_SERVICE_SEND_TIMEOUT": str(SEND_TIMEOUT),
    }
    env = service_env(svc_root, catalogue, extra)
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, svc_root / "service.log")
    svc.start()
    try:
        yield svc
    finally:
        check_nothing_left(svc, state)
