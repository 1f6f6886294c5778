"""Sandbox I/O with the job owner's rights: pack a directory into a tar stream, or unpack one.

The service (root) runs this module as a child process under the caller's uid, gid and groups
(``python -I -m glite_vm.service._sandbox_io``, request as JSON on stdin, result as JSON on
stdout) and hands it one end of a pipe: the child writes the tar stream of the input files
into it, or reads the guest's output stream from it, and the service moves the bytes between
the pipe and the VM's transfer disk (:mod:`glite_vm.service.sandbox`). Every file of the
sandbox is opened with the caller's rights: a symlink travels as a link and is never followed,
and a hard link or a ``..`` path to a file the caller cannot read fails with the kernel's
"permission denied" instead of leaking the file into the guest. Output lands in the
destination with the caller as the owner of every file.

The same functions run in-process on the transfer disk itself when the caller is the service's
own user. Standard library and :mod:`glite_vm.vm.transfer` only (no libvirt): the child starts
quickly.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

from glite_vm.errors import AccessDeniedError, GliteVmError, HostError, RequestError
from glite_vm.vm import transfer


def unpack_from(
    in_fd: int, dest: Path, unchanged_from: Path | None, refused: list[str], limit: int
) -> list[str]:
    """Extract the guest's tar stream from ``in_fd`` (a pipe, or the transfer disk) into
    ``dest`` (created if missing); names of the new and changed files. ``limit`` bounds the
    output (the transfer disk's size: the job's disk request). Refused members are listed in
    ``refused``."""
    if not dest.is_absolute():
        raise RequestError("dest_dir", f"{dest} is not an absolute path")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AccessDeniedError(
            f"cannot create the output directory {dest} as the job's owner: {exc.strerror}"
        ) from None
    if dest.is_symlink() or not dest.is_dir():
        raise RequestError("dest_dir", f"{dest} is not a directory (symlinks are not followed)")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".glite-vm-out-", dir=dest))
    except OSError as exc:
        raise AccessDeniedError(f"cannot write into {dest}: {exc.strerror}") from None
    try:
        with os.fdopen(os.dup(in_fd), "rb") as raw:
            names = transfer.extract_stream(raw, staging, refused, limit=limit)
        return transfer.copy_changed(staging, names, dest, unchanged_from)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# -- the child process -----------------------------------------------------------------------


def _serve_one(request: dict[str, Any]) -> dict[str, Any]:
    fd, limit = int(request["fd"]), int(request["limit"])
    if request["op"] == "pack":
        try:
            return {"bytes": transfer.pack_into(fd, Path(request["src"]), limit)}
        finally:
            os.close(fd)  # the end of the stream for the service
    if request["op"] == "unpack":
        refused: list[str] = []
        before = request.get("unchanged_from")
        dest, previous = Path(request["dest"]), Path(before) if before else None
        files = unpack_from(fd, dest, previous, refused, limit)
        return {"files": files, "refused": refused}
    raise ValueError(f"unknown operation {request['op']!r}")


def main(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    try:
        result: dict[str, Any] = {"ok": True, "result": _serve_one(json.loads(stdin.read()))}
    except GliteVmError as exc:
        result = {"ok": False, "type": type(exc).__name__, "message": exc.message}
    except OSError as exc:
        denied = exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
        kind = AccessDeniedError if denied else HostError
        result = {"ok": False, "type": kind.__name__, "message": _os_message(exc)}
    stdout.write(json.dumps(result).encode())
    stdout.flush()
    return 0


def _os_message(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"copying the job's files as its owner failed: {exc.strerror or exc}{where}"


if __name__ == "__main__":
    sys.exit(main(sys.stdin.buffer, sys.stdout.buffer))
