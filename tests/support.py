"""Helpers shared by the tests (importable as ``tests.support``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from glite_vm.vm.domain_xml import DOMAIN_PREFIX


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


def our_domain_names() -> list[str]:
    out = subprocess.run(
        ["virsh", "-c", "qemu:///system", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [n for n in out.split() if n.startswith(DOMAIN_PREFIX)]


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
