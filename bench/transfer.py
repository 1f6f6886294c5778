"""Transfer benchmark: why files travel as a tar stream over a transfer disk.

Copies the same payload into one running guest twice, through the guest agent's file calls
(``guest-file-write``, base64 in JSON over the agent's serial channel) and through the
transfer disk (``Vm.push``: tar written to a raw virtio disk, extracted by the guest), and the
way back (``guest-file-read`` against ``Vm.pull``). Prints MB/s for each and the speed-up;
the last line is JSON.

Usage: python bench/transfer.py [--mib N]   (needs the test guests: scripts/dev setup)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.config import Settings  # noqa: E402
from glite_vm.request import VMRequest  # noqa: E402
from glite_vm.vm.connect import open_host  # noqa: E402
from tests.support import direct_image_in, install_guests  # noqa: E402

GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=32, help="payload size in MiB")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="glite-vm-bench-", dir="/var/tmp"))
    work.chmod(0o711)
    payload = os.urandom(args.mib << 20)
    try:
        image = direct_image_in(work, install_guests(GUESTS, work), "bench-direct")
        settings = Settings(
            state_dir=work / "state", default_disk_bytes=2 << 30, default_memory_mib=512
        )
        host = open_host(settings)
        req = VMRequest.create(
            settings,
            image="bench",
            job_id="bench.1",
            owner="bench",
            root=True,
            keep_snapshot="never",
        )
        src = work / "in"
        src.mkdir()
        (src / "payload.bin").write_bytes(payload)
        out = work / "out"
        out.mkdir()
        with host.start(req, image) as vm:
            vm.wait_ready()
            t = time.monotonic()
            vm.agent.write_file("/var/tmp/agent-copy.bin", payload)
            agent_in = time.monotonic() - t
            t = time.monotonic()
            back = vm.agent.read_file("/var/tmp/agent-copy.bin", limit=len(payload))
            agent_out = time.monotonic() - t
            assert back == payload, "agent round trip changed the bytes"
            t = time.monotonic()
            vm.push(src)
            disk_in = time.monotonic() - t
            t = time.monotonic()
            vm.pull(out)
            disk_out = time.monotonic() - t
            assert (out / "payload.bin").read_bytes() == payload, "disk round trip changed bytes"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mb = len(payload) / 1e6
    figures = {
        "benchmark": "transfer",
        "mib": args.mib,
        "agent_in_MBps": round(mb / agent_in, 1),
        "agent_out_MBps": round(mb / agent_out, 1),
        "disk_in_MBps": round(mb / disk_in, 1),
        "disk_out_MBps": round(mb / disk_out, 1),
        "speedup_in": round(agent_in / disk_in, 1),
        "speedup_out": round(agent_out / disk_out, 1),
    }
    print(
        f"{args.mib} MiB in: agent {figures['agent_in_MBps']} MB/s, transfer disk "
        f"{figures['disk_in_MBps']} MB/s; out: agent {figures['agent_out_MBps']} MB/s, "
        f"transfer disk {figures['disk_out_MBps']} MB/s"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
