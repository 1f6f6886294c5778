"""A job for the API: :class:`VmJob`, one payload to run in a fresh VM, validated when it is made.

A bad value raises :class:`~glite_vm.errors.RequestError` whose ``field`` is the parameter's
name. The same job goes to a pool (:mod:`glite_vm.api.pool`), to this host
(:mod:`glite_vm.api.local`) or to many images (:mod:`glite_vm.api.matrix`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from glite_vm.api.jobdir import (
    LOG_NAME,
    RESERVED_NAMES,
    SCRIPT_NAME,
    STDERR_NAME,
    STDOUT_NAME,
    path_name,
    write_script,
)
from glite_vm.api.submit_language import ad_string, check_submit_text, submit_text, submit_words
from glite_vm.errors import RequestError
from glite_vm.knob_values import check_network_name
from glite_vm.request import KeepSnapshot
from glite_vm.units import KIB, MIB, format_size, parse_size

if TYPE_CHECKING:
    import htcondor2

#: Smallest memory and disk a job may ask for (the VM layer's own lower bounds).
MIN_SIZE: Final = 64 * MIB

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

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _refield(field: str, error: RequestError) -> RequestError:
    return RequestError(field, error.problem)


def _plain_string(field: str, value: object) -> str:
    """A string that goes into a job ad attribute: one line, no quote, no backslash."""
    if not isinstance(value, str):
        raise RequestError(field, f"must be a string, got {type(value).__name__}")
    check_submit_text(field, value)
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
    (``GliteVmHostname``; on a pool only where the site allows it). ``image_sha256``
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
            check_submit_text("arguments", arg)
        object.__setattr__(self, "arguments", tuple(self.arguments))
        if not isinstance(self.env, Mapping):
            raise RequestError("env", "must be a mapping of variable names to strings")
        for name, value in self.env.items():
            if not isinstance(name, str) or not _ENV_NAME.match(name):
                raise RequestError("env", f"{name!r} is not a variable name")
            if not isinstance(value, str):
                raise RequestError("env", f"the value of {name} must be a string")
            check_submit_text("env", value)
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
        check_submit_text("executable", text)
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
        name = path_name(text)
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
            taken[path_name(str(self.executable))] = "the executable"
        out: list[str] = []
        for item in self.inputs:
            if not isinstance(item, str | os.PathLike):
                raise RequestError("inputs", f"must be paths, got {item!r}")
            text = os.fspath(item)
            check_submit_text("inputs", text)
            if "," in text or text != text.strip():
                raise RequestError(
                    "inputs", f"{text!r}: HTCondor cannot transfer names with ',' or edge blanks"
                )
            if not os.path.exists(text):
                raise RequestError("inputs", f"{text} does not exist")
            contents = isinstance(item, str) and text.endswith("/") and os.path.isdir(text)
            absolute = os.path.abspath(text) + ("/" if contents else "")
            names = os.listdir(text) if contents else [path_name(text)]
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
            check_submit_text("outputs", item)
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
        return path_name(self.executable) if self.transfer_executable else str(self.executable)

    def with_image(self, image: str) -> VmJob:
        """This job for another image (the matrix case). Validated like a new job."""
        return dataclasses.replace(self, image=image)

    # -- HTCondor -----------------------------------------------------------------------------

    def submit_items(self, directory: str | os.PathLike[str]) -> dict[str, str]:
        """The submit description as ``{command: value}`` for ``directory``. Pure.

        Every value is written so that ``condor_submit`` gives it back unchanged
        (:mod:`glite_vm.api.submit_language`).
        """
        d = os.path.abspath(os.fspath(directory))
        check_submit_text("directory", d)
        if d != d.rstrip():
            raise RequestError("directory", f"{d!r} ends in a blank, which HTCondor would drop")
        executable = (
            os.path.join(d, SCRIPT_NAME) if self.script is not None else str(self.executable)
        )
        items: dict[str, str] = {
            "universe": "vanilla",
            "executable": submit_text(executable),
            "transfer_executable": "true" if self.transfer_executable else "false",
        }
        if self.arguments:
            items["arguments"] = submit_text(submit_words(self.arguments))
        if self.env:
            pairs = (f"{name}={value}" for name, value in self.env.items())
            items["environment"] = submit_text(submit_words(pairs))
        items.update(
            {
                "initialdir": submit_text(d),
                "output": submit_text(os.path.join(d, STDOUT_NAME)),
                "error": submit_text(os.path.join(d, STDERR_NAME)),
                "log": submit_text(os.path.join(d, LOG_NAME)),
                "should_transfer_files": "YES",
                "when_to_transfer_output": "ON_EXIT",
            }
        )
        if self.inputs:
            items["transfer_input_files"] = submit_text(", ".join(str(i) for i in self.inputs))
        if self.outputs:
            items["transfer_output_files"] = submit_text(", ".join(self.outputs))
            if any("/" in o for o in self.outputs):
                items["preserve_relative_paths"] = "true"
        items.update(
            {
                "request_cpus": str(self.cpus),
                "request_memory": str(self.memory_mib),  # MiB
                "request_disk": str(self.disk_kib),  # KiB
                "MY.GliteVmImage": ad_string(self.image),
                "MY.GliteVmRoot": "true" if self.root else "false",
                "MY.GliteVmKeepSnapshot": ad_string(KeepSnapshot(self.keep_snapshot).value),
                "MY.WantIOProxy": "true",  # the hooks and the launcher chirp into the job ad
            }
        )
        if self.image_sha256 is not None:
            items["MY.GliteVmImageSha256"] = ad_string(self.image_sha256)
        if self.hostname is not None:
            items["MY.GliteVmHostname"] = ad_string(self.hostname)
        if self.network is not None:
            items["MY.GliteVmNetwork"] = ad_string(self.network)
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
        ``htcondor2.Schedd().submit(description)`` or use :func:`glite_vm.api.pool.submit`.
        """
        import htcondor2  # noqa: PLC0415 - HTCondor only where HTCondor is used

        d = self.write_files(directory)
        return htcondor2.Submit(self.submit_items(d))
