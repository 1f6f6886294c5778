"""What the job runs, from its ad as submitted: HTCondor's argument syntaxes (``Args`` and
``Arguments``), its environment (``Env`` and ``Environment``) and its executable. Pure: the
launcher (:mod:`glite_vm.condor.launcher`) reads the ad from ``$_CONDOR_JOB_AD`` and runs what
this module makes of it; a malformed field is a ``RequestError`` naming it."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import classad2

from glite_vm.errors import RequestError


@dataclasses.dataclass(frozen=True)
class Payload:
    """The job's command as it runs in the guest's working directory."""

    argv: tuple[str, ...]
    env: dict[str, str]
    executable: str  # the scratch-directory name of a transferred executable, else ""


def split_v1_arguments(text: str) -> list[str]:
    """HTCondor's old argument syntax (``Args``): words separated by blanks, no quoting."""
    return text.split()


def split_v2_arguments(text: str, field: str = "Arguments") -> list[str]:
    """HTCondor's new argument syntax (``Arguments``, ``Environment``).

    Blanks separate words; single quotes group, and inside them a doubled quote stands for one.
    Quoted and unquoted parts of one word join (``a' 'b`` is ``a b``); ``''`` is an empty word.
    """
    words: list[str] = []
    current: list[str] = []
    started = False
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "'":
            started = True
            i += 1
            while True:
                if i >= n:
                    raise RequestError(field, f"has an unbalanced single quote: {text[:80]!r}")
                if text[i] == "'":
                    if i + 1 < n and text[i + 1] == "'":
                        current.append("'")
                        i += 2
                        continue
                    i += 1
                    break
                current.append(text[i])
                i += 1
        elif c.isspace():
            if started:
                words.append("".join(current))
                current, started = [], False
            i += 1
        else:
            current.append(c)
            started = True
            i += 1
    if started:
        words.append("".join(current))
    return words


def _env_pairs(items: Sequence[str], field: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise RequestError(field, f"has {item[:60]!r}, which is not NAME=VALUE")
        env[name] = value
    return env


def parse_environment(job_ad: Mapping[str, object]) -> dict[str, str]:
    """The job's environment: ``Environment`` (new syntax), else ``Env`` (old, ``;``-separated)."""
    v2 = _string(job_ad, "Environment")
    if v2 is not None:
        return _env_pairs(split_v2_arguments(v2, "Environment"), "Environment")
    v1 = _string(job_ad, "Env")
    if v1 is not None:
        delimiter = _string(job_ad, "EnvDelim") or ";"  # condor_submit writes EnvDelim = ";"
        return _env_pairs([p for p in v1.split(delimiter[0]) if p.strip()], "Env")
    return {}


def parse_arguments(job_ad: Mapping[str, object]) -> list[str]:
    """The job's arguments: ``Arguments`` (new syntax) or else ``Args`` (old syntax)."""
    v2 = _string(job_ad, "Arguments")
    if v2 is not None:
        return split_v2_arguments(v2)
    v1 = _string(job_ad, "Args")
    return split_v1_arguments(v1) if v1 is not None else []


def _string(job_ad: Mapping[str, object], name: str) -> str | None:
    try:
        value = job_ad.get(name)
    except Exception:
        return None
    if value is None or value is classad2.Value.Undefined:
        return None
    if not isinstance(value, str):
        raise RequestError(name, f"must be a string in the job ad, got {value!r:.60}")
    return value


def payload_from_job_ad(job_ad: Mapping[str, object], inputs: Sequence[str]) -> Payload:
    """What to run in the guest for the job as submitted (``$_CONDOR_JOB_AD``).

    A transferred executable (``TransferExecutable`` not false, and its basename among the
    inputs) runs as ``./<basename>`` in the guest's working directory; otherwise ``Cmd`` is a
    path inside the guest (``transfer_executable = false``, e.g. ``/bin/sh``).
    """
    cmd = _string(job_ad, "Cmd")
    if not cmd:
        raise RequestError("Cmd", "the job ad names no executable")
    try:
        transfer = job_ad.get("TransferExecutable")
    except Exception:
        transfer = None
    basename = os.path.basename(cmd)
    executable = basename if transfer is not False and basename in inputs else ""
    program = f"./{executable}" if executable else cmd
    return Payload(
        argv=(program, *parse_arguments(job_ad)),
        env=parse_environment(job_ad),
        executable=executable,
    )
