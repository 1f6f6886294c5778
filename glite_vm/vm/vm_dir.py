"""A VM's directory on the host: making it, its disks and private files, its lock, and handing
what is kept to the job's owner. The names inside are :class:`glite_vm.vm.record.VmFiles`'s.

Invariants. The snapshot directory is listable (0755) and each VM directory only traversable (0711,
for QEMU's user); every file in it is private (0600) from its first byte, the overlay qemu-img
writes too (its umask is 077): a chmod afterwards would leave a window in which another user opens
the file and keeps the descriptor. The directory is new and nobody else's while the VM runs; still,
files are created exclusively (``O_EXCL``) and never through a link. Whoever changes a VM directory
(start until its domain exists, teardown) holds its :func:`lock_vm_dir` flock, so a sweeper of
half-made directories never takes a live one. The owner gets kept files by ``chown`` that never
follows a link, the directory last: once it is the owner's, a name inside could be swapped for a
link to root's file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path

from glite_vm.qemu_img import overlay_command, qemu_img

log = logging.getLogger(__name__)


def make_vm_dir(snapshots: Path, name: str) -> Path:
    """A new directory ``snapshots/name`` (0711), the snapshot directory made if missing."""
    if not snapshots.is_dir():
        # Listable, so that users find their kept snapshots (glite-vm snapshots list); the
        # names it shows give nothing away: every file inside is private from birth.
        snapshots.mkdir(parents=True, exist_ok=True, mode=0o755)
    vm_dir = snapshots / name
    vm_dir.mkdir(mode=0o711)
    return vm_dir


def create_overlay(base: Path, base_format: str, overlay: Path, size: int) -> None:
    """The job's copy-on-write overlay on ``base`` (qemu-img's umask 077: private from its
    first byte; QEMU's own user gets it from libvirt, which relabels it)."""
    qemu_img(overlay_command(base, base_format, overlay, size), "creating the overlay", umask=0o077)


def create_private(path: Path) -> int:
    """A new file at ``path``, mode 0600 from its first byte (never through a link); its
    descriptor, open for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def write_private(path: Path, text: str) -> None:
    """A new private file at ``path`` holding ``text``."""
    with os.fdopen(create_private(path), "w") as f:
        f.write(text)


def create_sparse(path: Path, size: int) -> None:
    """A new private file of ``size`` bytes, all holes (the transfer disk)."""
    with os.fdopen(create_private(path), "wb") as f:
        f.truncate(size)


def copy_private(src: Path, dest: Path) -> Path:
    """Copy ``src`` to a new private file ``dest``; ``dest``."""
    with src.open("rb") as fin, os.fdopen(create_private(dest), "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return dest


def link_private(src: Path, dest: Path) -> Path:
    """``dest`` as a new name of the file ``src`` (a template's read-only disk layer: the VM
    keeps it when the template is evicted), or a private copy where no hard link can be made
    (another file system)."""
    try:
        os.link(src, dest, follow_symlinks=False)
    except OSError as exc:
        log.debug("copying %s: no hard link (%s)", src, exc)
        copy_private(src, dest)
        st = src.stat()  # QEMU reads it as it reads the template's (its group, read-only)
        os.chown(dest, -1, st.st_gid, follow_symlinks=False)
        os.chmod(dest, st.st_mode & 0o440)
    return dest


def lock_vm_dir(vm_dir: Path, *, blocking: bool) -> int | None:
    """An exclusive flock on a VM directory (start and teardown hold it while they change
    it); the descriptor to close, or ``None`` when the directory is gone or, not
    ``blocking``, someone else holds the lock."""
    try:
        fd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def give_to_owner(vm_dir: Path, paths: list[Path], owner_uid: int | None) -> None:
    """Kept files belong to the job's owner alone (when running as root for others); a VM of
    this process's own keeps them private to its user (no QEMU needs them now)."""
    if owner_uid is None or os.geteuid() != 0:
        for p in [*paths, vm_dir]:
            with contextlib.suppress(OSError):
                if not p.is_symlink():
                    p.chmod(0o700 if p == vm_dir else 0o600)
        return
    # The directory goes last: once it is the owner's, the owner could swap a name inside
    # for a symlink to a file of root's, and a chown by name would follow it.
    for p in [*paths, vm_dir]:
        try:
            os.chown(p, owner_uid, -1, follow_symlinks=False)
            if not p.is_symlink():
                os.chmod(p, 0o700 if p == vm_dir else 0o600)
        except OSError as exc:
            log.warning("cannot give %s to uid %s: %s", p, owner_uid, exc)
