"""Connecting to libvirt: the accelerator to use (the remembered probe) and the connection."""

from __future__ import annotations

import libvirt

from glite_vm.config import Settings
from glite_vm.errors import HypervisorError
from glite_vm.vm import libvirt_events
from glite_vm.vm.hypervisor import HYPERVISOR_CACHE, HypervisorInfo, detect_cached
from glite_vm.vm.lifecycle import VmHost


def hypervisor_for(settings: Settings, *, reprobe: bool = False) -> HypervisorInfo:
    """The accelerator, from the remembered probe when it still holds (else probed, ~10 s)."""
    return detect_cached(
        settings.hypervisor, settings.state_dir / HYPERVISOR_CACHE, reprobe=reprobe
    )


def open_host(settings: Settings, hypervisor: HypervisorInfo | None = None) -> VmHost:
    """Connect to libvirt and pick the accelerator (probe remembered across runs)."""
    hv = hypervisor or hypervisor_for(settings)
    # libvirt's default error handler prints every error to stderr; ours are raised instead.
    libvirt.registerErrorHandler(_ignore_libvirt_error, None)
    # Before connecting: only connections opened after it carry domain events.
    libvirt_events.start()
    try:
        conn = libvirt.open(settings.effective_libvirt_uri)
    except libvirt.libvirtError as exc:
        raise HypervisorError(
            f"cannot connect to libvirt at {settings.effective_libvirt_uri}: {exc}; "
            "is libvirtd running?"
        ) from exc
    return VmHost(conn, settings, hv)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    return None
