"""Who QEMU runs as on a libvirt connection, and letting it read the base images it boots.

Under ``qemu:///system`` QEMU runs as its own user (libvirt's DAC base label, e.g.
``libvirt-qemu``). Base images are root's and stay root's: the domain XML tells libvirt not to
relabel them (a QEMU owning a shared base could rewrite it for every later job). A catalogue's
image is world-readable; a custom image is cached readable by owner and group only (no other
local user may read it), so before a VM boots from one its group becomes QEMU's group.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import libvirt

log = logging.getLogger(__name__)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def qemu_ids(conn: libvirt.virConnect, kind: str) -> tuple[int, int] | None:
    """uid and gid of QEMU processes of domain type ``kind`` on ``conn``, from libvirt's DAC
    base label; None when libvirt names none (e.g. a session, where QEMU is the caller)."""
    try:
        caps = ET.fromstring(conn.getCapabilities())  # noqa: S314 - libvirt's output
    except (libvirt.libvirtError, ET.ParseError):
        return None
    for model in caps.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iterfind("baselabel"):
            if label.get("type") != kind:
                continue
            uid, _, gid = (label.text or "").partition(":")
            try:
                return int(uid.lstrip("+")), int(gid.lstrip("+"))
            except ValueError:
                return None
    return None


def let_qemu_read(
    conn: libvirt.virConnect, kind: str, paths: Iterable[Path], *, cache_blobs: Path
) -> None:
    """Give QEMU's group the cached custom images among ``paths``: files directly in the image
    cache's ``cache_blobs`` directory, named by their digest, root-owned, group-readable and
    not world-readable. Any other path is left alone: a snapshot's record names its base, and
    whoever owns the record must not get a host file handed to QEMU that way.

    Only as root (else QEMU runs as the caller, who owns the cache).
    """
    if os.geteuid() != 0:
        return
    wanted = [p.name for p in paths if p.parent == cache_blobs and _DIGEST.fullmatch(p.name)]
    if not wanted:
        return
    try:
        blobs = os.open(cache_blobs, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.debug("not handing cached images to QEMU: %s", exc)
        return
    try:
        ids = None
        for name in wanted:
            try:
                fd = os.open(name, _FLAGS, dir_fd=blobs)
            except OSError as exc:
                log.debug("not handing %s to QEMU: %s", name, exc)
                continue
            try:
                st = os.fstat(fd)
                private = st.st_mode & 0o044 == 0o040  # its group may read it, others not
                if not (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and private):
                    continue
                ids = ids or qemu_ids(conn, kind)
                if ids is None:
                    log.warning("QEMU's group is unknown; it may not be able to read %s", name)
                    return
                if st.st_gid != ids[1]:
                    os.fchown(fd, -1, ids[1])
            finally:
                os.close(fd)
    finally:
        os.close(blobs)
