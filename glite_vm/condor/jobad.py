"""Job ad in, hook output out. Pure: no I/O, no daemons.

:func:`request_from_job_ad` turns the starter's copy of a job ad (a ``classad2.ClassAd`` or a
plain mapping) plus the slot's facts into a validated :class:`~glite_vm.request.VMRequest`; every
way a job ad can be wrong ends in a hold-class :class:`~glite_vm.errors.UserError` whose message
names the attribute to fix. The other functions format what the hooks print.

HTCondor facts this module relies on (measured on 25.0.13, see docs/condor.md):

* The starter reads PREPARE_JOB's stdout one ``Name = value`` line at a time with old-ClassAd
  string rules: a backslash is an ordinary character and only ``\\"`` stands for a quote (a
  backslash before the closing quote stays a backslash); there is no way to write a line break.
  Chirp's ``set_job_attr`` reads values the same way. :func:`format_ad_updates` and
  :func:`chirp_literal` write strings accordingly; ``classad2.quote`` (new-ClassAd escapes) would
  arrive with its escapes as literal text.
* A PREPARE_JOB failure with ``HookStatusCode`` >= 300 puts the job back to Idle and counts it
  in ``NumVacatesByReason.StarterError``; ``NumJobStarts`` stays 0 (the job never started) and
  ``NumShadowStarts`` also counts failed claim activations, so neither counts host failures.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Final

import classad2

from glite_vm.config import Settings
from glite_vm.errors import (
    AccessDeniedError,
    AgentError,
    BootError,
    CacheFullError,
    ChecksumMismatchError,
    DownloadError,
    GliteVmError,
    GuestUserError,
    HostError,
    HypervisorError,
    ImageBootError,
    ImageRefusedError,
    LockTimeoutError,
    RequestError,
    RootNotPermittedError,
    ServiceUnavailableError,
    TransientBootError,
    UnknownImageError,
    UserError,
)
from glite_vm.images.sources import classify_ref
from glite_vm.one_line import one_line
from glite_vm.request import DEBUG_HOLD_FIELD, JobRequest, KeepSnapshot, check_debug_hold
from glite_vm.vm.record import HOST_FAILURES

# --- hook status codes (HoldReasonSubCode of held jobs; periodic_release can key on them) ------

#: 1-299 hold the job (HoldReasonCode 19, HoldReasonSubCode = the code); >= 300 requeue it.
HOLD_CODES: Final[Mapping[type[GliteVmError], int]] = {
    UserError: 1,
    RequestError: 10,
    UnknownImageError: 11,
    ChecksumMismatchError: 12,
    ImageRefusedError: 13,
    RootNotPermittedError: 14,
    AccessDeniedError: 15,
    ImageBootError: 16,
    GuestUserError: 17,
}
#: Held because the job failed on too many hosts in a row (each failure alone would requeue).
HOST_FAILURES_HOLD_CODE: Final = 20
REQUEUE_CODES: Final[Mapping[type[GliteVmError], int]] = {
    GliteVmError: 300,
    HostError: 300,
    HypervisorError: 301,
    DownloadError: 302,
    CacheFullError: 303,
    LockTimeoutError: 304,
    BootError: 305,
    AgentError: 306,
    ServiceUnavailableError: 307,
    TransientBootError: 308,
}
#: An exception glite-vm did not raise on purpose: the host is at fault until shown otherwise.
UNEXPECTED_ERROR_CODE: Final = 399

#: Job attribute in which the hooks accumulate the reasons of earlier host failures (via chirp).
HOST_FAILURES_ATTR: Final = HOST_FAILURES
MAX_MESSAGE: Final = 1000
MAX_HISTORY: Final = 2000
_ATTR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_INT64 = (-(2**63), 2**63 - 1)
_MISSING: Final = object()

AdValue = str | bool | int | float | Path


# --- reading ads ---------------------------------------------------------------------------


def _is_expression(value: object) -> bool:
    return isinstance(value, classad2.ExprTree)


def _shown(value: object, limit: int = 60) -> str:
    text = str(value) if _is_expression(value) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Ad:
    """Case-insensitive reads of a ClassAd or a plain mapping that never raise unclassified."""

    def __init__(self, ad: Mapping[str, object]) -> None:
        self._ad = ad
        self._is_classad = isinstance(ad, classad2.ClassAd)
        self._lowered: dict[str, object] = (
            {} if self._is_classad else {str(k).lower(): v for k, v in ad.items()}
        )
        self._scope: object = ad if self._is_classad else None

    def raw(self, name: str) -> object:
        """The attribute as written (an ``ExprTree`` for expressions); ``_MISSING`` if absent."""
        if self._is_classad:
            try:
                value = self._ad[name]
            except KeyError:
                return _MISSING
            except Exception as exc:  # the C extension raises various types
                raise RequestError(name, f"cannot be read: {exc}") from None
        else:
            value = self._lowered.get(name.lower(), _MISSING)
        if value is None or value is classad2.Value.Undefined:
            return _MISSING
        if value is classad2.Value.Error:
            raise RequestError(
                name, "is the ClassAd value error; fix or remove it in the submit file"
            )
        return value

    def evaluate(self, name: str) -> object:
        """The attribute's value; expressions are evaluated in the ad."""
        value = self.raw(name)
        if not isinstance(value, classad2.ExprTree):
            return value
        try:
            result = value.eval(self._scope_classad())
        except Exception as exc:
            raise RequestError(name, f"the expression {_shown(value)} failed: {exc}") from None
        if result is classad2.Value.Undefined:
            return _MISSING
        if result is classad2.Value.Error:
            raise RequestError(name, f"the expression {_shown(value)} evaluates to an error")
        return result

    def _scope_classad(self) -> object:
        if self._scope is None:
            # A plain mapping: copy what ClassAds can hold, so expressions can refer to it.
            scope = classad2.ClassAd()
            for key, value in self._ad.items():
                try:
                    scope[str(key)] = value
                except Exception:  # noqa: S112 - unrepresentable values simply stay out
                    continue
            self._scope = scope
        return self._scope


