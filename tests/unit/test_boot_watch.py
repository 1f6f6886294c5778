"""What the boot watcher reads in a console log, and whom it blames (pure: no VM).

The logs in ``boot_logs/`` are serial consoles captured from real guests under QEMU/TCG (the
test guests of tests/guest/build.sh, broken the ways the VM tests break them):

* ``direct-login-prompt.log``: the direct guest with ``glite_getty``, booting fine;
* ``direct-noagent-login-prompt.log``: the same with ``glite_noagent``: a login prompt, no agent;
* ``disk-boot-ok.log``: the disk guest (SeaBIOS, syslinux, kernel) booting fine;
* ``panic-init-exited.log``: ``rdinit=/bin/false``; ``panic-no-root-fs.log``:
  ``rdinit=/nonexistent``;
* ``panic-timer-check.log``: the direct guest without ``no_timer_check`` whose vCPU was held to
  3 % of a core (a CFS quota) during boot: the kernel's timer check failed;
* ``seabios-no-bootable-device.log``: the direct guest's data disk booted as a disk;
* ``syslinux-kernel-missing.log``: the disk guest with ``/vmlinuz`` deleted from its boot
  partition (the loader's output interleaved with its own echo, escapes and all);
* ``systemd-noagent-login-prompt.log`` and ``systemd-noagent-multi-user.log``: Debian 12's
  systemd 252 as init (in an initramfs on the test kernel), qemu-guest-agent masked, with an
  agetty on the serial console — once the getty owns the console, systemd prints no more
  status lines, so the login prompt is all there is — and without one (then systemd shows its
  targets, coloured and ellipsised, after waiting 90 s for a ttyS0 device no udev announces).
"""

from __future__ import annotations

from pathlib import Path

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glite_vm.errors import (
    BootError,
    Disposition,
    ImageBootError,
    TransientBootError,
)
from glite_vm.vm.boot_attempts import boot_with_retries
from glite_vm.vm.boot_watch import (
    BootLogScanner,
    FailureKind,
    clean_line,
    failure_error,
    no_agent_error,
    scan,
    stopped_error,
)
from glite_vm.vm.guest_user import valid_user_name

LOGS = Path(__file__).resolve().parent / "boot_logs"
BOOT_LOG = Path("/state/snapshots/glite-vm-x/boot.log")


def log(name: str) -> bytes:
    return (LOGS / name).read_bytes()


# -- failures found in real consoles -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kind", "decisive", "context"),
    [
        (
            "panic-init-exited.log",
            FailureKind.KERNEL_PANIC,
            "Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
            "Run /bin/false as init process",
        ),
        (
            "panic-no-root-fs.log",
            FailureKind.KERNEL_PANIC,
            "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)",
            'Please append a correct "root=" boot option',
        ),
        (
            "panic-timer-check.log",
            FailureKind.TIMER_CHECK_PANIC,
            "Kernel panic - not syncing: IO-APIC + timer doesn't work!",
            "..MP-BIOS bug: 8254 timer not connected to IO-APIC",
        ),
        (
            "seabios-no-bootable-device.log",
            FailureKind.NO_BOOT_DEVICE,
            "No bootable device.",
            "Boot failed: not a bootable disk",
        ),
        (
            "syslinux-kernel-missing.log",
            FailureKind.BOOT_LOADER,
            "Loading /vmlinuz...Loading /vmlinuz...  failed:failed:  No such file or director",
            "SYSLINUX 6.04",
        ),
    ],
)
def test_each_broken_boot_is_found_with_the_lines_that_show_it(
    name: str, kind: FailureKind, decisive: str, context: str
) -> None:
    scanner = scan(log(name))
    assert scanner.failure is not None
    assert scanner.failure.kind is kind
    assert decisive in scanner.failure.line
    assert any(context in line for line in scanner.failure.evidence[:-1]), scanner.failure
    assert all("\x1b" not in line and "\r" not in line for line in scanner.failure.evidence)
    assert scanner.booted is None


