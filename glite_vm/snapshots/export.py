"""Export: a kept snapshot and its base flattened into one self-contained qcow2.

The image is written in a private directory of the exporter's and moved into place by
directory descriptors, so a destination directory its owner rearranges meanwhile never makes
the exporter (root) write through a link.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import stat
import time
from pathlib import Path

from glite_vm import _dirfd
from glite_vm.errors import HypervisorError, RequestError, UserError
from glite_vm.qemu_img import qemu_img
from glite_vm.snapshots.disk import (
    QEMU_IMG_TIMEOUT,
    SnapshotUnusableError,
    open_snapshot,
    qemu_img_info,
    require_disk,
)
from glite_vm.snapshots.entry import SnapshotEntry

_EXPORT_NAME = "export.qcow2"  # the image's name inside the exporter's private directory


class ExportExistsError(UserError, FileExistsError):
    """The export's destination exists and ``force`` was not given."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} exists; choose another name or overwrite it with --force")
        self.path = path


@dataclasses.dataclass(frozen=True)
class ExportResult:
    path: Path
    virtual_size: int
    file_bytes: int
    seconds: float


def export_snapshot(
    entry: SnapshotEntry, dest: Path, *, force: bool = False, compress: bool = False
) -> ExportResult:
    """Write snapshot + base as one self-contained qcow2 (no backing file) at ``dest``.

    The directory of ``dest`` may be someone else's, who can swap any name in it at any moment,
    so nothing is ever written through a name there: the image is made in a private directory
    (0700, the exporter's) created beside ``dest`` and addressed only through its descriptor
    (``/proc/self/fd/N`` for qemu-img), checked with ``qemu-img check``, and only then moved
    into place from that descriptor to the directory's (mode 0600: it holds the job's data).
    On the way to the directory, root follows only root's own links. ``dest`` never holds half
    an image; it is not replaced unless ``force``.
    """
    t0 = time.monotonic()
    snapshot, base = require_disk(entry)
    dest = Path(os.path.abspath(dest))
    if dest.name in ("", ".", ".."):
        raise RequestError("FILE", f"{dest} is a directory; name the image file to write")
    parent_fd = _open_export_dir(dest.parent)
    fds: list[int] = [parent_fd]
    work: str | None = None
    work_fd: int | None = None
    try:
        there = _dirfd.lstat_at(parent_fd, dest.name)
        if there is not None and stat.S_ISDIR(there.st_mode):
            raise RequestError("FILE", f"{dest} is a directory; name the image file to write")
        if there is not None and not force:
            raise ExportExistsError(dest)
        snap_fd = open_snapshot(entry, snapshot)
        fds.append(snap_fd)
        base_fd = _open_base(entry, base)
        fds.append(base_fd)
        work = f".glite-vm-export-{secrets.token_hex(6)}"
        os.mkdir(work, 0o700, dir_fd=parent_fd)
        work_fd = _private_dir(parent_fd, work)
        fds.append(work_fd)
        image = f"/proc/self/fd/{work_fd}/{_EXPORT_NAME}"
        argv = ["convert", "-O", "qcow2", *(["-c"] if compress else [])]
        argv += [_chain_json(f"/dev/fd/{snap_fd}", f"/dev/fd/{base_fd}", entry.base_format)]
        qemu_img(
            [*argv, image],
            f"exporting {entry.name}",
            timeout=QEMU_IMG_TIMEOUT,
            fds=(snap_fd, base_fd, work_fd),
        )
        os.chmod(_EXPORT_NAME, 0o600, dir_fd=work_fd)
        check = ["check", "-q", "-f", "qcow2", image]
        qemu_img(
            check, f"checking the export of {entry.name}", timeout=QEMU_IMG_TIMEOUT, fds=(work_fd,)
        )
        info = qemu_img_info(Path(image), fds=(work_fd,))
        if info.get("backing-filename") or info.get("full-backing-filename"):
            raise HypervisorError(f"the export of {entry.name} still has a backing file")
        size = os.stat(_EXPORT_NAME, dir_fd=work_fd, follow_symlinks=False).st_size
        if force:
            os.rename(_EXPORT_NAME, dest.name, src_dir_fd=work_fd, dst_dir_fd=parent_fd)
        else:
            try:  # fails rather than replace a file that appeared meanwhile
                os.link(
                    _EXPORT_NAME,
                    dest.name,
                    src_dir_fd=work_fd,
                    dst_dir_fd=parent_fd,
                    follow_symlinks=False,
                )
            except FileExistsError:
                raise ExportExistsError(dest) from None
    finally:
        if work is not None and work_fd is not None:
            _remove_private_dir(parent_fd, work, work_fd)
        elif work is not None:
            with contextlib.suppress(OSError):
                os.rmdir(work, dir_fd=parent_fd)  # made, but not ours to open: empty anyway
        for fd in fds:
            os.close(fd)
    return ExportResult(
        path=dest,
        virtual_size=int(info.get("virtual-size", 0)),
        file_bytes=size,
        seconds=time.monotonic() - t0,
    )


def _open_export_dir(directory: Path) -> int:
    """A descriptor of the directory the export goes to. As root, only root's own links are
    followed on the way (a user's link could lead root's write anywhere)."""
    try:
        if os.geteuid() == 0:
            return _dirfd.open_dir_path(directory, trusted_uids=frozenset({0}))
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RequestError("FILE", f"the directory {directory} does not exist") from None
    except NotADirectoryError:
        raise RequestError("FILE", f"{directory} is not a directory") from None
    except OSError as exc:
        raise RequestError(
            "FILE",
            f"cannot export into {directory}: {exc.strerror or exc}; "
            "choose a directory reached without other users' symbolic links",
        ) from None


def _private_dir(parent_fd: int, name: str) -> int:
    """The directory ``name`` just made in ``parent_fd``, opened, and proven to be the one made
    (the exporter's, 0700, empty): someone who swapped the name meanwhile gets an error."""
    try:
        fd = _dirfd.open_dir(name, dir_fd=parent_fd)
    except OSError as exc:
        raise HypervisorError(
            f"the export's work directory {name} was replaced meanwhile ({exc.strerror})"
        ) from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) != 0o700 or os.listdir(fd):
        os.close(fd)
        raise HypervisorError(f"the export's work directory {name} was replaced meanwhile")
    return fd


def _remove_private_dir(parent_fd: int, name: str, fd: int) -> None:
    """Remove what the export left in its private directory, and the directory when the name
    in ``parent_fd`` still is that directory."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_EXPORT_NAME, dir_fd=fd)
    mine = os.fstat(fd)
    there = _dirfd.lstat_at(parent_fd, name)
    if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=parent_fd)


def _open_base(entry: SnapshotEntry, base: Path) -> int:
    """The base image for an export: a regular file (a FIFO swapped in cannot stall it)."""
    try:
        fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except PermissionError:
        raise SnapshotUnusableError(
            entry.name,
            f"you may not read its base image {base}: a custom image is cached readable only "
            "by root and QEMU; ask the host's admin to export it",
        ) from None
    except OSError as exc:
        raise SnapshotUnusableError(entry.name, f"cannot open {base}: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SnapshotUnusableError(entry.name, f"its base image {base} is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _chain_json(snapshot: str, base: str, base_format: str) -> str:
    """A qemu ``json:`` filename pinning the chain: the snapshot's header does not choose its
    backing file or probe formats."""
    doc = {
        "driver": "qcow2",
        "file": {"driver": "file", "filename": snapshot},
        "backing": {"driver": base_format, "file": {"driver": "file", "filename": base}},
    }
    return "json:" + json.dumps(doc)
