"""Booting again on the same host when a boot failed in a way that need not recur.

A :class:`~glite_vm.errors.TransientBootError` (QEMU crashed; the guest kernel's timer check
failed under CPU contention) says nothing about the image and little about the host, so a job
gets up to ``GLITE_VM_BOOT_ATTEMPTS`` boots here before it is requeued. All attempts share one
budget of ``GLITE_VM_BOOT_TIMEOUT`` seconds, so retries never make a job wait longer than a
single boot could. Every other error ends the attempts at once: an image fault holds the job
whatever the number of tries, and a timeout already spent the budget.

Each attempt must clean up after itself when it fails (domain, overlay, lease): this module only
decides whether to try again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from glite_vm.errors import TransientBootError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: An attempt gets its number (from 1) and the seconds left of the budget.
Attempt = Callable[[int, float], T]


def boot_with_retries(
    attempt: Attempt[T],
    *,
    attempts: int,
    budget: float,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[T, int]:
    """``attempt(n, seconds_left)`` until it returns; (its result, the number of attempts).

    A TransientBootError is retried while attempts and budget last; the last one is raised with
    the count in its message. Anything else propagates from the attempt that raised it.
    """
    attempts = max(1, attempts)
    deadline = clock() + budget
    number = 1
    while True:
        left = deadline - clock()
        try:
            return attempt(number, left), number
        except TransientBootError as exc:
            if number >= attempts or deadline - clock() <= 0:
                raise TransientBootError(
                    f"{exc.what} (boot attempt {number} of at most {attempts} on this host)",
                    exc.boot_log,
                    exc.tail,
                ) from exc
            log.warning("boot attempt %d of %d failed, again: %s", number, attempts, exc.what)
            number += 1
