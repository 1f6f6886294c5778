"""Running ``qemu-img``: the one place that starts it, bounds it in time and turns its failures
into :class:`~glite_vm.errors.HypervisorError` (the host's fault) unless the caller judges the
exit status itself (an image QEMU cannot read is the image's fault: images/inspect.py).

Paths are passed absolute, so none parses as a QEMU protocol prefix (``nbd:``, ``json:``, ...)
unless the caller means one; stdin is closed; the environment is this process's.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from glite_vm.errors import HypervisorError

DEFAULT_TIMEOUT = 120.0  # seconds; an overlay or an info takes milliseconds


def qemu_img(
    args: Sequence[str | Path],
    what: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
    fds: tuple[int, ...] = (),
    umask: int = -1,
    stderr_limit: int | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """``qemu-img ARGS``; ``what`` says what for, in errors. With ``check`` a non-zero exit
    status is a HypervisorError quoting QEMU's last line; without it the caller reads
    ``returncode``. ``fds`` are passed on (``/dev/fd/N`` paths); ``umask`` is qemu-img's own,
    for the files it creates (-1: this process's). With ``stderr_limit`` only the first that
    many bytes of its stderr are kept (spooled to a temporary file meanwhile, not memory: a
    damaged image makes ``check`` complain once per cluster)."""
    exe = shutil.which("qemu-img")
    if exe is None:
        raise HypervisorError(f"{what}: qemu-img is not installed (Debian: qemu-utils)")
    argv = [exe, *(str(a) for a in args)]
    with contextlib.ExitStack() as stack:
        spill = None if stderr_limit is None else stack.enter_context(tempfile.TemporaryFile())
        try:
            done = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if spill is None else spill,
                timeout=timeout,
                check=False,
                stdin=subprocess.DEVNULL,
                pass_fds=fds,
                umask=umask,
            )
        except subprocess.TimeoutExpired as exc:
            raise HypervisorError(f"{what}: qemu-img did not finish within {timeout:g} s") from exc
        except OSError as exc:
            raise HypervisorError(f"{what}: cannot run qemu-img: {exc}") from exc
        if spill is not None:
            spill.seek(0)
            done.stderr = spill.read(stderr_limit)
    if check and done.returncode != 0:
        raise HypervisorError(f"{what}: {last_line(done.stderr) or done.returncode}")
    return done


def last_line(output: bytes) -> str:
    """The last non-empty line qemu-img printed ('' when none)."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines()]
    return next((line for line in reversed(lines) if line), "")


def overlay_command(base: Path, base_format: str, overlay: Path, size: int) -> list[str]:
    """The arguments of a job's copy-on-write overlay on ``base`` (``-u``: the base is not
    opened, so the cost does not depend on its size)."""
    return [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        str(base),
        "-F",
        base_format,
        str(overlay),
        str(size),
    ]


def version() -> str | None:
    """qemu-img's version line (``None`` when it cannot be run)."""
    try:
        done = qemu_img(["--version"], "asking qemu-img its version", timeout=10)
    except HypervisorError:
        return None
    first = done.stdout.decode(errors="replace").splitlines()[:1]
    return first[0].strip() if first and first[0].strip() else None
