"""OpenSSL's views of a certificate's subject: the hashes that name files in a trust directory
(``openssl x509 -hash`` and ``-subject_hash_old``) and the one-line form Globus signing-policy
files use (``openssl x509 -subject -nameopt compat``).

Computed from the subject's DER exactly as OpenSSL does, so that the file names we give CA
certificates in ``/etc/grid-security/certificates`` are the ones OpenSSL's directory lookup
(and therefore Globus, VOMS, curl, ...) will search for.
"""

from __future__ import annotations

import hashlib

from cryptography import x509

_SEQUENCE = 0x30
_SET = 0x31
_OID = 0x06
_UTF8STRING = 0x0C
_CONTEXT_0 = 0xA0

# String types OpenSSL folds before hashing (ASN1_MASK_CANON), with how their bytes map to
# characters (ASN1_STRING_to_UTF8 reads T61String as Latin-1).
_CANON_CODECS = {
    0x0C: "utf-8",  # UTF8String
    0x13: "latin-1",  # PrintableString
    0x14: "latin-1",  # T61String
    0x16: "latin-1",  # IA5String
    0x1A: "latin-1",  # VisibleString
    0x1E: "utf-16-be",  # BMPString
    0x1C: "utf-32-be",  # UniversalString
}
_ASCII_SPACE = b" \t\n\v\f\r"

# OpenSSL's short names (OBJ_nid2sn) for the attributes met in certificate subjects.
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.4": "SN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "street",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "title",
    "2.5.4.15": "businessCategory",
    "2.5.4.17": "postalCode",
    "2.5.4.42": "GN",
    "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier",
    "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.2.840.113549.1.9.1": "emailAddress",
}


class _Der:
    """Just enough of a DER reader to walk a Name."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def read(self) -> tuple[int, bytes, bytes]:
        """Next element: (tag, contents, whole encoding)."""
        start = self.pos
        tag = self._byte()
        if tag & 0x1F == 0x1F:
            raise ValueError("high-tag-number form does not occur in certificate names")
        length = self._byte()
        if length & 0x80:
            count = length & 0x7F
            if count == 0 or count > 4:
                raise ValueError("unsupported DER length")
            length = int.from_bytes(self._take(count), "big")
        contents = self._take(length)
        return tag, contents, self.data[start : self.pos]

    def expect(self, tag: int) -> tuple[bytes, bytes]:
        got, contents, whole = self.read()
        if got != tag:
            raise ValueError(f"expected DER tag {tag:#04x}, found {got:#04x}")
        return contents, whole

    def _byte(self) -> int:
        return self._take(1)[0]

    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("truncated DER")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


def _encode(tag: int, contents: bytes) -> bytes:
    n = len(contents)
    if n < 0x80:
        return bytes([tag, n]) + contents
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + contents


def subject_der(cert: x509.Certificate) -> bytes:
    """The subject Name exactly as encoded in the certificate."""
    tbs, _ = _Der(cert.tbs_certificate_bytes).expect(_SEQUENCE)
    fields = _Der(tbs)
    tag, _, _ = fields.read()
    if tag == _CONTEXT_0:  # version
        fields.read()  # serial number
    fields.read()  # signature algorithm
    fields.expect(_SEQUENCE)  # issuer
    fields.expect(_SEQUENCE)  # validity
    _, subject = fields.expect(_SEQUENCE)
    return subject


def _rdns(name_der: bytes) -> list[list[tuple[bytes, int, bytes]]]:
    """[[(OID encoding, value tag, value contents), ...] per RDN] of a DER Name."""
    contents, _ = _Der(name_der).expect(_SEQUENCE)
    rdns = []
    reader = _Der(contents)
    while not reader.at_end():
        set_contents, _ = reader.expect(_SET)
        entries = []
        in_set = _Der(set_contents)
        while not in_set.at_end():
            attribute, _ = in_set.expect(_SEQUENCE)
            parts = _Der(attribute)
            _, oid, _ = parts.read()
            tag, value, _ = parts.read()
            entries.append((oid, tag, value))
        rdns.append(entries)
    return rdns


def _canonical_value(tag: int, value: bytes) -> tuple[int, bytes]:
    """OpenSSL's asn1_string_canon: UTF-8, trimmed, inner blanks collapsed, ASCII lower-cased."""
    codec = _CANON_CODECS.get(tag)
    if codec is None:
        return tag, value
    text = value.decode(codec).encode("utf-8")
    text = text.strip(_ASCII_SPACE)
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c in _ASCII_SPACE:
            out.append(0x20)
            while i < len(text) and text[i] in _ASCII_SPACE:
                i += 1
            continue
        out.append(c + 32 if 0x41 <= c <= 0x5A else c)
        i += 1
    return _UTF8STRING, bytes(out)


def _canonical_name(name_der: bytes) -> bytes:
    encoded = b""
    for rdn in _rdns(name_der):
        entries = []
        for oid, tag, value in rdn:
            canon_tag, canon_value = _canonical_value(tag, value)
            entries.append(_encode(_SEQUENCE, _encode(_OID, oid) + _encode(canon_tag, canon_value)))
        encoded += _encode(_SET, b"".join(sorted(entries)))  # DER orders a SET OF
    return encoded


def _hash_hex(digest: bytes) -> str:
    return f"{int.from_bytes(digest[:4], 'little'):08x}"


def subject_hash(cert: x509.Certificate) -> str:
    """What ``openssl x509 -hash`` prints (OpenSSL >= 1.0): SHA-1 of the canonical subject."""
    return _hash_hex(hashlib.sha1(_canonical_name(subject_der(cert))).digest())  # noqa: S324


def subject_hash_old(cert: x509.Certificate) -> str:
    """What ``openssl x509 -subject_hash_old`` prints (OpenSSL 0.9.8): MD5 of the subject."""
    return _hash_hex(hashlib.md5(subject_der(cert)).digest())  # noqa: S324


def _oid_text(oid: bytes) -> str:
    arcs: list[int] = []
    value = 0
    for byte in oid:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - 40 * first, *arcs[1:]])


def subject_oneline(cert: x509.Certificate) -> str:
    """OpenSSL's X509_NAME_oneline of the subject, e.g. ``/O=Grid/CN=Test CA`` (Globus form)."""
    parts = []
    for rdn in _rdns(subject_der(cert)):
        for index, (oid, _, value) in enumerate(rdn):
            dotted = _oid_text(oid)
            text = "".join(chr(b) if 0x20 <= b <= 0x7E else f"\\x{b:02X}" for b in value)
            parts.append(("+" if index else "/") + _SHORT_NAMES.get(dotted, dotted) + "=" + text)
    return "".join(parts)
