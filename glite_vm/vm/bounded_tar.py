"""Reading a tar stream a guest wrote, with bounds on what it can make the reader hold.

``tarfile`` reads a member's extended headers into memory whole before it hands the member out:
a pax header (``x``, ``g``, ``X``) or a GNU long name or link (``L``, ``K``) of the size its
512-byte header states, an old GNU sparse map (``S``) through as many extension blocks as the
stream chains, a GNU 1.0 sparse map of as many entries as its first line says; global pax
headers pile up for the rest of the stream; and the ``TarFile`` keeps every member it read.
A guest that writes one 512-byte header claiming a gigabyte of pax data, on a transfer disk of
that size, makes the reader allocate the gigabyte (zeros read from a sparse disk cost the guest
nothing). :func:`members` reads a stream with every one of those bounded, and refuses a stream
past a bound with a hold-class :class:`~glite_vm.errors.RequestError` (the guest's output is the
job's doing) before the memory is taken.

The bounds are far above what real archives hold: names and links are under 4 KiB on Linux,
pax records of real tars a few hundred bytes, sparse maps a few entries per hole.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import Any, BinaryIO, Final

from glite_vm.errors import RequestError

#: Bytes of one extended header (pax record set, GNU long name or link), and of all global pax
#: headers of a stream together.
MAX_HEADER_BYTES: Final = 1 << 20
#: Regions of one sparse member's map (old GNU extension blocks hold 21 each).
MAX_SPARSE_REGIONS: Final = 1 << 17
#: Extended headers before one member (tarfile reads a chain of them recursively, each one's
#: data held until the member at its end: a pax header and a GNU long name and link at most).
MAX_HEADER_CHAIN: Final = 4

_EXTENDED = {
    tarfile.GNUTYPE_LONGNAME: "GNU long name",
    tarfile.GNUTYPE_LONGLINK: "GNU long link",
    tarfile.XHDTYPE: "pax extended header",
    tarfile.XGLTYPE: "pax global header",
    tarfile.SOLARIS_XHDTYPE: "Solaris extended header",
}
_SPARSE_PER_BLOCK = 21


def _too_big(what: str, size: int, bound: int, name: str) -> RequestError:
    return RequestError(
        "output",
        f"the guest's output stream holds a tar header ({what}, for {name!r}) of {size} "
        f"{_unit(what)}, more than glite-vm reads ({bound}); "
        "the guest's tar or the job wrote a malformed archive",
    )


def _unit(what: str) -> str:
    return "regions" if "sparse map" in what else "headers" if "chain" in what else "bytes"


class BoundedTarInfo(tarfile.TarInfo):
    """A ``TarInfo`` whose extended headers are checked against the bounds before ``tarfile``
    reads them into memory (its private ``_proc_*`` steps, stable since Python 3.2)."""

    def _proc_member(self, tarfile_: Any) -> Any:
        what = _EXTENDED.get(self.type)
        if what is None:
            tarfile_.chain = (0, 0)  # a member: the chain of extended headers before it ends
        else:
            count, held = tarfile_.chain
            count, held = count + 1, held + self.size
            tarfile_.chain = (count, held)
            if count > MAX_HEADER_CHAIN:
                raise _too_big("chain of extended headers", count, MAX_HEADER_CHAIN, self.name)
            if held > MAX_HEADER_BYTES:
                raise _too_big(what, held, MAX_HEADER_BYTES, self.name)
        result = super()._proc_member(tarfile_)  # type: ignore[misc]
        if self.type == tarfile.XGLTYPE:
            held = sum(len(k) + len(v) for k, v in tarfile_.pax_headers.items())
            if held > MAX_HEADER_BYTES:
                raise _too_big("pax global headers", held, MAX_HEADER_BYTES, self.name)
        return result

    def _proc_sparse(self, tarfile_: Any) -> Any:
        """Old GNU sparse member: ``tarfile``'s own steps, with the extension blocks counted."""
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        while isextended:
            if len(structs) + _SPARSE_PER_BLOCK > MAX_SPARSE_REGIONS:
                raise _too_big("old GNU sparse map", len(structs), MAX_SPARSE_REGIONS, self.name)
            buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            pos = 0
            for _ in range(_SPARSE_PER_BLOCK):
                try:
                    offset = tarfile.nti(buf[pos : pos + 12])  # type: ignore[attr-defined]
                    numbytes = tarfile.nti(buf[pos + 12 : pos + 24])  # type: ignore[attr-defined]
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
                pos += 24
            isextended = bool(buf[504:505] and buf[504])
        self.sparse = structs
        self.offset_data = tarfile_.fileobj.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_gnusparse_10(self, next_: Any, pax_headers: Any, tarfile_: Any) -> None:
        """GNU 1.0 sparse map (its entry count first): ``tarfile``'s own steps, bounded."""
        try:
            buf = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
            count, buf = buf.split(b"\n", 1)
            fields = int(count)
            if not 0 <= fields <= MAX_SPARSE_REGIONS:
                raise _too_big("GNU 1.0 sparse map", fields, MAX_SPARSE_REGIONS, next_.name)
            sparse: list[int] = []
            while len(sparse) < fields * 2:
                if b"\n" not in buf:
                    more = tarfile_.fileobj.read(tarfile.BLOCKSIZE)
                    if not more or len(buf) > 64:  # a number has at most 20 digits
                        raise ValueError("no end of a number")
                    buf += more
                number, buf = buf.split(b"\n", 1)
                sparse.append(int(number))
        except RequestError:
            raise
        except ValueError as exc:
            raise tarfile.ReadError(f"malformed GNU 1.0 sparse map: {exc}") from None
        next_.offset_data = tarfile_.fileobj.tell()
        next_.sparse = list(zip(sparse[::2], sparse[1::2], strict=True))


class _BoundedTarFile(tarfile.TarFile):
    tarinfo = BoundedTarInfo
    chain: tuple[int, int] = (0, 0)  # extended headers (count, bytes) before the next member


def members(raw: BinaryIO) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Each member of the tar stream ``raw`` (read once, front to back: a pipe will do) with
    its ``TarFile`` (for ``extractfile`` of that member, before the next one), the extended
    headers bounded and no member kept once the next is read."""
    with _BoundedTarFile.open(fileobj=raw, mode="r|", bufsize=1 << 20) as tar:
        while True:
            member = tar.next()
            tar.members.clear()  # type: ignore[attr-defined]  # kept for getmembers()
            if member is None:
                return
            yield tar, member


__all__ = ["MAX_HEADER_BYTES", "MAX_SPARSE_REGIONS", "BoundedTarInfo", "members"]