def _literal_string(ad: _Ad, name: str) -> str | None:
    value = ad.raw(name)
    if value is _MISSING:
        return None
    if isinstance(value, str):
        return value
    if _is_expression(value):
        raise RequestError(name, f"must be a quoted string, not the expression {_shown(value)}")
    raise RequestError(name, f"must be a quoted string, got {_shown(value)}")


def _literal_bool(ad: _Ad, name: str) -> bool | None:
    value = ad.raw(name)
    if value is _MISSING:
        return None
    if isinstance(value, bool):
        return value
    if _is_expression(value):
        raise RequestError(
            name, f"must be the literal True or False, not the expression {_shown(value)}"
        )
    raise RequestError(name, f"must be True or False without quotes, got {_shown(value)}")


def _literal_int(ad: _Ad, name: str) -> int:
    value = ad.raw(name)
    if value is _MISSING:
        raise RequestError(name, "is missing from the job ad")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be a whole number, got {_shown(value)}")
    if value < 0:
        raise RequestError(name, f"must not be negative, got {value}")
    return value


def _literal_value(ad: _Ad, name: str, what: str) -> object:
    """The attribute as written, ``None`` when absent; an expression is refused (``what`` says
    what to write instead). The value's type is the request's to check."""
    value = ad.raw(name)
    if value is _MISSING:
        return None
    if _is_expression(value):
        raise RequestError(name, f"must be {what}, not the expression {_shown(value)}")
    return value


