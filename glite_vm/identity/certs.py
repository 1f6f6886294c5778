"""Host certificates: pre-issued pairs from a directory, or minted per VM by a local CA."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from glite_vm.config import Settings
from glite_vm.identity.errors import HostCertificateError, IdentityConfigError
from glite_vm.identity.hostname import validate_hostname
from glite_vm.identity.secret import Secret

_log = logging.getLogger(__name__)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
CertificateSource = Literal["none", "directory", "ca"]
KEY_TYPES = ("rsa", "ec")
HOST_CERT_FILE = "hostcert.pem"
HOST_KEY_FILE = "hostkey.pem"
CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"
# Certificates start a little in the past so a guest whose clock lags the host's accepts them.
BACKDATE = timedelta(minutes=5)
MAX_CN = 64  # ub-common-name (RFC 5280)
_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def not_valid_before(cert: x509.Certificate) -> datetime:
    """The start of ``cert``'s validity as an aware UTC datetime (any cryptography >= 38)."""
    aware: datetime | None = getattr(cert, "not_valid_before_utc", None)
    return aware if aware is not None else _utc(cert.not_valid_before)


def not_valid_after(cert: x509.Certificate) -> datetime:
    """The end of ``cert``'s validity as an aware UTC datetime (any cryptography >= 38)."""
    aware: datetime | None = getattr(cert, "not_valid_after_utc", None)
    return aware if aware is not None else _utc(cert.not_valid_after)


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


def new_private_key(key_type: str, *, for_ca: bool = False) -> PrivateKey:
    """A fresh key: ``rsa`` (2048 bits for hosts, 3072 for a CA) or ``ec`` (NIST P-256)."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072 if for_ca else 2048)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise IdentityConfigError(
        "HOST_KEY_TYPE", f"must be one of {', '.join(KEY_TYPES)}, got {key_type!r}"
    )


def _load_private_key(data: bytes) -> PrivateKey:
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
        now = _utc(now or datetime.now(UTC))
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
            key = _load_private_key(key_bytes.reveal())
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
        now = _utc(now or datetime.now(UTC))
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


# -- pre-issued pairs --------------------------------------------------------------------------


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
        key = _load_private_key(key_pem.reveal())
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
    now = _utc(now or datetime.now(UTC))
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


# -- choosing by settings ----------------------------------------------------------------------


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


# -- files for the CLI -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CaFiles:
    """Where :func:`init_ca` put a new CA."""

    cert_path: Path
    key_path: Path
    authority: LocalCA


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the first byte on (no window with wider rights)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_pair(first: tuple[Path, bytes, int], second: tuple[Path, Secret, int]) -> None:
    for path in (first[0], second[0]):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} already exists; remove it first or choose another place")
    _write_new(*first)
    try:
        _write_new(second[0], second[1].reveal(), second[2])
    except BaseException:
        first[0].unlink(missing_ok=True)
        raise


def init_ca(
    directory: Path,
    *,
    name: str,
    days: int = 365,
    key_type: str = "rsa",
    now: datetime | None = None,
) -> CaFiles:
    """Create a CA for a test site: ``directory/ca.pem`` (0644) and ``directory/ca.key`` (0600).

    Refuses (FileExistsError) to overwrite either file.
    """
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    authority = LocalCA.generate(name, days=days, key_type=key_type, now=now)
    cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
    _write_pair((cert_path, authority.cert_pem, 0o644), (key_path, authority.key_pem(), 0o600))
    return CaFiles(cert_path, key_path, authority)


def issue_to_directory(
    authority: LocalCA,
    hostname: str,
    cert_dir: Path,
    *,
    days: int = 365,
    key_type: str = "rsa",
    now: datetime | None = None,
) -> HostCredentials:
    """Pre-issue a pair into ``cert_dir/hostname/`` (hostcert.pem 0644, hostkey.pem 0400)."""
    hostname = validate_hostname(hostname, "hostname")
    credentials = authority.issue(
        hostname, lifetime=timedelta(days=days), key_type=key_type, now=now
    )
    directory = cert_dir / hostname
    directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    _write_pair(
        (directory / HOST_CERT_FILE, credentials.cert_pem, 0o644),
        (directory / HOST_KEY_FILE, credentials.key_pem, 0o400),
    )
    return credentials
