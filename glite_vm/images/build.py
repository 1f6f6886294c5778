"""``glite-vm catalogue build DIR``: write the catalogue for a directory of images.

Images are the regular files ending in ``.qcow2``, ``.raw`` or ``.img``, and any file with a
sidecar. A sidecar ``<image file>.json`` (optional) adds what a file cannot tell::

    {"name": "tiny", "os": "Debian 12", "arch": "x86_64", "guest_user": "glite",
     "description": "...", "boot": "kernel", "kernel": "vmlinuz", "initrd": "initrd.img",
     "cmdline": "console=ttyS0"}

``kernel`` and ``initrd`` name files in the same directory; they are listed with the image (and
are not images themselves). Every image passes the same safety checks a host applies before it
boots one, so a repository cannot publish what hosts would refuse.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from glite_vm.errors import CatalogueError, CatalogueInputError
from glite_vm.images._fsutil import atomic_write_bytes
from glite_vm.images._transport import CHUNK
from glite_vm.images.catalogue import BOOT_KINDS, CATALOGUE_VERSION, parse_catalogue
from glite_vm.images.inspect import Limits, inspect_image
from glite_vm.images.sources import NAME_RE

IMAGE_SUFFIXES = (".qcow2", ".raw", ".img")
CATALOGUE_NAME = "catalogue.json"
_SIDECAR_KEYS = frozenset(
    {"name", "os", "arch", "description", "guest_user", "boot", "kernel", "initrd", "cmdline"}
)


def build_catalogue(
    directory: Path,
    *,
    limits: Limits,
    base_url: str | None = None,
    default_arch: str = "x86_64",
    default_guest_user: str | None = None,
) -> dict[str, Any]:
    """The catalogue document for ``directory`` (see the module docstring)."""
    if not directory.is_dir():
        raise CatalogueInputError(
            f"{directory} is not a directory; give the directory of the images"
        )
    files = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.is_symlink() and not p.name.startswith(".")
    )
    names = {p.name for p in files}
    sidecars = {
        p.name[: -len(".json")]: _read_sidecar(p)
        for p in files
        if p.suffix == ".json" and p.name[: -len(".json")] in names
    }
    referenced = set()
    for image_name, side in sidecars.items():
        for key in ("kernel", "initrd"):
            if key in side:
                referenced.add(_member(side[key], names, f"{image_name}.json: {key}"))
    images = [
        p
        for p in files
        if p.suffix != ".json"
        and p.name != CATALOGUE_NAME
        and p.name not in referenced
        and (p.suffix in IMAGE_SUFFIXES or p.name in sidecars)
    ]
    entries: dict[str, dict[str, Any]] = {}
    for path in images:
        side = sidecars.get(path.name, {})
        entry = _entry(
            path,
            side,
            limits=limits,
            base_url=base_url,
            default_arch=default_arch,
            default_guest_user=default_guest_user,
        )
        if entry["name"] in entries:
            raise CatalogueInputError(
                f"two images are named {entry['name']!r}; set 'name' in a sidecar"
            )
        entries[entry["name"]] = entry
    doc = {"version": CATALOGUE_VERSION, "images": [entries[k] for k in sorted(entries)]}
    # What we write must be what hosts read: round-trip through the parser.
    parsed = parse_catalogue(json.dumps(doc).encode(), directory.absolute().as_uri() + "/")
    if len(parsed) != len(entries):
        raise CatalogueError("internal error: the built catalogue does not parse back")
    return doc


def write_catalogue(doc: dict[str, Any], output: Path) -> Path:
    atomic_write_bytes(output, (json.dumps(doc, indent=2) + "\n").encode())
    return output


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CatalogueInputError(f"{path}: not a readable JSON file: {exc}") from None
    if not isinstance(data, dict):
        raise CatalogueInputError(f"{path}: must hold a JSON object")
    unknown = set(data) - _SIDECAR_KEYS
    if unknown:
        raise CatalogueInputError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise CatalogueInputError(f"{path}: {key!r} must be a string")
    return data


def _member(name: str, names: set[str], where: str) -> str:
    if "/" in name or name in (".", "..") or name not in names:
        raise CatalogueInputError(f"{where}: {name!r} is not a file in this directory")
    return name


def _entry(
    path: Path,
    side: dict[str, Any],
    *,
    limits: Limits,
    base_url: str | None,
    default_arch: str,
    default_guest_user: str | None,
) -> dict[str, Any]:
    stem = path.name[: -len(path.suffix)] if path.suffix in IMAGE_SUFFIXES else path.name
    name = side.get("name", stem)
    if not NAME_RE.match(name):
        raise CatalogueInputError(f"{path.name}: {name!r} is not a valid image name; set 'name'")
    info = inspect_image(path, source=path.name, limits=limits)
    sha, size = _digest(path)
    entry: dict[str, Any] = {
        "name": name,
        "url": _url(path.name, base_url),
        "sha256": sha,
        "size": size,
        "format": info.format,
        "virtual_size": info.virtual_size,
        "os": side.get("os", ""),
        "arch": side.get("arch", default_arch),
        "boot": side.get("boot", "kernel" if "kernel" in side else "disk"),
    }
    if entry["boot"] not in BOOT_KINDS:
        raise CatalogueInputError(f"{path.name}.json: boot must be one of {', '.join(BOOT_KINDS)}")
    guest_user = side.get("guest_user", default_guest_user)
    if guest_user:
        entry["guest_user"] = guest_user
    if side.get("description"):
        entry["description"] = side["description"]
    if entry["boot"] == "kernel":
        if "kernel" not in side:
            raise CatalogueInputError(f"{path.name}.json: boot 'kernel' needs a 'kernel' file")
        for key in ("kernel", "initrd"):
            if key in side:
                ksha, ksize = _digest(path.parent / side[key])
                entry[key] = {"url": _url(side[key], base_url), "sha256": ksha, "size": ksize}
        if side.get("cmdline"):
            entry["cmdline"] = side["cmdline"]
    return entry


def _url(file_name: str, base_url: str | None) -> str:
    rel = quote(file_name)
    return f"{base_url.rstrip('/')}/{rel}" if base_url else rel


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while chunk := os.read(fd, CHUNK):
            h.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return h.hexdigest(), size
