"""Helpers shared by the tests (importable as ``tests.support``)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from glite_vm.config import Settings
from glite_vm.vm.domain_xml import DOMAIN_PREFIX
from glite_vm.vm.shell_port import shell_dir


@dataclasses.dataclass(frozen=True)
class LocalImage:
    """A test guest used in place (the cache has its own tests)."""

    name: str
    path: Path
    format: str
    sha256: str
    virtual_size: int
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    guest_user: str | None = "glite"
    cache_hit: bool = True
    fetch_seconds: float = 0.0


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def local_image(path: Path, **kw: Any) -> LocalImage:
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(path)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    return LocalImage(
        name=kw.pop("name", path.name),
        path=path,
        format=info["format"],
        sha256=sha256_of(path),
        virtual_size=int(info["virtual-size"]),
        **kw,
    )


def sized(ad: object, slot: object, settings: object) -> Any:
    """The VM a job ad asks for in ``slot``: the hook's request, sized as the service sizes it
    (what ``request_from_job_ad`` did in one step before the service stopped reading ads)."""
    from glite_vm.condor.jobad import request_from_job_ad  # noqa: PLC0415
    from glite_vm.request import vm_request  # noqa: PLC0415

    return vm_request(request_from_job_ad(ad, settings), slot, settings)  # type: ignore[arg-type]


def virsh(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``virsh -c qemu:///system ARGS``, its output captured as text."""
    return subprocess.run(
        ["virsh", "-c", "qemu:///system", *args],
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def domain_names(*, inactive: bool = True) -> list[str]:
    """The names of all libvirt domains on ``qemu:///system`` (only running ones without
    ``inactive``)."""
    return virsh("list", *(["--all"] if inactive else []), "--name", timeout=30).stdout.split()


def glite_vm_domains() -> list[str]:
    """Every glite-vm domain on this libvirtd, other runs' (and the other lane's) too: look a
    name up in it, never compare it whole (:func:`domains_under` gives one run's own)."""
    return [n for n in domain_names() if n.startswith(DOMAIN_PREFIX)]


def domains_under(root: Path) -> list[str]:
    """Names of glite-vm domains whose VM directory lies under ``root``: one test run's own,
    whatever other runs or other users' VMs share this libvirtd."""
    import libvirt  # noqa: PLC0415

    from glite_vm.vm.domain_xml import METADATA_NS, JobMetadata  # noqa: PLC0415

    conn = libvirt.open("qemu:///system")
    try:
        found = []
        for dom in conn.listAllDomains(0):
            if not dom.name().startswith(DOMAIN_PREFIX):
                continue
            try:
                meta = JobMetadata.from_xml(
                    dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
                )
            except (libvirt.libvirtError, KeyError, ValueError):
                continue
            if Path(meta.vm_dir).is_relative_to(root):
                found.append(dom.name())
        return found
    finally:
        conn.close()


def traversable(path: Path) -> Path:
    """``path`` (created) at mode 0711: QEMU's user, the condor user and the test users can
    reach into it, nobody can list it."""
    path.mkdir(mode=0o711, exist_ok=True)
    path.chmod(0o711)
    return path


def shell_sockets_left(state: Path) -> list[str]:
    """The shell sockets that VMs of a state directory ``state`` left (none once every VM is
    torn down); a directory for them outside ``state`` (a deep state directory's, in /run) is
    removed when empty, as the state directory will be."""
    directory = shell_dir(Settings(state_dir=state))
    left = sorted(os.listdir(directory)) if directory.is_dir() else []
    if not left and directory.is_dir() and not directory.is_relative_to(state):
        directory.rmdir()
    return left


@contextlib.contextmanager
def scratch_root(prefix: str, keep_env: str) -> Iterator[Path]:
    """A fresh :func:`traversable` directory under /var/tmp, removed afterwards unless the
    environment variable ``keep_env`` is set (then its path is printed, for a post-mortem)."""
    path = traversable(Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp")))
    try:
        yield path
    finally:
        if os.environ.get(keep_env):
            print(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def install_guests(src: Path, dest: Path) -> dict[str, Any]:
    """Copy the built test guests into ``dest`` readable by QEMU's own user; the manifest."""
    manifest: dict[str, Any] = json.loads((src / "guests.json").read_text())
    dest.mkdir(mode=0o755, exist_ok=True)
    for name in ["guests.json", *manifest["sha256"]]:
        shutil.copyfile(src / name, dest / name)
        (dest / name).chmod(0o644)
    return manifest


def direct_image_in(guest_dir: Path, manifest: dict[str, Any], name: str) -> LocalImage:
    """The direct-kernel-boot test guest as an image the VM layer can boot."""
    d = manifest["direct"]
    return local_image(
        guest_dir / d["disk"],
        name=name,
        kernel=guest_dir / d["kernel"],
        initrd=guest_dir / d["initrd"],
        cmdline=d["cmdline"],
        guest_user=manifest["user"],
    )


@dataclasses.dataclass(frozen=True)
class GuestVariant:
    """A catalogue entry made from the test guests (tests/guest/build.sh).

    ``base``: ``direct`` (kernel, initrd and data disk; ``extra`` words are added to its kernel
    command line, or ``cmdline`` replaces it), ``disk`` (the disk that boots by itself) or
    ``bare-disk`` (the direct guest's data disk alone: a disk without a boot loader).
    ``guest_user`` replaces the account the entry names (default: the guests' own);
    ``initrd`` gives a direct guest an initramfs of its own (e.g. :func:`dash_initrd`).
    """

    base: str = "direct"
    extra: str = ""
    cmdline: str | None = None
    guest_user: str | None = None
    initrd: Path | None = None  # an initramfs of its own (see dash_initrd) for a direct guest


#: Test images nobody tuned for glite-vm, each broken one way (docs/vm.md, tests/guest/README.md).
BROKEN_GUESTS: dict[str, GuestVariant] = {
    # the kernel panics at once: its init exits
    "test-panic": GuestVariant(extra="rdinit=/bin/false"),
    # the firmware finds nothing to boot
    "test-nobootloader": GuestVariant(base="bare-disk"),
    # reaches a login prompt, never starts its agent
    "test-agentless": GuestVariant(extra="glite_noagent glite_getty"),
    # no account for the job (created at boot), and one whose /etc cannot take an account
    "test-nouser": GuestVariant(extra="glite_nouser"),
    "test-roetc": GuestVariant(extra="glite_ro_etc", guest_user="builder"),
    # an account the disk guest lacks: made with its useradd
    "test-builder": GuestVariant(base="disk", guest_user="builder"),
    # an entry that would run ordinary jobs as root
    "test-rootuser": GuestVariant(guest_user="root"),
    # without no_timer_check: a starved vCPU fails the kernel's timer check (tests/load.py)
    "test-timercheck": GuestVariant(cmdline="console=ttyS0"),
}


def guest_catalogue(
    guests_src: Path,
    repo: Path,
    *,
    direct: Mapping[str, str] | None = None,
    disk: str | None = None,
    variants: Mapping[str, GuestVariant] | None = None,
) -> Path:
    """A ``file://`` repository in ``repo`` (created) listing the test guests the way a central
    repository publishes images; the catalogue's path.

    ``direct`` names the direct-kernel guest's entries, each with words to add to its kernel
    command line (e.g. the flag that keeps its agent from starting); ``disk`` names the
    disk-boot guest's entry; ``variants`` adds entries of any :class:`GuestVariant`.
    """
    from glite_vm.images.build import build_catalogue, write_catalogue  # noqa: PLC0415
    from glite_vm.images.inspect import Limits  # noqa: PLC0415

    manifest = json.loads((guests_src / "guests.json").read_text())
    repo.mkdir(mode=0o755, exist_ok=True)
    everything = {name: GuestVariant(extra=extra) for name, extra in (direct or {}).items()}
    if disk:
        everything[disk] = GuestVariant(base="disk")
    everything.update(variants or {})
    d = manifest["direct"]
    files: dict[str, dict[str, str]] = {}
    for name, variant in everything.items():
        sidecar = {"name": name, "guest_user": variant.guest_user or manifest["user"]}
        if variant.base == "direct":
            for file in (d["kernel"], d["initrd"]):
                if not (repo / file).exists():
                    shutil.copyfile(guests_src / file, repo / file)
            cmdline = variant.cmdline or f"{d['cmdline']} {variant.extra}".strip()
            initrd = d["initrd"]
            if variant.initrd is not None:
                initrd = f"{name}-initrd.img"
                shutil.copyfile(variant.initrd, repo / initrd)
            sidecar.update(boot="kernel", kernel=d["kernel"], initrd=initrd, cmdline=cmdline)
            source = d["disk"]
        elif variant.base == "disk":
            sidecar["os"] = "test guest"
            source = manifest["disk"]["disk"]
        elif variant.base == "bare-disk":
            sidecar["os"] = "test guest without a boot loader"
            source = d["disk"]
        else:
            raise ValueError(f"unknown test guest base {variant.base!r}")
        shutil.copyfile(guests_src / source, repo / f"{name}.qcow2")
        files[f"{name}.qcow2"] = sidecar
    for image, sidecar in files.items():
        (repo / image).chmod(0o644)
        (repo / f"{image}.json").write_text(json.dumps(sidecar))
    doc = build_catalogue(repo, limits=Limits(max_virtual_bytes=64 << 30, max_file_bytes=1 << 30))
    return write_catalogue(doc, repo / "catalogue.json")


def dash_initrd(initrd: Path, dest: Path) -> Path:
    """The direct guest's initramfs with ``/bin/sh`` as Debian images have it: dash, which
    looks commands up in ``PATH`` (the guest's static busybox runs its own applets whatever
    ``PATH`` says, which would hide what the environment does to a shell in real images).
    The guest's own scripts keep busybox's shell; only programs started as ``/bin/sh`` (the
    agent's ``guest-exec``) get dash. Needs the host's dash and cpio; returns ``dest``."""
    work = Path(tempfile.mkdtemp(prefix="dash-initrd-", dir=dest.parent))
    try:
        root = work / "root"
        root.mkdir()
        with initrd.open("rb") as f:
            unpacked = subprocess.run(
                ["sh", "-c", "gzip -dc | cpio -idm --quiet"],
                stdin=f,
                cwd=root,
                capture_output=True,
                timeout=120,
                check=False,
            )
        if unpacked.returncode != 0:
            raise RuntimeError(f"unpacking {initrd}: {unpacked.stderr.decode()}")
        for path in root.rglob("*"):
            if path.is_symlink() or not path.is_file():
                continue
            with path.open("rb") as f:
                head = f.read(16)
            if head.startswith(b"#!/bin/sh"):
                path.write_bytes(b"#!/bin/busybox sh" + path.read_bytes()[len(b"#!/bin/sh") :])
        shutil.copyfile("/bin/dash", root / "bin" / "dash")
        (root / "bin" / "dash").chmod(0o755)
        (root / "bin" / "sh").unlink()
        (root / "bin" / "sh").symlink_to("dash")
        packed = subprocess.run(
            [
                "sh",
                "-c",
                "find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet | gzip -9n",
            ],
            cwd=root,
            capture_output=True,
            timeout=300,
            check=False,
        )
        if packed.returncode != 0:
            raise RuntimeError(f"packing {dest}: {packed.stderr.decode()}")
        dest.write_bytes(packed.stdout)
        return dest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def truncated_copy(image: Path, dest: Path, keep: float = 0.5) -> Path:
    """``dest``: the first ``keep`` of ``image``'s bytes, as a download cut short leaves it."""
    data = image.read_bytes()
    dest.write_bytes(data[: int(len(data) * keep)])
    dest.chmod(0o644)
    return dest


def disk_guest_catalogue(guests_src: Path, repo: Path, name: str) -> Path:
    """A ``file://`` repository in ``repo`` listing the disk-boot test guest as ``name``."""
    return guest_catalogue(guests_src, repo, disk=name)


def service_env(
    root: Path, catalogue: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a glite-vm service whose state (``root/state``, created 0711 so
    QEMU's user can reach VM directories) and socket (``root/run``) live under ``root``."""
    state = root / "state"
    state.mkdir(mode=0o711, exist_ok=True)
    run = root / "run"
    run.mkdir(mode=0o755, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "LC_ALL": "C.UTF-8",
        "GLITE_VM_CONFIG": str(root / "no-config.toml"),
        "GLITE_VM_STATE_DIR": str(state),
        "GLITE_VM_CATALOGUE": str(catalogue),
        "GLITE_VM_SOCKET_PATH": str(run / "glite-vm.sock"),
        "GLITE_VM_BOOT_TIMEOUT": "120",
        "GLITE_VM_CACHE_MIN_FREE_BYTES": "0B",
        **(extra or {}),
    }


def local_account(name: str, *, home: bool = False) -> pwd.struct_passwd:
    """A real local user (made once and kept), with a home directory when ``home``. Both lanes
    of ``scripts/dev test`` may ask for one at once: the loser of useradd's race finds it made."""
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    homedir = "--create-home" if home else "--no-create-home"
    made = subprocess.run(
        ["useradd", homedir, "--user-group", "--shell", "/bin/sh", name],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"useradd {name} failed: {made.stderr.strip()}") from None
