"""The service's event log: one JSON object per line, for admins asking "what happened to the
VM of job 123.0, and why".

The log lives at ``<state dir>/service/events.jsonl`` (root, 0640). Every VM the service
starts, adopts, tears down, reaps or sweeps up gets a line; a teardown the job did not ask for
(the reaper, a caller that hung up, a failed boot, a crash recovered at start) carries its
``reason``. Fields: ``time`` (ISO 8601, UTC), ``event``, ``vm``, ``job``, ``uid`` and, when
known, ``reason``, ``snapshot`` and ``failed``. When the file passes :data:`MAX_BYTES` it is
renamed to ``events.jsonl.1`` (replacing the previous one) and a new file is started, so the
log costs at most twice that on disk.

Writing never raises: losing a line is better than failing a job over its log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_BYTES = 8 << 20
FILE_NAME = "events.jsonl"

# What the ``event`` field may say.
STARTED = "started"  # a VM exists for a job (its domain was defined and started)
ADOPTED = "adopted"  # a restarted service took over a VM it had made before
TORN_DOWN = "torn_down"  # the job's own teardown (JOB_EXIT, or the launcher's caller)
REAPED = "reaped"  # torn down because its job is gone; ``reason`` says how the reaper knew
ABANDONED = "abandoned"  # torn down because preparing it failed or its caller hung up
SWEPT = "swept"  # a VM directory left half-made by a crash, cleaned up
# a VM was to be restored from a template that failed; ``reason`` says how, and it booted cold
WARM_FALLBACK = "warm_fallback"
#: a job's VM kept running after its payload failed (``reason``: for how long, and what the site
#: changed of what the job asked), or a job that asked for it and was not granted it
DEBUG_HELD = "debug_held"
DEBUG_NOT_HELD = "debug_not_held"
DEBUG_HOLD_ENDED = "debug_hold_ended"  # ``reason``: expired, released, torn_down, stopped
EVENTS = (
    STARTED,
    ADOPTED,
    TORN_DOWN,
    REAPED,
    ABANDONED,
    SWEPT,
    DEBUG_HELD,
    DEBUG_NOT_HELD,
    DEBUG_HOLD_ENDED,
    WARM_FALLBACK,
)


@dataclasses.dataclass(frozen=True)
class Event:
    time: str
    event: str
    vm: str
    job: str | None = None
    uid: int | None = None
    reason: str | None = None
    snapshot: str | None = None
    failed: bool | None = None

    def to_json(self) -> str:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return json.dumps(data, ensure_ascii=False, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


class EventLog:
    """Appends events to ``path`` (thread-safe within one process)."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()

    def record(
        self,
        event: str,
        vm: str,
        *,
        job: str | None = None,
        uid: int | None = None,
        reason: str | None = None,
        snapshot: str | None = None,
        failed: bool | None = None,
    ) -> Event:
        entry = Event(
            time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            event=event,
            vm=vm,
            job=job,
            uid=uid,
            reason=reason,
            snapshot=snapshot,
            failed=failed,
        )
        line = (entry.to_json() + "\n").encode()
        with self._lock:
            try:
                self._append(line)
            except OSError as exc:
                log.warning("cannot write to the event log %s: %s", self.path, exc)
        return entry

    def _append(self, line: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            if self.path.stat().st_size + len(line) > self.max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
        except FileNotFoundError:
            pass
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, line)  # one write of one line: O_APPEND keeps lines whole
        finally:
            os.close(fd)


def read_events(path: Path) -> Iterator[Event]:
    """The events in ``path`` and its rotated predecessor, oldest first; bad lines skipped."""
    for p in (path.with_name(path.name + ".1"), path):
        try:
            text = p.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            continue
        # "\n" alone ends a line: str.splitlines would also split inside a reason's U+2028,
        # or U+0085 (JSON leaves them raw), and the event would be lost
        for raw in text.split("\n"):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw)
                if isinstance(data, dict) and isinstance(data.get("event"), str):
                    yield Event.from_dict(data)
            except (ValueError, TypeError):
                continue


def event_log_path(state_dir: Path) -> Path:
    return state_dir / "service" / FILE_NAME


__all__ = ["EVENTS", "Event", "EventLog", "event_log_path", "read_events"]
