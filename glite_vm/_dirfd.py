"""File operations inside directories that someone else controls: by descriptor, never through
a symbolic link, never blocking, bounded.

Root reads and removes VM directories that belong to a job's owner, and writes exports into
directories users name. Whoever owns a directory may swap any name in it, at any moment, for a
link, a FIFO, a huge file or a deep tree. So: every name is opened relative to an open directory
with ``O_NOFOLLOW`` (a swapped name fails instead of leading elsewhere), files with
``O_NONBLOCK`` and checked to be regular files before a byte is read, sizes are bounded before
reading, and walks are loops over a bounded stack of directory descriptors, never recursion.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import stat
from pathlib import Path
from typing import Protocol

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
WALK_DEPTH = 32  # directory descriptors a walk holds at most
WALK_ENTRIES = 200_000  # entries a size count looks at
REMOVE_ENTRIES = 2_000_000  # entries one removal deletes before it gives up (for this time)
MAX_LINKS = 40  # symbolic links followed while resolving a destination path (as the kernel)


class NotRegularError(OSError):
    """The name is there, but not a regular file (a FIFO, a device, a directory...)."""


class TooLargeError(OSError):
    """The file is larger than the caller is willing to read."""


def open_dir(name: str | Path, *, dir_fd: int | None = None) -> int:
    """A descriptor of directory ``name`` (relative to ``dir_fd``); never through a link."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


def open_regular(dir_fd: int, name: str) -> tuple[int, os.stat_result]:
    """``name`` in ``dir_fd`` opened for reading: a regular file, not a link, not a FIFO (the
    open does not wait for a writer); the descriptor (blocking again) and its fstat."""
    fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularError(errno.EINVAL, "not a regular file", name)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_small(dir_fd: int, name: str, limit: int) -> tuple[bytes, os.stat_result]:
    """The whole of regular file ``name`` in ``dir_fd``, at most ``limit`` bytes (else
    TooLargeError), and its fstat."""
    fd, st = open_regular(dir_fd, name)
    try:
        if st.st_size > limit:
            raise TooLargeError(errno.EFBIG, f"larger than {limit} bytes", name)
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:  # it grew since the fstat
        raise TooLargeError(errno.EFBIG, f"larger than {limit} bytes", name)
    return data, st


def read_tail(dir_fd: int, name: str, size: int) -> bytes:
    """The last ``size`` bytes of regular file ``name`` in ``dir_fd``."""
    fd, st = open_regular(dir_fd, name)
    try:
        return os.pread(fd, size, max(0, st.st_size - size))
    finally:
        os.close(fd)


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``name``'s own lstat in ``dir_fd``, or None when it is not there."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


@dataclasses.dataclass(frozen=True)
class Usage:
    bytes: int  # disk space of what was counted
    newest: float  # latest modification time seen among the directory and its entries
    complete: bool  # False: deeper than WALK_DEPTH or more than WALK_ENTRIES; bytes is a floor


class _Listing(Protocol):
    """What ``os.scandir`` returns: entries, and a close."""

    def __next__(self) -> os.DirEntry[str]: ...

    def close(self) -> None: ...


def disk_usage(dir_fd: int, *, depth: int = WALK_DEPTH, entries: int = WALK_ENTRIES) -> Usage:
    """Disk space of the tree under ``dir_fd`` (the directory itself included), ``du``-style,
    without following links; at most ``depth`` levels and ``entries`` entries."""
    top = os.fstat(dir_fd)
    total = top.st_blocks * 512
    newest = top.st_mtime
    complete = True
    seen = 0
    stack: list[tuple[int, _Listing]] = []
    try:
        stack.append((dir_fd, os.scandir(dir_fd)))
        while stack:
            fd, listing = stack[-1]
            item = next(listing, None)
            if item is None:
                stack.pop()
                _close(fd, listing, dir_fd)
                continue
            seen += 1
            if seen > entries:
                complete = False
                break
            try:
                st = item.stat(follow_symlinks=False)
            except OSError:
                continue
            total += st.st_blocks * 512
            if len(stack) == 1:
                newest = max(newest, st.st_mtime)
            if not stat.S_ISDIR(st.st_mode):
                continue
            if len(stack) >= depth:
                complete = False
                continue
            try:
                child = open_dir(item.name, dir_fd=fd)
            except OSError:
                continue  # swapped for something else meanwhile: not ours to follow
            stack.append((child, os.scandir(child)))
    finally:
        for fd, listing in stack:
            _close(fd, listing, dir_fd)
    return Usage(total, newest, complete)


