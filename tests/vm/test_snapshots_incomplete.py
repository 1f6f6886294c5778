"""A VM directory without a record: listed with what is known, pruned by retention, never while
its VM may still use it.

The way an admin makes one: `glite-vm run` is killed (SIGKILL: no teardown), its VM is
destroyed with `glite-vm vms destroy`, and the directory stays with its overlay, boot log and
domain XML but no record.json.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.config import Settings
from glite_vm.knob_values import Retention
from glite_vm.snapshots.store import SnapshotStore
from glite_vm.vm.vm_dir import lock_vm_dir
from tests.support import domains_under, glite_vm_domains

pytestmark = pytest.mark.vm

HOURS_AGO = 2 * 3600  # older than the hour an incomplete directory is left alone


def glite_vm_env(state: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LC_ALL": "C.UTF-8",
        "GLITE_VM_STATE_DIR": str(state),
        "GLITE_VM_CONFIG": "/nonexistent",
        "GLITE_VM_DEFAULT_MEMORY_MIB": "512MiB",
        "GLITE_VM_DEFAULT_DISK_BYTES": "2GiB",
        "GLITE_VM_BOOT_TIMEOUT": "240",
    }


def glite_vm(state: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "glite_vm", *args],
        capture_output=True,
        env=glite_vm_env(state),
        cwd="/",
        timeout=120,
        check=False,
    )


def listed(state: Path) -> dict[str, dict[str, object]]:
    proc = glite_vm(state, "snapshots", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    return {e["name"]: e for e in json.loads(proc.stdout)}


def backdate(directory: Path, seconds: float) -> None:
    """As if nothing in ``directory`` had changed for ``seconds``."""
    then = time.time() - seconds
    for path in [*directory.iterdir(), directory]:
        os.utime(path, (then, then), follow_symlinks=False)


@pytest.fixture
def state() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="gvm-killed-", dir="/var/tmp"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        for name in domains_under(path):
            glite_vm(path, "vms", "destroy", "--yes", name)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False, timeout=120)


def killed_run(state: Path, image: Path) -> str:
    """Start `glite-vm run` with a long payload, SIGKILL it once the payload runs; the domain."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "glite_vm",
            "run",
            "--image",
            str(image),
            "--",
            "sh",
            "-c",
            "echo payload-started; sleep 600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=glite_vm_env(state),
        cwd="/",
    )
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + 240
    try:
        while b"payload-started" not in out:
            assert time.monotonic() < deadline, f"the payload did not start: {out!r}"
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"`glite-vm run` ended early ({proc.wait()}): {out!r}"
                out += chunk
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
    (name,) = domains_under(state)
    return name


def test_a_killed_and_destroyed_run_is_listed_and_pruned(
    state: Path, guest_dir: Path, guests: dict[str, object]
) -> None:
    disk = guest_dir / guests["disk"]["disk"]  # type: ignore[index]
    name = killed_run(state, disk)
    directory = state / "snapshots" / name
    assert (directory / "overlay.qcow2").is_file() and not (directory / "record.json").exists()

    # Its VM still runs: listed as incomplete, and never pruned, however old it looks.
    entry = listed(state)[name]
    assert entry["state"] == "incomplete" and entry["kept"] == "incomplete"
    assert "no record.json" in str(entry["detail"])
    backdate(directory, HOURS_AGO)
    running = glite_vm(state, "snapshots", "prune", "--max-age", "1h", "--dry-run")
    assert running.returncode == 0, running.stderr
    assert f"kept {name}: its VM still runs".encode() in running.stdout, running.stdout
    assert directory.is_dir()

    destroyed = glite_vm(state, "vms", "destroy", "--yes", name)
    assert destroyed.returncode == 0, destroyed.stderr
    assert name not in glite_vm_domains()

    # Gone from libvirt, the directory stays: listed with what its domain XML tells.
    entry = listed(state)[name]
    assert entry["state"] == "incomplete"
    assert entry["job_id"] != "?" and str(entry["job_id"]) in name
    assert entry["image"] == str(disk)
    assert entry["owner"] == "root" and entry["owner_uid"] == 0
    assert int(str(entry["total_bytes"])) > 0
    table = glite_vm(state, "snapshots", "list")
    assert table.returncode == 0 and name.encode() in table.stdout
    assert b"incomplete" in table.stdout

    # Too young (it changed a moment ago) it stays; unchanged for two hours, retention takes it.
    os.utime(directory / "boot.log")
    young = glite_vm(state, "snapshots", "prune", "--max-age", "1s", "--dry-run")
    assert young.returncode == 0 and f"would remove {name}".encode() not in young.stdout
    backdate(directory, HOURS_AGO)
    dry = glite_vm(state, "snapshots", "prune", "--max-age", "1h", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {name}".encode() in dry.stdout, dry.stdout
    store = SnapshotStore(Settings(state_dir=state))
    report = store.prune(Retention.parse("1h"), running=set(glite_vm_domains()))
    assert [d.entry.name for d in report.removed] == [name] and not report.failures
    assert not directory.exists()
    assert name not in listed(state)


def test_an_incomplete_directory_a_start_holds_is_never_pruned(state: Path) -> None:
    """Between a start's overlay and its domain there is no domain yet: the directory's lock
    (held by the start) is what keeps prune away."""
    directory = state / "snapshots" / "glite-vm-root-starting.0-abc123"
    directory.mkdir(parents=True)
    (directory / "overlay.qcow2").write_bytes(b"")
    (directory / "boot.log").write_bytes(b"")
    backdate(directory, HOURS_AGO)
    store = SnapshotStore(Settings(state_dir=state))
    held = lock_vm_dir(directory, blocking=False)
    assert held is not None
    try:
        report = store.prune(Retention.parse("1h"), running=set())
        assert report.in_use == (directory.name,) and not report.removed
    finally:
        os.close(held)
    assert directory.is_dir()
    report = store.prune(Retention.parse("1h"), running=set())
    assert [d.entry.name for d in report.removed] == [directory.name]
    assert not directory.exists()
    # Without libvirt's answer an overlay always means "perhaps running".
    directory.mkdir()
    (directory / "overlay.qcow2").write_bytes(b"")
    backdate(directory, HOURS_AGO)
    assert store.prune(Retention.parse("1h"), running=None).in_use == (directory.name,)
