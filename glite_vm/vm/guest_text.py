"""Text a guest wrote (a command's stderr through the agent), made fit for anyone to read.

A guest is its image's and, after a job ran, its job's: what it prints can hold terminal
escapes, line breaks that forge log lines, C1 controls, invalid UTF-8 or megabytes. Errors
quote it through :func:`guest_text` only (the escapes go, then the rule every message to a
person follows: :mod:`glite_vm.one_line`), so that the service's log, the event log, the job
ad and an admin's terminal get one bounded, printable line.
"""

from __future__ import annotations

from typing import Final

from glite_vm.one_line import one_line
from glite_vm.vm.boot_watch import without_escapes

GUEST_TEXT_LIMIT: Final = 500  # characters of a guest's words quoted in an error


def guest_text(data: bytes, limit: int = GUEST_TEXT_LIMIT) -> str:
    """``data`` as one line: terminal escapes removed, then :func:`~glite_vm.one_line.one_line`
    (line breaks `` | ``, what is not printable ``?``, at most ``limit`` characters)."""
    text = data[: 8 * limit].decode("utf-8", "replace")
    return one_line("\n".join(without_escapes(line) for line in text.splitlines()), limit)


__all__ = ["GUEST_TEXT_LIMIT", "guest_text"]
