"""Watching a guest boot until its agent answers, and saying at once why one never will.

Two parts:

* :class:`BootLogScanner` is pure: fed the serial console's bytes as they are written, it finds
  what decides a boot early — a kernel panic, firmware with nothing to boot, a boot loader that
  cannot load its kernel — and the moment the guest *booted* (a login prompt, a systemd boot
  target, cloud-init finishing). Its tests feed it console text captured from real guests.
* :func:`watch_boot` is the loop: it tails the boot log, reads the domain's state and reason
  from libvirt (crashed, powered off, destroyed), pings the agent, and raises the error that
  blames the right party (:func:`failure_error`, :func:`stopped_error`). libvirt's domain
  events, when the process runs an event loop (:mod:`glite_vm.vm.libvirt_events`), only wake
  it early; every decision rests on what it polls, so a lost event costs at most one poll.

Who is blamed (docs/vm.md): a kernel panic, nothing to boot, a failing boot loader, a guest
that powers itself off, and a guest that booted but never opened its agent's channel are the
image's fault (:class:`~glite_vm.errors.ImageBootError`, hold). The TCG timer-check panic and
a crashed QEMU may not happen again (:class:`~glite_vm.errors.TransientBootError`, retried,
then requeued); a VM destroyed from outside and a plain timeout are the host's
(:class:`~glite_vm.errors.BootError`, requeue).
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import enum
import re
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import libvirt

from glite_vm.errors import (
    AgentError,
    BootError,
    GliteVmError,
    ImageBootError,
    TransientBootError,
)
from glite_vm.vm import libvirt_events
from glite_vm.vm.agent import GuestAgent
from glite_vm.vm.domain_xml import AGENT_CHANNEL

POLL_SECONDS = 0.1  # between looks at the boot log, the domain and the agent
AGENT_POLL_SECONDS = 0.02  # between pings once libvirt says the agent's channel opened
READ_CHUNK = 1 << 20  # bytes of boot log read per poll at most (a chatty guest cannot stall us)
CONTEXT_LINES = 8  # lines before the decisive one that a message quotes
MAX_LINE = 240  # characters of one quoted line
MAX_PARTIAL = 4096  # characters of an unfinished line kept before it counts as a line
TAIL_LINES = 12  # lines quoted when the decisive evidence is "how it ended"

# Terminal escapes: CSI sequences (colours, cursor), OSC strings, charset selection, the rest.
_ESCAPES = re.compile(
    r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[()][0-9A-Za-z]|.)"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class FailureKind(enum.Enum):
    """What the console shows went wrong."""

    KERNEL_PANIC = "kernel panic"
    TIMER_CHECK_PANIC = "timer-check panic"
    NO_BOOT_DEVICE = "nothing to boot"
    BOOT_LOADER = "boot loader failure"


_PANIC = re.compile(r"Kernel panic - not syncing: ?(?P<why>.*)")
# QEMU TCG under CPU contention: the guest's timer interrupts arrive too late for its check.
_TIMER_CHECK = re.compile(r"IO-APIC \+ timer doesn't work")
_NO_BOOT_DEVICE = re.compile(
    r"No bootable device"  # SeaBIOS
    r"|No bootable option or device was found"  # OVMF (UEFI)
)
_BOOT_LOADER = re.compile(
    r"^Loading \S+\.\.\..*\bfailed:"  # syslinux: its kernel or initrd is missing
    r"|Could not find kernel image: "  # older syslinux/isolinux
    r"|grub rescue>"  # GRUB gave up before reading its configuration
    r"|error: (?:no such partition|unknown filesystem|file '.*' not found)\."  # GRUB
)
#: Lines that show the firmware's boot attempt (quoted with a "nothing to boot" finding).
_FIRMWARE_CONTEXT = re.compile(r"^(?:Booting from |Boot failed|SeaBIOS|BdsDxe)")

#: A guest that shows one of these has finished booting: its agent should be up very soon.
_BOOTED = re.compile(
    r"^\S+ login: ?$"  # getty (agetty, busybox getty, ...)
    r"|Reached target .*(?:Multi-User System|multi-user\.target|Graphical Interface"
    r"|graphical\.target|Login Prompts|getty\.target)"  # systemd
    r"|Cloud-init v\. \S+ finished at"  # cloud-init's final stage
    r"|Please press Enter to activate this console\."  # busybox init
)


@dataclasses.dataclass(frozen=True)
class BootFailure:
    """A finding that ends the boot: what, and the lines that show it (the last one decides)."""

    kind: FailureKind
    evidence: tuple[str, ...]

    @property
    def line(self) -> str:
        return self.evidence[-1]

    @property
    def transient(self) -> bool:
        return self.kind is FailureKind.TIMER_CHECK_PANIC


def clean_line(raw: str) -> str:
    """A console line as a person reads it: no terminal escapes, carriage returns or other
    control characters, at most :data:`MAX_LINE` characters."""
    text = without_escapes(raw).rstrip()
    return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


def without_escapes(raw: str) -> str:
    """``raw`` without terminal escapes, carriage returns and other C0 controls (tabs become
    blanks; line breaks stay)."""
    return _CONTROL.sub("", _ESCAPES.sub("", raw.replace("\r", ""))).replace("\t", " ")


class BootLogScanner:
    """Reads a boot log as it grows and keeps the first failure and the first sign of a
    finished boot. Pure: bytes in, findings out; the result does not depend on how the bytes
    were split into calls of :meth:`feed`."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._context: collections.deque[str] = collections.deque(maxlen=CONTEXT_LINES)
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.failure: BootFailure | None = None
        self.booted: str | None = None  # the line that showed it
        self.lines = 0

    def feed(self, data: bytes) -> None:
        text = self._partial + self._decoder.decode(data)
        *complete, self._partial = text.split("\n")
        for raw in complete:
            self._line(raw)
        if len(self._partial) > MAX_PARTIAL:
            self._line(self._partial)
            self._partial = ""
        # A login prompt waits for input on an unfinished line.
        if self.booted is None and self._partial:
            prompt = clean_line(self._partial)
            if prompt and _BOOTED.search(prompt):
                self.booted = prompt

    def finish(self) -> None:
        """The log ends here (the guest stopped): an unfinished last line counts as a line."""
        rest = self._partial + self._decoder.decode(b"", final=True)
        self._partial = ""
        if rest:
            self._line(rest)

    @property
    def tail(self) -> tuple[str, ...]:
        """The last non-empty lines seen (unfinished one included)."""
        pending = clean_line(self._partial)
        return (*self._tail, pending) if pending else tuple(self._tail)

    def _line(self, raw: str) -> None:
        line = clean_line(raw)
        if not line:
            return
        self.lines += 1
        self._tail.append(line)
        if self.failure is None:
            kind = _failure_kind(line)
            if kind is not None:
                context = list(self._context)
                if kind is FailureKind.NO_BOOT_DEVICE:
                    context = [c for c in context if _FIRMWARE_CONTEXT.search(c)]
                self.failure = BootFailure(kind, (*context, line))
        if self.booted is None and _BOOTED.search(line):
            self.booted = line
        self._context.append(line)


