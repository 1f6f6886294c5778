"""`glite-vm run` as a user types it: exit status, streams, paths on stderr, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from glite_vm.service.events import event_log_path, read_events
from tests.service.svc_support import ensure_account
from tests.support import domains_under, glite_vm_domains

pytestmark = pytest.mark.vm
GLITE_VM = [sys.executable, "-m", "glite_vm"]


UNPRIVILEGED = "gvm-alice"


def cli_env(state_dir: Path, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "GLITE_VM_STATE_DIR": str(state_dir / "cli"),
        "GLITE_VM_CONFIG": "/nonexistent",
        "GLITE_VM_DEFAULT_MEMORY_MIB": "512MiB",
        "GLITE_VM_DEFAULT_DISK_BYTES": "2GiB",
        **(extra_env or {}),
    }


def glite_vm(
    state_dir: Path, *args: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [*GLITE_VM, *args],
        capture_output=True,
        env=cli_env(state_dir, extra_env),
        timeout=300,
        check=False,
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
    assert result["domain"] not in glite_vm_domains()


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


def vm_dirs(state_dir: Path) -> set[str]:
    snapshots = state_dir / "cli" / "snapshots"
    return {p.name for p in snapshots.iterdir()} if snapshots.is_dir() else set()


def refused_before_any_vm(state_dir: Path, *args: str) -> str:
    """Run ``glite-vm run ARGS``, expect exit 125 and no VM made; the stderr."""
    before = vm_dirs(state_dir)
    proc = glite_vm(state_dir, "run", *args)
    err = proc.stderr.decode()
    assert proc.returncode == 125, err
    assert "Traceback" not in err
    assert vm_dirs(state_dir) == before, "a VM was made for a request that was refused"
    return err


def test_bad_input_is_refused_before_any_vm_naming_the_option(
    state_dir: Path, guest_dir: Path, tmp_path: Path
) -> None:
    image = str(guest_dir / "disk-boot.qcow2")
    err = refused_before_any_vm(state_dir, "--image", str(tmp_path / "nope.qcow2"), "--", "true")
    assert "request error" in err and "nope.qcow2" in err and "no VM was started" in err
    err = refused_before_any_vm(state_dir, "--image", "x")
    assert "give the command after --" in err
    err = refused_before_any_vm(state_dir, "--image", image, "--memory", "2048", "--", "true")
    assert "--memory: '2048' has no unit; write e.g. '2048MiB'" in err
    err = refused_before_any_vm(state_dir, "--image", image, "--memory", "1MiB", "--", "true")
    assert "request error: --memory: 1 MiB is outside" in err and "RequestMemory" not in err
    err = refused_before_any_vm(state_dir, "--image", image, "--sha256", "abc", "--", "true")
    assert "request error: --sha256: must be 64 hexadecimal digits" in err
    assert "GliteVmImageSha256" not in err
    err = refused_before_any_vm(state_dir, "--image", image, "--disk", "30", "--", "true")
    assert "--disk: '30' has no unit" in err
    for limit in ("0", "-1", "soon", "0s"):
        err = refused_before_any_vm(state_dir, "--image", image, "--timeout", limit, "--", "true")
        assert "--timeout:" in err, limit
    err = refused_before_any_vm(state_dir, "--image", image, "--network", "user", "--", "true")
    assert "--network: 'user' is not offered here" in err and "'none'" in err
    err = refused_before_any_vm(state_dir, "--image", image, "--bogus", "--", "true")
    assert "request error" in err and "--bogus" in err  # usage errors exit 125 too
    helptext = glite_vm(state_dir, "run", "--help")
    assert helptext.returncode == 0
    for documented in (b"--keep-snapshot", b"exit status:", b"124", b"125", b"126/127"):
        assert documented in helptext.stdout


def test_an_unwritable_output_is_refused_before_the_vm_starts(
    state_dir: Path, guest_dir: Path, tmp_path: Path
) -> None:
    image = str(guest_dir / "disk-boot.qcow2")
    afile = tmp_path / "a-file"
    afile.write_text("x")
    err = refused_before_any_vm(
        state_dir, "--image", image, "--output", str(afile / "out"), "--", "true"
    )
    assert f"request error: --output: cannot write into {afile / 'out'}" in err
    # A read-only directory, for an ordinary user (root writes anywhere)
    user = ensure_account(UNPRIVILEGED)
    readonly = Path(tempfile.mkdtemp(prefix="gvm-ro-", dir="/var/tmp"))
    try:
        readonly.chmod(0o555)
        proc = subprocess.run(
            [
                "setpriv",
                f"--reuid={user.uid}",
                f"--regid={user.gid}",
                "--clear-groups",
                "--",
                *GLITE_VM,
                "run",
                "--image",
                image,
                "--output",
                str(readonly),
                "--",
                "true",
            ],
            capture_output=True,
            env={
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "HOME": str(readonly),
                "GLITE_VM_CONFIG": "/nonexistent",
            },
            cwd="/",
            timeout=120,
            check=False,
        )
        err = proc.stderr.decode()
        assert proc.returncode == 125, err
        assert f"--output: cannot write into {readonly}: Permission denied" in err
        assert "no VM was started" in err and "Traceback" not in err
    finally:
        readonly.rmdir()


def test_the_payloads_own_status_2_is_not_a_glite_vm_failure_and_its_environment_is_documented(
    state_dir: Path, guest_dir: Path, tmp_path: Path
) -> None:
    shutil.copyfile(guest_dir / "disk-boot.qcow2", tmp_path / "my.qcow2")
    proc = subprocess.run(
        [
            *GLITE_VM,
            "run",
            "--image",
            "./my.qcow2",  # relative: made absolute, as docs/images.md says
            "--env",
            "FOO=bar baz",
            "--output",
            "out",
            "--",
            "sh",
            "-c",
            "env > env.txt; exit 2",
        ],
        cwd=tmp_path,
        capture_output=True,
        env=cli_env(state_dir),
        timeout=300,
        check=False,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err  # the payload's 2, not a usage error
    assert "error" not in err.lower()
    env = dict(
        line.split("=", 1) for line in (tmp_path / "out" / "env.txt").read_text().splitlines()
    )
    # docs/users.md, "The environment": glite-vm's four and what the job gave, exactly (also
    # where the switch of user goes through su, as on this busybox guest), plus what the
    # payload's own shell (here `sh -c`) adds
    assert set(env) == {"PATH", "HOME", "USER", "LOGNAME", "FOO", "PWD", "SHLVL"}
    assert env["FOO"] == "bar baz"
    assert env["PATH"] == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    assert env["PWD"] == "/var/tmp/glite-vm-job"  # noqa: S105 - a directory, not a password
    assert (env["USER"], env["LOGNAME"], env["HOME"]) == ("glite", "glite", "/home/glite")


def test_a_payload_that_outlives_its_timeout_exits_124_and_says_where_its_vm_went(
    state_dir: Path, guest_dir: Path
) -> None:
    proc = glite_vm(
        state_dir,
        "run",
        "--image",
        str(guest_dir / "disk-boot.qcow2"),
        "--timeout",
        "3",
        "--json",
        "--",
        "sh",
        "-c",
        "echo started; sleep 120",
    )
    err = proc.stderr.decode()
    assert proc.returncode == 124, err
    assert proc.stdout == b"started\n"
    assert "request error: the payload did not finish within its time limit of 3 s" in err
    assert "host" not in err.split("request error")[1].split("\n")[0]
    result = json.loads(err.strip().splitlines()[-1])
    assert result["exit_status"] == 124
    assert result["error"]["class"] == "request"
    assert f"glite-vm: boot log: {result['boot_log_path']}" in err
    assert Path(result["boot_log_path"]).stat().st_size > 0
    assert f"glite-vm: snapshot: {result['snapshot_path']}" in err
    assert Path(result["snapshot_path"]).is_file()  # a stopped payload failed: on_failure keeps
    assert result["domain"] not in glite_vm_domains()


def test_a_failure_after_the_payload_still_reports_its_status_snapshot_and_boot_log(
    state_dir: Path, guest_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            *GLITE_VM,
            "run",
            "--image",
            str(guest_dir / "disk-boot.qcow2"),
            "--output",
            str(out),
            "--json",
            "--",
            "sh",
            "-c",
            "echo started; sleep 8; echo result > result.txt",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(state_dir),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"  # the payload runs: take its destination
        out.rmdir()
        out.write_text("the output directory went away")
        _, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    err = stderr.decode()
    assert proc.returncode == 125, err
    assert "Traceback" not in err
    assert f"--output: copying the outputs into {out} failed" in err
    assert "the command had ended: exit 0" in err
    result = json.loads(err.strip().splitlines()[-1])
    assert result["exit_code"] == 0 and result["exit_status"] == 125
    assert Path(result["boot_log_path"]).is_file()
    assert Path(result["snapshot_path"]).is_file()  # the run failed: on_failure keeps the disk
    assert result["domain"] not in glite_vm_domains()


def test_per_run_network_from_the_sites_list(state_dir: Path, guest_dir: Path) -> None:
    proc = glite_vm(
        state_dir,
        "run",
        "--image",
        str(guest_dir / "disk-boot.qcow2"),
        "--network",
        "user",
        "--keep-snapshot",
        "never",
        "--",
        "ls",
        "/sys/class/net",
        extra_env={"GLITE_VM_JOB_NETWORKS": "user"},
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.split() == [b"eth0", b"lo"]  # without --network: only lo


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


def start_and_kill(state_dir: Path, image: str) -> str:
    """A `glite-vm run` SIGKILLed while its payload runs; the name of the VM it left."""
    proc = subprocess.Popen(
        [*GLITE_VM, "run", "--image", image, "--", "sh", "-c", "echo started; sleep 300"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(state_dir),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        before = set(domains_under(state_dir / "cli"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    (left,) = before
    return left


def test_a_killed_run_is_reaped_by_the_next_run_and_by_glite_vm_reap(
    state_dir: Path, guest_dir: Path
) -> None:
    """kill -9 of a running `glite-vm run` leaves its VM; the next run takes it first, and
    where nothing else runs, `glite-vm reap` does (no service here: its own runs')."""
    image = str(guest_dir / "disk-boot.qcow2")
    killed = start_and_kill(state_dir, image)
    assert killed in glite_vm_domains(), "the killed run's VM goes on, for now"
    after = glite_vm(state_dir, "run", "--image", image, "--", "true")
    assert after.returncode == 0, after.stderr.decode()
    assert killed not in glite_vm_domains()
    events = read_events(event_log_path(state_dir / "cli"))
    (reaped,) = [e for e in events if e.vm == killed and e.event == "reaped"]
    assert reaped.reason is not None and "starter process" in reaped.reason

    again = start_and_kill(state_dir, image)
    assert again in glite_vm_domains()
    env = {**cli_env(state_dir), "GLITE_VM_SOCKET_PATH": str(state_dir / "no-service.sock")}
    reap = subprocess.run(
        [*GLITE_VM, "reap"], capture_output=True, env=env, timeout=300, check=False
    )
    assert (reap.returncode, reap.stdout) == (0, b""), reap.stderr.decode()
    assert f"{again} (uid 0)" in reap.stderr.decode()
    assert again not in glite_vm_domains()
    assert list((state_dir / "cli" / "runs").iterdir()) == []  # nor their scratch directories


def test_ones_own_vm_takes_the_hostname_asked_for(state_dir: Path, guest_dir: Path) -> None:
    proc = glite_vm(
        state_dir,
        "run",
        "--image",
        str(guest_dir / "disk-boot.qcow2"),
        "--hostname",
        "build01.example.org",
        "--",
        "hostname",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout.decode().strip() in ("build01", "build01.example.org")
