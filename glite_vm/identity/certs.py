"""Host certificates by the settings: which source (a directory of pre-issued pairs, a local
CA, or none), how long a minted certificate lives, and the VM's credentials from that source.

Invariant: at most one source is configured; both at once is a configuration error, never a
silent choice.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from cryptography.hazmat.primitives import serialization

from glite_vm.config import Settings
from glite_vm.identity.ca import LocalCA, load_ca_bundle
from glite_vm.identity.credentials import HostCredentials
from glite_vm.identity.errors import IdentityConfigError
from glite_vm.identity.preissued import load_preissued

CertificateSource = Literal["none", "directory", "ca"]


def certificate_source(settings: Settings) -> CertificateSource:
    """``directory`` (GLITE_VM_HOST_CERT_DIR), ``ca`` (GLITE_VM_CA_KEY) or ``none``."""
    if settings.host_cert_dir is not None and settings.ca_key is not None:
        raise IdentityConfigError(
            "CA_KEY",
            "is set together with GLITE_VM_HOST_CERT_DIR; choose one certificate source "
            "(keep GLITE_VM_CA_CERT to install the CA in guests)",
        )
    if settings.host_cert_dir is not None:
        return "directory"
    if settings.ca_key is not None:
        if settings.ca_cert is None:
            raise IdentityConfigError("CA_CERT", "is required when GLITE_VM_CA_KEY is set")
        return "ca"
    return "none"


def certificate_lifetime(settings: Settings, runtime: timedelta | None) -> timedelta:
    """How long a minted certificate lives: expected run time + margin, within the maximum."""
    expected = timedelta(seconds=settings.cert_default_runtime) if runtime is None else runtime
    expected = max(expected, timedelta(0))
    lifetime = expected + timedelta(seconds=max(settings.cert_margin, 0.0))
    return min(lifetime, timedelta(seconds=settings.cert_max_lifetime))


def host_credentials(
    settings: Settings,
    hostname: str,
    *,
    runtime: timedelta | None = None,
    now: datetime | None = None,
) -> HostCredentials | None:
    """The VM's certificate from the source the settings choose; ``None`` if there is none.

    ``runtime`` is the job's expected run time (e.g. its ``AllowedJobDuration``); when absent,
    ``settings.cert_default_runtime`` is assumed.
    """
    source = certificate_source(settings)
    if source == "directory":
        assert settings.host_cert_dir is not None
        trust = load_ca_bundle(settings.ca_cert) if settings.ca_cert is not None else ()
        return load_preissued(
            settings.host_cert_dir,
            hostname,
            ca_pems=tuple(c.public_bytes(serialization.Encoding.PEM) for c in trust),
            now=now,
        )
    if source == "ca":
        assert settings.ca_cert is not None and settings.ca_key is not None
        return LocalCA.load(settings.ca_cert, settings.ca_key).issue(
            hostname,
            lifetime=certificate_lifetime(settings, runtime),
            key_type=settings.host_key_type,
            now=now,
        )
    return None