def _whole_number(value: object) -> int | None:
    """``value`` as an int if it is a finite whole number (ints or integral floats)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _size(ad: _Ad, name: str, unit: str) -> int | None:
    """A positive whole-number size (``RequestMemory`` and friends may be expressions)."""
    value = ad.evaluate(name)
    if value is _MISSING:
        return None
    number = _whole_number(value)
    if number is None:
        raise RequestError(name, f"must be a whole number of {unit}, got {_shown(value)}")
    if number <= 0:
        raise RequestError(name, f"must be positive, got {number} {unit}")
    return number


# --- job ad -> request ---------------------------------------------------------------------


def request_from_job_ad(
    job_ad: Mapping[str, object], settings: Settings, *, site_policy: bool = True
) -> JobRequest:
    """What this job asks for, validated and bounded (the hook's side; the service sizes it
    for its slot: :func:`glite_vm.request.vm_request`). Without ``site_policy`` only the form
    is checked (see :meth:`JobRequest.create`), not which image sources, hostnames and networks
    the site allows: the hook does so, and leaves those rules to the service.

    Raises :class:`~glite_vm.errors.RequestError` for anything malformed (missing image, a
    ``GliteVmRoot`` that is not a literal boolean, impossible sizes, odd names, ...) and
    :class:`~glite_vm.errors.ImageRefusedError` for an image the site does not allow; both hold
    the job. ``RequestDisk`` is in KiB, as everywhere in HTCondor.
    """
    ad = _Ad(job_ad)
    job_id = f"{_literal_int(ad, 'ClusterId')}.{_literal_int(ad, 'ProcId')}"
    owner = _owner(ad)

    image = _literal_string(ad, "GliteVmImage")
    if image is None:
        if not settings.default_image:
            raise RequestError(
                "GliteVmImage",
                "is missing and this host has no default image (GLITE_VM_DEFAULT_IMAGE); "
                'add +GliteVmImage = "<catalogue name or URL>" to the submit file',
            )
        image = settings.default_image
    if site_policy:
        classify_ref(image, sources=settings.custom_image_sources, allow_local=False)
    disk_kib = _size(ad, "RequestDisk", "KiB")
    keep = _literal_string(ad, "GliteVmKeepSnapshot")
    return JobRequest.create(
        settings,
        image=image,
        job_id=job_id,
        owner=owner,
        cpus=_size(ad, "RequestCpus", "CPUs"),
        memory_mib=_size(ad, "RequestMemory", "MiB"),
        disk=None if disk_kib is None else disk_kib * 1024,
        root=bool(_literal_bool(ad, "GliteVmRoot")),
        keep_snapshot=KeepSnapshot.ON_FAILURE if keep is None else keep,
        image_sha256=_literal_string(ad, "GliteVmImageSha256"),
        hostname=_literal_string(ad, "GliteVmHostname"),
        network=_literal_string(ad, "GliteVmNetwork"),
        debug_hold=check_debug_hold(
            _literal_value(ad, DEBUG_HOLD_FIELD, "a whole number of seconds")
        ),
        site_policy=site_policy,
    )


def _owner(ad: _Ad) -> str:
    owner = _literal_string(ad, "Owner")
    if owner is None:
        user = _literal_string(ad, "User")  # "name@uid_domain"
        if user is None:
            raise RequestError("Owner", "the job ad names no Owner or User")
        owner = user.partition("@")[0]
    return owner


# --- host failures -------------------------------------------------------------------------


def host_failure_count(job_ad: Mapping[str, object]) -> int:
    """How often this job already failed on a host: ``NumVacatesByReason.StarterError``."""
    try:
        by_reason = _Ad(job_ad).raw("NumVacatesByReason")
    except RequestError:
        return 0
    if not isinstance(by_reason, Mapping):
        return 0
    try:
        count = _Ad(by_reason).raw("StarterError")
    except RequestError:
        return 0
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else 0


def host_failure_history(job_ad: Mapping[str, object]) -> str:
    """The reasons of earlier host failures that the hooks chirped into the job ad."""
    try:
        value = _Ad(job_ad).raw(HOST_FAILURES_ATTR)
    except RequestError:
        return ""
    return ad_safe_text(value, MAX_HISTORY) if isinstance(value, str) else ""


def append_host_failure(history: str, reason: str, limit: int = MAX_HISTORY) -> str:
    """``history`` with ``reason`` added; the oldest reasons go first when it grows too long."""
    reason = ad_safe_text(reason, limit)
    combined = f"{history} || {reason}" if history else reason
    return combined if len(combined) <= limit else "..." + combined[-(limit - 3) :]


# --- what the hooks print ------------------------------------------------------------------


def ad_safe_text(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` on one line, as a job ad attribute can carry it to the user
    (:func:`~glite_vm.one_line.one_line`: line breaks `` | ``, control and other characters that
    are not printable ``?``: ``\x9b`` starts a terminal escape as ``\x1b[`` does)."""
    return one_line(text, limit)


