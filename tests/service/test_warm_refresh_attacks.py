"""Attacks by a hostile image on the refresh of a VM restored from its warm-start template
(glite_vm.vm.warm.refresh_clone): the image's guest answers the refresh with a failure whose
stderr holds terminal escapes, line breaks, a ClassAd assignment, invalid UTF-8 and 300 KB of
filler, or never answers it. What reaches the event log, ``glite-vm events``, the service's log
and the job ad must be one bounded, printable line; the job's VM boots cold, and nothing is
left behind. Real libvirtd/QEMU, the real test guest with a ``/bin/sh`` of the attacker's."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.images.cache import ImageCache
from glite_vm.images.templates import TemplateStore
from glite_vm.request import JobRequest
from glite_vm.service import events
from glite_vm.service.api import PrepareResult
from glite_vm.service.local import LocalService
from glite_vm.slots import SlotFacts
from tests.service.warm_support import wait_for_builds, warm_local_service
from tests.support import GuestVariant, guest_catalogue

pytestmark = pytest.mark.vm
JUNK, HANG = "test-refresh-junk", "test-refresh-hang"
AGENT_TIMEOUT = 15.0  # the warm start's grace is twice this (glite_vm.service.prepare)

# /bin/sh of the hostile guest: busybox's shell for everything but the host's refresh script,
# which it answers (by the kernel command line's word) with junk on stderr, or never.
HOSTILE_SH = r"""#!/bin/busybox sh
if [ "${3-}" = glite-vm-refresh ]; then
    case " $(/bin/busybox cat /proc/cmdline) " in
    *" glite_refresh_junk "*)
        /bin/busybox printf '\033]0;owned\007\033[2J\302\23331m\377\376 ' >&2
        /bin/busybox printf 'HoldReason = "owned by the guest"\r\nGliteVmWarmStart = true\n' >&2
        /bin/busybox printf '\033[1;1Hforged line\n' >&2
        /bin/busybox head -c 300000 /dev/zero | /bin/busybox tr '\0' A >&2
        exit 7 ;;
    *" glite_refresh_hang "*)
        exec /bin/busybox sleep 100000 ;;
    esac
