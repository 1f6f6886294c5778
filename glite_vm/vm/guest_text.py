"""Text a guest wrote (a command's stderr through the agent), made fit for anyone to read.

A guest is its image's and, after a job ran, its job's: what it prints can hold terminal
escapes, line breaks that forge log lines, C1 controls, invalid UTF-8 or megabytes. Errors
quote it through :func:`guest_text` only, so that the service's log, the event log, the job
ad and an admin's terminal get one bounded, printable line.
"""

from __future__ import annotations

from typing import Final

from glite_vm.vm.boot_watch import without_escapes

GUEST_TEXT_LIMIT: Final = 500  # characters of a guest's words quoted in an error


def guest_text(data: bytes, limit: int = GUEST_TEXT_LIMIT) -> str:
    """``data`` as one line: terminal escapes and carriage returns removed, line breaks
    `` | ``, other characters that are not printable (C0 and C1 controls, invalid UTF-8)
    ``?``, at most ``limit`` characters ending in ``...``."""
    text = data[: 8 * limit].decode("utf-8", "replace")
    lines = (without_escapes(line).strip() for line in text.splitlines())
    flat = " | ".join(line for line in lines if line)
    safe = "".join(c if c.isprintable() else "?" for c in flat)
    if len(safe) <= limit:
        return safe
    return safe[: limit - 3] + "..." if limit >= 3 else safe[:limit]


__all__ = ["GUEST_TEXT_LIMIT", "guest_text"]
