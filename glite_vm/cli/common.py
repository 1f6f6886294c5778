"""What every `glite-vm` sub-command shares: exit statuses, error reports, tables, confirmation.

Exit statuses (README "Exit statuses", ``glite-vm run --help``):

* ``run`` exits with the command's own status (128 + N when signal N ended it). glite-vm's own
  failures exit :data:`EXIT_FAILURE` (125), as ``docker run`` and the HTCondor launcher do, so a
  command exiting 1, 2 or 3 is never taken for a glite-vm failure; a command that outlives
  ``--timeout`` exits :data:`EXIT_TIMEOUT` (124), as under ``timeout(1)``. glite-vm never uses
  126 and 127: those come from the guest's shell (command not executable / not found).
* Every other sub-command exits 0 when it did its job, :data:`EXIT_PROBLEMS` (1) when it did
  it and reports a problem it found (``doctor``, ``cache verify``, a prune that could not remove
  everything, a question answered "no"), and 125 when glite-vm failed.

A failure names its class on stderr: ``request error`` (fix the command line or its inputs),
``configuration error`` (a GLITE_VM_* setting), ``host error`` (this host failed: libvirt, the
disk, the network) or ``internal error`` (a bug); never a Python traceback.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final

from glite_vm.errors import GliteVmError, RequestError, UserError
from glite_vm.request import with_field_names

EXIT_PROBLEMS: Final = 1
EXIT_TIMEOUT: Final = 124
EXIT_FAILURE: Final = 125

#: Job-ad attributes and library parameter names -> the options a CLI user typed.
OPTION_NAMES: Final[Mapping[str, str]] = {
    "GliteVmImage": "--image",
    "GliteVmImageSha256": "--sha256",
    "GliteVmRoot": "--root",
    "GliteVmKeepSnapshot": "--keep-snapshot",
    "GliteVmNetwork": "--network",
    "GliteVmHostname": "--hostname",
    "RequestCpus": "--cpus",
    "RequestMemory": "--memory",
    "RequestDisk": "--disk",
    "timeout": "--timeout",
    "input_dir": "--input",
    "output_dir": "--output",
}

#: errno values of an OSError that point at what the user gave (a path), not at the host.
_USER_ERRNOS: Final = frozenset(
    {
        errno.EACCES,
        errno.EPERM,
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)


def error_class(exc: BaseException) -> str:
    """``request``, ``host`` or ``internal``: who has to act on ``exc``."""
    if isinstance(exc, GliteVmError):
        return "request" if exc.is_user_error else "host"
    if isinstance(exc, OSError):
        return "request" if exc.errno in _USER_ERRNOS else "host"
    if isinstance(exc, ValueError):
        return "request"  # the library's plain ValueErrors are values it was given
    return "internal"


def describe_error(exc: BaseException) -> str:
    """The message of ``exc`` as a CLI user should read it (options, not ad attributes)."""
    if isinstance(exc, RequestError):
        return str(with_field_names(exc, OPTION_NAMES))
    if isinstance(exc, GliteVmError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    if isinstance(exc, ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc} (a bug in glite-vm; -vv shows where)"


def signalled(exc: BaseException) -> BaseException:
    """What a signal handler raised, also when it ran inside a C function's callback (libvirt
    calls its error handler in Python, where a pending handler runs), which Python reports as
    a SystemError caused by it; else ``exc`` itself."""
    if isinstance(exc, SystemError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


def report_error(exc: BaseException, context: str = "") -> None:
    """``glite-vm: [context: ]<class> error: <message>`` on stderr."""
    prefix = f"glite-vm: {context}: " if context else "glite-vm: "
    print(f"{prefix}{error_class(exc)} error: {describe_error(exc)}", file=sys.stderr)


def print_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()
) -> None:
    """Columns as wide as their widest cell, two blanks apart; ``right``: right-aligned ones."""
    table = [list(header), *(list(r) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        cells = [
            cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        print("  ".join(cells).rstrip())


def confirm(question: str, *, yes: bool) -> bool:
    """Ask before removing anything: ``--yes`` answers for the user; without a terminal to ask
    on (a script), nothing is removed and the error says how to confirm."""
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UserError(
            "nothing was removed: confirm with --yes (no terminal to ask on), or look first "
            "with --dry-run"
        )
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        answer = ""
    return answer.strip().lower() in ("y", "yes")


def local_ref(ref: str) -> str:
    """A path the user typed (anything with '/' and no scheme) made absolute."""
    if "://" in ref or "/" not in ref or ref.startswith("/"):
        return ref
    return os.path.abspath(ref)