fi
exec /bin/busybox sh "$@"
"""


def _cpio_newc(name: str, data: bytes, mode: int) -> bytes:
    """A newc cpio archive of one regular file (the kernel's initramfs format)."""

    def entry(name: str, data: bytes, mode: int) -> bytes:
        fields = [1, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        head = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
        out = head + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        return out + b"\0" * (-len(out) % 4)

    archive = entry(name, data, mode) + entry("TRAILER!!!", b"", 0)
    return archive + b"\0" * (-len(archive) % 512)


def hostile_initrd(initrd: Path, dest: Path) -> Path:
    """The direct guest's initramfs with a second archive appended that replaces ``/bin/sh``
    (a later archive's file replaces an earlier one's: how the kernel unpacks initramfs)."""
    extra = _cpio_newc("bin/sh", HOSTILE_SH.encode(), 0o100755)
    dest.write_bytes(initrd.read_bytes() + gzip.compress(extra))
    return dest


@pytest.fixture(scope="module")
def hostile_catalogue(guest_dir: Path, guests: dict[str, Any]) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="glite-vm-refresh-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        initrd = hostile_initrd(guest_dir / guests["direct"]["initrd"], root / "hostile.img")
        variants = {
            JUNK: GuestVariant(extra="glite_refresh_junk", initrd=initrd),
            HANG: GuestVariant(extra="glite_refresh_hang", initrd=initrd),
        }
        yield guest_catalogue(guest_dir, root / "repo", variants=variants)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def hostile(
    svc_root: Path,
    hostile_catalogue: Path,
    hypervisor_probe: Path,
    request: pytest.FixtureRequest,
) -> Iterator[LocalService]:
    with warm_local_service(
        svc_root / f"refresh-{request.node.name[:40]}",
        hostile_catalogue,
        hypervisor_probe,
        boot_timeout=240.0,
        agent_timeout=AGENT_TIMEOUT,
        warm_images=(JUNK, HANG),
    ) as service:
        yield service


def prepare(service: LocalService, scratch: Path, image: str, n: int) -> PrepareResult:
    directory = scratch / f"job{n}"
    directory.mkdir(parents=True)
    request = JobRequest.create(
        service.settings, image=image, job_id=f"77.{n}", owner="root", keep_snapshot="never"
    )
    return service.prepare(
        request, scratch_dir=str(directory), starter_pid=None, slot=SlotFacts(name=f"slot1_{n}")
    )


def template_then_restore(
    service: LocalService,
    scratch: Path,
    image: str,
    meanwhile: Callable[[], object] | None = None,
) -> tuple[float, PrepareResult]:
    """A cold boot that has the image's template built, then a job restored from it (whose
    refresh the guest sabotages; ``meanwhile`` runs in a thread as long as its prepare does);
    when the template was made, and the second job's result."""
    first = prepare(service, scratch, image, 0)
    try:
        assert first.ad_attributes["GliteVmWarmStart"] is False
    finally:
        service.teardown(first.vm, failed=False)
    wait_for_builds()
    made = template_created(service)
    assert made > 0
    thread = threading.Thread(target=meanwhile or (lambda: None), daemon=True)
    thread.start()
    try:
        return made, prepare(service, scratch, image, 1)
    finally:
        thread.join(60)


def use_while_preparing(
    service: LocalService, job: str, scratch: Path, said: dict[str, str]
) -> None:
    """Find ``job``'s VM while its prepare still runs (within 60 s) and use it as its owner
    may (files from and to ``scratch``): ``said`` gets what exec, push, pull and console
    answered."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        found = [r for r in service.registry.active() if r.vm.request.job_id == job]
        if found and found[0].booting and found[0].vm.template is not None:
            name = found[0].name
            break
        time.sleep(0.05)
    else:
        return
    calls: dict[str, Callable[[], object]] = {
        "exec": lambda: service.exec(name, ["sh", "-c", "echo ran early"]).exit_code,
        "push": lambda: service.push(name, str(scratch / "job1")),
        "pull": lambda: service.pull(name, str(scratch / "early-out")),
        "console": lambda: service.console(name).running,
    }
    for op, run in calls.items():
        try:
            said[op] = f"ok: {run()!r}"
        except Exception as exc:
            said[op] = f"{type(exc).__name__}: {exc}"


def template_created(service: LocalService) -> float:
    """When the one template of the image was made (0: there is none)."""
    found = TemplateStore(ImageCache(service.settings)).entries()
    assert len(found) <= 1
    return found[0].created if found else 0.0


def unsafe(text: str) -> list[str]:
    """The characters of ``text`` a terminal, a log line or a ClassAd would act on."""
    return [c for c in text if not c.isprintable()]


def events_cli(service: LocalService) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GLITE_VM_STATE_DIR": str(service.settings.state_dir),
        "GLITE_VM_CONFIG": "/nonexistent",
    }
    shown = subprocess.run(
        [sys.executable, "-m", "glite_vm", "events"],
        capture_output=True,
        env=env,
        timeout=120,
        check=True,
    )
    return shown.stdout.decode("utf-8", "surrogateescape")


def test_a_guest_that_fails_its_refresh_with_junk_reaches_no_reader_raw(
    hostile: LocalService, svc_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    scratch = svc_root / "refresh-junk"
    with caplog.at_level(logging.INFO, logger="glite_vm"):
        failed_template, prepared = template_then_restore(hostile, scratch, JUNK)
    try:
        assert prepared.ad_attributes["GliteVmWarmStart"] is False  # booted cold
        out = bytearray()
        assert hostile.exec(prepared.vm, ["echo", "cold"], stdout=out.extend).exit_code == 0
        assert out == b"cold\n"
        for name, value in prepared.ad_attributes.items():
            assert not unsafe(str(value)), (name, value)
    finally:
        hostile.teardown(prepared.vm, failed=False)
    log_path = events.event_log_path(hostile.settings.state_dir)
    seen = [e for e in events.read_events(log_path) if e.job == "77.1"]
    fallback = [e for e in seen if e.event == events.WARM_FALLBACK]
    assert len(fallback) == 1
    assert "refreshing the restored guest failed (status 7)" in (fallback[0].reason or "")
    for e in seen:
        reason = e.reason or ""
        assert not unsafe(reason), e
        assert len(reason) <= 1000, e
    shown = events_cli(hostile)
    assert "refreshing the restored guest failed" in shown
    assert not [c for c in shown if c != "\n" and not c.isprintable()], shown[-2000:]
    assert "\nGliteVmWarmStart = true" not in shown and "\nforged line" not in shown
    for record in caplog.records:
        message = record.getMessage()
        assert not unsafe(message), message[:2000]
        assert len(message) <= 2000, message[:2000]
    # the template whose clone failed was dropped, and a new one built behind the cold boot
    wait_for_builds()
    assert template_created(hostile) > failed_template


def test_a_guest_that_never_answers_its_refresh_boots_cold_in_bounded_time(
    hostile: LocalService, svc_root: Path
) -> None:
    scratch = svc_root / "refresh-hang"
    said: dict[str, str] = {}
    _, prepared = template_then_restore(
        hostile, scratch, HANG, lambda: use_while_preparing(hostile, "77.1", scratch, said)
    )
    try:
        # While the restored clone hung in its refresh (the template's clock, machine id and
        # RNG still), its owner could run nothing in it; the console showed its boot.
        assert said, "the restored VM was never seen while its prepare ran"
        for op in ("exec", "push", "pull"):
            assert said[op].startswith("HostError: ") and "still being prepared" in said[op], said
        assert said["console"] == "ok: True", said
        assert prepared.ad_attributes["GliteVmWarmStart"] is False
        assert hostile.exec(prepared.vm, ["true"]).exit_code == 0
    finally:
        hostile.teardown(prepared.vm, failed=False)
    log_path = events.event_log_path(hostile.settings.state_dir)
    (fallback,) = [
        e
        for e in events.read_events(log_path)
        if e.event == events.WARM_FALLBACK and e.job == "77.1"
    ]
    waited = re.search(r"did not finish within ([0-9.]+) s", fallback.reason or "")
    assert waited is not None, fallback
    # the refresh counts in the warm start's grace (twice the agent's timeout), not beyond
    assert float(waited[1]) <= 2 * AGENT_TIMEOUT, fallback
