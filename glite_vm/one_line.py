"""Any text made one bounded, printable line: how a message reaches a person.

Texts that end up in a job ad, the event log, the service's log or a terminal can hold what
their writer chose: a guest's stderr, a job's chirped words, an error quoting either. Both ways
out, :func:`glite_vm.vm.guest_text.guest_text` (a guest's bytes) and
:func:`glite_vm.condor.jobad.ad_safe_text` (a job ad's strings), flatten through
:func:`one_line`, so one rule says what a reader may see.
"""

from __future__ import annotations


def one_line(text: str, limit: int) -> str:
    """``text`` as one line of at most ``limit`` characters.

    Line breaks (every Unicode line boundary) become `` | `` and blank lines go; tabs become
    blanks; every other character that is not printable (C0 and C1 controls, DEL, format
    characters such as bidi overrides, spaces other than the blank) becomes ``?``; a longer
    text is cut to ``limit`` characters ending in ``...``."""
    lines = (line.strip() for line in text.splitlines())
    safe = printable(" | ".join(line for line in lines if line).replace("\t", " "))
    if len(safe) <= limit:
        return safe
    return safe[: limit - 3] + "..." if limit >= 3 else safe[:limit]


def printable(text: str) -> str:
    """``text`` with every character that is not printable (controls, terminal escapes' ESC
    and CSI, line breaks, lone surrogates) shown as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


__all__ = ["one_line", "printable"]
