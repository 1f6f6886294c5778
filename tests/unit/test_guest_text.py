"""What a guest wrote, quoted in an error (glite_vm.vm.guest_text): whatever the bytes, one
bounded line a log, the event log, a job ad or a terminal can take as it is."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from glite_vm.vm.guest_text import GUEST_TEXT_LIMIT, guest_text


@given(st.binary(max_size=5000), st.integers(min_value=0, max_value=700))
def test_any_bytes_become_one_printable_bounded_line(data: bytes, limit: int) -> None:
    text = guest_text(data, limit)
    assert len(text) <= limit
    assert all(c.isprintable() for c in text), repr(text)


def test_what_a_person_would_read_is_kept() -> None:
    said = (
        b"\x1b]0;owned\x07\x1b[2J\xc2\x9b31m\xff\xfe HoldReason = 1\r\n"
        b"GliteVmWarmStart = true\n\n\x1b[1;1Hforged line\n"
    )
    assert guest_text(said) == (
        "?31m\ufffd\ufffd HoldReason = 1 | GliteVmWarmStart = true | forged line"
    )
    assert guest_text(b"A" * 100_000) == "A" * (GUEST_TEXT_LIMIT - 3) + "..."
    assert guest_text(b"") == ""
