"""A download progress bar for terminals; silent when stderr is not a TTY (batch jobs)."""

from __future__ import annotations

import time
from typing import TextIO

from glite_vm.units import format_size


class ProgressBar:
    """Callable as ``progress(done_bytes, total_bytes_or_None)``; redraws at most 10 times/s."""

    def __init__(self, label: str, stream: TextIO, *, force: bool = False) -> None:
        self.label = label
        self.stream = stream
        self.enabled = force or stream.isatty()
        self._last = 0.0
        self._drawn = False
        self._start = time.monotonic()

    def update(self, done: int, total: int | None) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and (total is None or done < total):
            return
        self._last = now
        rate = done / max(now - self._start, 1e-6)
        if total:
            frac = min(done / total, 1.0)
            filled = int(frac * 30)
            bar = "#" * filled + "-" * (30 - filled)
            text = f"{self.label} [{bar}] {frac:6.1%} {format_size(done)}/{format_size(total)}"
        else:
            text = f"{self.label} {format_size(done)}"
        text += f" {format_size(int(rate))}/s"
        self.stream.write("\r" + text[:120].ljust(80))
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
