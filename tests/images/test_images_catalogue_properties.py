"""Property tests of the catalogue parser: whatever the repository serves, a host gets either a
catalogue whose entries are safe to use or a ``CatalogueError`` (requeue), never a crash.

A crash here would be an unexpected exception in every job's PREPARE_JOB on every host that
reads the broken document, and in ``glite-vm images list``.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any
from urllib.parse import urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glite_vm.errors import CatalogueError, Disposition
from glite_vm.images.catalogue import BOOT_KINDS, CatalogueEntry, FileRef, parse_catalogue
from glite_vm.images.inspect import SUPPORTED_FORMATS
from glite_vm.images.sources import NAME_RE, URL_SCHEMES

BASES = [
    "https://repo.example/vm/catalogue.json",
    "file:///srv/vm-images/catalogue.json",
    "http://127.0.0.1:8080/c.json",
]
SHA = "ab" * 32
VALID_ENTRIES: list[dict[str, Any]] = [
    {
        "name": "debian-12",
        "url": "debian-12.qcow2",
        "sha256": SHA,
        "size": 343801856,
        "format": "qcow2",
        "virtual_size": 2147483648,
        "os": "Debian 12",
        "arch": "x86_64",
        "boot": "disk",
        "guest_user": "debian",
        "description": "Debian 12 cloud image",
    },
    {
        "name": "tiny",
        "url": "https://cdn.example/tiny.img",
        "sha256": SHA.upper(),
        "size": 1048576,
        "format": "raw",
        "boot": "kernel",
        "kernel": {"url": "vmlinuz", "sha256": SHA, "size": 8123456},
        "initrd": {"url": "initrd.img", "sha256": SHA},
        "cmdline": "console=ttyS0",
        "guest_user": "glite",
    },
]
VALID = json.dumps({"version": 1, "images": VALID_ENTRIES}).encode()
KEYS = sorted({key for entry in VALID_ENTRIES for key in entry} | {"version", "images", ""})
# Examples are cheap (microseconds); the bounds keep the whole module well under 30 s.
BOUNDED = settings(
    max_examples=400,
    deadline=1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "..", "/etc/shadow", "ftp://x/y", "//evil/x", "http://[::1/x", SHA]),
    st.sampled_from(["qcow2", "raw", "vmdk", "kernel", "disk", "debian-12", "\ud800", "a\x00b"]),
)
JSON_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(
            st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=6
        ),
    ),
    max_leaves=25,
)


def entry_like() -> st.SearchStrategy[dict[str, Any]]:
    """Entries built from the real keys with values of any JSON type, or valid ones bent."""
    arbitrary = st.dictionaries(st.sampled_from(KEYS), JSON_VALUES, max_size=12)

    @st.composite
    def bent(draw: st.DrawFn) -> dict[str, Any]:
        entry = dict(draw(st.sampled_from(VALID_ENTRIES)))
        for key in draw(st.lists(st.sampled_from(KEYS), max_size=3)):
            if draw(st.booleans()):
                entry.pop(key, None)
            else:
                entry[key] = draw(JSON_VALUES)
        return entry

    return st.one_of(arbitrary, bent())


DOCUMENTS = st.one_of(
    JSON_VALUES,
    st.fixed_dictionaries(
        {
            "version": st.one_of(st.sampled_from([1, 1.0, True, "1", 2, 0, None]), JSON_VALUES),
            "images": st.one_of(st.lists(entry_like(), max_size=6), JSON_VALUES),
        }
    ),
)


def check(data: bytes, base: str) -> None:
    """The parser's contract: entries safe to use, or CatalogueError; nothing else."""
    try:
        entries = parse_catalogue(data, base)
    except CatalogueError as exc:
        assert exc.disposition is Disposition.REQUEUE
        assert str(exc).startswith(f"catalogue {base}") or "catalogue" in str(exc)
        return
    assert isinstance(entries, dict)
    for name, entry in entries.items():
        assert isinstance(entry, CatalogueEntry)
        assert name == entry.name and NAME_RE.match(name)
        assert entry.format in SUPPORTED_FORMATS
        assert entry.boot in BOOT_KINDS
        assert (entry.kernel is not None) == (entry.boot == "kernel")
        for ref in (entry.image, entry.kernel, entry.initrd):
            if ref is None:
                continue
            assert isinstance(ref, FileRef)
            assert urlsplit(ref.url).scheme.lower() in URL_SCHEMES
            assert re.fullmatch(r"[0-9a-f]{64}", ref.sha256)
            assert ref.size is None or (type(ref.size) is int and ref.size >= 0)
        assert entry.virtual_size is None or (
            type(entry.virtual_size) is int and entry.virtual_size >= 0
        )
        # Whatever hosts do with an entry later (cache keys, metadata files, `images list`)
        # needs text that encodes; a lone surrogate from a "\ud800" escape does not.
        for text in (entry.url, entry.os, entry.arch, entry.description, entry.cmdline or ""):
            text.encode("utf-8")
        json.dumps(entry.url, ensure_ascii=False).encode("utf-8")


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)  # skipped entries warn; thousands of examples add up


@BOUNDED
@given(doc=DOCUMENTS, base=st.sampled_from(BASES))
def test_any_json_document_parses_or_is_a_catalogue_error(doc: object, base: str) -> None:
    check(json.dumps(doc).encode(), base)


@BOUNDED
@given(data=st.binary(max_size=2000), base=st.sampled_from(BASES))
def test_any_bytes_parse_or_are_a_catalogue_error(data: bytes, base: str) -> None:
    check(data, base)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """The valid catalogue with bytes flipped, inserted, deleted, or cut off."""
    data = bytearray(VALID)
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        if not data:
            break
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        how = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate"]))
        if how == "flip":
            data[at] ^= draw(st.integers(min_value=1, max_value=255))
        elif how == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif how == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
        elif how == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(min_value=1, max_value=40))]
    return bytes(data)


@BOUNDED
@given(data=mutated(), base=st.sampled_from(BASES))
def test_a_mutated_catalogue_parses_or_is_a_catalogue_error(data: bytes, base: str) -> None:
    check(data, base)


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b'{"version": 1, "images": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
    ],
    ids=["deep-array", "deep-images", "deep-object"],
)
def test_a_deeply_nested_document_is_a_catalogue_error(data: bytes) -> None:
    with pytest.raises(CatalogueError, match="nested too deeply"):
        parse_catalogue(data, BASES[0])


def test_an_entry_with_text_that_cannot_be_encoded_is_skipped() -> None:
    """JSON can carry a lone surrogate (``"\\ud800"``); UTF-8 cannot."""
    bad = [
        {**VALID_ENTRIES[0], "name": "bad-url", "url": "d\\ud800.qcow2"},
        {**VALID_ENTRIES[0], "name": "bad-os", "os": "Debian \\udfff"},
    ]
    text = json.dumps({"version": 1, "images": [VALID_ENTRIES[1], *bad]})
    text = text.replace("\\\\ud800", "\\ud800").replace("\\\\udfff", "\\udfff")
    entries = parse_catalogue(text.encode(), BASES[0])
    assert sorted(entries) == ["tiny"]


def test_the_unmutated_catalogue_parses() -> None:
    """The property tests start from a document that really is valid."""
    entries = parse_catalogue(VALID, BASES[0])
    assert sorted(entries) == ["debian-12", "tiny"]
    assert entries["debian-12"].url == "https://repo.example/vm/debian-12.qcow2"
