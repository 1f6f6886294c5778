"""`glite-vm doctor` and `glite-vm serve` on a real host: the accelerator verdict is remembered
and shared, and the service says what it is doing while it starts.

Both talk to the real libvirtd and run the real KVM probe (up to ~10 s here, where nested KVM
does not finish its self-test); no VM boots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from glite_vm.vm import hypervisor as hv

pytestmark = pytest.mark.vm
CLI = [sys.executable, "-m", "glite_vm"]


def env_for(state: Path, **extra: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GLITE_VM_CONFIG": "/nonexistent",
        "GLITE_VM_STATE_DIR": str(state),
        **extra,
    }


def doctor(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "doctor", "--json", *args],
        env=env_for(state),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def hypervisor_detail(proc: subprocess.CompletedProcess[str]) -> str:
    checks = json.loads(proc.stdout)["checks"]
    detail: str = next(c["detail"] for c in checks if c["check"] == "hypervisor")
    return detail


def test_doctor_uses_and_writes_the_remembered_verdict(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    remembered = state / hv.HYPERVISOR_CACHE
    # A verdict that still holds (same kernel, QEMU, /dev/kvm), as the service would leave it
    key = hv._probe_key(hv.find_emulator())
    record = {"key": key, "preference": "auto", "kind": "qemu", "reason": "the service's verdict"}
    remembered.write_text(json.dumps(record))
    used = doctor(state)
    assert used.returncode == 0, used.stderr
    assert "the service's verdict (cached probe)" in hypervisor_detail(used)
    assert "--reprobe" in hypervisor_detail(used)

    probed = doctor(state, "--reprobe")
    assert probed.returncode == 0, probed.stderr
    assert "probed in" in hypervisor_detail(probed)
    again = json.loads(remembered.read_text())
    assert again["key"] == key and again["reason"] != "the service's verdict"  # written anew

    # A fresh state directory: doctor probes once and remembers it for everyone after it
    fresh = tmp_path / "fresh"
    first = doctor(fresh)
    assert "probed in" in hypervisor_detail(first)
    assert (fresh / hv.HYPERVISOR_CACHE).is_file()
    assert "(cached probe)" in hypervisor_detail(doctor(fresh))


def test_serve_says_what_it_does_before_its_socket_exists(tmp_path: Path) -> None:
    state = tmp_path / "state"
    socket_path = tmp_path / "run" / "glite-vm.sock"
    socket_path.parent.mkdir()
    proc = subprocess.Popen(
        [*CLI, "serve", "--socket", str(socket_path)],
        env=env_for(state),  # fresh: no remembered verdict, so it probes KVM first
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: list[str] = []
    socket_when_it_spoke: list[bool] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "choosing the accelerator" in line:
                socket_when_it_spoke.append(socket_path.exists())
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any("ready after" in line for line in lines):
            assert proc.poll() is None, f"the service exited: {lines}"
            assert time.monotonic() < deadline, lines
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    assert socket_when_it_spoke == [False]  # it speaks before the silent part, not after
    text = "".join(lines)
    first = text.index("choosing the accelerator")
    assert first < text.index("accelerator: ") < text.index(f"socket {socket_path} bound")
    assert f"accepting calls on {socket_path}" in text
    assert (state / hv.HYPERVISOR_CACHE).is_file()  # and the verdict is remembered for others


def test_vms_destroy_shows_what_goes_and_asks_first(tmp_path: Path) -> None:
    """A defined (not started) domain of glite-vm's: nothing boots, the flow is the real one."""
    import xml.etree.ElementTree as ET  # noqa: PLC0415

    import libvirt  # noqa: PLC0415

    from glite_vm.vm.domain_xml import METADATA_NS, METADATA_PREFIX, JobMetadata  # noqa: PLC0415

    name = f"glite-vm-clitest-{os.getpid()}.0-d35700"
    meta = JobMetadata(
        job_id=f"{os.getpid()}.0",
        owner="clitest",
        owner_uid=0,
        image="test-image",
        image_sha256="0" * 64,
        keep_snapshot="never",
        vm_dir=str(tmp_path),
        created=time.time() - 610,
    )
    # as build_domain_xml writes it: the job's metadata inside the definition
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    domain = ET.Element("domain", type="qemu")
    ET.SubElement(domain, "name").text = name
    ET.SubElement(domain, "memory", unit="MiB").text = "64"
    ET.SubElement(ET.SubElement(domain, "os"), "type", arch="x86_64").text = "hvm"
    ET.SubElement(domain, "metadata").append(meta.to_element())
    conn = libvirt.open("qemu:///system")
    dom = conn.defineXML(ET.tostring(domain, encoding="unicode"))
    try:

        def destroy(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*CLI, "vms", "destroy", name, *args],
                env=env_for(tmp_path / "state", GLITE_VM_HYPERVISOR="qemu"),
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=120,
                check=False,
            )

        looked = destroy("--dry-run")
        assert looked.returncode == 0, looked.stderr
        assert "would destroy 1 VM(s)" in looked.stdout
        assert (
            name in looked.stdout and "clitest" in looked.stdout and "test-image" in looked.stdout
        )
        unconfirmed = destroy()  # a script, no --yes: nothing happens
        assert unconfirmed.returncode == 125
        assert "will destroy 1 VM(s)" in unconfirmed.stdout
        assert "confirm with --yes" in unconfirmed.stderr
        assert name in [d.name() for d in conn.listAllDomains(0)]
        done = destroy("--yes")
        assert done.returncode == 0, done.stderr
        assert f"destroyed {name}" in done.stdout
        assert name not in [d.name() for d in conn.listAllDomains(0)]
    finally:
        if name in [d.name() for d in conn.listAllDomains(0)]:
            dom.undefine()
        conn.close()