@pytest.mark.parametrize(
    ("name", "booted"),
    [
        ("direct-login-prompt.log", "glite-guest login:"),
        ("direct-noagent-login-prompt.log", "glite-guest login:"),
        ("disk-boot-ok.log", None),  # no getty: nothing says "booted", and nothing failed
        ("systemd-noagent-login-prompt.log", "glite-guest login:"),
        ("systemd-noagent-multi-user.log", "[  OK  ] Reached target getty.target - Login Prompts."),
    ],
)
def test_good_boots_show_no_failure_and_a_login_prompt_counts_as_booted(
    name: str, booted: str | None
) -> None:
    scanner = scan(log(name))
    assert scanner.failure is None
    assert scanner.booted == booted
    assert scanner.lines > 100


def test_the_login_prompt_is_seen_before_its_line_ends() -> None:
    text = log("direct-noagent-login-prompt.log")
    assert text.rstrip().endswith(b"login:")  # getty waits on an unfinished line
    scanner = BootLogScanner()
    scanner.feed(text)
    assert scanner.booted == "glite-guest login:"
    assert scanner.tail[-1] == "glite-guest login:"


ALL_LOGS = sorted(p.name for p in LOGS.glob("*.log"))


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(ALL_LOGS), cuts=st.lists(st.integers(0, 30000), max_size=40))
def test_findings_do_not_depend_on_how_the_log_arrives(name: str, cuts: list[int]) -> None:
    """QEMU writes the log in pieces of any size, a UTF-8 character or a line cut anywhere."""
    text = log(name)
    whole = scan(text)
    scanner = BootLogScanner()
    previous = 0
    for cut in sorted({min(c, len(text)) for c in cuts}):
        scanner.feed(text[previous:cut])
        previous = cut
    scanner.feed(text[previous:])
    assert scanner.failure == whole.failure
    assert scanner.booted == whole.booted


def test_console_lines_lose_escapes_and_carriage_returns() -> None:
    first = log("seabios-no-bootable-device.log").decode().split("\n")[0]
    assert first.startswith("\x1bc\x1b[?7l\x1b[2J")
    assert clean_line(first) == "SeaBIOS (version 1.16.2-debian-1.16.2-1)"
    assert clean_line("x" * 1000).endswith("...") and len(clean_line("x" * 1000)) == 240


def test_words_that_only_look_alike_decide_nothing() -> None:
    scanner = scan(
        b"[    0.000000] Kernel command line: console=ttyS0 panic=-1 oops=panic\n"
        b"[    1.000000] Booting from ROM is not attempted\n"
        b"Welcome! This is no login: prompt at all\n"
    )
    assert scanner.failure is None
    assert scanner.booted is None


def test_a_stream_of_garbage_is_read_in_bounded_memory() -> None:
    scanner = BootLogScanner()
    for _ in range(64):
        scanner.feed(b"\xff" * 65536)  # no line break ever
    assert scanner.failure is None
    assert len(scanner.tail) <= 13 and all(len(line) <= 240 for line in scanner.tail)


# -- whom the findings blame ---------------------------------------------------------------------


def failure_of(name: str) -> ImageBootError | TransientBootError | BootError:
    found = scan(log(name)).failure
    assert found is not None
    err = failure_error(found, BOOT_LOG)
    assert isinstance(err, ImageBootError | BootError)
    return err


def test_a_panicking_kernel_is_the_image_fault_and_says_what_to_fix() -> None:
    err = failure_of("panic-init-exited.log")
    assert isinstance(err, ImageBootError)
    assert err.disposition is Disposition.HOLD
    text = str(err)
    assert text.startswith("the image cannot boot: its kernel panicked (Attempted to kill init!")
    assert "its init program exited" in text
    assert f"boot log: {BOOT_LOG}" in text
    assert "Run /bin/false as init process" in text.split("--- from the boot log ---")[1]
    root = failure_of("panic-no-root-fs.log")
    assert "check root= and init= on the kernel command line" in str(root)


def test_nothing_to_boot_and_a_failing_boot_loader_are_the_image_fault() -> None:
    nothing = failure_of("seabios-no-bootable-device.log")
    assert isinstance(nothing, ImageBootError)
    assert "found nothing to boot on its disk (no boot loader)" in str(nothing)
    assert "install a boot loader" in str(nothing)
    loader = failure_of("syslinux-kernel-missing.log")
    assert isinstance(loader, ImageBootError)
    assert "its boot loader could not load a kernel" in str(loader)


