"""GLITE_VM_PREFETCH and GLITE_VM_PREFETCH_RATE as an admin writes them, and the rate limiter."""

from __future__ import annotations

import pytest

from glite_vm.config import Settings
from glite_vm.images.throttle import RateLimit
from glite_vm.knob_values import Prefetch
from glite_vm.units import MIB


@pytest.mark.parametrize(
    ("text", "names", "top"),
    [
        ("", (), 0),
        ("none", (), 0),
        ("debian-12", ("debian-12",), 0),
        ("debian-12, sl6 debian-12", ("debian-12", "sl6"), 0),
        ("top:5", (), 5),
        ("TOP:2, debian-12", ("debian-12",), 2),
    ],
)
def test_prefetch_takes_names_and_top_n(text: str, names: tuple[str, ...], top: int) -> None:
    plan = Settings.from_strings({"prefetch": text}).prefetch
    assert (plan.names, plan.top) == (names, top)
    assert bool(plan) is bool(names or top)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("top:0", "at least 1"),
        ("top:many", "whole number"),
        ("top:", "whole number"),
        ("top:2 top:3", "twice"),
        ("https://repo.example/x.qcow2", "takes no URLs"),
        ("/var/images/x.qcow2", "takes no URLs"),
        ("-rf", "not a catalogue name"),
    ],
)
def test_a_bad_prefetch_says_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="GLITE_VM_PREFETCH") as caught:
        Settings.from_strings({"prefetch": text})
    assert says in str(caught.value)
    assert "top:N" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "rate"),
    [("20MB/s", 20 * MIB), ("500 KiB/s", 500 * 1024), ("unlimited", None), ("", None)],
)
def test_prefetch_rate_is_a_size_per_second(text: str, rate: int | None) -> None:
    assert Settings.from_strings({"prefetch_rate": text}).prefetch_rate == rate


@pytest.mark.parametrize("text", ["20MB", "20", "20MB/h", "fast", "10B/s"])
def test_a_bad_rate_says_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match="GLITE_VM_PREFETCH_RATE"):
        Settings.from_strings({"prefetch_rate": text})


def test_the_defaults_prefetch_nothing_at_a_capped_rate() -> None:
    settings = Settings.from_strings({})
    assert settings.prefetch == Prefetch()
    assert settings.prefetch_rate == 20 * MIB


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_limiter_sleeps_until_the_bytes_fit_the_rate() -> None:
    t = FakeTime()
    limit = RateLimit(1000, clock=t.clock, sleep=t.sleep)
    limit(500, 3000)  # 0.5 s worth, arrived at once: wait 0.5 s
    assert t.slept == [0.5]
    t.now += 2.0  # the network was slow: 1000 more bytes are already late, no wait
    limit(1500, 3000)
    assert t.slept == [0.5]
    limit(3000, 3000)  # 3000 bytes in 2.5 s: 0.5 s more
    assert t.slept == [0.5, 0.5]
    assert limit.held_back == pytest.approx(1.0)


def test_the_limiter_counts_every_file_of_an_acquisition() -> None:
    t = FakeTime()
    limit = RateLimit(1000, clock=t.clock, sleep=t.sleep)
    limit(1000, 1000)  # the disk
    limit(1000, 1000)  # the kernel: done starts again
    assert limit.received == 2000
    assert sum(t.slept) == pytest.approx(2.0)


def test_a_stopping_service_is_not_held_back() -> None:
    import threading  # noqa: PLC0415

    stop = threading.Event()
    t = FakeTime()
    limit = RateLimit(1000, stop=stop, clock=t.clock, sleep=t.sleep)
    stop.set()
    limit(10_000, None)
    assert t.slept == []


def test_a_rate_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RateLimit(0)
