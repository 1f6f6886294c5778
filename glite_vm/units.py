"""Sizes and durations as people type them: the one parser of each, used by the settings, the
CLI and the API alike.

A size carries its unit (``20GB``, ``512MiB``, ``1.5G``); a bare number is refused where it is
ambiguous (HTCondor reads bare memory sizes as MiB, most tools as bytes), with the units to add.
A duration ends in s, m, h, d or w; timeouts and intervals may be bare seconds. Every error is a
:class:`~glite_vm.errors.RequestError` naming the field and what to write instead.
"""

from __future__ import annotations

import math

from glite_vm.errors import RequestError

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB

# --- units ------------------------------------------------------------------------------------
#
# Every size and duration a person types (CLI options, GLITE_VM_* settings from the environment,
# a TOML file or condor_config, API arguments) goes through the parsers below, so a unit means
# the same thing everywhere. The contract, also in README.md ("Sizes and durations"):
#
# * A size is a number and a binary unit: B, K/KB/KiB, M/MB/MiB, G/GB/GiB, T/TB/TiB (any case,
#   blanks allowed; "2GB" is 2 GiB, as in HTCondor's submit language). A bare number is refused
#   everywhere: HTCondor reads `request_memory = 2048` as MiB and `request_disk` as KiB, docker
#   and most tools read bytes, so whichever one glite-vm picked, someone would silently get a
#   VM, a cache budget or a retention 1024 times off. Memory is a size like any other
#   (`--memory 2GB`, `--memory 2048MiB`).
# * A duration is a number and a unit: s, m, h, d, w ("30m" is thirty minutes). A bare number is
#   seconds only where the option or setting is a timeout or an interval (`--timeout 600`,
#   GLITE_VM_BOOT_TIMEOUT = 300), as for timeout(1) and HTCondor's own knobs; an age
#   (`--max-age`, `--since`, GLITE_VM_SNAPSHOT_RETENTION) needs its unit, because "7" reads as
#   days to a person and as seconds to a program.

_SIZE_UNITS = {
    "b": 1,
    "k": KIB,
    "kb": KIB,
    "kib": KIB,
    "m": MIB,
    "mb": MIB,
    "mib": MIB,
    "g": GIB,
    "gb": GIB,
    "gib": GIB,
    "t": TIB,
    "tb": TIB,
    "tib": TIB,
}
_SIZE_EXAMPLE = "like '20GB', '512MiB' or '1.5G'"


def _split_number(text: str) -> tuple[str, str]:
    """``"30 GB"`` -> ``("30", "gb")``: the number and the lower-case unit after it."""
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    return num, s[len(num) :]


def parse_size(text: str | int, field: str = "size", *, likely: str = "GB") -> int:
    """Bytes of a size with its unit: ``"30GB"``, ``"512 MiB"``, ``"1.5G"`` (binary units).

    A bare number (``"20"``) is refused with the units to add; an ``int`` from Python code is
    taken as bytes (the type says so). Negative and non-finite sizes are refused. ``likely``
    is the unit the refusal of a bare number suggests first.
    """
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise RequestError(field, f"expected a size {_SIZE_EXAMPLE}, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise RequestError(field, f"must not be negative, got {text}")
        return text
    num, unit = _split_number(text)
    if num and not unit and _is_number(num):
        raise RequestError(
            field,
            f"{text.strip()!r} has no unit; write e.g. "
            + " or ".join(f"'{num}{u}'" for u in dict.fromkeys((likely, "GB", "MiB")))
            + " (a bare number is MiB to HTCondor and bytes to other tools; glite-vm takes "
            "none)",
        )
    if unit not in _SIZE_UNITS or not _is_number(num):
        raise RequestError(field, f"expected a size {_SIZE_EXAMPLE}, got {text!r}")
    value = float(num)
    if not math.isfinite(value) or value < 0:
        raise RequestError(field, f"must be a finite, non-negative size, got {text!r}")
    return int(value * _SIZE_UNITS[unit])


def parse_memory_mib(text: str, field: str = "memory") -> int:
    """Whole MiB (rounded up) of a memory size with its unit: ``"2GB"`` -> 2048."""
    if not isinstance(text, str):
        raise RequestError(field, f"expected a size {_SIZE_EXAMPLE}, got {text!r}")
    return math.ceil(parse_size(text, field, likely="MiB") / MIB)


def format_size(n: int) -> str:
    """Human-readable binary size: ``1.5 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION_EXAMPLE = "like '90s', '30m', '12h' or '7d'"


def parse_duration(
    text: str | float, field: str = "duration", *, bare_seconds: bool = False
) -> float:
    """Seconds of ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"``.

    ``bare_seconds``: a plain number is seconds (timeouts and intervals); otherwise it is
    refused with the units to add (ages). A ``float``/``int`` from Python code is seconds.
    Negative and non-finite durations are refused.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise RequestError(field, f"expected a duration {_DURATION_EXAMPLE}, got {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        num, unit = _split_number(text)
        if not unit and _is_number(num) and not bare_seconds:
            raise RequestError(
                field,
                f"{text.strip()!r} has no unit; write e.g. '{num}d', '{num}h' or '{num}s'",
            )
        if (unit and unit not in _DURATION_UNITS) or not _is_number(num):
            raise RequestError(field, f"expected a duration {_DURATION_EXAMPLE}, got {text!r}")
        value = float(num) * _DURATION_UNITS.get(unit, 1.0)
    if not math.isfinite(value) or value < 0:
        raise RequestError(field, f"must be a finite, non-negative duration, got {text!r}")
    return value


def parse_timeout(text: str | float, field: str = "timeout") -> float:
    """A time limit: a duration whose bare number is seconds, and which must be above zero."""
    value = parse_duration(text, field, bare_seconds=True)
    if value <= 0:
        raise RequestError(
            field, f"must be more than zero, got {text!r}; give e.g. '600' (seconds) or '10m'"
        )
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return bool(text) and text.lower() not in ("nan", "inf", "infinity")


def format_duration(seconds: float) -> str:
    """The largest whole unit up to days: ``7d``, ``36h``, ``90s``."""
    for unit in ("d", "h", "m"):
        n = _DURATION_UNITS[unit]
        if seconds >= n and seconds % n == 0:
            return f"{seconds / n:.0f}{unit}"
    return f"{seconds:g}s"
