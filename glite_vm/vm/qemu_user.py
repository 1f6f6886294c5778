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
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

import libvirt

log = logging.getLogger(__name__)


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


def let_qemu_read(conn: libvirt.virConnect, kind: str, paths: Iterable[Path]) -> None:
    """Give QEMU's group the root-owned, group-readable, not world-readable files among
    ``paths`` (cached custom images), so QEMU can open them read-only and nobody else can.

    Only as root (else QEMU runs as the caller, who owns the cache). Files of other owners,
    links and world-readable files are left as they are.
    """
    if os.geteuid() != 0:
        return
    ids = None
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.debug("not handing %s to QEMU: %s", path, exc)
            continue
        try:
            st = os.fstat(fd)
            private = st.st_mode & 0o044 == 0o040  # group may read, others may not
            if not (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and private):
                continue
            ids = ids or qemu_ids(conn, kind)
            if ids is None:
                log.warning("QEMU's group is unknown; it may not be able to read %s", path)
                return
            if st.st_gid != ids[1]:
                os.fchown(fd, -1, ids[1])
        finally:
            os.close(fd)
