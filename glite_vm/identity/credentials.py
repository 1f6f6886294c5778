"""A VM's host credentials, and the facts about X.509 objects every certificate source reads.

:class:`HostCredentials` is what a source (a local CA, :mod:`glite_vm.identity.ca`, or a
directory of pre-issued pairs, :mod:`glite_vm.identity.preissued`) hands to the guest setup.
Invariants: the private key is a :class:`Secret` and shows in no ``repr``, log line or error
message (a key that fails to parse is described, never quoted); every date read from a
certificate is an aware UTC datetime, whatever the cryptography version.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from glite_vm.identity.secret import Secret

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC datetime; a naive one is taken to be UTC already."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def not_valid_before(cert: x509.Certificate) -> datetime:
    """The start of ``cert``'s validity as an aware UTC datetime (any cryptography >= 38)."""
    aware: datetime | None = getattr(cert, "not_valid_before_utc", None)
    return aware if aware is not None else as_utc(cert.not_valid_before)


def not_valid_after(cert: x509.Certificate) -> datetime:
    """The end of ``cert``'s validity as an aware UTC datetime (any cryptography >= 38)."""
    aware: datetime | None = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else as_utc(cert.not_valid_after)


def split_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every ``CERTIFICATE`` block of a PEM file, in order (other blocks are skipped)."""
    return [x509.load_pem_x509_certificate(block) for block in _PEM_CERT.findall(data)]


def _public_der(key: object) -> bytes:
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return b"unsupported:" + type(key).__name__.encode()
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches_certificate(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    return _public_der(key.public_key()) == _public_der(cert.public_key())


def load_private_key(data: bytes) -> PrivateKey:
    """Parse an unencrypted PEM key; ValueError with a reason that never quotes the key."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("it is encrypted; it must be stored without a passphrase") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("it is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"its type ({type(key).__name__}) is not RSA or EC")
    return key


@dataclasses.dataclass(frozen=True)
class CertificateSummary:
    """The public facts about a VM's host certificate (safe for logs and job ads)."""

    source: Literal["minted", "preissued"]
    subject: str
    serial: int
    not_before: datetime
    not_after: datetime
    sha256: str  # fingerprint of the DER certificate, lower-case hex


@dataclasses.dataclass(frozen=True, repr=False)
class HostCredentials:
    """A VM's host certificate, its private key and the CA certificates that vouch for it.

    ``key_pem`` is a :class:`Secret`: ``repr``/``str`` of this object (and of the secret) show
    only sizes; ``key_pem.reveal()`` gives the bytes to write into the guest.
    """

    hostname: str
    source: Literal["minted", "preissued"]
    cert_pem: bytes  # the host certificate, followed by any chain the source supplied
    key_pem: Secret
    ca_pems: tuple[bytes, ...] = ()  # one PEM certificate each

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def ca_pem(self) -> bytes:
        """All CA certificates as one PEM bundle."""
        return b"".join(self.ca_pems)

    def summary(self) -> CertificateSummary:
        cert = self.certificate
        return CertificateSummary(
            source=self.source,
            subject=cert.subject.rfc4514_string(),
            serial=cert.serial_number,
            not_before=not_valid_before(cert),
            not_after=not_valid_after(cert),
            sha256=cert.fingerprint(hashes.SHA256()).hex(),
        )

    def __repr__(self) -> str:
        cert = self.certificate
        return (
            f"HostCredentials(hostname={self.hostname!r}, source={self.source!r}, "
            f"serial={cert.serial_number:#x}, not_after={not_valid_after(cert).isoformat()}, "
            f"key_pem={self.key_pem!r}, ca_certs={len(self.ca_pems)})"
        )

    __str__ = __repr__