def _failure_kind(line: str) -> FailureKind | None:
    panic = _PANIC.search(line)
    if panic:
        if _TIMER_CHECK.search(panic.group("why")):
            return FailureKind.TIMER_CHECK_PANIC
        return FailureKind.KERNEL_PANIC
    if _NO_BOOT_DEVICE.search(line):
        return FailureKind.NO_BOOT_DEVICE
    if _BOOT_LOADER.search(line):
        return FailureKind.BOOT_LOADER
    return None


def scan(text: bytes) -> BootLogScanner:
    """A whole boot log at once (tests, post-mortems)."""
    scanner = BootLogScanner()
    scanner.feed(text)
    return scanner


# --- findings -> errors ------------------------------------------------------------------------

_PANIC_FIXES: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"Attempted to kill init"),
        "its init program exited while the system booted; check the init system of the "
        "image (and init= or rdinit= on its kernel command line)",
    ),
    (
        re.compile(r"VFS: Unable to mount root fs|No working init found|Requested init .* failed"),
        "the kernel found no root file system or no init to start; check root= and init= on "
        "the kernel command line and that the initramfs holds the virtio disk drivers "
        "(virtio_pci, virtio_blk)",
    ),
    (
        re.compile(r"Out of memory"),
        "the guest ran out of memory while booting; ask for more memory (request_memory) or "
        "make the image need less",
    ),
)
_GENERIC_PANIC_FIX = (
    "fix the image's kernel, initramfs or kernel command line; the lines below show where "
    "it stopped"
)