def status_code(error: BaseException) -> int:
    """The ``HookStatusCode`` for ``error``: 1-299 hold, >= 300 requeue."""
    if not isinstance(error, GliteVmError):
        return UNEXPECTED_ERROR_CODE
    table = HOLD_CODES if error.is_user_error else REQUEUE_CODES
    for cls in type(error).__mro__:
        if cls in table:
            return table[cls]
    return 1 if error.is_user_error else 300


def hook_status_lines(
    error: BaseException,
    previous_failures: int,
    max_host_failures: int,
    earlier_reasons: str = "",
) -> list[str]:
    """The ad lines PREPARE_JOB prints when it fails (then it exits non-zero).

    ``previous_failures`` is :func:`host_failure_count` of the job ad. A host error requeues
    the job, unless this failure is number ``max_host_failures`` (> 0): then the job is held
    with code :data:`HOST_FAILURES_HOLD_CODE` and ``earlier_reasons``, as HTCondor would
    otherwise requeue it forever.
    """
    code = status_code(error)
    if isinstance(error, GliteVmError):
        message = str(error)
    else:
        message = f"internal error in glite-vm: {type(error).__name__}: {error}"
    if code >= 300:
        failures = max(previous_failures, 0) + 1
        if 0 < max_host_failures <= failures:
            code = HOST_FAILURES_HOLD_CODE
            message = (
                f"held after {failures} host failures (GLITE_VM_MAX_HOST_FAILURES = "
                f"{max_host_failures}); last: {message}"
            )
            if earlier_reasons:
                message += f"; earlier: {earlier_reasons}"
            message += "; release the job (condor_release) to try again"
        else:
            limit = f" of at most {max_host_failures}" if max_host_failures > 0 else ""
            message = f"host failure {failures}{limit}, the job goes back to the queue: {message}"
    return [
        f"HookStatusCode = {code}",
        f"HookStatusMessage = {_string_literal(ad_safe_text(message))}",
    ]


def _string_literal(text: str) -> str:
    """A quoted string for the old-ClassAd line format the starter and chirp read."""
    if "\n" in text or "\r" in text or "\0" in text:
        raise ValueError(f"{text[:60]!r}...: line breaks and NUL cannot be written in this format")
    return '"' + text.replace('"', '\\"') + '"'


def _literal(value: AdValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"{value} does not fit a ClassAd integer")
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return repr(value)
    return _string_literal(str(value))


def _check_name(name: str) -> None:
    if not _ATTR_NAME.match(name):
        raise ValueError(f"{name!r} is not a ClassAd attribute name")


def format_ad_updates(updates: Mapping[str, AdValue]) -> str:
    """``Name = value`` lines for PREPARE_JOB's stdout (the starter's copy of the job ad).

    Strings keep every character; one with a line break or NUL cannot be written and raises
    ``ValueError``. ``Path`` values are written as strings.
    """
    lines = []
    for name, value in updates.items():
        _check_name(name)
        lines.append(f"{name} = {_literal(value)}\n")
    return "".join(lines)


def v2_quote(words: Iterable[str]) -> str:
    """HTCondor's V2 syntax of the job ad's ``Arguments`` and ``Environment``: every word in
    single quotes, a single quote doubled (``'a b' 'it''s'``).

    :func:`glite_vm.condor.payload.split_v2_arguments` reads it back. A submit file wraps it in
    double quotes and doubles those too (:func:`glite_vm.api.submit_language.submit_words`).
    """
    return " ".join("'" + w.replace("'", "''") + "'" for w in words)


def chirp_literal(value: AdValue) -> str:
    """``value`` as chirp's ``set_job_attr`` reads it; strings go through :func:`ad_safe_text`."""
    if isinstance(value, str | Path):
        return _literal(ad_safe_text(str(value), MAX_HISTORY))
    return _literal(value)
