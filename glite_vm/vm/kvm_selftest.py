"""A bounded KVM self-test: run five bytes of real-mode code in a fresh KVM VM.

Run as ``python -m glite_vm.vm.kvm_selftest`` in a child process so that a host where KVM_RUN
hangs (nested virtualisation without support) can be killed after a timeout. Exit status 0 and
``ok`` on stdout means the guest executed its ``out`` instruction and KVM works.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import sys

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_RUN = 0xAE80
KVM_GET_REGS = 0x8090AE81
KVM_SET_REGS = 0x4090AE82
KVM_GET_SREGS = 0x8138AE83
KVM_SET_SREGS = 0x4138AE84
KVM_EXIT_IO = 2
GUEST_ADDR = 0x1000
PORT = 0x10
MAGIC = 0x42
# mov al, MAGIC ; out PORT, al ; hlt
CODE = bytes([0xB0, MAGIC, 0xE6, PORT, 0xF4])


def selftest() -> str:
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    api = fcntl.ioctl(kvm, KVM_GET_API_VERSION)
    if api != 12:
        return f"unexpected KVM API version {api}"
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    mem = mmap.mmap(-1, 0x1000, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mem[: len(CODE)] = CODE
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    region = struct.pack("IIQQQ", 0, 0, GUEST_ADDR, 0x1000, addr)
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, region)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, size, prot=mmap.PROT_READ | mmap.PROT_WRITE, flags=mmap.MAP_SHARED)
    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    struct.pack_into("Q", sregs, 0, 0)  # cs.base
    struct.pack_into("H", sregs, 12, 0)  # cs.selector
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    struct.pack_into("Q", regs, 16 * 8, GUEST_ADDR)  # rip
    struct.pack_into("Q", regs, 17 * 8, 0x2)  # rflags
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))
    fcntl.ioctl(vcpu, KVM_RUN, 0)
    exit_reason = struct.unpack_from("I", run, 8)[0]
    if exit_reason != KVM_EXIT_IO:
        return f"guest exited with reason {exit_reason}, expected an I/O exit"
    # struct kvm_run.io: direction u8, size u8, port u16, count u32, data_offset u64 (at 32)
    _direction, _size, port, _count, offset = struct.unpack_from("BBHIQ", run, 32)
    value = run[offset]
    if port != PORT or value != MAGIC:
        return f"guest wrote {value:#x} to port {port:#x}, expected {MAGIC:#x} to {PORT:#x}"
    return "ok"


if __name__ == "__main__":
    try:
        result = selftest()
    except OSError as exc:
        result = f"{exc.strerror or exc} during the KVM self-test"
    sys.stdout.write(result + "\n")
    sys.exit(0 if result == "ok" else 1)
