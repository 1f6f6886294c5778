"""The header of a libvirt QEMU save image (what ``virDomainSave`` writes), read and rewritten.

A save image is a fixed header, then the domain XML and libvirt's cookie (each NUL-terminated,
in a data area padded to QEMU's block size), then QEMU's migration stream::

    char magic[16] = "LibvirtQemudSave"; uint32 version, data_len, was_running, compressed,
    cookie_offset; uint32 unused[14]          (92 bytes, native byte order)
    data[data_len] = xml NUL cookie NUL padding

libvirt refuses to restore a saved domain under another name or UUID (its ABI check compares
them, and ``virDomainSaveImageDefineXML`` applies the same check), so every VM restored from
one template would collide with the next. A per-job copy of the save image gets a header of
its own instead: :func:`rewrite_header` writes a new domain XML into the data area, in place,
and moves the cookie behind it. The migration stream is not touched, and nothing else is:
libvirt checks that the new XML keeps the saved machine's ABI when it restores.

Invariants. Only a header whose magic, version and sizes make sense is read (bounded by
:data:`MAX_DATA`); a new XML that does not fit in the data area is refused (``ValueError``),
never written past it.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

MAGIC = b"LibvirtQemudSave"
PARTIAL_MAGIC = b"LibvirtQemudPart"  # what libvirt writes while a save is still going on
_FIELDS = struct.Struct("=IIIII")
HEADER_SIZE = len(MAGIC) + _FIELDS.size + 14 * 4
VERSIONS = (2,)  # version 2 carries a cookie; version 1 is older than any libvirt we support
MAX_DATA = 16 << 20  # a data area larger than this is not a save image of ours


@dataclasses.dataclass(frozen=True)
class SaveHeader:
    version: int
    data_len: int
    was_running: int
    compressed: int
    xml: str
    cookie: bytes

    @property
    def room(self) -> int:
        """Bytes of XML the data area can hold with the cookie behind it."""
        return self.data_len - len(self.cookie) - 2


def read_header(path: Path) -> SaveHeader:
    """The header of the save image at ``path``; ``ValueError`` when it is not one."""
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE or head[: len(MAGIC)] != MAGIC:
            raise ValueError(f"{path} is not a complete libvirt save image")
        version, data_len, running, compressed, cookie_at = _FIELDS.unpack_from(head, len(MAGIC))
        if version not in VERSIONS or not 0 < data_len <= MAX_DATA or cookie_at >= data_len:
            raise ValueError(f"{path}: unexpected save image header (version {version})")
        data = f.read(data_len)
    if len(data) != data_len:
        raise ValueError(f"{path}: the save image ends inside its header")
    xml_end = data.find(b"\0")
    cookie_end = data.find(b"\0", cookie_at) if cookie_at else -1
    if xml_end <= 0 or (cookie_at and cookie_end < 0):
        raise ValueError(f"{path}: the save image's XML is not terminated")
    cookie = data[cookie_at:cookie_end] if cookie_at else b""
    return SaveHeader(version, data_len, running, compressed, data[:xml_end].decode(), cookie)


def rewrite_header(path: Path, header: SaveHeader, xml: str) -> None:
    """Replace the domain XML in the save image at ``path`` (whose header is ``header``) with
    ``xml``, in place; ``ValueError`` when it does not fit."""
    body = xml.encode() + b"\0"
    cookie_at = len(body) if header.cookie else 0
    if header.cookie:
        body += header.cookie + b"\0"
    if len(body) > header.data_len:
        raise ValueError(
            f"the new domain XML ({len(xml)} bytes) does not fit in the save image's header "
            f"({header.room} bytes)"
        )
    fields = _FIELDS.pack(
        header.version, header.data_len, header.was_running, header.compressed, cookie_at
    )
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.pwrite(fd, fields, len(MAGIC))
        os.pwrite(fd, body + b"\0" * (header.data_len - len(body)), HEADER_SIZE)
    finally:
        os.close(fd)


__all__ = ["HEADER_SIZE", "MAGIC", "SaveHeader", "read_header", "rewrite_header"]
