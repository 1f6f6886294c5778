"""Boot benchmark: glite-vm's request-to-agent-ready against bare QEMU, in one process run.

(a) a bare ``qemu-system-x86_64`` started with the same kernel, disk and devices, timed from
spawn until the guest agent first answers on its socket; (b) glite-vm from ``VmHost.start`` to
``wait_ready`` returning. Runs alternate (a, b, a, b, ...) so machine noise hits both alike.
Also times overlay creation and teardown. Targets: ratio b/a <= 1.15, overhead b-a <= 250 ms,
teardown <= 1 s. The last line is JSON.

Usage: python bench/boot.py [--runs N]   (needs the test guests: scripts/dev setup)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.config import Settings  # noqa: E402
from glite_vm.qemu_img import overlay_command, qemu_img  # noqa: E402
from glite_vm.request import VMRequest  # noqa: E402
from glite_vm.vm.connect import open_host  # noqa: E402
from glite_vm.vm.lifecycle import VmHost  # noqa: E402
from tests.support import LocalImage, direct_image_in, install_guests  # noqa: E402

GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))
MEMORY_MIB = 512
TIMEOUT = 120.0


def bare_qemu_ready(image: LocalImage, emulator: str, accel: str, work: Path) -> float:
    overlay = work / "bare.qcow2"
    qemu_img(
        overlay_command(image.path, image.format, overlay, image.virtual_size),
        "creating the bare QEMU's overlay",
    )
    sock_path = work / "qga.sock"
    sock_path.unlink(missing_ok=True)
    cmd = [
        emulator,
        "-accel",
        accel,
        "-machine",
        "pc",
        "-m",
        str(MEMORY_MIB),
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-no-user-config",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        image.cmdline or "",
        "-drive",
        f"file={overlay},format=qcow2,if=none,id=d0",
        "-device",
        "virtio-blk-pci,drive=d0",
        "-serial",
        f"file:{work / 'bare-boot.log'}",
        "-device",
        "virtio-serial-pci",
        "-chardev",
        f"socket,path={sock_path},server=on,wait=off,id=qga0",
        "-device",
        "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        "-object",
        "rng-random,filename=/dev/urandom,id=rng0",
        "-device",
        "virtio-rng-pci,rng=rng0",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        while not sock_path.exists():
            if time.monotonic() - start > TIMEOUT or proc.poll() is not None:
                raise RuntimeError("bare QEMU did not create its agent socket")
            time.sleep(0.005)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(sock_path))
            s.settimeout(0.05)
            while time.monotonic() - start < TIMEOUT:
                try:
                    s.sendall(b'{"execute":"guest-ping"}\n')
                    if b'"return"' in s.recv(4096):
                        return time.monotonic() - start
                except TimeoutError:
                    continue
        raise RuntimeError("bare QEMU's guest agent never answered")
    finally:
        proc.kill()
        proc.wait()
        overlay.unlink(missing_ok=True)


def glite_vm_ready(host: VmHost, image: LocalImage, n: int) -> tuple[float, float, float]:
    req = VMRequest.create(
        host.settings,
        image=image.name,
        job_id=f"bench.{n}",
        owner="bench",
        memory_mib=MEMORY_MIB,
        keep_snapshot="never",
    )
    start = time.monotonic()
    vm = host.start(req, image)
    try:
        vm.wait_ready(TIMEOUT)
        ready = time.monotonic() - start
    finally:
        done = vm.teardown(failed=False)
    return ready, vm.timings.overlay or 0.0, done.seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="glite-vm-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    try:
        image = direct_image_in(work, install_guests(GUESTS, work), "bench-direct")
        settings = Settings(state_dir=work / "state", default_disk_bytes=2 << 30)
        host = open_host(settings)
        accel = "kvm" if host.hypervisor.kind == "kvm" else "tcg"
        bare: list[float] = []
        ours: list[float] = []
        overlays: list[float] = []
        teardowns: list[float] = []
        for n in range(args.runs):
            bare.append(bare_qemu_ready(image, host.hypervisor.emulator, accel, work))
            ready, overlay, teardown = glite_vm_ready(host, image, n)
            ours.append(ready)
            overlays.append(overlay)
            teardowns.append(teardown)
            print(
                f"run {n + 1}: bare {bare[-1]:.3f} s, glite-vm {ready:.3f} s, "
                f"overlay {overlay * 1000:.1f} ms, teardown {teardown:.3f} s",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a, b = statistics.median(bare), statistics.median(ours)
    figures = {
        "benchmark": "boot",
        "hypervisor": host.hypervisor.kind,
        "runs": args.runs,
        "bare_qemu_ready_s": round(a, 3),
        "glite_vm_ready_s": round(b, 3),
        "ratio": round(b / a, 3),
        "overhead_ms": round((b - a) * 1000, 1),
        "overlay_ms": round(statistics.median(overlays) * 1000, 2),
        "teardown_s": round(statistics.median(teardowns), 3),
        "targets": {"ratio": 1.15, "overhead_ms": 250, "teardown_s": 1.0},
    }
    print(
        f"median bare QEMU {a:.3f} s, glite-vm {b:.3f} s: ratio {b / a:.3f}, "
        f"overhead {(b - a) * 1000:.0f} ms; teardown {figures['teardown_s']} s"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
