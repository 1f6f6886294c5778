"""An entry's kept disk: whether it can be used (and a clear reason when not), a descriptor of
it that never follows a link, and ``qemu-img`` on what export and boot make of it.

The snapshot file is its owner's: before anything hands it to QEMU it must be a regular qcow2
file without an external data file (which would make QEMU open another host file) and not
marked corrupt. QEMU only ever gets it through a descriptor, never by name.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from glite_vm.errors import UserError
from glite_vm.qemu_img import qemu_img
from glite_vm.snapshots.entry import SnapshotEntry, open_entry_file

QEMU_IMG_TIMEOUT = 3600.0  # a flattening export of a big disk takes a while
_QCOW_MAGIC = b"QFI\xfb"
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2


class SnapshotUnusableError(UserError):
    """The entry exists but cannot be booted or exported (no disk kept, base gone, ...)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"snapshot {name}: {reason}")
        self.name = name
        self.reason = reason


def require_disk(entry: SnapshotEntry) -> tuple[Path, Path]:
    """The kept snapshot and its base, or a clear reason why there are none."""
    if not entry.complete:
        raise SnapshotUnusableError(
            entry.name,
            f"its VM did not finish with a teardown ({entry.detail}); there is no snapshot "
            f"to use, only the files in {entry.directory}",
        )
    if entry.snapshot is None:
        raise SnapshotUnusableError(
            entry.name,
            "only the boot log was kept (the job's policy did not keep its disk); "
            'submit with GliteVmKeepSnapshot = "always" to keep it next time',
        )
    base = entry.base_image
    if base is None or not base.is_file():
        raise SnapshotUnusableError(
            entry.name,
            f"its base image {base or '(unrecorded)'} is gone from this host (evicted from the "
            f"image cache?); fetch it again (glite-vm images pull {entry.image}) — the cache "
            "keeps it under the same digest",
        )
    if entry.base_format not in ("qcow2", "raw"):
        raise SnapshotUnusableError(entry.name, f"unknown base format {entry.base_format!r}")
    return entry.snapshot, base


def open_snapshot(entry: SnapshotEntry, path: Path) -> int:
    """An fd of the kept snapshot, refusing symlinks, FIFOs and anything but a plain qcow2
    without an external data file (which would make QEMU open another host file)."""
    try:
        fd = open_entry_file(entry, path.name)
    except OSError as exc:
        why = exc.strerror or str(exc)
        raise SnapshotUnusableError(entry.name, f"cannot open {path}: {why}") from None
    try:
        header = os.pread(fd, 104, 0)
        if len(header) < 72 or header[:4] != _QCOW_MAGIC:
            raise SnapshotUnusableError(entry.name, f"{path} is not a qcow2 image")
        version = struct.unpack(">I", header[4:8])[0]
        incompat = struct.unpack(">Q", header[72:80])[0] if version >= 3 else 0
        if incompat & _QCOW2_INCOMPAT_DATA_FILE:
            raise SnapshotUnusableError(entry.name, f"{path} uses an external data file")
        if incompat & _QCOW2_INCOMPAT_CORRUPT:
            raise SnapshotUnusableError(entry.name, f"{path} is marked corrupt")
    except BaseException:
        os.close(fd)
        raise
    return fd


def qemu_img_info(path: Path, *, fds: tuple[int, ...] = ()) -> dict[str, Any]:
    """``qemu-img info`` of a qcow2 file we made (format pinned, backing not opened); ``fds``:
    descriptors the path goes through (``/proc/self/fd/N/...``)."""
    argv = ["info", "-U", "--output=json", "-f", "qcow2", str(path)]
    done = qemu_img(argv, f"inspecting {path}", timeout=QEMU_IMG_TIMEOUT, fds=fds)
    data: dict[str, Any] = json.loads(done.stdout)
    return data
