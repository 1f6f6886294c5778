"""Domain XML: the properties the design promises, checked on the XML itself."""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from glite_vm.vm.domain_xml import (
    AGENT_CHANNEL,
    METADATA_NS,
    DomainSpec,
    JobMetadata,
    build_domain_xml,
    domain_name,
)

META = JobMetadata(
    job_id="42.0",
    owner="alice",
    owner_uid=1001,
    image="debian-12",
    image_sha256="ab" * 32,
    keep_snapshot="on_failure",
    vm_dir="/var/lib/glite-vm/snapshots/x",
    created=1700000000.5,
    starter_pid=1234,
    scratch_dir="/var/lib/condor/execute/dir_1234",
)


def spec(**kw: object) -> DomainSpec:
    args: dict[str, object] = {
        "name": "glite-vm-alice-42.0-abcdef",
        "uuid": "0f2e9a55-3c1b-4d6e-8f00-123456789abc",
        "domain_type": "qemu",
        "emulator": "/usr/bin/qemu-system-x86_64",
        "cpus": 2,
        "memory_mib": 2048,
        "overlay": Path("/v/overlay.qcow2"),
        "base_image": Path("/c/base"),
        "base_format": "raw",
        "boot_log": Path("/v/boot.log"),
        "xfer_disk": Path("/v/xfer.img"),
        "metadata": META,
    }
    args.update(kw)
    return DomainSpec(**args)  # type: ignore[arg-type]


def parse(s: DomainSpec) -> ET.Element:
    return ET.fromstring(build_domain_xml(s))  # noqa: S314 - our own output


def test_overlay_with_pinned_base_format_and_no_further_chain() -> None:
    root = parse(spec())
    disks = [d for d in root.iterfind("devices/disk") if d.find("target").get("dev") == "vda"]  # type: ignore[union-attr]
    assert len(disks) == 1
    disk = disks[0]
    assert disk.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
    assert disk.find("source").get("file") == "/v/overlay.qcow2"  # type: ignore[union-attr]
    backing = disk.find("backingStore")
    assert backing is not None
    assert backing.find("format").get("type") == "raw"  # type: ignore[union-attr]
    assert backing.find("source").get("file") == "/c/base"  # type: ignore[union-attr]
    end = backing.find("backingStore")
    assert end is not None and len(end) == 0 and not end.attrib


def test_boot_log_agent_channel_no_network_and_crash_policy() -> None:
    root = parse(spec())
    serial = root.find("devices/serial")
    assert serial is not None and serial.get("type") == "file"
    assert serial.find("source").get("path") == "/v/boot.log"  # type: ignore[union-attr]
    assert serial.find("source").get("append") == "off"  # type: ignore[union-attr]
    target = root.find("devices/channel/target")
    assert target is not None and target.get("name") == AGENT_CHANNEL
    assert root.find("devices/interface") is None
    assert root.findtext("on_crash") == "destroy"
    assert root.get("type") == "qemu"
    assert root.findtext("vcpu") == "2"
    assert root.find("memory").text == "2048"  # type: ignore[union-attr]


def test_metadata_names_the_job_and_round_trips() -> None:
    root = parse(spec())
    job = root.find(f"metadata/{{{METADATA_NS}}}job")
    assert job is not None
    assert JobMetadata.from_xml(ET.tostring(job, encoding="unicode")) == META


def test_network_modes_and_direct_kernel_boot() -> None:
    root = parse(spec(network="user", kernel=Path("/k"), initrd=Path("/i"), cmdline="quiet"))
    assert root.find("devices/interface").get("type") == "user"  # type: ignore[union-attr]
    assert root.findtext("os/kernel") == "/k"
    assert root.findtext("os/initrd") == "/i"
    assert root.findtext("os/cmdline") == "quiet"
    assert root.find("os/boot") is None
    bridged = parse(spec(network="br-grid")).find("devices/interface")
    assert bridged is not None and bridged.get("type") == "network"
    assert bridged.find("source").get("network") == "br-grid"  # type: ignore[union-attr]


def test_kvm_gets_host_cpu_and_bad_inputs_are_refused() -> None:
    assert parse(spec(domain_type="kvm")).find("cpu").get("mode") == "host-passthrough"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="domain type"):
        build_domain_xml(spec(domain_type="xen"))
    with pytest.raises(ValueError, match="format"):
        build_domain_xml(spec(base_format="vmdk"))


def test_hostile_strings_stay_text() -> None:
    meta = JobMetadata(**{**META.__dict__, "image": "</name><evil/>&"})
    xml = build_domain_xml(spec(metadata=meta))
    assert "<evil/>" not in xml
    job = parse(spec(metadata=meta)).find(f"metadata/{{{METADATA_NS}}}job")
    assert job is not None
    assert JobMetadata.from_xml(ET.tostring(job, encoding="unicode")).image == "</name><evil/>&"


def test_domain_names_are_safe() -> None:
    name = domain_name("12.0", "alice/../x", "abc123")
    assert name.startswith("glite-vm-")
    assert "/" not in name and name.endswith("-abc123")


@pytest.mark.parametrize(
    "kw", [{}, {"network": "user", "kernel": Path("/k"), "domain_type": "kvm"}]
)
def test_libvirt_schema_accepts_it(tmp_path: Path, kw: dict[str, object]) -> None:
    f = tmp_path / "d.xml"
    f.write_text(build_domain_xml(spec(**kw)))
    proc = subprocess.run(
        ["virt-xml-validate", str(f), "domain"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
