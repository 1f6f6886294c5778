"""The exception tree.

Every error the library raises on purpose is a :class:`GliteVmError`. Each one knows whether the
job should be **held** (the user must change something: unknown image, bad checksum, refused
image, an image that cannot boot, root not permitted, impossible sizes) or **requeued** (this
host failed: libvirt down, disk full, download failure, boot timeout), and its ``str()`` is the
message the user reads.
Errors also subclass the closest built-in exception so callers can catch them naturally
(``except ValueError`` still catches a bad request).
"""

from __future__ import annotations

import enum
from pathlib import Path


class Disposition(enum.Enum):
    """What HTCondor should do with a job that failed with this error."""

    HOLD = "hold"
    REQUEUE = "requeue"


class GliteVmError(Exception):
    """Base of every error glite-vm raises on purpose."""

    disposition: Disposition = Disposition.REQUEUE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def is_user_error(self) -> bool:
        return self.disposition is Disposition.HOLD


# --- user errors: hold the job --------------------------------------------------------------


class UserError(GliteVmError):
    """The job asked for something that can never work here; the user must change it."""

    disposition = Disposition.HOLD


class RequestError(UserError, ValueError):
    """A field of the job's request is missing, malformed or out of bounds."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnknownImageError(UserError, LookupError):
    """The job names an image the catalogue does not list."""

    def __init__(self, name: str, known: list[str]) -> None:
        shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
        super().__init__(f"unknown image {name!r}; known: {shown or '(the catalogue is empty)'}")
        self.name = name
        self.known = known


class ChecksumMismatchError(UserError):
    """Downloaded bytes do not have the digest the job or catalogue promised."""

    def __init__(self, source: str, expected: str, actual: str) -> None:
        super().__init__(
            f"checksum mismatch for {source}: expected sha256 {expected}, got {actual}; "
            "fix the expected digest (GliteVmImageSha256 in a submit file, --sha256 on the "
            "command line) or the image"
        )
        self.source = source
        self.expected = expected
        self.actual = actual


class ImageRefusedError(UserError):
    """The image failed a safety check (backing file, external data file, size, format)."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"image {source} refused: {reason}")
        self.source = source
        self.reason = reason


class ImageNotFoundError(UserError, FileNotFoundError):
    """A custom image's URL or path does not exist (HTTP 404/410, no such file)."""

    def __init__(self, source: str, detail: str) -> None:
        super().__init__(f"image {source} not found: {detail}; check GliteVmImage")
        self.source = source
        self.detail = detail


class RootNotPermittedError(UserError, PermissionError):
    """The job asked for root in the guest where that is not allowed."""


class AccessDeniedError(UserError, PermissionError):
    """A caller asked to act on something it does not own."""


class PayloadTimeoutError(UserError, TimeoutError):
    """The payload outlived the time limit its own job set (``--timeout``, ``timeout=``).

    The job's doing, not the host's: running it elsewhere would end the same way.
    """

    def __init__(self, limit: float) -> None:
        shown = f"{limit:g}" if isinstance(limit, int | float) else str(limit)
        super().__init__(f"the payload did not finish within its time limit of {shown} s")
        self.limit = limit


class CatalogueInputError(UserError, ValueError):
    """The directory or sidecar files given to ``catalogue build`` cannot make a catalogue."""


def _with_boot_log(text: str, boot_log: Path | None, heading: str, lines: str) -> str:
    if boot_log is not None:
        text += f"; boot log: {boot_log}"
    if lines:
        text += f"\n--- {heading} ---\n" + lines
    return text


class ImageBootError(UserError):
    """The image cannot boot into a guest that can run a job: its kernel panicked, there is
    nothing to boot, it powered itself off, or it booted without starting its guest agent.

    ``problem`` says what happened, ``fix`` what to change in the image, ``evidence`` quotes
    the lines of the boot log that show it.
    """

    def __init__(
        self, problem: str, fix: str, boot_log: Path | None = None, evidence: str = ""
    ) -> None:
        super().__init__(
            _with_boot_log(
                f"the image cannot boot: {problem}; {fix}", boot_log, "from the boot log", evidence
            )
        )
        self.problem = problem
        self.fix = fix
        self.boot_log = boot_log
        self.evidence = evidence


class GuestUserError(UserError):
    """The guest's account for the job is missing and cannot be made, or is root's."""

    def __init__(self, user: str, detail: str) -> None:
        super().__init__(
            f"the image's account {user!r} for the job cannot be set up: {detail}; add the "
            "account to the image (an ordinary user, not uid 0), or name one it has "
            "(guest_user in its catalogue entry, or GLITE_VM_GUEST_USER)"
        )
        self.user = user
        self.detail = detail


# --- host errors: requeue the job -----------------------------------------------------------


class HostError(GliteVmError):
    """This execute host failed; the job may well run elsewhere."""

    disposition = Disposition.REQUEUE


class HypervisorError(HostError):
    """libvirt or QEMU is unavailable or refused to run the domain."""


class DownloadError(HostError, ConnectionError):
    """The image could not be fetched (network, server, timeout)."""


class CatalogueError(HostError, ValueError):
    """The central catalogue is missing, unreadable or malformed (a repository problem)."""


class CacheFullError(HostError, OSError):
    """The image cache (or the disk under it) has no room for this image."""


class LockTimeoutError(HostError, TimeoutError):
    """Another process held a lock for longer than the bound allows."""


class BootError(HostError):
    """The guest died or its agent never answered; the message quotes the boot log."""

    def __init__(self, message: str, boot_log: Path | None = None, tail: str = "") -> None:
        super().__init__(_with_boot_log(message, boot_log, "last lines of the boot log", tail))
        self.what = message
        self.boot_log = boot_log
        self.tail = tail


class TransientBootError(BootError):
    """A boot failed in a way that need not happen again (QEMU crashed; the guest kernel's
    timer check failed under CPU contention): retried on the same host a bounded number of
    times (``GLITE_VM_BOOT_ATTEMPTS``), then the job is requeued."""


class AgentError(HostError):
    """The guest agent failed while the job was running."""


class ServiceUnavailableError(HostError, ConnectionError):
    """The glite-vm service did not answer in time."""
