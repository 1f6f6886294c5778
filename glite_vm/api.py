"""The Python API for build frameworks: describe a job once, run it in its own VM on an HTCondor
pool or on this host.

::

    from glite_vm.api import VmJob, matrix, run_local, submit, wait

    job = VmJob("debian-12", script="tar xzf src.tar.gz && make -C src check > report.txt",
                inputs=["src.tar.gz"], outputs=["report.txt"])
    handles = submit([job], directory="runs/42")          # HTCondor: one cluster per job
    for result in wait(handles, timeout=3600):
        print(result.exit_code, result.stdout_path, result.snapshot_path, result.timings)

    local = run_local(job, directory="repro")             # same job, this host, no HTCondor

A :class:`VmJob` is validated when it is made: a bad value raises
:class:`~glite_vm.errors.RequestError` whose ``field`` is the parameter's name. Everything else
raises the library's errors (:mod:`glite_vm.errors`); nothing here prints, exits or keeps state
between calls. Settings are passed in, or read once per call with
:meth:`~glite_vm.config.Settings.load`. The HTCondor bindings are imported only by the functions
that talk to HTCondor, so :func:`run_local` works on a laptop without any HTCondor configuration.

Each job owns a directory (the submit's ``initialdir``): its script, HTCondor's stdout, stderr
and event log (:data:`STDOUT_NAME`, :data:`STDERR_NAME`, :data:`LOG_NAME`) and the job's outputs
land there, on the pool and locally alike. See docs/api.md.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import math
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, overload

from glite_vm.condor.jobad import v2_quote
from glite_vm.config import (
    KIB,
    MIB,
    Settings,
    check_network_name,
    format_size,
    parse_size,
    parse_timeout,
)
from glite_vm.errors import GliteVmError, HostError, RequestError
from glite_vm.request import KeepSnapshot, with_field_names

if TYPE_CHECKING:
    import htcondor2

    from glite_vm.images.download import Progress
    from glite_vm.vm.lifecycle import VmHost

#: Names the API uses in every job directory; a job's inputs and outputs may not take them.
SCRIPT_NAME: Final = "glite-vm-job.sh"
STDOUT_NAME: Final = "glite-vm-job.out"
STDERR_NAME: Final = "glite-vm-job.err"
LOG_NAME: Final = "glite-vm-job.log"
RESERVED_NAMES: Final = frozenset({SCRIPT_NAME, STDOUT_NAME, STDERR_NAME, LOG_NAME})

#: Smallest memory and disk a job may ask for (the VM layer's own lower bounds).
MIN_SIZE: Final = 64 * MIB
#: Seconds between two looks at the schedd in :func:`wait`.
DEFAULT_POLL_INTERVAL: Final = 5.0

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_LINE_BREAKS = ("\n", "\r", "\0")
#: A ``$`` that starts a submit-language macro or macro function (measured on condor_submit 25.0).
_MACRO_DOLLAR = re.compile(r"\$(?=[A-Za-z0-9_]*\()")
_UNWRITABLE = re.compile(r"\$\$[A-Za-z0-9_]*\(|\$\(dollar\)", re.IGNORECASE)

#: Job-ad attributes (what the request layer names) -> this API's parameter names.
PARAMETER_NAMES: Final = {
    "GliteVmImage": "image",
    "GliteVmImageSha256": "image_sha256",
    "GliteVmRoot": "root",
    "GliteVmKeepSnapshot": "keep_snapshot",
    "GliteVmNetwork": "network",
    "GliteVmHostname": "hostname",
    "RequestCpus": "cpus",
    "RequestMemory": "memory",
    "RequestDisk": "disk",
}


# --- errors of the API's own ------------------------------------------------------------------


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


# --- validation helpers -------------------------------------------------------------------------


def _refield(field: str, error: RequestError) -> RequestError:
    return RequestError(field, error.problem)


def _check_text(field: str, text: str) -> None:
    """Refuse what HTCondor's submit language cannot carry unchanged.

    A line break or NUL ends a submit line. ``$$(`` (also ``$$NAME(``) is a match-time
    reference, and the literal text ``$(DOLLAR)`` always expands, whatever the escaping.
    """
    if any(c in text for c in _LINE_BREAKS):
        raise RequestError(field, f"{text[:60]!r} contains a line break or NUL")
    if _UNWRITABLE.search(text):
        raise RequestError(
            field,
            f"{text[:60]!r} contains '$$(' or '$(DOLLAR)', which HTCondor's submit language "
            "cannot pass on unchanged",
        )


def _plain_string(field: str, value: object) -> str:
    """A string that goes into a job ad attribute: one line, no quote, no backslash."""
    if not isinstance(value, str):
        raise RequestError(field, f"must be a string, got {type(value).__name__}")
    _check_text(field, value)
    if '"' in value or "\\" in value:
        raise RequestError(field, f"{value[:60]!r} must not contain a double quote or backslash")
    return value


def _size(field: str, value: object) -> int:
    """Bytes of a size given with a unit (``"2GB"``, ``"512MiB"``; the unit contract of
    :mod:`glite_vm.config`): a string, as a number alone would be ambiguous."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise RequestError(
            field,
            f"give a size with a unit, like '2GB' or '512MiB', got {value!r} (a bare number "
            "is ambiguous: HTCondor reads MiB or KiB, other tools bytes)",
        )
    size = parse_size(value, field, likely="MiB" if field == "memory" else "GB")
    if size < MIN_SIZE:
        raise RequestError(field, f"{format_size(size)} is below the minimum of 64.0 MiB")
    return size


def _path_name(path: str | os.PathLike[str]) -> str:
    return os.path.basename(os.path.normpath(os.fspath(path)))


def image_slug(image: str) -> str:
    """A directory name for ``image``: the catalogue name itself, else a sanitised, hashed form.

    Different references never give the same slug (URLs carry a short hash of themselves).
    """
    if _PLAIN_NAME.match(image):
        return image
    tail = image.rstrip("/").rsplit("/", 1)[-1]
    stem = _SLUG_UNSAFE.sub("_", tail).strip("._") or "image"
    digest = hashlib.sha256(image.encode()).hexdigest()[:8]
    return f"{stem[:48]}-{digest}"


# --- the job ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VmJob:
    """One payload to run in a fresh VM of ``image``. Validated on creation.

    Give exactly one of ``script`` (the text of a shell script; ``#!/bin/sh`` is added when it
    has no ``#!`` line) or ``executable`` (a local file sent into the VM; with
    ``transfer_executable=False`` an absolute path of a program inside the guest instead).

    ``inputs`` are local files or directories copied into the guest's working directory (a
    directory given as a string ending in ``/`` contributes its contents, as in HTCondor).
    ``outputs`` are paths relative to that working directory copied back into the job's
    directory (keeping their relative paths); with no ``outputs``, every new or changed file at
    the top of the working directory comes back (HTCondor's rule). Sizes need a unit
    (``"2GB"``, ``"512MiB"``; binary units). ``keep_snapshot`` is ``"always"``,
    ``"on_failure"`` or ``"never"``. ``hostname`` asks for a guest host name
    (``GliteVmHostname``; only where the site allows it, and only on a pool). ``image_sha256``
    pins a custom image's digest. ``network`` asks for one of the networks the site offers
    (``GliteVmNetwork``: ``GLITE_VM_NETWORK`` or one of ``GLITE_VM_JOB_NETWORKS``; ``None``: the
    host's default).
    """

    image: str
    script: str | None = None
    executable: str | os.PathLike[str] | None = None
    arguments: Sequence[str] = ()
    root: bool = False
    inputs: Sequence[str | os.PathLike[str]] = ()
    outputs: Sequence[str] = ()
    cpus: int = 1
    memory: str = "2GB"
    disk: str = "30GB"
    keep_snapshot: str | KeepSnapshot = "on_failure"
    hostname: str | None = None
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    image_sha256: str | None = None
    transfer_executable: bool = True
    network: str | None = None

    def __post_init__(self) -> None:
        self._normalise_image()
        self._normalise_program()
        object.__setattr__(self, "inputs", self._checked_inputs())
        object.__setattr__(self, "outputs", self._checked_outputs())
        self._normalise_vm()

    def _normalise_image(self) -> None:
        from glite_vm.images.sources import check_sha256, classify_ref  # noqa: PLC0415

        image = _plain_string("image", self.image)
        try:
            classify_ref(image, sources=(), allow_local=True)
        except RequestError as exc:
            raise _refield("image", exc) from None
        if self.image_sha256 is not None:
            digest = _plain_string("image_sha256", self.image_sha256)
            try:
                object.__setattr__(self, "image_sha256", check_sha256(digest))
            except RequestError as exc:
                raise _refield("image_sha256", exc) from None

    def _normalise_program(self) -> None:
        if not isinstance(self.transfer_executable, bool):
            raise RequestError("transfer_executable", "must be True or False")
        if (self.script is None) == (self.executable is None):
            raise RequestError(
                "script",
                "give either a script (its text) or an executable, not both"
                if self.script is not None
                else "give a script (its text) or an executable",
            )
        if self.script is not None:
            if not isinstance(self.script, str) or not self.script.strip():
                raise RequestError("script", "must be the non-empty text of a shell script")
            if "\0" in self.script:
                raise RequestError("script", "contains a NUL character")
            if not self.transfer_executable:
                raise RequestError("transfer_executable", "a script is always sent into the VM")
        else:
            object.__setattr__(self, "executable", self._checked_executable())
        if isinstance(self.arguments, str | bytes) or not isinstance(self.arguments, Sequence):
            raise RequestError("arguments", "must be a list of strings, not one string")
        for arg in self.arguments:
            if not isinstance(arg, str):
                raise RequestError("arguments", f"must be strings, got {arg!r}")
            _check_text("arguments", arg)
        object.__setattr__(self, "arguments", tuple(self.arguments))
        if not isinstance(self.env, Mapping):
            raise RequestError("env", "must be a mapping of variable names to strings")
        for name, value in self.env.items():
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise RequestError("env", f"{name!r} is not a variable name")
            if not isinstance(value, str):
                raise RequestError("env", f"the value of {name} must be a string")
            _check_text("env", value)
        object.__setattr__(self, "env", dict(self.env))

    def _normalise_vm(self) -> None:
        from glite_vm.identity.hostname import validate_hostname  # noqa: PLC0415 - keeps import light

        if not isinstance(self.root, bool):
            raise RequestError("root", f"must be True or False, got {self.root!r}")
        if isinstance(self.cpus, bool) or not isinstance(self.cpus, int) or self.cpus < 1:
            raise RequestError("cpus", f"must be a whole number of at least 1, got {self.cpus!r}")
        _size("memory", self.memory)
        _size("disk", self.disk)
        keep = self.keep_snapshot
        if not isinstance(keep, KeepSnapshot):
            if not isinstance(keep, str):
                raise RequestError("keep_snapshot", f"must be a string, got {keep!r}")
            try:
                keep = KeepSnapshot.parse(keep)
            except RequestError as exc:
                raise _refield("keep_snapshot", exc) from None
        object.__setattr__(self, "keep_snapshot", keep)
        if self.hostname is not None:
            hostname = validate_hostname(self.hostname, field="hostname")
            object.__setattr__(self, "hostname", hostname)
        if self.network is not None:
            check_network_name(self.network, "network")

    def _checked_executable(self) -> str:
        exe = self.executable
        if not isinstance(exe, str | os.PathLike):
            raise RequestError("executable", f"must be a path, got {exe!r}")
        text = os.fspath(exe)
        _check_text("executable", text)
        if not self.transfer_executable:
            if not text.startswith("/"):
                raise RequestError(
                    "executable",
                    f"{text!r}: a program inside the guest must be an absolute path, "
                    "like /usr/bin/make",
                )
            return text
        if not os.path.isfile(text):
            raise RequestError(
                "executable",
                f"{text} is not a file here (for a program inside the guest, "
                "set transfer_executable=False)",
            )
        if "," in text:
            raise RequestError("executable", f"{text}: HTCondor cannot transfer names with ','")
        name = _path_name(text)
        if name in RESERVED_NAMES:
            raise RequestError("executable", f"{name!r} is a name glite-vm uses; rename it")
        return os.path.abspath(text)

    def _checked_inputs(self) -> tuple[str, ...]:
        if isinstance(self.inputs, str | bytes) or not isinstance(self.inputs, Sequence):
            raise RequestError("inputs", "must be a list of paths, not one string")
        taken: dict[str, str] = {}
        if self.script is not None:
            taken[SCRIPT_NAME] = "the script"
        elif self.transfer_executable:
            taken[_path_name(str(self.executable))] = "the executable"
        out: list[str] = []
        for item in self.inputs:
            if not isinstance(item, str | os.PathLike):
                raise RequestError("inputs", f"must be paths, got {item!r}")
            text = os.fspath(item)
            _check_text("inputs", text)
            if "," in text or text != text.strip():
                raise RequestError(
                    "inputs", f"{text!r}: HTCondor cannot transfer names with ',' or edge blanks"
                )
            if not os.path.exists(text):
                raise RequestError("inputs", f"{text} does not exist")
            contents = isinstance(item, str) and text.endswith("/") and os.path.isdir(text)
            absolute = os.path.abspath(text) + ("/" if contents else "")
            names = os.listdir(text) if contents else [_path_name(text)]
            for name in names:
                if name in RESERVED_NAMES:
                    raise RequestError("inputs", f"{name!r} is a name glite-vm uses; rename it")
                if name in taken:
                    raise RequestError(
                        "inputs", f"{name!r} from {text} would replace {taken[name]}"
                    )
                taken[name] = text
            out.append(absolute)
        return tuple(out)

    def _checked_outputs(self) -> tuple[str, ...]:
        if isinstance(self.outputs, str | bytes) or not isinstance(self.outputs, Sequence):
            raise RequestError("outputs", "must be a list of relative paths, not one string")
        out: list[str] = []
        for item in self.outputs:
            if not isinstance(item, str) or not item.strip():
                raise RequestError("outputs", f"must be non-empty relative paths, got {item!r}")
            _check_text("outputs", item)
            norm = os.path.normpath(item)
            parts = Path(norm).parts
            if item.startswith("/") or not parts or ".." in parts or norm == ".":
                raise RequestError(
                    "outputs", f"{item!r} must be a path inside the job's working directory"
                )
            if "," in item or item != item.strip():
                raise RequestError(
                    "outputs", f"{item!r}: HTCondor cannot transfer names with ',' or edge blanks"
                )
            if parts[0] in RESERVED_NAMES:
                raise RequestError("outputs", f"{parts[0]!r} is a name glite-vm uses")
            if norm in out:
                raise RequestError("outputs", f"{item!r} is listed twice")
            out.append(norm)
        return tuple(out)

    # -- derived ----------------------------------------------------------------------------

    @property
    def memory_mib(self) -> int:
        """``memory`` in MiB (rounded up), as HTCondor's ``RequestMemory``."""
        return math.ceil(_size("memory", self.memory) / MIB)

    @property
    def disk_bytes(self) -> int:
        return _size("disk", self.disk)

    @property
    def disk_kib(self) -> int:
        """``disk`` in KiB (rounded up), as HTCondor's ``RequestDisk``."""
        return math.ceil(self.disk_bytes / KIB)

    @property
    def program_name(self) -> str:
        """The name the payload has in the guest's working directory (or its guest path)."""
        if self.script is not None:
            return SCRIPT_NAME
        assert self.executable is not None
        return _path_name(self.executable) if self.transfer_executable else str(self.executable)

    def with_image(self, image: str) -> VmJob:
        """This job for another image (the matrix case). Validated like a new job."""
        return dataclasses.replace(self, image=image)

    # -- HTCondor -----------------------------------------------------------------------------

    def submit_items(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """The submit description as ``{command: value}`` for ``directory``. Pure.

        Every value is written so that ``condor_submit`` gives it back unchanged: a ``$`` that
        would start a macro becomes ``$(DOLLAR)``; arguments and environment use the quoted (V2)
        syntax; ClassAd strings need no escapes (validation refused quotes and backslashes).
        """
        d = os.path.abspath(os.fspath(directory))
        _check_text("directory", d)
        if d != d.rstrip():
            raise RequestError("directory", f"{d!r} ends in a blank, which HTCondor would drop")
        if self.script is not None:
            executable = os.path.join(d, SCRIPT_NAME)
        else:
            executable = str(self.executable)
        items: dict[str, str] = {
            "universe": "vanilla",
            "executable": _submit_text(executable),
            "transfer_executable": "true" if self.transfer_executable else "false",
        }
        if self.arguments:
            items["arguments"] = _submit_text(submit_words(self.arguments))
        if self.env:
            items["environment"] = _submit_text(
                submit_words(f"{k}={v}" for k, v in self.env.items())
            )
        items.update(
            {
                "initialdir": _submit_text(d),
                "output": _submit_text(os.path.join(d, STDOUT_NAME)),
                "error": _submit_text(os.path.join(d, STDERR_NAME)),
                "log": _submit_text(os.path.join(d, LOG_NAME)),
                "should_transfer_files": "YES",
                "when_to_transfer_output": "ON_EXIT",
            }
        )
        if self.inputs:
            items["transfer_input_files"] = _submit_text(", ".join(str(i) for i in self.inputs))
        if self.outputs:
            items["transfer_output_files"] = _submit_text(", ".join(self.outputs))
            if any("/" in o for o in self.outputs):
                items["preserve_relative_paths"] = "true"
        items.update(
            {
                "request_cpus": str(self.cpus),
                "request_memory": str(self.memory_mib),  # MiB
                "request_disk": str(self.disk_kib),  # KiB
                "MY.GliteVmImage": _ad_string(self.image),
                "MY.GliteVmRoot": "true" if self.root else "false",
                "MY.GliteVmKeepSnapshot": _ad_string(_keep(self).value),
                "MY.WantIOProxy": "true",  # the hooks and the launcher chirp into the job ad
            }
        )
        if self.image_sha256 is not None:
            items["MY.GliteVmImageSha256"] = _ad_string(self.image_sha256)
        if self.hostname is not None:
            items["MY.GliteVmHostname"] = _ad_string(self.hostname)
        if self.network is not None:
            items["MY.GliteVmNetwork"] = _ad_string(self.network)
        return items

    def write_files(self, directory: str | os.PathLike[str]) -> Path:
        """Create ``directory`` and write the job's script there; return the directory."""
        d = Path(os.path.abspath(os.fspath(directory)))
        d.mkdir(parents=True, exist_ok=True)
        if self.script is not None:
            write_script(d / SCRIPT_NAME, self.script)
        return d

    def submit_description(self, directory: str | os.PathLike[str]) -> htcondor2.Submit:
        """An ``htcondor2.Submit`` for this job, whose files live in ``directory``.

        ``directory`` becomes the job's ``initialdir``; it is created, and a script job's
        script is written there (the only side effect). Submit it with
        ``htcondor2.Schedd().submit(description)`` or use :func:`submit`.
        """
        import htcondor2  # noqa: PLC0415 - HTCondor only where HTCondor is used

        d = self.write_files(directory)
        return htcondor2.Submit(self.submit_items(d))


def _keep(job: VmJob) -> KeepSnapshot:
    keep = job.keep_snapshot
    assert isinstance(keep, KeepSnapshot)  # __post_init__ made it one
    return keep


def _submit_text(value: str) -> str:
    """``value`` as a submit-language value that macro expansion gives back unchanged.

    Only a ``$`` that starts a macro (``$(``, ``$ENV(``, ``$Fn(``, ...) is escaped, as
    ``$(DOLLAR)``; any other ``$`` (``$HOME``, ``$$``) is left alone by condor_submit.
    """
    return _MACRO_DOLLAR.sub("$(DOLLAR)", value)


def _ad_string(value: str) -> str:
    # validated: no quote, backslash or line break, so plain quoting is exact
    return '"' + _submit_text(value) + '"'


def submit_words(words: Iterable[str]) -> str:
    """``arguments`` or ``environment`` in a submit file: the job ad's V2 syntax
    (:func:`~glite_vm.condor.jobad.v2_quote`) in double quotes, a double quote doubled
    (``"'a b' 'it''s' 'say ""hi""'"``)."""
    return '"' + v2_quote(words).replace('"', '""') + '"'


def write_script(path: Path, text: str) -> None:
    """Write a job's script, executable, with a ``#!/bin/sh`` line when it has none."""
    if not text.startswith("#!"):
        text = "#!/bin/sh\n" + text
    if not text.endswith("\n"):
        text += "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


# --- results ------------------------------------------------------------------------------------


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
    """A job in an HTCondor queue, as :func:`submit` made it. Hashable; a dict key."""

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
    """A job run on this host by :func:`run_local`."""

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


def _outputs_in(directory: Path, declared: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The job's outputs in its directory, and the declared ones that are not there."""
    if declared:
        found = [directory / o for o in declared if os.path.lexists(directory / o)]
        missing = [o for o in declared if not os.path.lexists(directory / o)]
        return found, missing
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return [], []
    return [directory / n for n in names if n not in RESERVED_NAMES], []


# --- HTCondor: submit, wait, result -------------------------------------------------------------


def _schedd_for(handle: JobHandle | None, schedd: Any) -> Any:
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
    base = _base_directory(directory, "glite-vm-jobs-")
    the_schedd = _schedd_for(None, schedd)
    handles: list[JobHandle] = []
    for job in job_list:
        job_dir = Path(tempfile.mkdtemp(prefix=image_slug(job.image) + "-", dir=base))
        job_dir.chmod(0o755)
        handles.append(_submit_one(the_schedd, job, job_dir, handles))
    return handles


def _base_directory(directory: str | os.PathLike[str] | None, prefix: str) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    base = Path(os.path.abspath(os.fspath(directory)))
    base.mkdir(parents=True, exist_ok=True)
    return base


def _submit_one(schedd: Any, job: VmJob, job_dir: Path, done: Sequence[JobHandle]) -> JobHandle:
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
            s = _schedd_for(h, schedd)
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
    s = _schedd_for(handle, schedd)
    ads = _query(s, [handle], [])
    ad = ads[0] if ads else _history(s, handle, [])
    if ad is None:
        raise JobNotFoundError(f"job {handle.job_id} is neither in the queue nor in the history")
    return result_from_ad(handle, ad)


def result_from_ad(handle: JobHandle, ad: Mapping[str, object]) -> PoolResult:
    """Read a :class:`PoolResult` from a job ad (a ``classad2.ClassAd`` or a plain mapping)."""
    plain = _plain_ad(ad)
    state = JobState.of(plain.get("JobStatus"))
    by_signal = plain.get("ExitBySignal") is True
    exit_code = None
    if state is JobState.COMPLETED and not by_signal:
        exit_code = _int(plain.get("ExitCode"))
    exit_signal = _int(plain.get("ExitSignal")) if by_signal else None
    if exit_signal is None:
        exit_signal = _int(plain.get("GliteVmPayloadSignal"))
    timings: dict[str, float] = {}
    for name, value in plain.items():
        if name.startswith("GliteVmTime") and len(name) > len("GliteVmTime"):
            number = _float(value)
            if number is not None:
                timings[_snake(name[len("GliteVmTime") :])] = number
    held = state is JobState.HELD
    outputs, missing = _outputs_in(handle.directory, handle.job.outputs)
    cache_hit = plain.get("GliteVmCacheHit")
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
        snapshot_path=_path(plain.get("GliteVmSnapshotPath")),
        boot_log_path=_path(plain.get("GliteVmBootLogPath")),
        record_path=_path(plain.get("GliteVmRecordPath")),
        domain=_str(plain.get("GliteVmDomain")),
        hypervisor=_str(plain.get("GliteVmHypervisor")),
        image_digest=_str(plain.get("GliteVmImageDigest")),
        cache_hit=cache_hit if isinstance(cache_hit, bool) else None,
        timings=timings,
        hold_reason=_str(plain.get("HoldReason")) if held else None,
        hold_reason_code=_int(plain.get("HoldReasonCode")) if held else None,
        hold_reason_subcode=_int(plain.get("HoldReasonSubCode")) if held else None,
        launcher_error=_str(plain.get("GliteVmLauncherError")),
        host_failures=_str(plain.get("GliteVmHostFailures")),
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


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _path(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


# --- this host: run_local ---------------------------------------------------------------------


def run_local(
    job: VmJob,
    settings: Settings | None = None,
    *,
    directory: str | os.PathLike[str] | None = None,
    host: VmHost | None = None,
    download_progress: Progress | None = None,
    cancel: threading.Event | None = None,
    timeout: float | None = None,
) -> LocalResult:
    """Run ``job`` on this host, without HTCondor, through :func:`glite_vm.session.run_job`.

    That is the engine ``glite-vm run`` uses: same image cache, same VM life cycle, same
    snapshot policy. The job's directory (``directory``, default a new temporary directory)
    receives its stdout and stderr (written as they arrive), its outputs by the same rule as on
    a pool, and the script. ``settings`` default to :meth:`Settings.load` (read once);
    ``host`` lets several runs share one libvirt connection (:func:`glite_vm.session.open_host`).
    ``timeout`` (seconds, more than zero; checked before anything boots) bounds the payload:
    one that outlives it ends in :class:`~glite_vm.errors.PayloadTimeoutError` (hold-class: the
    job's own limit). ``cancel`` stops it with :class:`~glite_vm.errors.AgentError`. Both come
    after the VM is torn down. A request the host refuses (memory above its maximum, a network
    it does not offer) raises :class:`~glite_vm.errors.RequestError` naming the parameter.

    Differences from a pool, on purpose: the image may be a local path; a declared output the
    job did not make is listed in ``missing_outputs`` (HTCondor holds such a job); the VM is
    the caller's own, so its ``hostname`` is set whatever the site's policy on job-chosen names.
    Raises the library's errors (hold-class for the job's faults, requeue-class for this
    host's).
    """
    from glite_vm.session import JobSpec, run_job  # noqa: PLC0415 - needs libvirt
    from glite_vm.vm.connect import open_host  # noqa: PLC0415 - needs libvirt

    if not isinstance(job, VmJob):
        raise RequestError("job", f"must be a VmJob, got {type(job).__name__}")
    if directory is not None and os.path.isdir(directory) and os.listdir(directory):
        raise RequestError(
            "directory", f"{os.fspath(directory)} is not empty; give a new or empty directory"
        )
    limit = None if timeout is None else parse_timeout(timeout, "timeout")
    the_settings = settings if settings is not None else Settings.load()
    job_dir = job.write_files(_base_directory(directory, "glite-vm-local-"))
    staging = Path(tempfile.mkdtemp(prefix=".glite-vm-in-", dir=job_dir))
    pulled = Path(tempfile.mkdtemp(prefix=".glite-vm-out-", dir=job_dir))
    own_host = host is None
    try:
        argv = _stage_inputs(job, job_dir, staging)
        spec = JobSpec(
            image=job.image,
            argv=argv,
            image_sha256=job.image_sha256,
            root=job.root,
            cpus=job.cpus,
            memory_mib=job.memory_mib,
            disk=job.disk_bytes,
            keep_snapshot=_keep(job),
            input_dir=staging,
            output_dir=pulled,
            env=dict(job.env),
            timeout=limit,
            network=job.network,
            hostname=job.hostname,
        )
        the_host = host if host is not None else open_host(the_settings)
        try:
            with (
                (job_dir / STDOUT_NAME).open("wb") as out,
                (job_dir / STDERR_NAME).open("wb") as err,
            ):
                try:
                    done = run_job(
                        the_host,
                        spec,
                        stdout=_sink(out),
                        stderr=_sink(err),
                        progress=download_progress,
                        cancel=cancel,
                    )
                except RequestError as exc:
                    raise with_field_names(exc, PARAMETER_NAMES) from None
        finally:
            if own_host:
                the_host.conn.close()
        _adopt_outputs(job, pulled, job_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(pulled, ignore_errors=True)
    outputs, missing = _outputs_in(job_dir, job.outputs)
    return LocalResult(
        image=job.image,
        directory=job_dir,
        exit_code=done.exit_code,
        signal=done.signal,
        stdout_path=job_dir / STDOUT_NAME,
        stderr_path=job_dir / STDERR_NAME,
        outputs=outputs,
        missing_outputs=missing,
        snapshot_path=done.snapshot_path,
        boot_log_path=done.boot_log_path,
        record_path=done.record_path,
        domain=done.domain,
        hypervisor=done.hypervisor,
        image_digest=done.image_digest,
        cache_hit=done.cache_hit,
        timings={k: v for k, v in done.timings.as_dict().items() if v is not None},
        boot_attempts=done.boot_attempts,
    )


def _sink(f: Any) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        f.write(data)
        f.flush()

    return write


def _stage_inputs(job: VmJob, job_dir: Path, staging: Path) -> list[str]:
    """Copy the payload and the inputs where the guest's working directory is made from.

    Returns the command line in the guest. Symlinks are copied as links (the transfer layer
    decides what a link may point at).
    """
    if job.script is not None:
        shutil.copy2(job_dir / SCRIPT_NAME, staging / SCRIPT_NAME)
        program = f"./{SCRIPT_NAME}"
    elif job.transfer_executable:
        exe = str(job.executable)
        name = _path_name(exe)
        shutil.copy2(exe, staging / name)
        (staging / name).chmod((staging / name).stat().st_mode | 0o755)
        program = f"./{name}"
    else:
        program = str(job.executable)
    for item in (str(i) for i in job.inputs):
        src = Path(item)
        if item.endswith("/"):
            for child in sorted(src.iterdir()):
                _copy_entry(child, staging / child.name)
        else:
            _copy_entry(src, staging / src.name)
    return [program, *job.arguments]


def _copy_entry(src: Path, dest: Path) -> None:
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dest, symlinks=True)
    else:
        shutil.copy2(src, dest, follow_symlinks=False)


def _adopt_outputs(job: VmJob, pulled: Path, job_dir: Path) -> None:
    """Move what came back into the job's directory by HTCondor's rule (see :class:`VmJob`)."""
    if job.outputs:
        wanted = list(job.outputs)
    else:
        wanted = [
            p.name
            for p in sorted(pulled.iterdir())
            if p.is_file() and not p.is_symlink() and p.name not in RESERVED_NAMES
        ]
    for rel in wanted:
        src, dest = pulled / rel, job_dir / rel
        if not os.path.lexists(src):
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(src, dest)


# --- many platforms: matrix -------------------------------------------------------------------

MatrixOutcome = LocalResult | GliteVmError


@overload
def matrix(
    images: Iterable[str],
    job: VmJob,
    *,
    local: Literal[False] = False,
    directory: str | os.PathLike[str] | None = None,
    schedd: Any = None,
) -> dict[str, JobHandle]: ...


@overload
def matrix(
    images: Iterable[str],
    job: VmJob,
    *,
    local: Literal[True],
    directory: str | os.PathLike[str] | None = None,
    settings: Settings | None = None,
    download_progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, MatrixOutcome]: ...


def matrix(
    images: Iterable[str],
    job: VmJob,
    *,
    local: bool = False,
    directory: str | os.PathLike[str] | None = None,
    schedd: Any = None,
    settings: Settings | None = None,
    download_progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, JobHandle] | dict[str, MatrixOutcome]:
    """The same job on every image; results kept apart in ``<directory>/<image slug>/``.

    ``job``'s own image is replaced by each of ``images`` (every variant is validated first,
    so a bad image name fails before anything runs). The slug is the catalogue name itself, or
    a sanitised name with a hash for URLs and paths (:func:`image_slug`); those directories
    must not exist yet.

    Pooled (default): submits one cluster per image and returns ``{image: JobHandle}`` at once;
    pass the handles to :func:`wait`. Local (``local=True``): runs the images one after the
    other on this host with :func:`run_local` over one libvirt connection and returns
    ``{image: LocalResult}``; an image that fails with a glite-vm error (unknown image, boot
    failure, ...) gets that error as its value and the others still run. Once ``cancel`` is
    set, the running image stops and the ones not started get a "cancelled" error.
    """
    if not isinstance(job, VmJob):
        raise RequestError("job", f"must be a VmJob, got {type(job).__name__}")
    if isinstance(images, str):
        raise RequestError("images", "must be a list of images, not one string")
    image_list = list(images)
    if not image_list:
        raise RequestError("images", "is empty")
    if len(set(image_list)) != len(image_list):
        twice = sorted({i for i in image_list if image_list.count(i) > 1})
        raise RequestError("images", f"lists {', '.join(twice)} more than once")
    variants = {image: job.with_image(image) for image in image_list}
    base = _base_directory(directory, "glite-vm-matrix-")
    dirs = {image: base / image_slug(image) for image in image_list}
    for path in dirs.values():
        if os.path.lexists(path):
            raise RequestError("directory", f"{path} exists already; give a fresh directory")
    if not local:
        the_schedd = _schedd_for(None, schedd)
        handles: dict[str, JobHandle] = {}
        for image, variant in variants.items():
            dirs[image].mkdir(mode=0o755)
            handles[image] = _submit_one(the_schedd, variant, dirs[image], list(handles.values()))
        return handles

    from glite_vm.vm.connect import open_host  # noqa: PLC0415 - needs libvirt

    the_settings = settings if settings is not None else Settings.load()
    host = open_host(the_settings)
    outcomes: dict[str, MatrixOutcome] = {}
    try:
        for image, variant in variants.items():
            if cancel is not None and cancel.is_set():
                outcomes[image] = GliteVmError("cancelled before this image started")
                continue
            dirs[image].mkdir(mode=0o755)
            try:
                outcomes[image] = run_local(
                    variant,
                    the_settings,
                    directory=dirs[image],
                    host=host,
                    download_progress=download_progress,
                    cancel=cancel,
                )
            except GliteVmError as exc:
                outcomes[image] = exc
    finally:
        host.conn.close()
    return outcomes
