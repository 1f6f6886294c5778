"""A bandwidth cap for downloads that may take their time (pre-staging): a
:data:`~glite_vm.images.download.Progress` callback that sleeps until the bytes received so
far are no more than the rate allows. Pure apart from the injected clock and sleep."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class RateLimit:
    """``progress(done, total)`` that holds the caller back to ``bytes_per_second`` on
    average, over all the files of one acquisition (``done`` starts again at each file).

    ``stop``: when set, the limiter stops sleeping (a service shutting down does not wait
    for a throttled download; the partial file is resumed later)."""

    def __init__(
        self,
        bytes_per_second: int,
        *,
        stop: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"a rate must be positive, got {bytes_per_second}")
        self.rate = bytes_per_second
        self._stop = stop or threading.Event()
        self._clock = clock
        self._sleep = sleep or self._stop.wait
        self._started: float | None = None
        self._carried = 0  # bytes of earlier files
        self._last = 0  # ``done`` of the last call
        self.held_back = 0.0  # seconds the caller was made to wait, in all

    @property
    def received(self) -> int:
        return self._carried + self._last

    def __call__(self, done: int, total: int | None) -> None:
        now = self._clock()
        if self._started is None:
            self._started = now
        if done <= self._last:  # the next file (within one, every chunk adds bytes)
            self._carried += self._last
        self._last = done
        ahead = self.received / self.rate - (now - self._started)
        if ahead > 0 and not self._stop.is_set():
            self.held_back += ahead
            self._sleep(ahead)