def failure_error(failure: BootFailure, boot_log: Path | None) -> GliteVmError:
    """The error for what the console showed: the image's fault, or transient."""
    evidence = "\n".join(failure.evidence)
    if failure.kind is FailureKind.TIMER_CHECK_PANIC:
        return TransientBootError(
            "the guest kernel panicked in its timer check ('IO-APIC + timer doesn't work!'), "
            "which happens to guests under QEMU's TCG emulation when the host's CPUs are busy; "
            "not a fault of the image ('no_timer_check' on a kernel command line avoids it)",
            boot_log,
            evidence,
        )
    if failure.kind is FailureKind.KERNEL_PANIC:
        why = _PANIC.search(failure.line)
        reason = why.group("why").strip() if why else ""
        fix = next((f for p, f in _PANIC_FIXES if p.search(reason)), _GENERIC_PANIC_FIX)
        problem = f"its kernel panicked ({reason or 'no reason given'})"
        return ImageBootError(problem, fix, boot_log, evidence)
    if failure.kind is FailureKind.NO_BOOT_DEVICE:
        return ImageBootError(
            "the firmware found nothing to boot on its disk (no boot loader)",
            "install a boot loader in the image (for example grub-install), or give its "
            "catalogue entry a kernel and initrd to boot directly",
            boot_log,
            evidence,
        )
    return ImageBootError(
        "its boot loader could not load a kernel",
        "repair the boot loader's configuration in the image (the kernel or partition it "
        "names must exist)",
        boot_log,
        evidence,
    )


def stopped_error(
    name: str, reason: int, scanner: BootLogScanner, boot_log: Path | None
) -> GliteVmError:
    """The error for a domain that stopped before its agent answered (``reason``: libvirt's
    ``VIR_DOMAIN_SHUTOFF_*``), when its console showed no failure of its own."""
    tail = "\n".join(scanner.tail)
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_SHUTDOWN:
        return ImageBootError(
            "it powered itself off before its guest agent answered",
            "find out from the boot log's last lines why the image shuts down while booting",
            boot_log,
            tail,
        )
    if reason in (libvirt.VIR_DOMAIN_SHUTOFF_CRASHED, libvirt.VIR_DOMAIN_SHUTOFF_FAILED):
        return TransientBootError(
            f"QEMU stopped unexpectedly while {name} booted (it crashed or was killed)",
            boot_log,
            tail,
        )
    if reason == libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED:
        return BootError(
            f"the VM {name} was destroyed from outside (an administrator, libvirt) before its "
            "guest agent answered",
            boot_log,
            tail,
        )
    return BootError(
        f"the VM {name} stopped before its guest agent answered (libvirt reason {reason})",
        boot_log,
        tail,
    )


def no_agent_error(scanner: BootLogScanner, waited: float, boot_log: Path | None) -> ImageBootError:
    evidence = "\n".join(scanner.tail)
    return ImageBootError(
        f"it finished booting (its console shows {scanner.booted!r}) but did not start "
        f"qemu-guest-agent within {waited:.0f} s",
        "install qemu-guest-agent in the image and start it at boot (systemctl enable "
        f"qemu-guest-agent); it must serve the virtio port {AGENT_CHANNEL}",
        boot_log,
        evidence,
    )


# --- the loop ----------------------------------------------------------------------------------


