"""Host certificates: minted per VM by a local CA, or pre-issued pairs from a directory."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from glite_vm.config import Settings
from glite_vm.errors import Disposition
from glite_vm.identity.ca import BACKDATE, LocalCA
from glite_vm.identity.ca_files import init_ca, issue_to_directory
from glite_vm.identity.certs import certificate_lifetime, certificate_source, host_credentials
from glite_vm.identity.credentials import HostCredentials, not_valid_after, not_valid_before
from glite_vm.identity.errors import HostCertificateError, IdentityConfigError
from glite_vm.identity.preissued import load_preissued

OPENSSL = shutil.which("openssl") or "openssl-is-required-for-these-tests"
HOST = "node1-slot1.example.org"


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA made the way an admin makes one (RSA, the default)."""
    directory = tmp_path_factory.mktemp("ca")
    init_ca(directory, name="glite-vm unit test CA", days=30)
    return directory


@pytest.fixture(scope="module")
def ca(ca_dir: Path) -> LocalCA:
    return LocalCA.load(ca_dir / "ca.pem", ca_dir / "ca.key")


@pytest.fixture(scope="module")
def ec_ca() -> LocalCA:
    return LocalCA.generate("glite-vm EC test CA", days=30, key_type="ec")


def ca_settings(ca_dir: Path, **overrides: object) -> Settings:
    return Settings.from_strings(
        {}, {"ca_cert": ca_dir / "ca.pem", "ca_key": ca_dir / "ca.key", **overrides}
    )


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=False)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    public = issuer.public_key()
    assert cert.signature_hash_algorithm is not None
    try:
        if isinstance(public, rsa.RSAPublicKey):
            public.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            public.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
    except InvalidSignature:
        return False
    return cert.issuer == issuer.subject


