"""The accelerator probe: bounded, honest about why, remembered, and its stub really runs."""

from __future__ import annotations

import time
from pathlib import Path

from glite_vm.vm import hypervisor as hv


def test_the_self_test_guest_runs_to_completion_under_tcg() -> None:
    # The stub must be a valid 64-bit guest, or a KVM verdict based on it would mean nothing.
    assert hv.qemu_selftest(hv.find_emulator(), "tcg", timeout=30) is None


def test_a_broken_accelerator_is_reported_not_hung() -> None:
    start = time.monotonic()
    problem = hv.qemu_selftest(hv.find_emulator(), "no-such-accel", timeout=30)
    assert problem is not None and "no-such-accel" in problem
    assert time.monotonic() - start < 30


def test_detect_is_bounded_and_gives_a_reason() -> None:
    start = time.monotonic()
    info = hv.detect("auto", timeout=4)
    assert time.monotonic() - start < 4 + 5 + 5  # qemu probe + ioctl probe bounds + slack
    assert info.kind in ("kvm", "qemu")
    assert info.reason
    if info.kind == "qemu":
        assert info.reason.startswith("using TCG: ")


def test_preference_qemu_skips_the_probe() -> None:
    info = hv.detect("qemu")
    assert info.kind == "qemu"
    assert "GLITE_VM_HYPERVISOR" in info.reason


def test_the_verdict_is_remembered(tmp_path: Path) -> None:
    cache = tmp_path / "hypervisor.json"
    first = hv.detect_cached("auto", cache, timeout=4)
    start = time.monotonic()
    second = hv.detect_cached("auto", cache, timeout=4)
    assert time.monotonic() - start < 1.0
    assert second.kind == first.kind
    assert second.reason.endswith("(cached probe)")
