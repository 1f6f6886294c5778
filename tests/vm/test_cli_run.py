"""`glite-vm run` as a user types it: exit status, streams, paths on stderr, clear errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import our_domain_names

pytestmark = pytest.mark.vm
GLITE_VM = [sys.executable, "-m", "glite_vm"]


def glite_vm(state_dir: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        **os.environ,
        "GLITE_VM_STATE_DIR": str(state_dir / "cli"),
        "GLITE_VM_CONFIG": "/nonexistent",
        "GLITE_VM_DEFAULT_MEMORY_MIB": "512",
        "GLITE_VM_DEFAULT_DISK_BYTES": "2GiB",
    }
    return subprocess.run(
        [*GLITE_VM, *args], capture_output=True, env=env, timeout=300, check=False
    )


def test_run_returns_the_exit_status_and_streams_and_paths(
    state_dir: Path, guest_dir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "in.txt").write_text("abc\n")
    out = tmp_path / "out"
    proc = glite_vm(
        state_dir,
        "run",
        "--image",
        str(guest_dir / "disk-boot.qcow2"),
        "--input",
        str(src),
        "--output",
        str(out),
        "--json",
        "--",
        "sh",
        "-c",
        "printf 'to\\000out'; printf 'to err' >&2; rev in.txt > made.txt; exit 7",
    )
    assert proc.returncode == 7, proc.stderr.decode()
    assert proc.stdout == b"to\x00out"
    assert proc.stderr.startswith(b"to err")
    text = proc.stderr.decode()
    assert "glite-vm: boot log: " in text
    result = json.loads(text.strip().splitlines()[-1])
    assert result["exit_code"] == 7
    assert Path(result["boot_log_path"]).stat().st_size > 0
    assert Path(result["snapshot_path"]).is_file()  # on_failure keeps it
    assert (out / "made.txt").read_text() == "cba\n"
    assert not (out / "in.txt").exists()  # unchanged inputs are not copied back
    assert result["domain"] not in our_domain_names()


def test_second_run_is_a_cache_hit_and_never_keeps_when_asked(
    state_dir: Path, guest_dir: Path
) -> None:
    image = str(guest_dir / "disk-boot.qcow2")
    glite_vm(state_dir, "run", "--image", image, "--", "true")
    proc = glite_vm(
        state_dir,
        "run",
        "--image",
        image,
        "--keep-snapshot",
        "never",
        "--json",
        "--root",
        "--",
        "sh",
        "-c",
        "id -u; exit 1",
    )
    assert proc.returncode == 1
    assert proc.stdout == b"0\n"
    result = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    assert result["cache_hit"] is True
    assert result["snapshot_path"] is None


def test_clear_errors_for_bad_input(state_dir: Path, tmp_path: Path) -> None:
    missing = glite_vm(state_dir, "run", "--image", str(tmp_path / "nope.qcow2"), "--", "true")
    assert missing.returncode == 2
    assert b"nope.qcow2" in missing.stderr
    no_cmd = glite_vm(state_dir, "run", "--image", "x")
    assert no_cmd.returncode == 2
    assert b"give the command after --" in no_cmd.stderr
    bad_mem = glite_vm(state_dir, "run", "--image", "x", "--memory", "1", "--", "true")
    assert bad_mem.returncode == 2
    assert b"RequestMemory" in bad_mem.stderr
    helptext = glite_vm(state_dir, "run", "--help")
    assert helptext.returncode == 0
    assert b"--keep-snapshot" in helptext.stdout


def test_a_root_run_keeps_its_files_private(state_dir: Path, guest_dir: Path) -> None:
    """Root's own runs too: the kept disk, the record, the domain XML and the boot log are
    0600 in a 0700 directory, and another local user reads none of them."""
    proc = glite_vm(
        state_dir, "run", "--image", str(guest_dir / "disk-boot.qcow2"), "--json", "--", "false"
    )
    assert proc.returncode == 1, proc.stderr.decode()
    result = json.loads(proc.stderr.decode().strip().splitlines()[-1])
    vm_dir = Path(result["snapshot_path"]).parent
    assert stat.S_IMODE(vm_dir.stat().st_mode) == 0o700
    kept = sorted(vm_dir.iterdir())
    assert {p.name for p in kept} >= {"snapshot.qcow2", "record.json", "domain.xml", "boot.log"}
    for path in kept:
        assert stat.S_IMODE(path.lstat().st_mode) == 0o600, path
        nobody = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert nobody.returncode != 0 and b"Permission denied" in nobody.stderr, path