class _LogTail:
    """New bytes of a file that another process writes, from the first byte on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO | None = None

    def read(self) -> bytes:
        if self._file is None:
            try:
                self._file = self.path.open("rb")
            except FileNotFoundError:
                return b""  # QEMU has not created it yet
            except OSError as exc:
                raise BootError(f"cannot read the boot log {self.path}: {exc.strerror}") from exc
        return self._file.read(READ_CHUNK)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def agent_channel_connected(domain: libvirt.virDomain) -> bool:
    """Has the guest opened the agent's virtio port (qemu-ga runs, though it may not answer
    yet)? From the live domain XML's channel ``state``."""
    try:
        root = ET.fromstring(domain.XMLDesc(0))  # noqa: S314 - libvirt's own output
    except (libvirt.libvirtError, ET.ParseError):
        return False
    for target in root.iterfind("devices/channel/target"):
        if target.get("name") == AGENT_CHANNEL:
            return target.get("state") == "connected"
    return False


def watch_boot(
    domain: libvirt.virDomain,
    boot_log: Path,
    *,
    name: str,
    timeout: float,
    agent_timeout: float,
    cancel: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> float:
    """Wait until the guest agent of ``domain`` answers; seconds waited.

    Ends early, within about :data:`POLL_SECONDS` of the evidence reaching the boot log or
    libvirt, with the error that blames the right party (see the module docstring). A guest
    that booted (:attr:`BootLogScanner.booted`) gets ``agent_timeout`` seconds more for its
    agent, unless the agent's channel is open (the agent runs, only slowly): then the
    ``timeout`` for the whole boot applies. ``cancel`` ends the wait with AgentError.
    """
    start = clock()
    deadline = start + timeout
    agent = GuestAgent(domain)
    scanner = BootLogScanner()
    tail = _LogTail(boot_log)
    booted_at: float | None = None
    with libvirt_events.DomainEvents(domain) as events:
        try:
            while True:
                scanner.feed(tail.read())
                if scanner.failure is not None:
                    raise failure_error(scanner.failure, boot_log)
                stopped = _stopped_reason(domain)
                if stopped is not None:
                    scanner.feed(tail.read())  # what it wrote before it stopped
                    scanner.finish()
                    if scanner.failure is not None:
                        raise failure_error(scanner.failure, boot_log)
                    raise stopped_error(name, stopped, scanner, boot_log)
                if agent.ping(timeout=1):
                    return clock() - start
                now = clock()
                if cancel is not None and cancel.is_set():
                    raise AgentError(f"stopped waiting for {name} to boot: cancelled")
                if scanner.booted is not None:
                    booted_at = now if booted_at is None else booted_at
                    if now - booted_at >= agent_timeout and not agent_channel_connected(domain):
                        raise no_agent_error(scanner, now - booted_at, boot_log)
                if now >= deadline:
                    raise _timeout_error(name, timeout, domain, scanner, boot_log)
                pause = AGENT_POLL_SECONDS if events.agent_connected else POLL_SECONDS
                events.wait(min(pause, max(deadline - now, 0.0)))
        finally:
            tail.close()


def _stopped_reason(domain: libvirt.virDomain) -> int | None:
    """``VIR_DOMAIN_SHUTOFF_*`` when the domain is no longer running, else ``None``."""
    try:
        state, reason = (int(v) for v in domain.state())
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return int(libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)
        raise BootError(f"lost libvirt while the guest booted: {exc}") from exc
    if state == libvirt.VIR_DOMAIN_SHUTOFF:
        return reason
    if state == libvirt.VIR_DOMAIN_CRASHED:  # only with on_crash=preserve; ours destroys
        return int(libvirt.VIR_DOMAIN_SHUTOFF_CRASHED)
    return None


def _timeout_error(
    name: str, timeout: float, domain: libvirt.virDomain, scanner: BootLogScanner, log: Path
) -> BootError:
    tail = "\n".join(scanner.tail)
    if agent_channel_connected(domain):
        what = f"the guest agent of {name} opened its channel but did not answer within"
    else:
        what = f"the guest agent of {name} did not answer within"
    return BootError(f"{what} {timeout:g} s", log, tail)


__all__ = [
    "BootFailure",
    "BootLogScanner",
    "FailureKind",
    "agent_channel_connected",
    "clean_line",
    "failure_error",
    "scan",
    "stopped_error",
    "watch_boot",
    "without_escapes",
]
