"""Which accelerator VMs use here: KVM only when a real, bounded probe shows it works.

``/dev/kvm`` existing proves little: under nested virtualisation it can open, answer ioctls and
still hang or crawl when a guest runs. The probe therefore (1) opens ``/dev/kvm`` and checks the
API version, (2) runs five bytes of guest code with ``KVM_RUN`` in a child process, and (3) boots
a 32-bit multiboot stub with the real QEMU and ``-accel kvm`` through the firmware, each step in
bounded time. Any failure selects QEMU's TCG with the reason recorded.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KVM_DEVICE = Path("/dev/kvm")
KVM_GET_API_VERSION = 0xAE00
# The stub writes this byte to isa-debug-exit; QEMU then exits with (byte << 1) | 1.
_EXIT_BYTE = 0x21
_EXPECTED_EXIT = (_EXIT_BYTE << 1) | 1
EMULATOR_NAMES = ("qemu-system-x86_64", "kvm")
#: File in the state directory that remembers the probe's verdict (see :func:`detect_cached`).
HYPERVISOR_CACHE = "hypervisor.json"


@dataclasses.dataclass(frozen=True)
class HypervisorInfo:
    """The accelerator chosen for VMs on this host, and why."""

    kind: str  # "kvm" or "qemu" (TCG), the libvirt domain type
    reason: str
    emulator: str
    kvm_probe_seconds: float = 0.0

    @property
    def accelerated(self) -> bool:
        return self.kind == "kvm"


def find_emulator() -> str:
    for name in EMULATOR_NAMES:
        path = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/libexec")
        if path:
            return path
    return ""


def multiboot_stub() -> bytes:
    """A multiboot (v1) image that does what a kernel does first, then exits QEMU.

    From 32-bit protected mode it enables PAE, loads identity-mapped page tables, sets
    EFER.LME, turns paging on, far-jumps into a 64-bit code segment, runs ten million
    iterations of a register+memory loop and writes ``_EXIT_BYTE`` to isa-debug-exit. Under
    nested virtualisation that cannot really run guests, this is where KVM hangs; TCG runs it in
    well under a second.
    """
    magic, flags = 0x1BADB002, 0x00010000
    checksum = (-(magic + flags)) & 0xFFFFFFFF
    base = 0x100000
    pml4, pdpt, pd = base + 0x1000, base + 0x2000, base + 0x3000
    code64, gdt, gdtr = base + 0x400, base + 0x800, base + 0x830
    img = bytearray(0x4000)
    img[0:32] = struct.pack("<8I", magic, flags, checksum, base, base, 0, 0, base + 32)
    c32 = bytearray()
    c32 += bytes([0x0F, 0x20, 0xE0, 0x83, 0xC8, 0x20, 0x0F, 0x22, 0xE0])  # cr4 |= PAE
    c32 += b"\xb8" + struct.pack("<I", pml4) + bytes([0x0F, 0x22, 0xD8])  # cr3 = pml4
    c32 += b"\xb9" + struct.pack("<I", 0xC0000080) + bytes([0x0F, 0x32])  # rdmsr EFER
    c32 += b"\x0d" + struct.pack("<I", 0x100) + bytes([0x0F, 0x30])  # EFER.LME, wrmsr
    c32 += bytes([0x0F, 0x20, 0xC0]) + b"\x0d" + struct.pack("<I", 0x80000001)  # cr0 |= PG|PE
    c32 += bytes([0x0F, 0x22, 0xC0])
    c32 += bytes([0x0F, 0x01, 0x15]) + struct.pack("<I", gdtr)  # lgdt
    c32 += b"\xea" + struct.pack("<IH", code64, 0x08)  # jmp 0x08:code64
    img[32 : 32 + len(c32)] = c32
    # mov ecx, 10M; loop: add rax, rcx; mov [0x200000], rax; dec ecx; jnz loop
    body = bytes([0x48, 0x01, 0xC8, 0x48, 0x89, 0x04, 0x25]) + struct.pack("<I", 0x200000)
    body += bytes([0xFF, 0xC9])
    c64 = b"\xb9" + struct.pack("<I", 10_000_000) + body + bytes([0x75, -(len(body) + 2) & 0xFF])
    c64 += bytes([0xB0, _EXIT_BYTE, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])  # out 0xf4, al; hlt
    img[0x400 : 0x400 + len(c64)] = c64
    img[0x800:0x818] = struct.pack("<QQQ", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    img[0x830:0x836] = struct.pack("<HI", 23, gdt)
    img[0x1000:0x1008] = struct.pack("<Q", pdpt | 3)
    img[0x2000:0x2008] = struct.pack("<Q", pd | 3)
    img[0x3000:0x3010] = struct.pack("<QQ", 0x83, 0x200000 | 0x83)  # two 2 MiB pages
    return bytes(img)


def qemu_selftest(emulator: str, accel: str, timeout: float) -> str | None:
    """Boot the multiboot stub with ``-accel ACCEL``; ``None`` when it worked, else why not."""
    with tempfile.TemporaryDirectory(prefix="glite-vm-probe-") as tmp:
        stub = Path(tmp) / "stub.bin"
        stub.write_bytes(multiboot_stub())
        cmd = [
            emulator,
            "-accel",
            accel,
            "-machine",
            "pc",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-m",
            "32",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            str(stub),
        ]
        try:
            proc = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return (
                f"QEMU with -accel {accel} did not finish a 64-bit self-test guest "
                f"within {timeout:g} s"
            )
        except OSError as exc:
            return f"cannot run {emulator}: {exc.strerror}"
    if proc.returncode != _EXPECTED_EXIT:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = err[-1] if err else f"exit status {proc.returncode}"
        return f"QEMU with -accel {accel} failed a 64-bit self-test guest: {detail}"
    return None


def kvm_ioctl_selftest(timeout: float) -> str | None:
    """Open /dev/kvm, check the API, run guest code in a killable child; ``None`` when OK."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"{KVM_DEVICE} does not exist (no KVM module or no hardware virtualisation)"
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return f"{KVM_DEVICE} is not accessible to this user ({exc.strerror})"
        return f"{KVM_DEVICE} cannot be opened: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return f"KVM API version {version}, expected 12"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "glite_vm.vm.kvm_selftest"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"KVM_RUN of a five-byte guest did not return within {timeout:g} s"
    if proc.returncode != 0:
        return "KVM self-test failed: " + (proc.stdout.decode(errors="replace").strip() or "?")
    return None


