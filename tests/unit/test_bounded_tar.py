"""The guest's output stream, read with bounds: hostile headers are refused before tarfile holds
their data, and real archives (GNU tar's, in every sparse format) still come out whole."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from glite_vm.errors import Disposition, RequestError
from glite_vm.vm.bounded_tar import MAX_HEADER_BYTES, MAX_SPARSE_REGIONS
from glite_vm.vm.transfer import MAX_OUTPUT_NAMES, extract_stream

GIB = 1 << 30


def header(name: str, kind: bytes, size: int, extra: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte GNU-style header of type ``kind`` stating ``size`` bytes of data."""
    block = bytearray(512)
    block[0 : len(name)] = name.encode()
    block[100:108] = b"%07o\0" % 0o644
    block[108:116] = block[116:124] = b"%07o\0" % 0
    block[124:136] = b"%011o\0" % size
    block[136:148] = b"%011o\0" % 0
    block[156:157] = kind
    block[257:265] = b"ustar  \0"
    for at, data in (extra or {}).items():
        block[at : at + len(data)] = data
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length += 1
    return f"{length}{body}".encode()


class CountingZeros(io.RawIOBase):
    """``size`` bytes: ``head``, then zeros (what a sparse transfer disk reads as), counting
    how many the reader took."""

    def __init__(self, head: bytes, size: int) -> None:
        self.head = head
        self.size = size
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.size - self.pos)
        view = memoryview(buffer)[:n]
        start = self.pos
        head = self.head[start : start + n]
        view[: len(head)] = head
        view[len(head) :] = bytes(n - len(head))
        self.pos += n
        return n


def refused(stream: bytes | io.RawIOBase, tmp_path: Path, says: str) -> str:
    raw = io.BufferedReader(stream) if isinstance(stream, io.RawIOBase) else io.BytesIO(stream)
    with pytest.raises(RequestError) as info:
        extract_stream(raw, tmp_path, limit=GIB)
    assert info.value.disposition is Disposition.HOLD
    assert says in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    ("kind", "says"),
    [(b"x", "pax extended header"), (b"L", "GNU long name"), (b"K", "GNU long link")],
)
def test_a_header_claiming_a_gigabyte_is_refused_unread(
    kind: bytes, says: str, tmp_path: Path
) -> None:
    """One 512-byte header says a gigabyte of header data follows (zeros on the disk)."""
    stream = CountingZeros(header("././@LongLink", kind, GIB - 4096), GIB)
    refused(stream, tmp_path, says)
    assert stream.pos <= 2 << 20, f"read {stream.pos} bytes of a header before refusing it"


def test_a_chain_of_extended_headers_is_refused(tmp_path: Path) -> None:
    """tarfile reads extended headers recursively, each held until the member at the end."""
    record = padded(pax_record("comment", "x" * 100))
    one = header("././@PaxHeader", b"x", len(pax_record("comment", "x" * 100))) + record
    refused(one * 50 + padded(header("f", b"0", 0)) + bytes(1024), tmp_path, "chain")


def test_global_headers_do_not_pile_up(tmp_path: Path) -> None:
    """Each global header stays in force for the rest of the stream, new keys adding up."""
    stream = b""
    for i in range(8):
        data = pax_record(f"key{i}", "v" * 200_000)
        stream += header("././@PaxHeader", b"g", len(data)) + padded(data)
        stream += header(f"f{i}", b"0", 0)
    refused(stream + bytes(1024), tmp_path, "pax global headers")


def test_an_endless_old_gnu_sparse_map_is_refused(tmp_path: Path) -> None:
    """An 'S' member whose extension blocks chain on (each flagged as not the last)."""
    entry = b"%011o\0%011o\0" % (1, 1)
    block = bytearray(512)
    block[0 : 21 * 24] = entry * 21
    block[504] = 1
    blocks = MAX_SPARSE_REGIONS // 21 + 10
    first = header("s", b"S", 0, {482: b"\1", 483: b"%011o\0" % (1 << 20)})
    stream = first + bytes(block) * blocks + bytes(1024)
    refused(stream, tmp_path, "old GNU sparse map")


