"""The API on an HTCondor pool: :func:`submit` jobs, :func:`wait` for them, read a
:func:`result`; and the errors of the schedd.

The HTCondor bindings are imported only by the calls that talk to a schedd. HTCondor's submit
warnings are kept in :attr:`JobHandle.submit_warnings`, never printed.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from glite_vm.api.jobdir import base_directory, image_slug
from glite_vm.api.results import JobHandle, JobState, PoolResult, result_from_ad
from glite_vm.api.vmjob import VmJob
from glite_vm.errors import GliteVmError, HostError, RequestError

#: Seconds between two looks at the schedd in :func:`wait`.
DEFAULT_POLL_INTERVAL: Final = 5.0


class SchedulerError(HostError):
    """The schedd could not be reached or refused a submission or a query.

    ``submitted`` holds the handles of jobs that did reach the queue before the failure.
    """

    def __init__(self, message: str, submitted: Sequence[JobHandle] = ()) -> None:
        super().__init__(message)
        self.submitted = list(submitted)


class JobNotFoundError(GliteVmError, LookupError):
    """The job is neither in the schedd's queue nor in its history."""


class WaitTimeoutError(GliteVmError, TimeoutError):
    """:func:`wait` gave up; ``pending`` are the jobs that had not finished."""

    def __init__(self, message: str, pending: Sequence[JobHandle]) -> None:
        super().__init__(message)
        self.pending = list(pending)


def schedd_for(handle: JobHandle | None, schedd: Any) -> Any:
    """``schedd`` if given, else the one ``handle`` went to, else the local schedd."""
    if schedd is not None:
        return schedd
    if handle is not None and handle.schedd is not None:
        return handle.schedd
    import htcondor2  # noqa: PLC0415

    try:
        return htcondor2.Schedd()
    except Exception as exc:  # the bindings raise HTCondorException, ValueError, ...
        raise SchedulerError(f"cannot find the local schedd: {exc}") from None


def submit(
    jobs: VmJob | Iterable[VmJob],
    schedd: Any = None,
    *,
    directory: str | os.PathLike[str] | None = None,
) -> list[JobHandle]:
    """Queue each job as its own cluster; return their handles in order.

    Each job gets a fresh directory under ``directory`` (default: a new temporary directory)
    named after its image. ``schedd`` is an ``htcondor2.Schedd`` (default: the local one).
    HTCondor's submit warnings are kept in ``JobHandle.submit_warnings``, never printed.
    Raises :class:`SchedulerError` (with the handles already queued) if the schedd fails.
    """
    job_list = [jobs] if isinstance(jobs, VmJob) else list(jobs)
    for job in job_list:
        if not isinstance(job, VmJob):
            raise RequestError("jobs", f"must be VmJob objects, got {type(job).__name__}")
    base = base_directory(directory, "glite-vm-jobs-")
    the_schedd = schedd_for(None, schedd)
    handles: list[JobHandle] = []
    for job in job_list:
        job_dir = Path(tempfile.mkdtemp(prefix=image_slug(job.image) + "-", dir=base))
        job_dir.chmod(0o755)
        handles.append(submit_one(the_schedd, job, job_dir, handles))
    return handles