def detect(preference: str = "auto", *, timeout: float = 10.0) -> HypervisorInfo:
    """Choose the accelerator. ``preference`` is the GLITE_VM_HYPERVISOR setting."""
    emulator = find_emulator()
    if preference == "qemu":
        return HypervisorInfo("qemu", "TCG chosen by the GLITE_VM_HYPERVISOR setting", emulator)
    if preference not in ("auto", "kvm"):
        raise ValueError(f"GLITE_VM_HYPERVISOR must be auto, kvm or qemu, not {preference!r}")
    if not emulator:
        return HypervisorInfo("qemu", "no qemu-system-x86_64 found on PATH", "")
    start = time.monotonic()
    problem = kvm_ioctl_selftest(min(timeout, 5.0))
    if problem is None:
        problem = qemu_selftest(emulator, "kvm", timeout)
    elapsed = time.monotonic() - start
    if problem is None:
        return HypervisorInfo("kvm", "KVM self-test passed", emulator, elapsed)
    return HypervisorInfo("qemu", f"using TCG: {problem}", emulator, elapsed)


def _probe_key(emulator: str) -> str:
    """What the probe result depends on; a change of any of these probes again."""
    parts = [os.uname().release, emulator]
    for path in (emulator, str(KVM_DEVICE)):
        try:
            st = os.stat(path)
            parts.append(f"{st.st_ino}:{st.st_mtime_ns}")
        except OSError:
            parts.append("-")
    return "|".join(parts)


def detect_cached(
    preference: str, cache_file: Path, *, timeout: float = 10.0, reprobe: bool = False
) -> HypervisorInfo:
    """:func:`detect`, remembered in ``cache_file`` until the kernel, QEMU or /dev/kvm change.

    A host where KVM hangs would otherwise pay the probe's timeout on every job. ``reprobe``
    probes even when a remembered verdict holds, and remembers the new one.
    """
    if preference == "qemu":
        return detect(preference)
    emulator = find_emulator()
    key = _probe_key(emulator)
    try:
        data = json.loads(cache_file.read_text())
        if not reprobe and data.get("key") == key and data.get("preference") == preference:
            return HypervisorInfo(data["kind"], data["reason"] + " (cached probe)", emulator, 0.0)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    info = detect(preference, timeout=timeout)
    record = {"key": key, "preference": preference, "kind": info.kind, "reason": info.reason}
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(cache_file)
    except OSError:
        pass  # a read-only state dir only costs a new probe next time
    return info
