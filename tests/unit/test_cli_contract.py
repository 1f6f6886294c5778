"""The CLI's contract: every sub-command with broken inputs ends in one line that names the class
of the error and exit status 125 (or 1 for "done, a problem found"), never a traceback; units
mean the same everywhere; errors name the options a user typed.

Each case runs ``python -m glite_vm`` in its own process, as a user would, against a scratch
state directory. Nothing here boots a VM (every input is broken before that).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.cli.main import build_parser
from glite_vm.config import Settings
from glite_vm.errors import RequestError
from glite_vm.units import GIB, MIB, parse_duration, parse_memory_mib, parse_size

CLI = [sys.executable, "-m", "glite_vm"]
CLASS_LINE = re.compile(r"^glite-vm: (?:.*: )?(request|host|configuration) error: \S")


def leaf_commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not actions:
        yield " ".join(prefix)
        return
    for name, sub in actions[0].choices.items():
        yield from leaf_commands(sub, (*prefix, name))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: connecting is refused


PORT = closed_port()
BAD_URL = f"http://127.0.0.1:{PORT}/disk.qcow2"

#: (argv, extra environment). Every sub-command appears at least once with broken input.
CASES: list[tuple[list[str], dict[str, str]]] = [
    (["run", "--image", "/nonexistent/disk.qcow2", "--", "true"], {}),
    (["run", "--image", "./nonexistent.qcow2", "--", "true"], {}),
    (["run", "--image", "x", "--memory", "lots", "--", "true"], {}),
    (["run", "--image", "x", "--memory", "2048", "--", "true"], {}),
    (["run", "--image", "x", "--timeout", "-1", "--", "true"], {}),
    (["run", "--image", "x", "--timeout", "0", "--", "true"], {}),
    (["run", "--image", "x", "--output", "/proc/no/such", "--", "true"], {}),
    (["run", "--image", "x", "--env", "=oops", "--", "true"], {}),
    (["run", "--image", "x", "--network", "a b", "--", "true"], {}),
    (["run", "--image", BAD_URL, "--", "true"], {}),
    (["run", "--image"], {}),
    (["run", "--image", "x", "--", "true"], {"GLITE_VM_CACHE_MAX_BYTES": "20"}),
    (["doctor"], {"GLITE_VM_LIBVIRT_URI": "nosuchdriver:///x"}),
    (["doctor", "--bogus"], {}),
    (["vms", "list"], {"GLITE_VM_LIBVIRT_URI": "nosuchdriver:///x"}),
    (["vms", "destroy", "nope"], {"GLITE_VM_LIBVIRT_URI": "nosuchdriver:///x"}),
    (["vms", "destroy"], {}),
    (["vms", "release", "glite-vm-nope"], {}),
    (["vms", "release"], {}),
    (["images", "list"], {"GLITE_VM_CATALOGUE": BAD_URL}),
    (["images", "list"], {"GLITE_VM_CATALOGUE": "file:///nonexistent/catalogue.json"}),
    (["images", "pull", BAD_URL], {}),
    (["images", "pull", "/nonexistent.qcow2", "--sha256", "xyz"], {}),
    (["images", "warm", "no-such-image"], {"GLITE_VM_CATALOGUE": "file:///nonexistent/c.json"}),
    (["cache", "status"], {"GLITE_VM_CACHE_DIR": "/proc/version"}),
    (["cache", "prune", "--to", "20"], {}),
    (["cache", "prune", "--to", "-5GB"], {}),
    (["cache", "verify"], {"GLITE_VM_CACHE_DIR": "/proc/version"}),
    (["catalogue", "build", "/nonexistent"], {}),
    (["catalogue", "build", "/proc/self"], {}),
    (["config", "--slots", "0"], {}),
    (["config", "--memory", "2048"], {}),
    (["config", "-o", "/nonexistent/dir/60-glite-vm.conf"], {}),
    (["hook", "install", "/proc/no/such"], {}),
    (["hook", "install", "/tmp/x", "--python", "python3"], {}),
    (["advertise"], {"GLITE_VM_CACHE_MAX_BYTES": "20"}),
    (["serve", "--socket", "/nonexistent/dir/s.sock"], {"GLITE_VM_LIBVIRT_URI": "nosuch:///x"}),
    (["reap", "--socket", "/nonexistent/dir/s.sock"], {}),
    (["shell"], {}),  # no service at GLITE_VM_SOCKET_PATH
    (["shell", "vm1", "vm2"], {}),
    (["shell", "vm1", "--"], {}),
    (["shell", "--socket", "/nonexistent/dir/s.sock", "vm1", "--", "id"], {}),
    (["console"], {}),
    (["console", "--socket", "/nonexistent/dir/s.sock", "vm1"], {}),
    (["events", "--since", "7"], {}),
    (["events", "--since", "yesterday"], {}),
    (["events", "-n", "many"], {}),
    (["snapshots", "list"], {"GLITE_VM_SNAPSHOT_RETENTION": "7"}),
    (["snapshots", "show", "nope"], {}),
    (["snapshots", "boot", "--memory", "512", "nope"], {}),
    (["snapshots", "boot", "nope", "--memory", "1GB"], {}),
    (["snapshots", "boot", "nope"], {}),
    (["snapshots", "export", "nope", "/nonexistent/dir/x.qcow2"], {}),
    (["snapshots", "prune", "--max-bytes", "20"], {}),
    (["snapshots", "prune", "--max-age", "7"], {}),
    (["ca", "init", "/proc/no/such"], {}),
    (["ca", "init", "/tmp/x", "--days", "0"], {}),
    (
        [
            "ca",
            "issue",
            "vm.example.org",
            "--ca-cert",
            "/nonexistent/ca.pem",
            "--ca-key",
            "/nonexistent/ca.key",
            "--cert-dir",
            "/nonexistent/certs",
        ],
        {},
    ),
    (["ca", "issue", "../escape", "--cert-dir", "/tmp/x"], {}),
    (["no-such-command"], {}),
]


@pytest.fixture(scope="module")
def base_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-contract")
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(root),
        "GLITE_VM_CONFIG": str(root / "no-config.toml"),
        "GLITE_VM_STATE_DIR": str(root / "state"),
        "GLITE_VM_SOCKET_PATH": str(root / "no.sock"),
        "GLITE_VM_HYPERVISOR": "qemu",  # no KVM probe: these runs are about errors
        "GLITE_VM_CATALOGUE": (root / "no-catalogue.json").as_uri(),
    }


def test_every_sub_command_has_broken_inputs_below() -> None:
    covered = {" ".join(w for w in argv if not w.startswith("-"))[:40] for argv, _ in CASES}
    for command in leaf_commands(build_parser()):
        assert any(c.startswith(command) for c in covered), f"no broken-input case for {command}"


@pytest.mark.parametrize(
    ("argv", "env"), CASES, ids=[" ".join(a).replace(BAD_URL, "BAD_URL")[:60] for a, _ in CASES]
)
def test_broken_input_ends_in_a_classified_error_never_a_traceback(
    argv: list[str], env: dict[str, str], base_env: dict[str, str]
) -> None:
    proc = subprocess.run(
        [*CLI, *argv],
        env={**base_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    shown = f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    assert "Traceback" not in proc.stdout + proc.stderr, shown
    assert "internal error" not in proc.stderr, shown  # an exception nobody classified
    assert proc.returncode in (1, 125), shown
    if proc.returncode == 125:
        assert any(CLASS_LINE.match(line) for line in proc.stderr.splitlines()), shown
    # urllib3's and Python's internals are not messages
    for leak in ("HTTPConnectionPool", "object at 0x", "Max retries", "Errno"):
        assert leak not in proc.stderr, shown


def run_cli(base_env: dict[str, str], *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *argv],
        env={**base_env, **env},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_what_the_errors_say(base_env: dict[str, str]) -> None:
    refused = run_cli(base_env, "run", "--image", BAD_URL, "--", "true")
    assert f"host error: cannot fetch {BAD_URL}: connection refused" in refused.stderr
    build = run_cli(base_env, "catalogue", "build", "/nonexistent")
    assert "request error: /nonexistent is not a directory" in build.stderr  # the user's input
    prune = run_cli(base_env, "cache", "prune", "--to", "20")
    assert "request error: --to: '20' has no unit; write e.g. '20GB' or '20MiB'" in prune.stderr
    setting = run_cli(base_env, "cache", "status", GLITE_VM_CACHE_MAX_BYTES="20")
    assert "configuration error: setting GLITE_VM_CACHE_MAX_BYTES: '20' has no unit" in (
        setting.stderr
    )
    usage = run_cli(base_env, "cache", "prune", "--too", "20GB")
    assert usage.returncode == 125 and "request error" in usage.stderr


def test_a_bare_file_name_is_a_catalogue_name_and_the_cli_says_how_to_mean_the_file(
    base_env: dict[str, str], tmp_path: Path
) -> None:
    (tmp_path / "my.qcow2").write_bytes(b"")
    proc = subprocess.run(
        [*CLI, "run", "--image", "my.qcow2", "--", "true"],
        env=base_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 125
    assert "write --image ./my.qcow2" in proc.stderr, proc.stderr


# --- the unit contract --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20GB", 20 * GIB), ("20 GiB", 20 * GIB), ("512MiB", 512 * MIB), ("1.5g", 3 * GIB // 2)],
)
def test_sizes_take_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["20", "0", "2048", "20 ", "1e3"])
def test_a_bare_size_is_refused_with_the_units_to_add(text: str) -> None:
    with pytest.raises(RequestError, match=r"has no unit; write e\.g\."):
        parse_size(text, "--to")


def test_memory_is_a_size_like_any_other() -> None:
    assert parse_memory_mib("2GB") == parse_memory_mib("2048MiB") == parse_memory_mib("2GiB")
    assert parse_memory_mib("2GB") == 2048
    with pytest.raises(RequestError, match=r"'2048MiB'"):
        parse_memory_mib("2048", "--memory")


def test_durations_need_a_unit_except_where_seconds_are_the_rule() -> None:
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("30m") == 1800  # minutes, not months or MiB
    assert parse_duration("600", bare_seconds=True) == 600
    with pytest.raises(RequestError, match="has no unit"):
        parse_duration("7", "--max-age")


def test_settings_read_the_same_units_from_every_layer(tmp_path: Path) -> None:
    toml = tmp_path / "config.toml"
    toml.write_text('cache_max_bytes = "20GB"\ndefault_memory_mib = "1GiB"\nboot_timeout = 90\n')
    s = Settings.load({"GLITE_VM_CONFIG": str(toml), "GLITE_VM_LOCK_TIMEOUT": "10m"})
    assert (s.cache_max_bytes, s.default_memory_mib, s.boot_timeout) == (20 * GIB, 1024, 90.0)
    assert s.lock_timeout == 600.0
    toml.write_text("cache_max_bytes = 20\n")
    with pytest.raises(ValueError, match="GLITE_VM_CACHE_MAX_BYTES: '20' has no unit"):
        Settings.load({"GLITE_VM_CONFIG": str(toml)})
    for knob, value in (
        ("GLITE_VM_DEFAULT_MEMORY_MIB", "2048"),
        ("GLITE_VM_BOOT_TIMEOUT", "0"),
        ("GLITE_VM_REAP_INTERVAL", "-1"),
        ("GLITE_VM_MAX_CPUS", "2GB"),
        ("GLITE_VM_SNAPSHOT_RETENTION", "7"),
        ("GLITE_VM_JOB_NETWORKS", "user, b@d"),
    ):
        with pytest.raises(ValueError, match=knob):
            Settings.load({"GLITE_VM_CONFIG": "/nonexistent", knob: value})


def test_condor_config_knobs_follow_the_same_units(tmp_path: Path) -> None:
    """The third layer, HTCondor's configuration (read through the real htcondor2 bindings)."""
    config = tmp_path / "condor_config"
    script = (
        "from glite_vm.config import Settings\n"
        "s = Settings.load({'GLITE_VM_CONFIG': '/nonexistent'}, use_condor=True)\n"
        "print(s.cache_max_bytes, s.default_memory_mib)\n"
    )

    def load(text: str) -> subprocess.CompletedProcess[str]:
        config.write_text(text)
        return subprocess.run(
            [sys.executable, "-c", script],
            env={"PATH": os.environ.get("PATH", ""), "CONDOR_CONFIG": str(config)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    good = load("GLITE_VM_CACHE_MAX_BYTES = 20GB\nGLITE_VM_DEFAULT_MEMORY_MIB = 2GiB\n")
    assert good.stdout.split() == [str(20 * GIB), "2048"], good.stderr
    bad = load("GLITE_VM_CACHE_MAX_BYTES = 20\n")
    assert bad.returncode != 0 and "GLITE_VM_CACHE_MAX_BYTES: '20' has no unit" in bad.stderr


def test_an_http_server_that_never_answers_is_named_in_words(base_env: dict[str, str]) -> None:
    with socket.socket() as server:  # accepts connections (the backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        url = f"http://127.0.0.1:{server.getsockname()[1]}/disk.qcow2"
        proc = run_cli(base_env, "images", "pull", url, GLITE_VM_DOWNLOAD_TIMEOUT="1")
    assert proc.returncode == 125
    assert f"host error: cannot fetch {url}: no answer in time" in proc.stderr, proc.stderr
    assert "Read timed out" not in proc.stderr and "HTTPConnectionPool" not in proc.stderr


def test_vms_list_columns_line_up_whatever_the_widths(capsys: pytest.CaptureFixture[str]) -> None:
    from glite_vm.cli.vms import _print_vms  # noqa: PLC0415

    rows: list[dict[str, object]] = [
        {
            "name": "glite-vm-a-rather-long-owner-name-local-1796414577-26381-f65f10",
            "state": "running",
            "owner": "a-rather-long-owner-name",
            "job": "local-1796414577-26381",
            "image": "debian-12",
            "age_seconds": 5,
        },
        {
            "name": "glite-vm-bob-1.0-0a1b2c",
            "state": "defined",
            "owner": "bob",
            "job": "1.0",
            "image": "/srv/images/custom.qcow2",
            "age_seconds": 86400,
        },
    ]
    _print_vms(rows)
    lines = capsys.readouterr().out.splitlines()
    header = lines[0]
    for column in ("STATE", "OWNER", "JOB", "IMAGE"):  # left-aligned: each starts in one place
        at = header.index(column)
        for line in lines[1:]:
            assert line[at - 2 : at] == "  " and line[at] != " ", (column, lines)
    age_end = header.index("AGE") + len("AGE")  # right-aligned: each ends in one place
    for line in lines[1:]:
        assert line[age_end - 1] != " " and line[age_end : age_end + 2] == "  ", lines


def test_the_cli_and_the_launcher_share_one_failure_status() -> None:
    from glite_vm.cli.common import EXIT_FAILURE  # noqa: PLC0415
    from glite_vm.condor.launcher import LAUNCHER_FAILURE_EXIT  # noqa: PLC0415

    assert EXIT_FAILURE == LAUNCHER_FAILURE_EXIT == 125  # docs: README "Exit statuses"
