"""A job's directory: the names glite-vm uses there, the script, where directories are made and
which outputs came back. Every job owns one (the submit's ``initialdir``, or the ``directory``
of a local run); its script, stdout, stderr, HTCondor's event log and its outputs land there, on
a pool and locally alike.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

#: Names the API uses in every job directory; a job's inputs and outputs may not take them.
SCRIPT_NAME: Final = "glite-vm-job.sh"
STDOUT_NAME: Final = "glite-vm-job.out"
STDERR_NAME: Final = "glite-vm-job.err"
LOG_NAME: Final = "glite-vm-job.log"
RESERVED_NAMES: Final = frozenset({SCRIPT_NAME, STDOUT_NAME, STDERR_NAME, LOG_NAME})

_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def path_name(path: str | os.PathLike[str]) -> str:
    """The name ``path`` has once copied into a directory (its last component)."""
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


def base_directory(directory: str | os.PathLike[str] | None, prefix: str) -> Path:
    """``directory`` made absolute and created, or a new temporary directory named ``prefix*``."""
    if directory is None:
        return Path(tempfile.mkdtemp(prefix=prefix))
    base = Path(os.path.abspath(os.fspath(directory)))
    base.mkdir(parents=True, exist_ok=True)
    return base


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


def outputs_in(directory: Path, declared: Sequence[str]) -> tuple[list[Path], list[str]]:
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