def _close(fd: int, listing: _Listing, keep: int) -> None:
    listing.close()
    if fd != keep:
        os.close(fd)


class _Budget:
    def __init__(self, limit: int) -> None:
        self.left = limit

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise OSError(errno.EMLINK, "too many entries to remove in one go; the rest later")


def empty_dir(top: int, *, limit: int = REMOVE_ENTRIES) -> None:
    """Remove everything inside the directory ``top`` (a descriptor), never following a link.

    A loop over at most :data:`WALK_DEPTH` open directories: a sub-directory found deeper than
    that is moved up into ``top`` (a rename inside the same tree) and emptied from there, so any
    depth is removed with a bounded number of descriptors. Raises OSError when something could
    not be removed, or after ``limit`` entries (the tree's owner can add entries as fast as they
    go; what was removed stays removed).
    """
    budget = _Budget(limit)
    moved = 0
    token = secrets.token_hex(4)
    stack: list[tuple[int, str]] = [(top, "")]
    try:
        while stack:
            fd = stack[-1][0]
            child = None
            with os.scandir(fd) as items:
                for item in items:
                    budget.spend()
                    try:
                        is_dir = item.is_dir(follow_symlinks=False)
                    except OSError:
                        is_dir = False
                    if not is_dir:
                        with contextlib.suppress(FileNotFoundError):
                            _unlink(item.name, fd)
                        continue
                    if len(stack) >= WALK_DEPTH:
                        moved += 1
                        os.rename(
                            item.name, f".deep-{token}-{moved}", src_dir_fd=fd, dst_dir_fd=top
                        )
                        continue
                    try:
                        child = (open_dir(item.name, dir_fd=fd), item.name)
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                            raise
                        _unlink(item.name, fd)  # swapped for a link or a file meanwhile
                        continue
                    break
            if child is not None:
                stack.append(child)
                continue
            if len(stack) == 1:
                return
            fd, name = stack.pop()
            os.close(fd)
            try:
                os.rmdir(name, dir_fd=stack[-1][0])
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:  # if it filled up meanwhile: once more
                    raise
    finally:
        for fd, _name in stack[1:]:
            os.close(fd)


def _unlink(name: str, dir_fd: int) -> None:
    # A file swapped for a directory meanwhile is taken on the next pass.
    with contextlib.suppress(IsADirectoryError):
        os.unlink(name, dir_fd=dir_fd)


def remove_tree(parent_fd: int, name: str, *, limit: int = REMOVE_ENTRIES) -> None:
    """Remove directory ``name`` in ``parent_fd`` with all it holds (see :func:`empty_dir`)."""
    fd = open_dir(name, dir_fd=parent_fd)
    try:
        empty_dir(fd, limit=limit)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=parent_fd)


def open_dir_path(path: Path, *, trusted_uids: frozenset[int]) -> int:
    """A descriptor of directory ``path`` (absolute), resolved one component at a time without
    ever following a link that a uid outside ``trusted_uids`` owns (like the kernel's
    protected_symlinks, for every directory): a link such a user planted or swapped in on the
    way fails the call instead of leading elsewhere."""
    if not path.is_absolute():
        raise ValueError(f"{path} is not absolute")
    fd = os.open("/", DIR_FLAGS)
    todo = list(reversed(path.parts[1:]))
    links = 0
    try:
        while todo:
            part = todo.pop()
            if part in ("", "."):
                continue
            st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links", str(path))
                if st.st_uid not in trusted_uids:
                    raise PermissionError(
                        errno.EPERM,
                        f"{part!r} is a symbolic link of uid {st.st_uid}, not followed",
                        str(path),
                    )
                target = os.readlink(part, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", DIR_FLAGS)
                parts = Path(target).parts
                todo.extend(reversed(parts[1:] if target.startswith("/") else parts))
                continue
            new = os.open(part, DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd
