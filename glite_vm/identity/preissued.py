"""Pre-issued host certificates: the pair a site put in ``<dir>/<hostname>/``, read and
checked before a VM gets it.

Invariants: a pair is handed out only when its key belongs to its certificate, the certificate
names the host (subjectAltName, else CN; ``*.`` matches one label) and is valid now; a job's
hostname is validated before it becomes a path, so it can name no other directory. A missing
or bad pair is the job's problem (:class:`HostCertificateError`, hold); a missing or unreadable
directory is the host's (:class:`IdentityConfigError`, requeue).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from glite_vm.identity.credentials import (
    HostCredentials,
    as_utc,
    key_matches_certificate,
    load_private_key,
    not_valid_after,
    not_valid_before,
    split_pem_certificates,
)
from glite_vm.identity.errors import HostCertificateError, IdentityConfigError
from glite_vm.identity.hostname import validate_hostname
from glite_vm.identity.secret import Secret

_log = logging.getLogger(__name__)

HOST_CERT_FILE = "hostcert.pem"
HOST_KEY_FILE = "hostkey.pem"


def _names_in(cert: x509.Certificate) -> list[str]:
    """The DNS names a certificate is for: its subjectAltName, else its CN (``host/`` dropped)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = [
            str(a.value).rsplit("/", 1)[-1]
            for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    else:
        names = san.get_values_for_type(x509.DNSName)
    return [n.lower().rstrip(".") for n in names]


def _name_matches(pattern: str, hostname: str) -> bool:
    if pattern.startswith("*."):
        first, _, rest = hostname.partition(".")
        return bool(first) and rest == pattern[2:]
    return pattern == hostname


def load_preissued(
    cert_dir: Path,
    hostname: str,
    *,
    ca_pems: tuple[bytes, ...] = (),
    now: datetime | None = None,
) -> HostCredentials:
    """The pair ``cert_dir/hostname/{hostcert.pem,hostkey.pem}``, checked before use.

    Raises :class:`HostCertificateError` (hold) when the pair is missing, is not PEM, is for
    another host, is outside its validity period, or when the key does not belong to the
    certificate; :class:`IdentityConfigError` (requeue) when ``cert_dir`` itself is missing or
    unreadable.
    """
    hostname = validate_hostname(hostname, "hostname")
    if not cert_dir.is_dir():
        raise IdentityConfigError("HOST_CERT_DIR", f"{cert_dir} is not a directory")
    directory = cert_dir / hostname  # a validated hostname has no "/" and is never ".."
    cert_path, key_path = directory / HOST_CERT_FILE, directory / HOST_KEY_FILE
    missing = [p.name for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise HostCertificateError(
            hostname,
            f"the site has no pre-issued {' or '.join(missing)} for this hostname in "
            f"{directory}; the admin must add the pair, or the job must use a hostname "
            "the site has a certificate for",
        )
    try:
        cert_bytes = cert_path.read_bytes()
        key_pem = Secret(key_path.read_bytes())
    except OSError as exc:
        raise IdentityConfigError(
            "HOST_CERT_DIR", f"cannot read {exc.filename}: {exc.strerror}"
        ) from None
    try:
        chain = split_pem_certificates(cert_bytes)
    except ValueError:
        chain = []
    if not chain:
        raise HostCertificateError(hostname, f"{cert_path} holds no readable PEM certificate")
    cert = chain[0]
    try:
        key = load_private_key(key_pem.reveal())
    except ValueError as exc:
        raise HostCertificateError(hostname, f"{key_path} is unusable: {exc}") from None
    if not key_matches_certificate(key, cert):
        raise HostCertificateError(
            hostname,
            f"{key_path} does not match {cert_path} (the key is not the certificate's "
            "private key); the admin must install the key that belongs to the certificate",
        )
    names = _names_in(cert)
    if not any(_name_matches(n, hostname) for n in names):
        raise HostCertificateError(
            hostname,
            f"{cert_path} is for {', '.join(names) or 'no DNS name'}, not for {hostname}",
        )
    now = as_utc(now or datetime.now(UTC))
    if now < not_valid_before(cert):
        raise HostCertificateError(
            hostname, f"{cert_path} is not valid before {not_valid_before(cert).isoformat()}"
        )
    if now >= not_valid_after(cert):
        raise HostCertificateError(
            hostname, f"{cert_path} expired at {not_valid_after(cert).isoformat()}"
        )
    _log.info("using pre-issued host certificate %s (serial %#x)", cert_path, cert.serial_number)
    return HostCredentials(
        hostname=hostname,
        source="preissued",
        cert_pem=cert_bytes,
        key_pem=key_pem,
        ca_pems=ca_pems,
    )
