"""What a job gives back: a pooled job's handle, state and result (read from its job ad), a
local run's result, and the :class:`Result` protocol both satisfy. Pure: nothing here talks to
a schedd or a hypervisor.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from glite_vm.api.jobdir import LOG_NAME, STDERR_NAME, STDOUT_NAME, outputs_in
from glite_vm.vm.record import AdFacts

if TYPE_CHECKING:
    from glite_vm.api.vmjob import VmJob


class JobState(enum.Enum):
    """Where a pooled job is (HTCondor's ``JobStatus``)."""

    IDLE = 1
    RUNNING = 2
    REMOVED = 3
    COMPLETED = 4
    HELD = 5
    TRANSFERRING_OUTPUT = 6
    SUSPENDED = 7
    UNKNOWN = 0

    @classmethod
    def of(cls, status: object) -> JobState:
        if isinstance(status, int) and not isinstance(status, bool):
            for state in cls:
                if state.value == status:
                    return state
        return cls.UNKNOWN


class Result(Protocol):
    """What pooled and local results have in common."""

    @property
    def image(self) -> str: ...
    @property
    def exit_code(self) -> int | None: ...
    @property
    def directory(self) -> Path: ...
    @property
    def stdout_path(self) -> Path: ...
    @property
    def stderr_path(self) -> Path: ...
    @property
    def outputs(self) -> list[Path]: ...
    @property
    def missing_outputs(self) -> list[str]: ...
    @property
    def snapshot_path(self) -> Path | None: ...
    @property
    def boot_log_path(self) -> Path | None: ...
    @property
    def timings(self) -> dict[str, float]: ...
    @property
    def succeeded(self) -> bool: ...


@dataclasses.dataclass(frozen=True)
class JobHandle:
    """A job in an HTCondor queue, as :func:`~glite_vm.api.pool.submit` made it; a dict key."""

    cluster: int
    proc: int
    image: str
    directory: Path
    job: VmJob = dataclasses.field(compare=False, repr=False)
    schedd: Any = dataclasses.field(default=None, compare=False, repr=False)
    submit_warnings: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    @property
    def job_id(self) -> str:
        return f"{self.cluster}.{self.proc}"


@dataclasses.dataclass(frozen=True)
class PoolResult:
    """A pooled job as its job ad (queue or history) and its directory describe it."""

    handle: JobHandle
    state: JobState
    exit_code: int | None  # None while it runs, when held, removed or killed by a signal
    exit_signal: int | None
    stdout_path: Path
    stderr_path: Path
    log_path: Path
    outputs: list[Path]
    missing_outputs: list[str]
    snapshot_path: Path | None
    boot_log_path: Path | None
    record_path: Path | None
    domain: str | None
    hypervisor: str | None
    image_digest: str | None
    cache_hit: bool | None
    timings: dict[str, float]  # GliteVmTime<Phase> as {"phase": seconds}, e.g. "transfer_in"
    hold_reason: str | None
    hold_reason_code: int | None
    hold_reason_subcode: int | None  # glite-vm's code when HoldReasonCode is 19 (docs/users.md)
    launcher_error: str | None
    host_failures: str | None
    boot_attempts: int | None  # boots its VM took on its last host (None: not known yet)
    ad: Mapping[str, object] = dataclasses.field(repr=False)

    @property
    def image(self) -> str:
        return self.handle.image

    @property
    def directory(self) -> Path:
        return self.handle.directory

    @property
    def finished(self) -> bool:
        """Nothing more will happen without someone acting (completed, removed or held)."""
        return self.state in (JobState.COMPLETED, JobState.REMOVED, JobState.HELD)

    @property
    def succeeded(self) -> bool:
        return self.state is JobState.COMPLETED and self.exit_code == 0


@dataclasses.dataclass(frozen=True)
class LocalResult:
    """A job run on this host by :func:`~glite_vm.api.local.run_local`."""

    image: str
    directory: Path
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    stdout_path: Path
    stderr_path: Path
    outputs: list[Path]
    missing_outputs: list[str]
    snapshot_path: Path | None
    boot_log_path: Path
    record_path: Path
    domain: str
    hypervisor: str
    image_digest: str
    cache_hit: bool
    timings: dict[str, float]
    boot_attempts: int = 1  # boots the VM took (a transient failure is booted again)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0


def result_from_ad(handle: JobHandle, ad: Mapping[str, object]) -> PoolResult:
    """Read a :class:`PoolResult` from a job ad (a ``classad2.ClassAd`` or a plain mapping)."""
    plain = _plain_ad(ad)
    state = JobState.of(plain.get("JobStatus"))
    by_signal = plain.get("ExitBySignal") is True
    exit_code = None
    if state is JobState.COMPLETED and not by_signal:
        exit_code = _int(plain.get("ExitCode"))
    exit_signal = _int(plain.get("ExitSignal")) if by_signal else None
    vm = AdFacts.from_ad(plain)
    if exit_signal is None:
        exit_signal = vm.payload_signal
    held = state is JobState.HELD
    outputs, missing = outputs_in(handle.directory, handle.job.outputs)
    return PoolResult(
        handle=handle,
        state=state,
        exit_code=exit_code,
        exit_signal=exit_signal,
        stdout_path=handle.directory / STDOUT_NAME,
        stderr_path=handle.directory / STDERR_NAME,
        log_path=handle.directory / LOG_NAME,
        outputs=outputs,
        missing_outputs=missing,
        snapshot_path=_path(vm.snapshot),
        boot_log_path=_path(vm.boot_log),
        record_path=_path(vm.record),
        domain=vm.domain,
        hypervisor=vm.hypervisor,
        image_digest=vm.image_digest,
        cache_hit=vm.cache_hit,
        timings=dict(vm.timings),
        hold_reason=_str(plain.get("HoldReason")) if held else None,
        hold_reason_code=_int(plain.get("HoldReasonCode")) if held else None,
        hold_reason_subcode=_int(plain.get("HoldReasonSubCode")) if held else None,
        launcher_error=vm.launcher_error,
        host_failures=vm.host_failures,
        boot_attempts=vm.boot_attempts,
        ad=plain,
    )


def _plain_ad(ad: Mapping[str, object]) -> dict[str, object]:
    """The ad's attributes with their values: expressions evaluated, undefined/error left out."""
    import classad2  # noqa: PLC0415 - only where ads are read

    evaluate = ad.eval if isinstance(ad, classad2.ClassAd) else ad.get
    out: dict[str, object] = {}
    for key in list(ad.keys()):
        try:
            value = evaluate(key)
        except Exception:  # noqa: S112 - an attribute that does not evaluate is no result
            continue
        if value is None or isinstance(value, classad2.Value):  # Value is an IntEnum
            continue
        out[str(key)] = value
    return out


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
