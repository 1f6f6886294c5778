"""Living under the condor_starter: what the hooks and the launcher, both run by the starter
as the job owner, share. The bootstrapper service is reached through :func:`connect` only (its
client is wired in one place); attributes go into the schedd's job ad through :class:`Chirp`;
ads arrive in the old syntax (:func:`parse_old_ad`); the starter's stop signals become
:class:`Stopped`; and a call into the service is bounded by :func:`call_with_deadline`.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Final, Protocol, TypeVar

import classad2

from glite_vm.condor.jobad import AdValue, chirp_literal
from glite_vm.config import Settings
from glite_vm.errors import HostError
from glite_vm.service.api import VmService

T = TypeVar("T")

#: Seconds the cleanup after a failed or abandoned PREPARE_JOB or payload may take at most, beyond
#: ``GLITE_VM_TEARDOWN_TIMEOUT``.
CLEANUP_MARGIN: Final = 15.0
#: Seconds one chirp connection may take (HTChirp's socket timeout).
CHIRP_TIMEOUT: Final = 5.0
#: Signals with which the starter stops a hook or job (condor_rm, hold, vacate, shutdown).
STOP_SIGNALS: Final = (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP)


# --- the service and chirp -------------------------------------------------------------------


def connect(settings: Settings) -> VmService:
    """The bootstrapper service, as hooks and launcher reach it (its Unix socket)."""
    from glite_vm.service.client import ServiceClient  # noqa: PLC0415 - keeps hooks light

    return ServiceClient.from_settings(settings)


ServiceFactory = Callable[[Settings], VmService]


class Chirp(Protocol):
    """Puts attributes into the schedd's copy of the job ad."""

    def set_attributes(self, attributes: Mapping[str, AdValue]) -> None: ...


class HTChirpSender:
    """:class:`Chirp` through the starter's chirp server (``htcondor2.htchirp``).

    A failure (no ``+WantIOProxy``, server gone, timeout) is reported to ``warn`` and otherwise
    ignored: the attributes are for the user's information, the job does not depend on them.
    """

    def __init__(self, warn: Callable[[str], None], timeout: float = CHIRP_TIMEOUT) -> None:
        self._warn = warn
        self._timeout = timeout

    def set_attributes(self, attributes: Mapping[str, AdValue]) -> None:
        if not attributes:
            return
        config = os.environ.get("_CONDOR_CHIRP_CONFIG", ".chirp.config")
        if not os.path.isfile(config):
            self._warn(
                "cannot put GliteVm* attributes into the job ad: no chirp server "
                "(add +WantIOProxy = true to the submit file)"
            )
            return
        try:
            from htcondor2.htchirp import (  # type: ignore[import-untyped]  # noqa: PLC0415
                HTChirp,
            )

            with HTChirp(timeout=self._timeout) as chirp:
                for name, value in attributes.items():
                    chirp.set_job_attr(name, chirp_literal(value))
        except Exception as exc:  # the module raises bare Exceptions and socket errors
            self._warn(f"chirping {', '.join(attributes)} failed: {exc}")


# --- the ads HTCondor hands over -------------------------------------------------------------


def parse_old_ad(text: str, what: str) -> classad2.ClassAd:
    """A job or machine ad in the old syntax HTCondor hands to hooks."""
    try:
        ad = classad2.parseOne(text, classad2.ParserType.Old)
    except Exception as exc:  # the bindings raise ClassAdException / ValueError alike
        raise HostError(f"cannot parse the {what} HTCondor gave the hook: {exc}") from None
    if not isinstance(ad, classad2.ClassAd) or len(ad) == 0:
        raise HostError(f"HTCondor gave the hook an empty {what}")
    return ad


# --- bounded calls and stop signals ----------------------------------------------------------


class Stopped(BaseException):
    """The process got a stop signal; ``signum`` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def raise_on_stop_signals() -> None:
    """Turn the starter's stop signals into :class:`Stopped` in the main thread, once."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        for sig in STOP_SIGNALS:  # a second signal must not interrupt the cleanup
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


class DeadlineExceeded(HostError, TimeoutError):
    """A call into the service did not return within the hook's own bound."""


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """``fn()`` in a daemon thread; :class:`DeadlineExceeded` if it has not returned in time.

    The thread is abandoned on timeout (the process exits soon after): calls into the service
    block in socket reads that only the process's end interrupts.
    """
    outcome: list[tuple[bool, object]] = []
    done = threading.Event()

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))
        finally:
            done.set()

    threading.Thread(target=run, name=what, daemon=True).start()
    if not done.wait(max(seconds, 0.0)):
        raise DeadlineExceeded(f"{what} did not finish within {seconds:.0f} s")
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[return-value]
    assert isinstance(value, BaseException)
    raise value