def private_key(credentials: HostCredentials) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(credentials.key_pem.reveal(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


def key_material(credentials: HostCredentials) -> list[str]:
    """Every base64 line of the private key: none may appear anywhere public."""
    lines = credentials.key_pem.reveal().decode().splitlines()
    return [line for line in lines if line and not line.startswith("-----")]


# -- minting ------------------------------------------------------------------------------------


def test_minted_certificate_verifies_against_the_ca_with_openssl(
    ca: LocalCA, ca_dir: Path, tmp_path: Path
) -> None:
    credentials = ca.issue(HOST, lifetime=timedelta(hours=3))
    cert_file = write(tmp_path / "hostcert.pem", credentials.cert_pem)
    ca_file = write(tmp_path / "ca.pem", credentials.ca_pem)
    assert credentials.ca_pem == (ca_dir / "ca.pem").read_bytes()
    for purpose in ("sslserver", "sslclient"):
        result = openssl(
            "verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(ca_file), str(cert_file)
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith(": OK")
    assert signed_by(credentials.certificate, ca.certificate)


def test_minted_certificate_names_the_host_and_has_host_usages(ca: LocalCA) -> None:
    credentials = ca.issue(HOST, lifetime=timedelta(hours=3))
    cert = credentials.certificate
    assert credentials.source == "minted" and credentials.hostname == HOST
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [HOST]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == [HOST]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and usage.value.key_encipherment
    assert not (usage.value.key_cert_sign or usage.value.crl_sign or usage.value.key_agreement)
    extended = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(extended) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.issuer == ca.certificate.subject


def test_minted_key_is_a_fresh_rsa_2048_key_matching_the_certificate(
    ca: LocalCA, tmp_path: Path
) -> None:
    first = ca.issue(HOST, lifetime=timedelta(hours=1))
    second = ca.issue(HOST, lifetime=timedelta(hours=1))
    key = private_key(first)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert first.key_pem.reveal().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(serialization.Encoding.DER, spki) == (
        first.certificate.public_key().public_bytes(serialization.Encoding.DER, spki)
    )
    # and the same seen by openssl
    key_file = write(tmp_path / "hostkey.pem", first.key_pem.reveal())
    cert_file = write(tmp_path / "hostcert.pem", first.cert_pem)
    from_key = openssl("pkey", "-in", str(key_file), "-pubout").stdout
    from_cert = openssl("x509", "-in", str(cert_file), "-noout", "-pubkey").stdout
    assert from_key and from_key == from_cert
    assert first.key_pem != second.key_pem
    assert first.certificate.serial_number != second.certificate.serial_number


def test_ec_host_keys_are_p256_with_ec_key_usage(ca: LocalCA, tmp_path: Path) -> None:
    credentials = ca.issue(HOST, lifetime=timedelta(hours=1), key_type="ec")
    key = private_key(credentials)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    usage = credentials.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_agreement and not usage.key_encipherment
    cert_file = write(tmp_path / "c.pem", credentials.cert_pem)
    ca_file = write(tmp_path / "ca.pem", credentials.ca_pem)
    result = openssl("verify", "-purpose", "sslserver", "-CAfile", str(ca_file), str(cert_file))
    assert result.returncode == 0, result.stderr


def test_an_ec_ca_signs_too(ec_ca: LocalCA, tmp_path: Path) -> None:
    credentials = ec_ca.issue(HOST, lifetime=timedelta(hours=1))
    assert signed_by(credentials.certificate, ec_ca.certificate)
    cert_file = write(tmp_path / "c.pem", credentials.cert_pem)
    ca_file = write(tmp_path / "ca.pem", ec_ca.cert_pem)
    assert openssl("verify", "-CAfile", str(ca_file), str(cert_file)).returncode == 0


def test_validity_is_the_lifetime_from_now_started_a_little_earlier(ec_ca: LocalCA) -> None:
    now = not_valid_before(ec_ca.certificate) + timedelta(days=2)
    credentials = ec_ca.issue(HOST, lifetime=timedelta(hours=6), now=now)
    assert not_valid_before(credentials.certificate) == now - BACKDATE
    assert not_valid_after(credentials.certificate) == now + timedelta(hours=6)


def test_validity_never_outlives_the_ca(ec_ca: LocalCA, caplog: pytest.LogCaptureFixture) -> None:
    ca_end = not_valid_after(ec_ca.certificate)
    now = ca_end - timedelta(hours=1)
    with caplog.at_level(logging.WARNING):
        credentials = ec_ca.issue(HOST, lifetime=timedelta(days=3), now=now)
    assert not_valid_after(credentials.certificate) == ca_end
    assert "cut short" in caplog.text


def test_an_expired_ca_is_the_hosts_fault(ec_ca: LocalCA) -> None:
    after = not_valid_after(ec_ca.certificate) + timedelta(seconds=1)
    with pytest.raises(IdentityConfigError, match="expired") as caught:
        ec_ca.issue(HOST, lifetime=timedelta(hours=1), now=after)
    assert caught.value.disposition is Disposition.REQUEUE


def test_a_hostname_longer_than_a_common_name_goes_whole_into_the_san(ec_ca: LocalCA) -> None:
    hostname = "a" * 40 + "." + "b" * 40 + ".example.org"
    cert = ec_ca.issue(hostname, lifetime=timedelta(hours=1)).certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a" * 40
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [hostname]


@pytest.mark.parametrize(
    ("runtime", "expected"),
    [
        (timedelta(hours=2), timedelta(hours=3)),  # run time + margin (1 h)
        (None, timedelta(hours=25)),  # default run time (24 h) + margin
        (timedelta(days=30), timedelta(days=7)),  # never beyond the maximum
        (timedelta(hours=-5), timedelta(hours=1)),
    ],
)
def test_certificate_lifetime_follows_the_jobs_run_time(
    runtime: timedelta | None, expected: timedelta
) -> None:
    assert certificate_lifetime(Settings(), runtime) == expected


def test_settings_mint_a_certificate_lasting_the_run_time_plus_margin(ca_dir: Path) -> None:
    settings = ca_settings(ca_dir, cert_margin=600.0, host_key_type="ec")
    now = datetime.now(UTC).replace(microsecond=0)
    credentials = host_credentials(settings, HOST, runtime=timedelta(minutes=30), now=now)
    assert credentials is not None and credentials.source == "minted"
    assert not_valid_after(credentials.certificate) == now + timedelta(minutes=40)
    assert isinstance(private_key(credentials), ec.EllipticCurvePrivateKey)


# -- loading a CA -------------------------------------------------------------------------------


def test_a_ca_key_of_another_ca_is_refused(ca_dir: Path, ec_ca: LocalCA, tmp_path: Path) -> None:
    other_key = write(tmp_path / "other.key", ec_ca.key_pem().reveal())
    with pytest.raises(IdentityConfigError, match="does not belong") as caught:
        LocalCA.load(ca_dir / "ca.pem", other_key)
    assert caught.value.setting == "CA_KEY"


def test_a_host_certificate_is_not_a_ca(ec_ca: LocalCA, tmp_path: Path) -> None:
    host = ec_ca.issue(HOST, lifetime=timedelta(hours=1))
    cert = write(tmp_path / "host.pem", host.cert_pem)
    key = write(tmp_path / "host.key", host.key_pem.reveal())
    with pytest.raises(IdentityConfigError, match="not a CA"):
        LocalCA.load(cert, key)


def test_an_encrypted_or_missing_ca_key_is_explained(ec_ca: LocalCA, tmp_path: Path) -> None:
    cert = write(tmp_path / "ca.pem", ec_ca.cert_pem)
    key = serialization.load_pem_private_key(ec_ca.key_pem().reveal(), password=None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(IdentityConfigError, match="encrypted"):
        LocalCA.load(cert, write(tmp_path / "enc.key", encrypted))
    with pytest.raises(IdentityConfigError, match="cannot read"):
        LocalCA.load(cert, tmp_path / "absent.key")
    with pytest.raises(IdentityConfigError, match="no PEM certificate"):
        LocalCA.load(write(tmp_path / "empty.pem", b"nothing"), tmp_path / "enc.key")


def test_a_ca_file_may_be_a_bundle(ca: LocalCA, ec_ca: LocalCA, tmp_path: Path) -> None:
    bundle = write(tmp_path / "bundle.pem", ca.cert_pem + ec_ca.cert_pem)
    key = write(tmp_path / "ec.key", ec_ca.key_pem().reveal())
    loaded = LocalCA.load(bundle, key)
    assert loaded.certificate == ec_ca.certificate  # the one the key belongs to signs
    assert set(loaded.ca_pems) == {ca.cert_pem, ec_ca.cert_pem}
    credentials = loaded.issue(HOST, lifetime=timedelta(hours=1))
    assert signed_by(credentials.certificate, ec_ca.certificate)


def test_init_ca_writes_a_private_key_and_never_overwrites(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "site-ca", name="Site CA", days=10, key_type="ec")
    assert stat.S_IMODE(files.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.cert_path.stat().st_mode) == 0o644
    key_before = files.key_path.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        init_ca(tmp_path / "site-ca", name="Another CA", days=10, key_type="ec")
    assert files.key_path.read_bytes() == key_before
    cert = x509.load_pem_x509_certificate(files.cert_path.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Site CA"
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not_valid_after(cert) - not_valid_before(cert) == timedelta(days=10) + BACKDATE


# -- choosing the source ------------------------------------------------------------------------


def test_certificate_source_follows_the_settings(tmp_path: Path) -> None:
    assert certificate_source(Settings()) == "none"
    assert host_credentials(Settings(), HOST) is None
    assert certificate_source(Settings(host_cert_dir=tmp_path)) == "directory"
    assert certificate_source(Settings(ca_cert=tmp_path / "c", ca_key=tmp_path / "k")) == "ca"
    with pytest.raises(IdentityConfigError, match="choose one certificate source"):
        certificate_source(Settings(host_cert_dir=tmp_path, ca_key=tmp_path / "k"))
    with pytest.raises(IdentityConfigError, match="required"):
        certificate_source(Settings(ca_key=tmp_path / "k"))


# -- pre-issued pairs ---------------------------------------------------------------------------


@pytest.fixture
def cert_dir(tmp_path: Path, ec_ca: LocalCA) -> Path:
    directory = tmp_path / "hostcerts"
    for name in ("vm1.example.org", "vm2.example.org", "vm3.example.org"):
        issue_to_directory(ec_ca, name, directory, days=5, key_type="ec")
    return directory


def test_issue_to_directory_writes_the_pair_with_safe_modes(cert_dir: Path) -> None:
    pair = cert_dir / "vm1.example.org"
    assert stat.S_IMODE((pair / "hostcert.pem").stat().st_mode) == 0o644
    assert stat.S_IMODE((pair / "hostkey.pem").stat().st_mode) == 0o400


def test_preissued_mode_picks_the_pair_of_the_hostname(
    cert_dir: Path, ec_ca: LocalCA, tmp_path: Path
) -> None:
    ca_file = write(tmp_path / "ca.pem", ec_ca.cert_pem)
    settings = Settings(host_cert_dir=cert_dir, ca_cert=ca_file)
    credentials = host_credentials(settings, "vm2.example.org")
    assert credentials is not None and credentials.source == "preissued"
    assert credentials.cert_pem == (cert_dir / "vm2.example.org" / "hostcert.pem").read_bytes()
    assert credentials.key_pem.reveal() == (
        (cert_dir / "vm2.example.org" / "hostkey.pem").read_bytes()
    )
    san = credentials.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["vm2.example.org"]
    assert credentials.ca_pems == (ec_ca.cert_pem,)


def test_a_missing_pair_holds_the_job_with_the_reason(cert_dir: Path) -> None:
    with pytest.raises(HostCertificateError) as caught:
        load_preissued(cert_dir, "vm9.example.org")
    assert caught.value.disposition is Disposition.HOLD
    message = str(caught.value)
    assert "vm9.example.org" in message
    assert "no pre-issued hostcert.pem or hostkey.pem" in message
    assert str(cert_dir / "vm9.example.org") in message


def test_a_missing_key_is_named(cert_dir: Path) -> None:
    (cert_dir / "vm1.example.org" / "hostkey.pem").unlink()
    with pytest.raises(HostCertificateError, match=r"no pre-issued hostkey\.pem for"):
        load_preissued(cert_dir, "vm1.example.org")


def test_a_key_that_is_not_the_certificates_holds_the_job(cert_dir: Path) -> None:
    one, two = cert_dir / "vm1.example.org", cert_dir / "vm2.example.org"
    (one / "hostkey.pem").chmod(0o600)
    shutil.copyfile(two / "hostkey.pem", one / "hostkey.pem")
    with pytest.raises(HostCertificateError) as caught:
        load_preissued(cert_dir, "vm1.example.org")
    assert caught.value.disposition is Disposition.HOLD
    assert "hostkey.pem does not match" in caught.value.reason
    assert "hostcert.pem" in caught.value.reason


def test_a_certificate_for_another_host_holds_the_job(cert_dir: Path) -> None:
    stray = cert_dir / "vm4.example.org"
    shutil.copytree(cert_dir / "vm3.example.org", stray)
    with pytest.raises(HostCertificateError, match=r"is for vm3\.example\.org, not for vm4"):
        load_preissued(cert_dir, "vm4.example.org")


def test_an_expired_or_unreadable_pair_holds_the_job(cert_dir: Path) -> None:
    later = datetime.now(UTC) + timedelta(days=6)
    with pytest.raises(HostCertificateError, match="expired"):
        load_preissued(cert_dir, "vm1.example.org", now=later)
    earlier = datetime.now(UTC) - timedelta(days=1)
    with pytest.raises(HostCertificateError, match="not valid before"):
        load_preissued(cert_dir, "vm1.example.org", now=earlier)
    (cert_dir / "vm2.example.org" / "hostcert.pem").write_bytes(b"garbage")
    with pytest.raises(HostCertificateError, match="no readable PEM certificate"):
        load_preissued(cert_dir, "vm2.example.org")
    key = cert_dir / "vm3.example.org" / "hostkey.pem"
    key.chmod(0o600)
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(HostCertificateError, match="not a PEM private key"):
        load_preissued(cert_dir, "vm3.example.org")


def test_wildcard_and_cn_only_certificates_are_recognised(ec_ca: LocalCA, tmp_path: Path) -> None:
    """Old grid host certificates name the host as CN=host/<fqdn> without a SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    for directory, subject, san in [
        ("vm5.example.org", "host/vm5.example.org", None),
        ("vm6.example.org", "ignored", "*.example.org"),
    ]:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ec_ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False
            )
        ca_key = serialization.load_pem_private_key(ec_ca.key_pem().reveal(), password=None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        cert = builder.sign(ca_key, hashes.SHA256())
        pair = tmp_path / directory
        pair.mkdir()
        write(pair / "hostcert.pem", cert.public_bytes(serialization.Encoding.PEM))
        write(
            pair / "hostkey.pem",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        assert load_preissued(tmp_path, directory).hostname == directory


def test_a_missing_certificate_directory_is_the_hosts_fault(tmp_path: Path) -> None:
    with pytest.raises(IdentityConfigError, match="not a directory") as caught:
        load_preissued(tmp_path / "absent", "vm1.example.org")
    assert caught.value.disposition is Disposition.REQUEUE


def test_an_unreadable_pair_is_the_hosts_fault(
    cert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests may run as root, which reads any file: make the read fail at the file-system seam.
    real_read = Path.read_bytes
    unreadable = cert_dir / "vm1.example.org" / "hostkey.pem"

    def read_bytes(path: Path) -> bytes:
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(IdentityConfigError, match=r"cannot read .*hostkey\.pem: Permission denied"):
        load_preissued(cert_dir, "vm1.example.org")


# -- the key never shows ------------------------------------------------------------------------


def test_repr_str_and_logs_never_show_the_key(
    ca_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        credentials = host_credentials(ca_settings(ca_dir), HOST)
    assert credentials is not None
    shown = [
        repr(credentials),
        str(credentials),
        f"{credentials}",
        repr(credentials.key_pem),
        str(credentials.key_pem),
        f"{credentials.key_pem}",
        f"{credentials.key_pem:>20}",
        repr(dataclasses.astuple(credentials)),
        repr(credentials.summary()),
        caplog.text,
    ]
    assert HOST in repr(credentials) and "secret" in repr(credentials)
    fragments = key_material(credentials)
    assert len(fragments) > 10
    for text in shown:
        assert "PRIVATE KEY" not in text
        for fragment in fragments:
            assert fragment not in text


def test_errors_about_a_pair_never_quote_the_key(cert_dir: Path) -> None:
    key = cert_dir / "vm1.example.org" / "hostkey.pem"
    secret_text = key.read_text()
    key.chmod(0o600)
    key.write_text(secret_text.replace("A", "B", 3))  # damaged, still PEM-shaped
    with pytest.raises(HostCertificateError) as caught:
        load_preissued(cert_dir, "vm1.example.org")
    lines = [ln for ln in secret_text.splitlines() if ln and not ln.startswith("-----")]
    assert all(line not in str(caught.value) for line in lines)