def test_a_gnu_1_0_sparse_map_of_a_billion_regions_is_refused(tmp_path: Path) -> None:
    records = (
        pax_record("GNU.sparse.major", "1")
        + pax_record("GNU.sparse.minor", "0")
        + pax_record("GNU.sparse.name", "s")
        + pax_record("GNU.sparse.realsize", str(1 << 20))
    )
    stream = (
        header("././@PaxHeader", b"x", len(records))
        + padded(records)
        + header("s", b"0", 512)
        + padded(b"1000000000\n")
        + bytes(1024)
    )
    refused(stream, tmp_path, "GNU 1.0 sparse map")


def test_the_names_of_the_outputs_are_bounded(tmp_path: Path) -> None:
    """Names travel back in one protocol line: 13 MiB of them (3,300 files whose paths are
    4,000 characters long) are refused, not sent."""
    src = io.BytesIO()
    component = "d" * 250
    deep = "/".join([component] * 15)
    count = MAX_OUTPUT_NAMES // len(deep) + 100
    with tarfile.open(fileobj=src, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(count):
            info = tarfile.TarInfo(f"{deep}/{i}")
            tar.addfile(info, io.BytesIO(b""))
    src.seek(0)
    with pytest.raises(RequestError, match="names of the job's output files"):
        extract_stream(src, tmp_path, limit=GIB)


def test_refused_members_are_named_up_to_a_bound(tmp_path: Path) -> None:
    src = io.BytesIO()
    with tarfile.open(fileobj=src, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(500):
            info = tarfile.TarInfo(f"link{i}")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    src.seek(0)
    problems: list[str] = []
    assert extract_stream(src, tmp_path, problems, limit=GIB) == []
    assert len(problems) == 101 and problems[-1] == "... and 400 more"


@pytest.mark.parametrize(
    "tar_args",
    [
        ["--format=gnu"],
        ["--format=posix", "--sparse-version=0.0"],
        ["--format=posix", "--sparse-version=1.0"],
    ],
)
def test_gnu_tars_sparse_archives_come_out_whole(tar_args: list[str], tmp_path: Path) -> None:
    """What a guest's GNU tar writes for a sparse file (holes, data, a hole at the end) and a
    long name, in the sparse formats Python's tarfile reads (not 0.1, whose long names it
    does not restore, bounds or not), through the bounded reader."""
    src = tmp_path / "src"
    deep = src / ("n" * 200) / ("m" * 200)
    deep.mkdir(parents=True)
    sparse = deep / "sparse.bin"
    with sparse.open("wb") as f:
        for at in range(0, 64 << 20, 4 << 20):
            f.seek(at)
            f.write(os.urandom(4096))
        f.truncate(80 << 20)
    archive = tmp_path / "out.tar"
    subprocess.run(
        ["tar", "--sparse", *tar_args, "-cf", str(archive), "-C", str(src), "."],
        check=True,
        capture_output=True,
        timeout=120,
    )
    dest = tmp_path / "dest"
    dest.mkdir()
    with archive.open("rb") as raw:
        names = extract_stream(raw, dest, limit=GIB)
    rel = sparse.relative_to(src).as_posix()
    assert names == [rel]
    out = dest / rel
    assert out.stat().st_size == 80 << 20
    assert out.read_bytes() == sparse.read_bytes()
    assert out.stat().st_blocks * 512 < 24 << 20, "the sparse file came out dense"


def test_a_bounded_header_still_reads_a_long_name(tmp_path: Path) -> None:
    """Within the bound, a pax header of a long name is read as always."""
    src = io.BytesIO()
    name = "/".join(["p" * 200] * 10) + "/f"
    with tarfile.open(fileobj=src, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    assert len(src.getvalue()) < MAX_HEADER_BYTES
    src.seek(0)
    assert extract_stream(src, tmp_path, limit=GIB) == [name]
    assert (tmp_path / name).read_bytes() == b"hello"
