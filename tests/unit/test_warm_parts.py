"""The pure parts of warm start: the save image's header, the restored domain's XML, template
keys, and templates in the cache (made of plain files here; tests/service/test_warm_start.py
restores real ones)."""

from __future__ import annotations

import dataclasses
import os
import struct
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from glite_vm.config import Settings
from glite_vm.images.cache import ImageCache
from glite_vm.images.cache_budget import budgeted
from glite_vm.images.templates import TemplateKey, TemplateStore
from glite_vm.vm.domain_xml import (
    DomainSpec,
    JobMetadata,
    build_domain_xml,
    renamed_domain_xml,
    restored_domain_xml,
)
from glite_vm.vm.save_image import HEADER_SIZE, MAGIC, read_header, rewrite_header
from glite_vm.vm.warm import RestoreQueue

STREAM = b"QEVM\x00\x00\x00\x03" + os.urandom(4096)  # stands in for QEMU's migration stream


def save_image(path: Path, xml: str, cookie: bytes = b"<cookie/>", data_len: int = 8192) -> None:
    body = xml.encode() + b"\0" + cookie + b"\0"
    fields = struct.pack("=IIIII", 2, data_len, 1, 0, len(xml) + 1)
    path.write_bytes(MAGIC + fields + b"\0" * 56 + body + b"\0" * (data_len - len(body)) + STREAM)


def test_a_header_is_rewritten_in_place_and_the_stream_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "state.sav"
    save_image(path, "<domain><name>template</name></domain>")
    header = read_header(path)
    assert (header.xml, header.cookie, header.data_len) == (
        "<domain><name>template</name></domain>",
        b"<cookie/>",
        8192,
    )
    longer = "<domain><name>glite-vm-alice-1234.0-abcdef-with-a-longer-name</name></domain>"
    rewrite_header(path, header, longer)
    again = read_header(path)
    assert (again.xml, again.cookie, again.data_len) == (longer, b"<cookie/>", 8192)
    assert path.read_bytes()[HEADER_SIZE + 8192 :] == STREAM
    with pytest.raises(ValueError, match="does not fit"):
        rewrite_header(path, again, "<domain>" + "x" * 9000 + "</domain>")
    assert read_header(path).xml == longer  # a refused rewrite wrote nothing


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: b"LibvirtQemudPart" + raw[16:],  # a save that never finished
        lambda raw: raw[:100],  # cut inside the data area
        lambda raw: raw[:16] + struct.pack("=I", 7) + raw[20:],  # an unknown version
        lambda raw: raw[:20] + struct.pack("=I", 1 << 30) + raw[24:],  # an absurd size
        lambda raw: raw.replace(b"\0", b" ", 200),  # XML without its terminator
    ],
)
def test_anything_but_a_save_image_is_refused(tmp_path: Path, damage: object) -> None:
    path = tmp_path / "state.sav"
    save_image(path, "<domain/>")
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(ValueError):
        read_header(path)


def spec(directory: Path, name: str, *, network: str = "user", shell: bool = True) -> DomainSpec:
    meta = JobMetadata(
        job_id=name,
        owner="alice",
        owner_uid=1000,
        image="debian-12",
        image_sha256="a" * 64,
        keep_snapshot="on_failure",
        vm_dir=str(directory),
        created=1.0,
    )
    return DomainSpec(
        name=name,
        uuid=f"00000000-0000-4000-8000-{abs(hash(name)) % 10**12:012d}",
        domain_type="qemu",
        emulator="/usr/bin/qemu-system-x86_64",
        cpus=1,
        memory_mib=512,
        overlay=directory / "overlay.qcow2",
        base_image=Path("/cache/blobs/" + "b" * 64),
        base_format="qcow2",
        boot_log=directory / "boot.log",
        xfer_disk=directory / "xfer.img",
        metadata=meta,
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
        cmdline="console=ttyS0",
        network=network,
        genid=True,
        shell_socket=Path(f"/run/gvm/shells/{name[-6:]}") if shell else None,
    )


def saved_xml(template: DomainSpec) -> str:
    """What libvirt saves of a template's domain: ours, with device addresses and a MAC."""
    dom = ET.fromstring(build_domain_xml(template))  # noqa: S314
    for slot, disk in enumerate(dom.iterfind("devices/disk"), start=3):
        ET.SubElement(disk, "address", type="pci", slot=f"0x{slot:02x}")
    ET.SubElement(dom.find("devices/interface"), "mac", address="52:54:00:00:00:01")  # type: ignore[arg-type]
    dom.find("genid").text = "11111111-1111-4111-8111-111111111111"  # type: ignore[union-attr]
    return ET.tostring(dom, encoding="unicode")


