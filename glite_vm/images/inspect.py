"""Safety checks on a disk image before anything boots it or opens it read-write.

Two layers. First the file's header is read here, in Python, so that images which would make
even a read-only ``qemu-img info`` open other host files are refused without running it: a
qcow2 with a backing file or an external data file, VMDK descriptors (their extents are host
paths), and every other format we do not boot. Then ``qemu-img info -U --output=json -f FORMAT``
confirms the header with QEMU's own parser, and for qcow2 a read-only ``qemu-img check`` refuses
damaged images (truncated downloads, corrupt tables) before any VM boots them. The format is
*pinned* (qcow2 when the file carries the qcow2 magic, raw otherwise) and passed with ``-f``:
QEMU never probes, so a raw image whose guest-writable first sector looks like a qcow2 header
can never be reinterpreted later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

from glite_vm.errors import HypervisorError, ImageRefusedError
from glite_vm.qemu_img import last_line, qemu_img
from glite_vm.units import format_size

SUPPORTED_FORMATS = ("qcow2", "raw")
QEMU_IMG_TIMEOUT = 60.0
# qemu-img check reads every table of the image: bounded by the image's (bounded) file size.
QEMU_IMG_CHECK_TIMEOUT = 300.0
_CHECK_MESSAGE_BYTES = 4096
_QCOW_MAGIC = b"QFI\xfb"
_QCOW2_INCOMPAT_CORRUPT = 1 << 1
_QCOW2_INCOMPAT_DATA_FILE = 1 << 2
_QCOW2_KNOWN_INCOMPAT = (1 << 0) | _QCOW2_INCOMPAT_CORRUPT | _QCOW2_INCOMPAT_DATA_FILE | (1 << 3)
# Magic numbers of formats we refuse by name (so the user reads "vmdk", not "raw, won't boot").
_OTHER_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"KDMV", "vmdk"),
    (0, b"# Disk DescriptorFile", "vmdk"),
    (0, b"COWD", "vmdk"),
    (0, b"vhdxfile", "vhdx"),
    (0, b"conectix", "vpc"),
    (0, b"QED\x00", "qed"),
    (0, b"LUKS\xba\xbe", "luks"),
    (0, b"WithoutFreeSpace", "parallels"),
    (0, b"WithouFreSpacExt", "parallels"),
    (0, b"Bochs Virtual HD Image", "bochs"),
    (0, b"#!/bin/sh\n#V2.0 Format", "cloop"),
    (0x40, struct.pack("<I", 0xBEDA107F), "vdi"),
)


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """What the checks established about an image file."""

    format: str  # "qcow2" or "raw"; boot with exactly this format
    virtual_size: int
    file_size: int
    qemu_img: dict[str, Any]  # the raw `qemu-img info` answer, for logs


@dataclasses.dataclass(frozen=True)
class Limits:
    max_virtual_bytes: int
    max_file_bytes: int


def inspect_image(
    path: Path, *, source: str, limits: Limits, declared_format: str | None = None
) -> ImageInfo:
    """Check ``path`` and pin its format; raise ImageRefusedError (hold) with the reason.

    ``source`` names the image in messages. ``declared_format`` (from the catalogue) must agree
    with what the file is. Raise HypervisorError when ``qemu-img`` itself is unusable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as exc:
        raise ImageRefusedError(source, f"cannot be read: {exc.strerror}") from exc
    try:
        file_size = os.fstat(fd).st_size
        header = os.pread(fd, 512, 0)
    finally:
        os.close(fd)
    if file_size > limits.max_file_bytes:
        raise ImageRefusedError(
            source,
            f"file size {format_size(file_size)} exceeds the limit "
            f"{format_size(limits.max_file_bytes)} (GLITE_VM_MAX_IMAGE_FILE_BYTES)",
        )
    fmt = _check_header(header, source)
    if declared_format is not None and declared_format != fmt:
        raise ImageRefusedError(
            source, f"the catalogue says format {declared_format} but the file is {fmt}"
        )
    info = qemu_img_info(path, fmt, source=source)
    _check_info(info, fmt, source)
    virtual_size = int(info["virtual-size"])
    if virtual_size > limits.max_virtual_bytes:
        raise ImageRefusedError(
            source,
            f"virtual size {format_size(virtual_size)} exceeds the limit "
            f"{format_size(limits.max_virtual_bytes)} (GLITE_VM_MAX_IMAGE_VIRTUAL_BYTES)",
        )
    if fmt == "qcow2":
        qemu_img_check(path, source=source)
    return ImageInfo(format=fmt, virtual_size=virtual_size, file_size=file_size, qemu_img=info)


