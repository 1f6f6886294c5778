"""libvirt domain XML for one job's VM, built in pure code with ElementTree.

Every choice here is deliberate:

* the root disk is a qcow2 **overlay** whose backing store is spelled out with its format, so
  neither libvirt nor QEMU ever probes a format (a raw image claiming to be qcow2 stays raw) and
  the base image is opened read-only;
* the serial console goes to a **file from the first byte** (the kernel's first lines included);
  for an interactive session (``glite-vm snapshots boot``) it becomes a pty that libvirt's
  console streams attach to, still logged to the same file from the first byte;
* the guest agent gets the standard channel ``org.qemu.guest_agent.0``;
* a job's VM gets a second serial port for ``glite-vm shell`` (:data:`SHELL_PORT`): on the
  host a Unix socket that libvirt binds (and hands to QEMU) at a short path in a directory
  only the service may enter, which the service connects to itself; a real terminal in the
  guest (``/dev/ttyS1``, see :mod:`glite_vm.vm.guest_shell`);
* there is **no network** unless asked for, ``on_crash`` destroys, and libvirt ``<metadata>``
  names the job and its owner so a reaper can find the owner of any domain later.
"""

from __future__ import annotations

import dataclasses
import os
import xml.etree.ElementTree as ET
from pathlib import Path

METADATA_NS = "urn:glite-vm:job:1"
METADATA_PREFIX = "glitevm"
XFER_SERIAL = "glitevm-xfer"
AGENT_CHANNEL = "org.qemu.guest_agent.0"
DOMAIN_PREFIX = "glite-vm-"
SERIAL_CONSOLES = ("file", "pty")
#: The shell's serial port (the guest's second UART, ``/dev/ttyS1``).
SHELL_PORT = "1"
#: The longest path of a Unix socket (``sun_path`` holds 108 bytes with the final NUL).
MAX_SOCKET_PATH = 107


@dataclasses.dataclass(frozen=True)
class JobMetadata:
    """Who a domain belongs to; stored in the domain so it survives our own restarts."""

    job_id: str
    owner: str
    owner_uid: int
    image: str
    image_sha256: str
    keep_snapshot: str
    vm_dir: str
    created: float
    starter_pid: int | None = None
    scratch_dir: str | None = None

    def to_element(self) -> ET.Element:
        job = ET.Element(f"{{{METADATA_NS}}}job")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                ET.SubElement(job, f"{{{METADATA_NS}}}{field.name}").text = str(value)
        return job

    @classmethod
    def from_xml(cls, text: str) -> JobMetadata:
        """Parse what :meth:`to_element` wrote (as libvirt returns it)."""
        root = ET.fromstring(text)  # noqa: S314 - libvirt's own output
        values: dict[str, str] = {}
        for child in root:
            values[child.tag.rsplit("}", 1)[-1]] = child.text or ""
        return cls(
            job_id=values["job_id"],
            owner=values["owner"],
            owner_uid=int(values["owner_uid"]),
            image=values["image"],
            image_sha256=values["image_sha256"],
            keep_snapshot=values["keep_snapshot"],
            vm_dir=values["vm_dir"],
            created=float(values["created"]),
            starter_pid=int(values["starter_pid"]) if values.get("starter_pid") else None,
            scratch_dir=values.get("scratch_dir") or None,
        )


@dataclasses.dataclass(frozen=True)
class DomainSpec:
    """Everything the domain XML depends on; nothing else is read."""

    name: str
    uuid: str
    domain_type: str  # "kvm" or "qemu"
    emulator: str
    cpus: int
    memory_mib: int
    overlay: Path
    base_image: Path
    base_format: str  # "qcow2" or "raw"
    boot_log: Path
    xfer_disk: Path | None
    metadata: JobMetadata
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    network: str = "none"  # none | user | <libvirt network name>
    # Images below the base, for overlays on a kept snapshot: ((path, format), ...).
    base_chain: tuple[tuple[Path, str], ...] = ()
    machine: str = "pc"
    # "file": the serial console only writes the boot log (jobs). "pty": an interactive console
    # (libvirt's virDomainOpenConsole attaches to it) whose output is still logged to boot_log.
    serial_console: str = "file"
    # The Unix socket of a second serial port for `glite-vm shell` (jobs' VMs; not the
    # throw-away VMs of a kept snapshot, whose console is interactive already); None: no port.
    shell_socket: Path | None = None
    # A VM generation ID device (``<genid/>``): a template's VMs get a new ID on each restore,
    # which tells a guest kernel that has the driver (CONFIG_VMGENID) to reseed its RNG.
    genid: bool = False