def test_the_timer_check_panic_is_transient_not_the_image_fault() -> None:
    err = failure_of("panic-timer-check.log")
    assert isinstance(err, TransientBootError)
    assert err.disposition is Disposition.REQUEUE
    assert "timer check" in str(err) and "not a fault of the image" in str(err)
    assert "IO-APIC + timer doesn't work!" in err.tail


def test_how_a_domain_stopped_decides_who_is_blamed() -> None:
    scanner = scan(b"glite-guest: init done\nglite-guest: poweroff requested\n")
    off = stopped_error("vm", libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN, scanner, BOOT_LOG)
    assert isinstance(off, ImageBootError)
    assert "powered itself off before its guest agent answered" in str(off)
    assert "poweroff requested" in str(off)
    crash = stopped_error("vm", libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, scanner, BOOT_LOG)
    assert isinstance(crash, TransientBootError)
    assert "QEMU stopped unexpectedly" in str(crash)
    gone = stopped_error("vm", libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED, scanner, BOOT_LOG)
    assert type(gone) is BootError
    assert "destroyed from outside" in str(gone)


def test_no_agent_after_a_login_prompt_is_the_image_fault() -> None:
    scanner = scan(log("direct-noagent-login-prompt.log"))
    err = no_agent_error(scanner, 30.2, BOOT_LOG)
    assert err.disposition is Disposition.HOLD
    assert "its console shows 'glite-guest login:'" in str(err)
    assert "did not start qemu-guest-agent within 30 s" in str(err)
    assert "install qemu-guest-agent in the image" in str(err)
    assert "NOT starting the agent" in err.evidence


# -- retries ---------------------------------------------------------------------------------------


class Attempts:
    """An attempt that fails with the given errors, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls: list[tuple[int, float]] = []

    def __call__(self, number: int, seconds_left: float) -> str:
        self.calls.append((number, seconds_left))
        if self.errors:
            raise self.errors.pop(0)
        return "vm"


def test_transient_failures_are_retried_then_the_job_boots() -> None:
    attempts = Attempts(TransientBootError("QEMU stopped"), TransientBootError("timer"))
    assert boot_with_retries(attempts, attempts=3, budget=300) == ("vm", 3)
    assert [n for n, _ in attempts.calls] == [1, 2, 3]


def test_retries_are_bounded_and_the_last_error_counts_them() -> None:
    attempts = Attempts(*(TransientBootError("QEMU stopped", BOOT_LOG) for _ in range(5)))
    with pytest.raises(TransientBootError) as info:
        boot_with_retries(attempts, attempts=3, budget=300)
    assert len(attempts.calls) == 3
    assert str(info.value).startswith(
        "QEMU stopped (boot attempt 3 of at most 3 on this host); boot log: "
    )
    assert info.value.boot_log == BOOT_LOG


def test_an_image_fault_or_a_timeout_is_never_retried() -> None:
    for error in (ImageBootError("panic", "fix it"), BootError("no answer in 300 s")):
        attempts = Attempts(error)
        with pytest.raises(type(error)):
            boot_with_retries(attempts, attempts=3, budget=300)
        assert len(attempts.calls) == 1


def test_all_attempts_share_one_time_budget() -> None:
    now = [0.0]

    def slow_crash(number: int, seconds_left: float) -> str:
        now[0] += 200.0
        raise TransientBootError(f"crash {number} with {seconds_left:.0f} s left")

    with pytest.raises(TransientBootError) as info:
        boot_with_retries(slow_crash, attempts=5, budget=300, clock=lambda: now[0])
    assert str(info.value).startswith("crash 2 with 100 s left (boot attempt 2 of at most 5")


@pytest.mark.parametrize(
    ("name", "ok"),
    [("glite", True), ("builder-1", True), ("_svc", True), ("-rf", False), ("Root", False),
     ("a b", False), ("", False), ("x" * 33, False)],
)  # fmt: skip
def test_guest_account_names_are_checked_before_they_reach_a_guest(name: str, ok: bool) -> None:
    assert valid_user_name(name) is ok