def _check_header(header: bytes, source: str) -> str:
    """Pin the format from the header; refuse what would make qemu-img touch other files."""
    if header[:4] == _QCOW_MAGIC:
        if len(header) < 72:
            raise ImageRefusedError(source, "truncated qcow header")
        version, backing_offset = struct.unpack_from(">IQ", header, 4)
        if version not in (2, 3):
            raise ImageRefusedError(source, f"qcow version {version} is not supported (use qcow2)")
        if backing_offset != 0:
            raise ImageRefusedError(source, "it has a backing file (a path on the host)")
        (crypt_method,) = struct.unpack_from(">I", header, 32)
        if crypt_method != 0:
            raise ImageRefusedError(source, "it is encrypted")
        if version == 3:
            if len(header) < 104:
                raise ImageRefusedError(source, "truncated qcow2 header")
            (incompatible,) = struct.unpack_from(">Q", header, 72)
            if incompatible & _QCOW2_INCOMPAT_DATA_FILE:
                raise ImageRefusedError(source, "it has an external data file (a path on the host)")
            if incompatible & _QCOW2_INCOMPAT_CORRUPT:
                raise ImageRefusedError(source, "qcow2 marks it as corrupt")
            if incompatible & ~_QCOW2_KNOWN_INCOMPAT:
                raise ImageRefusedError(source, "it uses unknown qcow2 features")
        return "qcow2"
    for offset, magic, name in _OTHER_MAGIC:
        if header[offset : offset + len(magic)] == magic:
            raise ImageRefusedError(
                source, f"format {name} is not supported; convert it to qcow2 or raw"
            )
    return "raw"


def _check_info(info: dict[str, Any], fmt: str, source: str) -> None:
    """Second opinion from QEMU's parser on what the header check already established."""
    if info.get("format") != fmt:
        raise ImageRefusedError(source, f"qemu-img reads it as {info.get('format')!r}, not {fmt}")
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise ImageRefusedError(source, "it has a backing file (a path on the host)")
    if info.get("encrypted"):
        raise ImageRefusedError(source, "it is encrypted")
    specific = info.get("format-specific")
    data = specific.get("data") if isinstance(specific, dict) else None
    if isinstance(data, dict):
        if data.get("data-file"):
            raise ImageRefusedError(source, "it has an external data file (a path on the host)")
        if data.get("corrupt"):
            raise ImageRefusedError(source, "qcow2 marks it as corrupt")
    if not isinstance(info.get("virtual-size"), int) or info["virtual-size"] < 0:
        raise ImageRefusedError(source, "qemu-img reports no virtual size")


def qemu_img_info(path: Path, fmt: str, *, source: str | None = None) -> dict[str, Any]:
    """``qemu-img info -U --output=json -f FMT PATH``; ImageRefusedError if QEMU rejects it."""
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"refusing to run qemu-img with format {fmt!r}")
    done = qemu_img(
        ["info", "-U", "--output=json", "-f", fmt, path.absolute()],
        f"inspecting {source or path}",
        timeout=QEMU_IMG_TIMEOUT,
        check=False,  # a file QEMU cannot read is the image's fault, not the host's
    )
    if done.returncode != 0:
        detail = last_line(done.stderr) or f"exit status {done.returncode}"
        raise ImageRefusedError(source or str(path), f"qemu-img cannot read it as {fmt}: {detail}")
    try:
        info = json.loads(done.stdout)
    except ValueError as exc:
        raise HypervisorError("qemu-img info printed something that is not JSON") from exc
    if not isinstance(info, dict):
        raise HypervisorError("qemu-img info printed something that is not a JSON object")
    return info


def qemu_img_check(path: Path, *, source: str | None = None) -> None:
    """``qemu-img check`` of a qcow2 image whose header passed the checks above: refuse a
    damaged one (truncated, corrupt tables) with ImageRefusedError before anything boots it.

    Read-only (no ``-r``), format pinned, ``-U`` like ``info``. Leaked clusters (exit status 3)
    are harmless and accepted. Only the first lines of QEMU's complaints are kept: a truncated
    image yields one line per missing cluster.
    """
    done = qemu_img(
        ["check", "-U", "--output=json", "-f", "qcow2", path.absolute()],
        f"checking {source or path}",
        timeout=QEMU_IMG_CHECK_TIMEOUT,
        check=False,  # a damaged image is the image's fault, not the host's
        stderr_limit=_CHECK_MESSAGE_BYTES,
    )
    if done.returncode in (0, 3):
        return
    complaints = done.stderr.decode(errors="replace").splitlines()
    try:
        report = json.loads(done.stdout)
    except ValueError:
        report = {}
    counts = report if isinstance(report, dict) else {}
    found = [
        f"{counts[key]} {what}"
        for key, what in (("corruptions", "corruptions"), ("check-errors", "read errors"))
        if isinstance(counts.get(key), int) and counts[key] > 0
    ]
    first = next((c.strip() for c in complaints if c.strip()), "")
    detail = ", ".join(found) or f"exit status {done.returncode}"
    if first:
        detail += f" (first: {first[:200]})"
    raise ImageRefusedError(
        source or str(path),
        f"it is damaged (truncated or corrupt): qemu-img check found {detail}; "
        "upload it again or repair it (qemu-img check -r all, on a copy)",
    )