def test_a_restored_domain_is_the_saved_machine_with_the_jobs_identity_and_files() -> None:
    template = spec(Path("/snap/tmpl"), "glite-vm-glite-vm-warm-template-aaaaaa")
    job = spec(Path("/snap/job"), "glite-vm-alice-12.0-bbbbbb")
    layer = Path("/snap/job/template-layer.qcow2")
    xml = restored_domain_xml(
        saved_xml(template),
        job,
        layer,
        genid="22222222-2222-4222-8222-222222222222",
        mac="52:54:00:12:34:56",
    )
    dom = ET.fromstring(xml)  # noqa: S314
    assert dom.findtext("name") == job.name and dom.findtext("uuid") == job.uuid
    assert dom.findtext("genid") == "22222222-2222-4222-8222-222222222222"
    assert f"job {job.name} of alice" in (dom.findtext("description") or "")
    assert "/snap/tmpl" not in xml  # nothing of the template's own files is left
    vda, vdb = dom.findall("devices/disk")
    assert vda.find("source").get("file") == "/snap/job/overlay.qcow2"  # type: ignore[union-attr]
    chain = [s.get("file") for s in vda.iterfind(".//backingStore/source")]
    assert chain == [str(layer), str(job.base_image)]
    assert vda.find("address").get("slot") == "0x03"  # type: ignore[union-attr]
    assert vdb.find("source").get("file") == "/snap/job/xfer.img"  # type: ignore[union-attr]
    console, shell = dom.findall("devices/serial")
    assert console.find("source").attrib == {"path": "/snap/job/boot.log", "append": "on"}  # type: ignore[union-attr]
    # the shell's port: the job's socket, bound by libvirt, never the template's
    assert shell.find("source").attrib == {"mode": "bind", "path": "/run/gvm/shells/bbbbbb"}  # type: ignore[union-attr]
    assert "/run/gvm/shells/aaaaaa" not in xml
    assert dom.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
    assert dom.findtext("os/kernel") == "/snap/job/vmlinuz"

    header = ET.fromstring(renamed_domain_xml(saved_xml(template), xml))  # noqa: S314
    assert header.findtext("name") == job.name and header.findtext("uuid") == job.uuid
    assert header.find("devices/interface/mac").get("address") == "52:54:00:12:34:56"  # type: ignore[union-attr]
    assert "/snap/tmpl/overlay.qcow2" in ET.tostring(header, encoding="unicode")  # only identity


def test_a_template_without_the_shell_port_is_refused_for_a_vm_with_one() -> None:
    """A template saved before VMs had a shell port cannot become one that has (the saved
    machine's devices are fixed): refused, so the job boots cold."""
    old = saved_xml(spec(Path("/snap/tmpl"), "t-aaaaaa", shell=False))
    with pytest.raises(ValueError, match="no shell port"):
        restored_domain_xml(old, spec(Path("/j"), "j-bbbbbb"), Path("/l"), genid="g", mac="m")
    new = saved_xml(spec(Path("/snap/tmpl"), "t-aaaaaa"))
    with pytest.raises(ValueError, match="the job's VM has none"):
        restored_domain_xml(
            new, spec(Path("/j"), "j-bbbbbb", shell=False), Path("/l"), genid="g", mac="m"
        )


def test_a_saved_domain_with_disks_we_do_not_make_is_refused() -> None:
    template = spec(Path("/snap/tmpl"), "t")
    dom = ET.fromstring(saved_xml(template))  # noqa: S314
    extra = ET.SubElement(dom.find("devices"), "disk", type="file")  # type: ignore[arg-type]
    ET.SubElement(extra, "source", file="/etc/shadow")
    ET.SubElement(extra, "target", dev="vdc")
    with pytest.raises(ValueError, match="unexpected disk 'vdc'"):
        restored_domain_xml(
            ET.tostring(dom, encoding="unicode"),
            spec(Path("/j"), "j"),
            Path("/l"),
            genid="g",
            mac="52:54:00:00:00:02",
        )


KEY = TemplateKey(
    image_sha256="c" * 64,
    kernel=None,
    initrd=None,
    cmdline=None,
    cpus=1,
    memory_mib=1024,
    disk_bytes=2 << 30,
    network="none",
    machine="pc",
    hypervisor="qemu",
    qemu_version="qemu:7002022",
    libvirt_version="9000000",
    template_format=1,
)