def submit_one(schedd: Any, job: VmJob, job_dir: Path, done: Sequence[JobHandle]) -> JobHandle:
    """Queue ``job`` as a cluster of one, its files in ``job_dir``; ``done`` are the handles
    queued before it, carried by the :class:`SchedulerError` if this one fails."""
    description = job.submit_description(job_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = schedd.submit(description, count=1)
            cluster = int(result.cluster())
            proc = int(result.first_proc())
        except Exception as exc:
            raise SchedulerError(
                f"submitting the job for {job.image} failed: {exc}", done
            ) from None
    return JobHandle(
        cluster=cluster,
        proc=proc,
        image=job.image,
        directory=job_dir,
        job=job,
        schedd=schedd,
        submit_warnings=tuple(str(w.message) for w in caught),
    )


@dataclasses.dataclass(frozen=True)
class WaitProgress:
    """What :func:`wait` reports to its ``progress`` callback whenever a state changes."""

    states: dict[JobHandle, JobState]
    elapsed: float

    def count(self, *states: JobState) -> int:
        return sum(1 for s in self.states.values() if s in states)

    @property
    def total(self) -> int:
        return len(self.states)

    @property
    def finished(self) -> int:
        return self.count(JobState.COMPLETED, JobState.REMOVED, JobState.HELD)


def _id_constraint(handles: Sequence[JobHandle]) -> str:
    return " || ".join(f"(ClusterId == {h.cluster} && ProcId == {h.proc})" for h in handles)


def _query(schedd: Any, handles: Sequence[JobHandle], projection: list[str]) -> list[Any]:
    try:
        return list(schedd.query(constraint=_id_constraint(handles), projection=projection))
    except Exception as exc:
        raise SchedulerError(f"querying the schedd failed: {exc}") from None


def _history(schedd: Any, handle: JobHandle, projection: list[str]) -> Any | None:
    try:
        ads = list(schedd.history(_id_constraint([handle]), projection, match=1))
    except Exception as exc:
        raise SchedulerError(f"reading the schedd's history failed: {exc}") from None
    return ads[0] if ads else None


def _key(ad: Mapping[str, object]) -> tuple[object, object]:
    return (ad.get("ClusterId"), ad.get("ProcId"))


def wait(
    handles: Iterable[JobHandle],
    timeout: float | None = None,
    progress: Callable[[WaitProgress], None] | None = None,
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    schedd: Any = None,
    cancel: threading.Event | None = None,
) -> list[PoolResult]:
    """Wait until every job has finished; return their results in the order given.

    A job has finished when it left the queue (completed or removed: its history ad is what
    :func:`result` reads) or is held (it waits for someone to act: see ``hold_reason``).
    ``progress`` is called with a :class:`WaitProgress` at the first look and whenever a job's
    state changes. After ``timeout`` seconds (or when ``cancel`` is set) raises
    :class:`WaitTimeoutError`; the jobs stay queued.
    """
    todo = list(dict.fromkeys(handles))
    started = time.monotonic()
    states: dict[JobHandle, JobState] = dict.fromkeys(todo, JobState.UNKNOWN)
    finished: dict[JobHandle, Mapping[str, object]] = {}
    reported: dict[JobHandle, JobState] | None = None
    projection = ["ClusterId", "ProcId", "JobStatus"]
    while True:
        pending = [h for h in todo if h not in finished]
        by_schedd: dict[int, tuple[Any, list[JobHandle]]] = {}
        for h in pending:
            s = schedd_for(h, schedd)
            by_schedd.setdefault(id(s), (s, []))[1].append(h)
        for s, group in by_schedd.values():
            queued = {_key(ad): ad for ad in _query(s, group, projection)}
            for h in group:
                ad = queued.get((h.cluster, h.proc))
                if ad is not None:
                    states[h] = JobState.of(ad.get("JobStatus"))
                    if states[h] is JobState.HELD:
                        finished[h] = ad
                    continue
                gone = _history(s, h, projection)
                if gone is not None:  # else: between queue and history; look again
                    states[h] = JobState.of(gone.get("JobStatus"))
                    finished[h] = gone
        if progress is not None and states != reported:
            reported = dict(states)
            progress(WaitProgress(states=dict(states), elapsed=time.monotonic() - started))
        if len(finished) == len(todo):
            break
        elapsed = time.monotonic() - started
        if (timeout is not None and elapsed >= timeout) or (cancel is not None and cancel.is_set()):
            left = [h for h in todo if h not in finished]
            raise WaitTimeoutError(
                f"{len(left)} of {len(todo)} job(s) not finished after {elapsed:.0f} s: "
                + ", ".join(h.job_id for h in left[:20]),
                left,
            )
        delay = poll_interval if timeout is None else min(poll_interval, timeout - elapsed)
        if cancel is not None:
            cancel.wait(max(delay, 0.0))
        else:
            time.sleep(max(delay, 0.0))
    return [result(h, schedd=schedd) for h in todo]


def result(handle: JobHandle, *, schedd: Any = None) -> PoolResult:
    """The job's result as far as it goes: from the queue while it is there, else the history.

    Raises :class:`JobNotFoundError` if the schedd knows nothing of it.
    """
    s = schedd_for(handle, schedd)
    ads = _query(s, [handle], [])
    ad = ads[0] if ads else _history(s, handle, [])
    if ad is None:
        raise JobNotFoundError(f"job {handle.job_id} is neither in the queue nor in the history")
    return result_from_ad(handle, ad)
