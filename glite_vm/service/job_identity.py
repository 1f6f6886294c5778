"""A job's identity in its guest: the step of preparing a VM that gives the guest its hostname
and host certificate (docs/identity.md), and the one rule the service adds to it: the host key
never goes into a custom image's guest unless the job is root there by the site's policy."""

from __future__ import annotations

import logging
import socket

from glite_vm.config import Settings
from glite_vm.images.sources import classify_ref
from glite_vm.request import VMRequest
from glite_vm.vm.lifecycle import Vm

log = logging.getLogger(__name__)


def apply_identity(settings: Settings, vm: Vm, request: VMRequest, slot_name: str) -> str | None:
    """Give the job's guest its hostname and host certificate where the site or the job asks
    for them (docs/identity.md); the hostname given, or ``None``."""
    s = settings
    wanted = (
        s.guest_identity
        or request.hostname is not None
        or any(p is not None for p in (s.host_cert_dir, s.ca_cert, s.ca_key))
    )
    if not wanted:
        return None
    from glite_vm.identity.guest import prepare_guest_identity  # noqa: PLC0415
    from glite_vm.vm.guest_setup import apply_guest_setup  # noqa: PLC0415

    setup = prepare_guest_identity(
        s,
        host=socket.gethostname(),
        slot=slot_name,
        job_id=request.job_id,
        requested=request.hostname,
    )
    if not request.root and custom_image(request, s):
        # Whoever made a custom image is root in its guest, whatever the job may be: the
        # host key goes only where root is the site's (its catalogue's images) or the job's
        # by the site's policy (a root job on a root-enabled slot).
        log.info("%s: a custom image of a job that is not root gets no host key", vm.name)
        setup = setup.without_secrets()
    apply_guest_setup(vm, setup)
    return setup.hostname


def custom_image(request: VMRequest, settings: Settings) -> bool:
    """Is the job's image a custom one (a URL or a path), rather than one of the site's
    catalogue? (Only classified here: prepare applied the policy on it already.)"""
    ref = classify_ref(request.image, sources=settings.custom_image_sources, allow_local=True)
    return ref.kind == "url"


__all__ = ["apply_identity", "custom_image"]