def test_every_part_of_a_key_names_another_template() -> None:
    changes: dict[str, Any] = {
        "image_sha256": "d" * 64,
        "kernel": "k",
        "initrd": "i",
        "cmdline": "quiet",
        "cpus": 2,
        "memory_mib": 2048,
        "disk_bytes": 3 << 30,
        "network": "default",
        "machine": "q35",
        "hypervisor": "kvm",
        "qemu_version": "qemu:8000000",
        "libvirt_version": "10000000",
        "template_format": 2,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(TemplateKey)}
    digests = {dataclasses.replace(KEY, **{k: v}).digest for k, v in changes.items()}
    assert KEY.digest not in digests and len(digests) == len(changes)


def make_template(store: TemplateStore, key: TemplateKey, image: Path, size: int) -> None:
    with store.building(key, image) as build:
        assert build is not None
        for name in ("layer.qcow2", "state.sav", "boot.log"):
            (build / name).write_bytes(b"x" * size)


@pytest.fixture
def cache(tmp_path: Path) -> ImageCache:
    return ImageCache(Settings(state_dir=tmp_path, cache_min_free_bytes=0))


def test_templates_appear_whole_are_found_by_key_and_image_and_go_when_stale(
    cache: ImageCache, tmp_path: Path
) -> None:
    store = TemplateStore(cache)
    image = tmp_path / "image"
    image.write_bytes(b"i")
    assert store.find(KEY, image) is None
    make_template(store, KEY, image, 10)
    found = store.find(KEY, image)
    assert found is not None and found.size == 30 and found.layer.read_bytes() == b"x" * 10
    assert store.path(KEY.digest).stat().st_mode & 0o777 == 0o700
    assert not [p for p in store.root.iterdir() if p.name.startswith(".build-")]
    with store.building(KEY, image) as build:  # exists already: nothing to build
        assert build is None
    other = dataclasses.replace(KEY, memory_mib=2048)
    assert store.find(other, image) is None  # another key, another template
    found.state.write_bytes(b"changed")
    with pytest.raises(ValueError, match="incomplete or changed; removed"):
        store.find(KEY, image)
    assert not store.path(KEY.digest).exists()
    make_template(store, KEY, image, 10)
    image.unlink()  # its image left the cache
    assert store.find(KEY, image) is None and not store.path(KEY.digest).exists()


def test_a_failed_build_leaves_nothing(cache: ImageCache, tmp_path: Path) -> None:
    store = TemplateStore(cache)
    with pytest.raises(RuntimeError), store.building(KEY, tmp_path) as build:
        assert build is not None
        (build / "state.sav").write_bytes(b"half")
        raise RuntimeError("the template's boot failed")
    assert list(store.root.iterdir()) == []


def test_templates_count_in_the_budget_and_are_evicted_least_recently_used_first(
    cache: ImageCache, tmp_path: Path
) -> None:
    store = TemplateStore(cache)
    image = tmp_path / "image"
    image.write_bytes(b"i")
    old, new = KEY, dataclasses.replace(KEY, cpus=2)
    make_template(store, old, image, 1000)
    make_template(store, new, image, 1000)
    past = time.time() - 3600
    os.utime(store.path(old.digest) / "template.json", (past, past))
    assert sum(e.size for e in budgeted(cache)) == 6000
    assert cache.prune_plan(4000).evict[0].sha256 == old.digest
    report = cache.prune(4000)
    assert [e.sha256 for e in report.removed] == [old.digest]
    assert store.load(old.digest) is None and store.load(new.digest) is not None


def test_warm_starts_take_turns_and_a_turn_ends_once() -> None:
    queue = RestoreQueue(2, patience=60.0)
    inside = 0
    most = 0
    lock = threading.Lock()
    go = threading.Event()
    errors: list[BaseException] = []

    def warm_start() -> None:
        try:
            one_turn()
        except BaseException as exc:  # a second end that gave back too much raises here
            errors.append(exc)

    def one_turn() -> None:
        nonlocal inside, most
        turn = queue.turn()
        with lock:
            inside += 1
            most = max(most, inside)
        go.wait(5)
        with lock:
            inside -= 1
        turn.end()
        turn.end()  # a teardown after the refresh ends it again: nothing more is given back

    threads = [threading.Thread(target=warm_start) for _ in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while most < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.set()
    for t in threads:
        t.join(10)
    assert most == 2  # never more than the queue's size at once
    assert errors == []
    # all turns were given back exactly once: the queue's two places are free again
    first, second = queue.turn(), queue.turn()
    first.end()
    second.end()


def test_a_turn_that_does_not_come_in_time_goes_ahead_anyway() -> None:
    queue = RestoreQueue(1, patience=0.2)
    held = queue.turn()
    late = queue.turn()  # the place is taken: after its patience it goes ahead without one
    late.end()  # and gives back nothing it did not take (a bounded semaphore would refuse)
    held.end()
    again = queue.turn()
    again.end()
