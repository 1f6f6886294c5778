"""Subject hashes and one-line names must be exactly what the real `openssl` computes."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glite_vm.identity.x509name import subject_hash, subject_hash_old, subject_oneline

OPENSSL = shutil.which("openssl") or "openssl-is-required-for-these-tests"
_KEY = ec.generate_private_key(ec.SECP256R1())


def self_signed(name: x509.Name) -> x509.Certificate:
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(_KEY, hashes.SHA256())
    )


def openssl_view(cert: x509.Certificate, tmp: Path) -> tuple[str, str, str]:
    path = tmp / "cert.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        [OPENSSL, "x509", "-in", str(path), "-noout", "-hash", "-subject_hash_old"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    subject = subprocess.run(
        [OPENSSL, "x509", "-in", str(path), "-noout", "-subject", "-nameopt", "compat"],
        capture_output=True,
        check=True,
    ).stdout.decode("latin-1")
    return out[0], out[1], subject.strip().removeprefix("subject=")


def attr(oid: x509.ObjectIdentifier, value: str, kind: _ASN1Type) -> x509.NameAttribute:
    return x509.NameAttribute(oid, value, _type=kind)


NAMES = {
    "plain CN": x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "glite-vm test CA")]),
    "grid DN": x509.Name(
        [
            attr(NameOID.DOMAIN_COMPONENT, "org", _ASN1Type.IA5String),
            attr(NameOID.DOMAIN_COMPONENT, "Example", _ASN1Type.IA5String),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Grid  Site"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, " Test CA "),
            x509.NameAttribute(NameOID.COMMON_NAME, "Example Grid CA 2"),
        ]
    ),
    "country and e-mail": x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "CH"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "CA-Admin@Example.ORG"),
            x509.NameAttribute(NameOID.COMMON_NAME, "CA"),
        ]
    ),
    "non-ASCII UTF8String": x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "Zertifizierungsstelle Zürich ÉTÉ")]
    ),
    "BMPString": x509.Name([attr(NameOID.COMMON_NAME, "Bmp CA Ωmega", _ASN1Type.BMPString)]),
    "UniversalString": x509.Name(
        [attr(NameOID.COMMON_NAME, "Univ CA \U0001f512", _ASN1Type.UniversalString)]
    ),
    "T61String": x509.Name([attr(NameOID.COMMON_NAME, "T61 CA caf\xe9", _ASN1Type.T61String)]),
    "PrintableString with tabs": x509.Name(
        [attr(NameOID.COMMON_NAME, "\tA\t\tB  C\r", _ASN1Type.PrintableString)]
    ),
    "NumericString is not folded": x509.Name(
        [
            attr(NameOID.SERIAL_NUMBER, "0042 ", _ASN1Type.NumericString),
            x509.NameAttribute(NameOID.COMMON_NAME, "N"),
        ]
    ),
    "multi-valued RDN": x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Zeta"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "Alpha"),
                ]
            ),
            x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.USER_ID, "u1")]),
        ]
    ),
    "unknown attribute": x509.Name(
        [
            x509.NameAttribute(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), "x"),
            x509.NameAttribute(NameOID.COMMON_NAME, "CA"),
        ]
    ),
    "long value": x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "O" * 300)]),
}


@pytest.mark.parametrize("label", sorted(NAMES))
def test_hashes_and_oneline_equal_openssl(label: str, tmp_path: Path) -> None:
    cert = self_signed(NAMES[label])
    new, old, oneline = openssl_view(cert, tmp_path)
    assert subject_hash(cert) == new
    assert subject_hash_old(cert) == old
    assert subject_oneline(cert) == oneline


def test_the_hash_ignores_case_and_blanks_like_openssl() -> None:
    loud = self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "  My   TEST Ca ")]))
    quiet = self_signed(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "my test ca")]))
    assert subject_hash(loud) == subject_hash(quiet)
    assert subject_hash_old(loud) != subject_hash_old(quiet)  # the old hash is of raw bytes


_ATTRIBUTES = st.sampled_from(
    [
        (NameOID.COMMON_NAME, _ASN1Type.UTF8String, st.text(min_size=1, max_size=30)),
        (
            NameOID.ORGANIZATION_NAME,
            _ASN1Type.PrintableString,
            st.text("ABCXYZabcxyz0189 '()+,-./:=? \t", min_size=1, max_size=30),
        ),
        (
            NameOID.DOMAIN_COMPONENT,
            _ASN1Type.IA5String,
            st.text(st.characters(max_codepoint=127), min_size=1, max_size=20),
        ),
        (
            NameOID.ORGANIZATIONAL_UNIT_NAME,
            _ASN1Type.BMPString,
            st.text(st.characters(max_codepoint=0xFFFF, exclude_categories=["Cs"]), min_size=1),
        ),
        (
            NameOID.LOCALITY_NAME,
            _ASN1Type.T61String,
            st.text(st.characters(max_codepoint=255), min_size=1, max_size=20),
        ),
    ]
)


@st.composite
def names(draw: st.DrawFn) -> x509.Name:
    rdns = []
    for _ in range(draw(st.integers(1, 4))):
        entries = []
        for oid, kind, values in draw(st.lists(_ATTRIBUTES, min_size=1, max_size=2)):
            entries.append(attr(oid, draw(values), kind))
        if len({(e.oid, e.value) for e in entries}) == len(entries):
            rdns.append(x509.RelativeDistinguishedName(entries))
    return x509.Name(rdns or [x509.RelativeDistinguishedName([attr(*_CN)])])


_CN = (NameOID.COMMON_NAME, "fallback", _ASN1Type.UTF8String)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(name=names())
def test_random_names_hash_like_openssl(name: x509.Name, tmp_path: Path) -> None:
    cert = self_signed(name)
    new, old, _ = openssl_view(cert, tmp_path)
    assert (subject_hash(cert), subject_hash_old(cert)) == (new, old)
