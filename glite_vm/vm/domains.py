"""Finding this tool's libvirt domains, ending one, and finding the QEMU process behind one.

Invariants. Ending a domain is idempotent: a domain that is already gone (stopped, undefined,
or both, by us or anyone) is not an error, and nothing here raises for it; other libvirt
failures are logged, never raised, so a teardown or reaper always gets on to its files. The
QEMU pid is read from libvirt's own pid file (system or session daemon), never guessed from a
process list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import libvirt

from glite_vm.vm.domain_xml import DOMAIN_PREFIX, METADATA_NS, JobMetadata

log = logging.getLogger(__name__)


def our_domains(conn: libvirt.virConnect) -> Iterator[tuple[libvirt.virDomain, JobMetadata | None]]:
    """Every domain this tool made, with its job metadata when readable."""
    for dom in conn.listAllDomains(0):
        if not dom.name().startswith(DOMAIN_PREFIX):
            continue
        try:
            text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            meta: JobMetadata | None = JobMetadata.from_xml(text)
        except (libvirt.libvirtError, KeyError, ValueError):
            meta = None
        yield dom, meta


def qemu_pid(name: str) -> int | None:
    """The pid of the QEMU process of domain ``name`` (from libvirt's pid file), if running."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    for directory in (Path("/run/libvirt/qemu"), Path(runtime) / "libvirt/qemu/run"):
        try:
            return int((directory / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def destroy_domain(dom: libvirt.virDomain) -> None:
    """Stop and undefine a domain, tolerating one that is already gone."""
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            log.warning("destroying %s: %s", _safe_name(dom), exc)
    try:
        dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            log.warning("undefining %s: %s", _safe_name(dom), exc)


def _safe_name(dom: libvirt.virDomain) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:
        return "?"
