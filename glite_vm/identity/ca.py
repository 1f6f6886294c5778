"""A local certificate authority: made or loaded from its files, it mints one host certificate
per VM.

Invariants: a :class:`LocalCA` holds a key that belongs to its certificate (checked when it is
made); a loaded CA is a CA (basicConstraints CA:TRUE, key usage allowing certificate signing);
a minted certificate starts :data:`BACKDATE` in the past and never outlives the CA; the CA's
key leaves the object only as a :class:`Secret`.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from glite_vm.identity.credentials import (
    HostCredentials,
    PrivateKey,
    as_utc,
    key_matches_certificate,
    load_private_key,
    not_valid_after,
    not_valid_before,
    split_pem_certificates,
)
from glite_vm.identity.errors import IdentityConfigError
from glite_vm.identity.hostname import validate_hostname
from glite_vm.identity.secret import Secret

_log = logging.getLogger(__name__)

KEY_TYPES = ("rsa", "ec")
# Certificates start a little in the past so a guest whose clock lags the host's accepts them.
BACKDATE = timedelta(minutes=5)
MAX_CN = 64  # ub-common-name (RFC 5280)


def new_private_key(key_type: str, *, for_ca: bool = False) -> PrivateKey:
    """A fresh key: ``rsa`` (2048 bits for hosts, 3072 for a CA) or ``ec`` (NIST P-256)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072 if for_ca else 2048)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise IdentityConfigError(
        "HOST_KEY_TYPE", f"must be one of {', '.join(KEY_TYPES)}, got {key_type!r}"
    )


class LocalCA:
    """A certificate authority whose key this host holds; it signs one certificate per VM."""

    __slots__ = ("_key", "bundle", "certificate")

    def __init__(
        self,
        certificate: x509.Certificate,
        key: PrivateKey,
        bundle: tuple[x509.Certificate, ...] = (),
    ) -> None:
        if not key_matches_certificate(key, certificate):
            raise IdentityConfigError("CA_KEY", "does not belong to the CA certificate")
        self.certificate = certificate
        self._key = key
        # every certificate guests should trust: the signer first, then the rest of its file
        self.bundle = (certificate, *(c for c in bundle if c != certificate))

    def __repr__(self) -> str:
        return (
            f"LocalCA(subject={self.certificate.subject.rfc4514_string()!r}, "
            f"not_after={not_valid_after(self.certificate).isoformat()})"
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def ca_pems(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(serialization.Encoding.PEM) for c in self.bundle)

    def key_pem(self) -> Secret:
        """The CA's key as unencrypted PKCS#8 PEM (for writing it to its file once)."""
        return Secret(
            self._key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    # -- making and loading -----------------------------------------------------------------

    @classmethod
    def generate(
        cls, name: str, *, days: int = 365, key_type: str = "rsa", now: datetime | None = None
    ) -> LocalCA:
        """A new self-signed CA with subject ``CN=name``, valid for ``days`` days."""
        if not name.strip() or len(name) > MAX_CN:
            raise ValueError(f"CA name must have 1 to {MAX_CN} characters, got {name!r}")
        if days < 1:
            raise ValueError(f"CA lifetime must be at least one day, got {days}")
        now = as_utc(now or datetime.now(UTC))
        key = new_private_key(key_type, for_ca=True)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> LocalCA:
        """The CA of ``GLITE_VM_CA_CERT``/``GLITE_VM_CA_KEY``; IdentityConfigError if unusable.

        The certificate file may hold a bundle: the certificate that matches the key signs,
        and all of them are installed in guests as trusted.
        """
        bundle = load_ca_bundle(cert_path)
        try:
            key_bytes = Secret(key_path.read_bytes())
        except OSError as exc:
            raise IdentityConfigError("CA_KEY", f"cannot read {key_path}: {exc.strerror}") from None
        try:
            key = load_private_key(key_bytes.reveal())
        except ValueError as exc:
            raise IdentityConfigError("CA_KEY", f"{key_path}: {exc}") from None
        signer = next((c for c in bundle if key_matches_certificate(key, c)), None)
        if signer is None:
            raise IdentityConfigError(
                "CA_KEY", f"{key_path} does not belong to any certificate in {cert_path}"
            )
        try:
            constraints = signer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise IdentityConfigError(
                "CA_CERT", f"{cert_path}: the certificate is not a CA (no basicConstraints CA:TRUE)"
            )
        try:
            usage = signer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise IdentityConfigError(
                "CA_CERT", f"{cert_path}: the CA's key usage does not allow signing certificates"
            )
        return cls(signer, key, bundle)

    # -- issuing ----------------------------------------------------------------------------

    def issue(
        self,
        hostname: str,
        *,
        lifetime: timedelta,
        key_type: str = "rsa",
        now: datetime | None = None,
    ) -> HostCredentials:
        """A fresh key and a certificate for ``hostname`` valid from now for ``lifetime``.

        The certificate starts :data:`BACKDATE` in the past and never outlives the CA.
        Subject ``CN=hostname`` (the first label if the name is longer than 64 characters, the
        limit of a CN), subjectAltName ``DNS:hostname``, basicConstraints CA:FALSE, key usage
        digitalSignature + keyEncipherment (RSA) or digitalSignature + keyAgreement (EC, where
        key encipherment does not exist), extended key usage serverAuth + clientAuth.
        """
        hostname = validate_hostname(hostname, "hostname")
        if lifetime <= timedelta(0):
            raise ValueError(f"certificate lifetime must be positive, got {lifetime}")
        now = as_utc(now or datetime.now(UTC))
        ca_before, ca_after = not_valid_before(self.certificate), not_valid_after(self.certificate)
        if now >= ca_after:
            raise IdentityConfigError("CA_CERT", f"the CA expired at {ca_after.isoformat()}")
        if now < ca_before:
            raise IdentityConfigError(
                "CA_CERT", f"the CA is not valid before {ca_before.isoformat()}"
            )
        not_after = min(now + lifetime, ca_after)
        if not_after < now + lifetime:
            _log.warning(
                "host certificate for %s cut short to the CA's end of validity %s",
                hostname,
                ca_after.isoformat(),
            )
        key = new_private_key(key_type)
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        common_name = hostname if len(hostname) <= MAX_CN else hostname.split(".", 1)[0]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(max(now - BACKDATE, ca_before))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=not is_rsa,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        # Traditional ("BEGIN RSA PRIVATE KEY") form: what grid host keys have always looked
        # like, and what the oldest grid tools still parse.
        key_pem = Secret(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
        )
        _log.info(
            "minted host certificate for %s: serial %#x, valid until %s",
            hostname,
            cert.serial_number,
            not_after.isoformat(),
        )
        return HostCredentials(
            hostname=hostname,
            source="minted",
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=key_pem,
            ca_pems=self.ca_pems,
        )


def load_ca_bundle(path: Path) -> tuple[x509.Certificate, ...]:
    """The certificates of ``GLITE_VM_CA_CERT``; IdentityConfigError if none can be read."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityConfigError("CA_CERT", f"cannot read {path}: {exc.strerror}") from None
    try:
        certs = split_pem_certificates(data)
    except ValueError:
        raise IdentityConfigError("CA_CERT", f"{path} holds a malformed certificate") from None
    if not certs:
        raise IdentityConfigError("CA_CERT", f"{path} holds no PEM certificate")
    return tuple(certs)
