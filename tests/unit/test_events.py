"""The service's event log and `glite-vm events`: what an admin reads after a VM vanished."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from glite_vm.cli.main import main as glite_vm
from glite_vm.service.events import (
    ABANDONED,
    REAPED,
    STARTED,
    EventLog,
    event_log_path,
    read_events,
)


def _log(state: Path) -> EventLog:
    return EventLog(event_log_path(state))


def test_events_are_json_lines_with_only_the_fields_that_apply(tmp_path: Path) -> None:
    log = _log(tmp_path)
    log.record(STARTED, "vm-a", job="12.0", uid=1001)
    log.record(
        REAPED,
        "vm-a",
        job="12.0",
        uid=1001,
        reason="its starter process 9 is gone",
        snapshot="/s/vm-a/snapshot.qcow2",
        failed=True,
    )
    lines = event_log_path(tmp_path).read_text().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "event", "vm", "job", "uid"}
    assert second["reason"] == "its starter process 9 is gone" and second["failed"] is True
    assert (event_log_path(tmp_path).stat().st_mode & 0o777) == 0o640
    assert [e.event for e in read_events(event_log_path(tmp_path))] == [STARTED, REAPED]


def test_the_log_rotates_once_and_keeps_the_previous_file(tmp_path: Path) -> None:
    log = EventLog(event_log_path(tmp_path), max_bytes=400)
    for n in range(12):
        log.record(STARTED, f"vm-{n}", job=f"{n}.0", uid=1000)
    path = event_log_path(tmp_path)
    assert path.stat().st_size <= 400
    assert path.with_name(path.name + ".1").exists()
    names = [e.vm for e in read_events(path)]
    assert names == sorted(names, key=lambda v: int(v.split("-")[1]))  # oldest first
    assert names[-1] == "vm-11" and len(names) < 12  # older ones rotated away, none reordered


def test_lines_from_many_threads_stay_whole(tmp_path: Path) -> None:
    log = _log(tmp_path)

    def write(t: int) -> None:
        for n in range(50):
            log.record(STARTED, f"vm-{t}-{n}", reason="x" * 300)

    threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(list(read_events(event_log_path(tmp_path)))) == 200


def test_unreadable_lines_are_skipped_not_fatal(tmp_path: Path) -> None:
    path = event_log_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(
        'not json\n{"no": "event"}\n[1, 2]\n{"event": "started", "vm": "v", "time": "t"}\n'
    )
    assert [e.vm for e in read_events(path)] == ["v"]


def test_a_log_that_cannot_be_written_does_not_raise(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = EventLog(blocker / "service" / "events.jsonl")  # its parent is a file
    assert log.record(STARTED, "vm").vm == "vm"


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GLITE_VM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("GLITE_VM_STATE_DIR", str(tmp_path))
    log = _log(tmp_path)
    log.record(STARTED, "vm-a", job="1.0", uid=1001)
    log.record(STARTED, "vm-b", job="2.0", uid=1002)
    log.record(ABANDONED, "vm-b", job="2.0", uid=1002, reason="its caller hung up")
    log.record(
        REAPED,
        "vm-a",
        job="1.0",
        uid=1001,
        reason="its scratch directory /x is gone",
        snapshot="/s/snapshot.qcow2",
        failed=True,
    )
    return tmp_path


def test_glite_vm_events_filters_by_vm_job_and_kind(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert glite_vm(["events", "--vm", "vm-a"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == ["started", "reaped"]
    assert "its scratch directory /x is gone; snapshot /s/snapshot.qcow2; failed" in out[1]

    assert glite_vm(["events", "--job", "2.0", "--event", "abandoned", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["reason"] == "its caller hung up"

    assert glite_vm(["events", "-n", "1"]) == 0
    assert capsys.readouterr().out.split()[1] == "reaped"

    assert glite_vm(["events", "--since", "1h"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 4


def test_glite_vm_events_shows_no_terminal_escapes_from_a_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reason can quote a guest (what a hostile image wrote) or a line written before that
    text was made safe: what the admin's terminal gets is printable, one line per event."""
    monkeypatch.setenv("GLITE_VM_STATE_DIR", str(tmp_path))
    hostile = "\x1b]0;owned\x07\x1b[2J\x9b31m\x7f HoldReason = 1\nforged\r\u2028line"
    _log(tmp_path).record(ABANDONED, "vm-\x1b[31m", job="3.0\x1b[0m", uid=1, reason=hostile)
    assert glite_vm(["events"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert [c for c in line if not c.isprintable()] == []
    assert "HoldReason = 1?forged?" in line


def test_glite_vm_events_says_what_is_wrong(
    state: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert glite_vm(["events", "--since", "yesterday"]) == 125
    assert "--since" in capsys.readouterr().err
    assert glite_vm(["events", "--since", "7"]) == 125  # 7 what? the unit is required
    assert "--since" in capsys.readouterr().err

    monkeypatch.setenv("GLITE_VM_STATE_DIR", str(tmp_path / "elsewhere"))
    assert glite_vm(["events"]) == 0
    assert "does not exist yet" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another user")
def test_a_non_root_reader_is_told_what_it_cannot_read(state: Path) -> None:
    event_log_path(state).chmod(0o600)

    def events_as_nobody(config: str) -> subprocess.CompletedProcess[str]:
        cli = "import sys; from glite_vm.cli.main import main; sys.exit(main())"
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
        return subprocess.run(
            [*nobody, sys.executable, "-c", cli, "events"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "GLITE_VM_STATE_DIR": str(state), "GLITE_VM_CONFIG": config},
            cwd="/",
            check=False,
        )

    # The test's config path lies in root's private temporary directory.
    unreachable = events_as_nobody(os.environ["GLITE_VM_CONFIG"])
    assert unreachable.returncode == 125
    assert "cannot read the configuration file" in unreachable.stderr, unreachable.stderr
    refused = events_as_nobody("/nonexistent/config.toml")
    assert refused.returncode == 125, refused.stderr
    assert "request error" in refused.stderr and "readable by root only" in refused.stderr