def build_domain_xml(spec: DomainSpec) -> str:
    if spec.serial_console not in SERIAL_CONSOLES:
        raise ValueError(f"serial console must be 'file' or 'pty', not {spec.serial_console!r}")
    if spec.domain_type not in ("kvm", "qemu"):
        raise ValueError(f"domain type must be 'kvm' or 'qemu', not {spec.domain_type!r}")
    if spec.shell_socket is not None:
        check_socket_path(spec.shell_socket)
    for fmt in (spec.base_format, *(f for _p, f in spec.base_chain)):
        if fmt not in ("qcow2", "raw"):
            raise ValueError(f"base image format must be qcow2 or raw, not {fmt!r}")
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    dom = ET.Element("domain", type=spec.domain_type)
    ET.SubElement(dom, "name").text = spec.name
    ET.SubElement(dom, "uuid").text = spec.uuid
    if spec.genid:
        ET.SubElement(dom, "genid")
    ET.SubElement(dom, "title").text = f"glite-vm job {spec.metadata.job_id}"
    ET.SubElement(
        dom, "description"
    ).text = f"job {spec.metadata.job_id} of {spec.metadata.owner}, image {spec.metadata.image}"
    ET.SubElement(dom, "metadata").append(spec.metadata.to_element())
    ET.SubElement(dom, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(dom, "vcpu").text = str(spec.cpus)

    os_el = ET.SubElement(dom, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine=spec.machine).text = "hvm"
    if spec.kernel is not None:
        ET.SubElement(os_el, "kernel").text = str(spec.kernel)
        if spec.initrd is not None:
            ET.SubElement(os_el, "initrd").text = str(spec.initrd)
        if spec.cmdline:
            ET.SubElement(os_el, "cmdline").text = spec.cmdline
    else:
        ET.SubElement(os_el, "boot", dev="hd")
    ET.SubElement(os_el, "bios", useserial="yes")

    features = ET.SubElement(dom, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    if spec.domain_type == "kvm":
        ET.SubElement(dom, "cpu", mode="host-passthrough")
    ET.SubElement(dom, "clock", offset="utc")
    ET.SubElement(dom, "on_poweroff").text = "destroy"
    ET.SubElement(dom, "on_reboot").text = "restart"
    ET.SubElement(dom, "on_crash").text = "destroy"

    devices = ET.SubElement(dom, "devices")
    ET.SubElement(devices, "emulator").text = spec.emulator
    ET.SubElement(devices, "controller", type="usb", model="none")
    _root_disk(devices, spec)
    if spec.xfer_disk is not None:
        _xfer_disk(devices, spec.xfer_disk)
    _network(devices, spec.network)

    _serial_console(devices, spec.boot_log, spec.serial_console)
    if spec.shell_socket is not None:
        # mode='bind': libvirtd binds the socket itself and passes it to QEMU, so the
        # directory may be one that only root (the service) can enter.
        shell = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(shell, "source", mode="bind", path=str(spec.shell_socket))
        ET.SubElement(shell, "target", port=SHELL_PORT)

    channel = ET.SubElement(devices, "channel", type="unix")
    ET.SubElement(channel, "source", mode="bind")
    ET.SubElement(channel, "target", type="virtio", name=AGENT_CHANNEL)

    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(devices, "memballoon", model="none")
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def check_socket_path(path: Path) -> None:
    """Refuse a socket path that is relative or longer than a Unix socket's name can be."""
    if not path.is_absolute() or len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ValueError(
            f"the shell socket {path} must be an absolute path of at most {MAX_SOCKET_PATH} bytes"
        )


def shell_socket_of(xml: str) -> Path | None:
    """The Unix socket of the shell's serial port in a domain's XML (libvirt's, of one of
    ours); ``None`` when it has none (a VM started before ``glite-vm shell`` had sockets)."""
    dom = ET.fromstring(xml)  # noqa: S314 - libvirt's output of a domain we defined
    for serial in dom.iterfind("devices/serial"):
        target, source = serial.find("target"), serial.find("source")
        if (
            serial.get("type") == "unix"
            and target is not None
            and target.get("port") == SHELL_PORT
            and source is not None
            and source.get("mode") == "bind"
            and source.get("path")
        ):
            return Path(str(source.get("path")))
    return None


def _root_disk(devices: ET.Element, spec: DomainSpec) -> None:
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="qcow2", discard="unmap")
    ET.SubElement(disk, "source", file=str(spec.overlay))
    _backing_chain(disk, ((spec.base_image, spec.base_format), *spec.base_chain))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")


def _backing_chain(disk: ET.Element, chain: tuple[tuple[Path, str], ...]) -> None:
    parent = disk
    for path, fmt in chain:
        backing = ET.SubElement(parent, "backingStore", type="file")
        ET.SubElement(backing, "format", type=fmt)
        source = ET.SubElement(backing, "source", file=str(path))
        # Shared, read-only images stay root-owned: libvirt must not hand them to QEMU's user
        # (a compromised QEMU could then rewrite a base other jobs boot from).
        ET.SubElement(source, "seclabel", model="dac", relabel="no")
        parent = backing
    ET.SubElement(parent, "backingStore")  # the chain ends here: no further probing


def _serial_console(devices: ET.Element, boot_log: Path, mode: str, at: int | None = None) -> None:
    """Serial port 0 and the console on it: a file, or a pty logged to the same file."""
    position = len(devices) if at is None else at
    for tag, target in (("serial", {"port": "0"}), ("console", {"type": "serial", "port": "0"})):
        el = ET.Element(tag, type=mode)
        if mode == "file":
            ET.SubElement(el, "source", path=str(boot_log), append="off")
        else:
            ET.SubElement(el, "log", file=str(boot_log), append="off")
        ET.SubElement(el, "target", target)
        devices.insert(position, el)
        position += 1


def with_serial_console(xml: str, boot_log: Path, mode: str) -> str:
    """``xml`` (a domain definition, e.g. libvirt's inactive XML of one of ours) with its serial
    port and console replaced by the ``mode`` variant (see :attr:`DomainSpec.serial_console`)."""
    if mode not in SERIAL_CONSOLES:
        raise ValueError(f"serial console must be 'file' or 'pty', not {mode!r}")
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    dom = ET.fromstring(xml)  # noqa: S314 - libvirt's output of a domain we defined
    devices = dom.find("devices")
    if devices is None:
        raise ValueError("domain XML without <devices>")
    old = [el for el in devices if el.tag in ("serial", "console")]
    at = list(devices).index(old[0]) if old else len(devices)
    for el in old:
        devices.remove(el)
    _serial_console(devices, boot_log, mode, at)
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _xfer_disk(devices: ET.Element, path: Path) -> None:
    """A raw scratch disk the sandbox travels through as a tar stream (see transfer.py)."""
    disk = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="writeback")
    ET.SubElement(disk, "source", file=str(path))
    ET.SubElement(disk, "target", dev="vdb", bus="virtio")
    ET.SubElement(disk, "serial").text = XFER_SERIAL


def _network(devices: ET.Element, network: str) -> None:
    if network == "none":
        return
    if network == "user":
        iface = ET.SubElement(devices, "interface", type="user")
    else:
        iface = ET.SubElement(devices, "interface", type="network")
        ET.SubElement(iface, "source", network=network)
    ET.SubElement(iface, "model", type="virtio")


def domain_name(job_id: str, owner: str, token: str) -> str:
    """A libvirt-safe, recognisable, unique name: glite-vm-<owner>-<job>-<token>."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{owner}-{job_id}")
    return f"{DOMAIN_PREFIX}{safe[:64]}-{token}"


def restored_domain_xml(saved: str, spec: DomainSpec, layer: Path, *, genid: str, mac: str) -> str:
    """The domain XML of one job's VM restored from a template whose save image holds the
    domain XML ``saved`` (libvirt's migratable XML of the template's VM).

    The machine stays the saved one (devices, their addresses, CPU model: what the saved state
    needs); what belongs to the job becomes the job's: name, UUID, title, metadata, a new VM
    generation ID ``genid`` and MAC address ``mac``, the root disk (the job's overlay on the
    template's frozen ``layer``, on ``spec.base_image`` and its chain), the transfer disk, kernel
    and initrd copies, and the boot log (appended to: it starts with the template's).
    """
    ET.register_namespace(METADATA_PREFIX, METADATA_NS)
    dom = ET.fromstring(saved)  # noqa: S314 - libvirt's output of a template we made
    _set_text(dom, "name", spec.name)
    _set_text(dom, "uuid", spec.uuid)
    _set_text(dom, "genid", genid)
    _set_text(dom, "title", f"glite-vm job {spec.metadata.job_id}")
    _set_text(
        dom,
        "description",
        f"job {spec.metadata.job_id} of {spec.metadata.owner}, image {spec.metadata.image}",
    )
    metadata = dom.find("metadata")
    if metadata is None:
        metadata = ET.SubElement(dom, "metadata")
    for child in list(metadata):
        metadata.remove(child)
    metadata.append(spec.metadata.to_element())
    for tag, path in (("kernel", spec.kernel), ("initrd", spec.initrd)):
        el = dom.find(f"os/{tag}")
        if el is not None:
            if path is None:
                raise ValueError(f"the template boots a {tag} but the job has none")
            el.text = str(path)
    devices = dom.find("devices")
    if devices is None:
        raise ValueError("saved domain XML without <devices>")
    for disk in devices.iterfind("disk"):
        target = disk.find("target")
        dev = target.get("dev") if target is not None else None
        source = disk.find("source")
        if source is None or target is None:
            raise ValueError("saved domain XML has a disk without source or target")
        for old in disk.findall("backingStore"):
            disk.remove(old)
        if dev == "vda":
            source.attrib = {"file": str(spec.overlay)}
            chain = ((layer, "qcow2"), (spec.base_image, spec.base_format), *spec.base_chain)
            position = list(disk).index(target)
            scratch = ET.Element("scratch")
            _backing_chain(scratch, chain)
            for i, el in enumerate(scratch):
                disk.insert(position + i, el)
        elif dev == "vdb" and spec.xfer_disk is not None:
            source.attrib = {"file": str(spec.xfer_disk)}
        else:
            raise ValueError(f"saved domain XML has an unexpected disk {dev!r}")
    for el in (*devices.iterfind("serial"), *devices.iterfind("console")):
        for source in el.iterfind("source"):
            if "path" in source.attrib:
                source.attrib = {"path": str(spec.boot_log), "append": "on"}
        for log in el.iterfind("log"):
            log.attrib = {"file": str(spec.boot_log), "append": "on"}
    for channel in devices.iterfind("channel"):
        for source in channel.iterfind("source"):
            source.attrib.pop("path", None)  # libvirt makes one per domain
    for iface in devices.iterfind("interface"):
        address = iface.find("mac")
        if address is None:
            address = ET.SubElement(iface, "mac")
        address.attrib = {"address": mac}
    ET.indent(dom)
    return ET.tostring(dom, encoding="unicode")


def _set_text(dom: ET.Element, tag: str, text: str) -> None:
    el = dom.find(tag)
    if el is None:
        raise ValueError(f"saved domain XML has no <{tag}>")
    el.text = text


def renamed_domain_xml(saved: str, job_xml: str) -> str:
    """``saved`` with the identity of ``job_xml`` (name, UUID, VM generation ID, MAC addresses)
    and nothing else of it: what a save image's header must say for libvirt to restore it as
    the job's domain (see :mod:`glite_vm.vm.save_image`)."""
    dom = ET.fromstring(saved)  # noqa: S314 - libvirt's output of a template we made
    job = ET.fromstring(job_xml)  # noqa: S314 - made by restored_domain_xml
    for tag in ("name", "uuid", "genid"):
        _set_text(dom, tag, job.findtext(tag) or "")
    for mine, theirs in zip(
        dom.iterfind("devices/interface/mac"), job.iterfind("devices/interface/mac"), strict=True
    ):
        mine.attrib = dict(theirs.attrib)
    return ET.tostring(dom, encoding="unicode")
