"""What must happen inside the guest before the payload: a plan as data, applied by the VM layer.

Pure: nothing here touches a guest. The VM layer applies a :class:`GuestSetup` through the guest
agent in this order: make ``directories`` (parents first, then set mode and owner), write
``files``, then run ``commands`` (argv tuples, no shell). A file must have its mode before it has
its content: qemu-guest-agent's ``guest-file-open`` creates a *new* file with mode 0666 whatever
the umask (``DEFAULT_NEW_FILE_MODE`` in qga/commands-posix.c), so a secret file is first created
empty with its final mode (e.g. ``install -m 0400 /dev/null PATH`` via ``guest-exec``), and only
then opened for writing (an existing file keeps its mode)."""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from glite_vm.config import Settings
from glite_vm.identity.ca import load_ca_bundle
from glite_vm.identity.certs import host_credentials
from glite_vm.identity.credentials import (
    CertificateSummary,
    HostCredentials,
    split_pem_certificates,
)
from glite_vm.identity.hostname import resolve_hostname, validate_hostname
from glite_vm.identity.secret import Secret
from glite_vm.identity.x509name import subject_hash, subject_hash_old, subject_oneline

GRID_SECURITY_DIR = "/etc/grid-security"
TRUST_DIR = "/etc/grid-security/certificates"
HOSTCERT_PATH = "/etc/grid-security/hostcert.pem"
HOSTKEY_PATH = "/etc/grid-security/hostkey.pem"
HOSTNAME_PATH = "/etc/hostname"
HOSTS_PATH = "/etc/hosts"
HOSTS_ADDRESS = "127.0.1.1"  # Debian's convention for "this host" without a known address
KERNEL_HOSTNAME_MAX = 64  # Linux HOST_NAME_MAX: sethostname() refuses longer names
_MAX_ID = 2**32 - 2


def _check_path(path: str) -> None:
    if (
        not isinstance(path, str)
        or not path.startswith("/")
        or path.startswith("//")
        or "\0" in path
        or posixpath.normpath(path) != path
        or path == "/"
    ):
        raise ValueError(f"guest path must be absolute and normalised, got {path!r}")


def _check_owner(mode: int, uid: int, gid: int) -> None:
    if not 0 <= mode <= 0o7777:
        raise ValueError(f"mode must be within 0o0..0o7777, got {mode:#o}")
    if not (0 <= uid <= _MAX_ID and 0 <= gid <= _MAX_ID):
        raise ValueError(f"uid and gid must be valid ids, got {uid}:{gid}")


@dataclasses.dataclass(frozen=True, repr=False)
class GuestDirectory:
    """A directory that must exist in the guest with this mode and owner."""

    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0

    def __post_init__(self) -> None:
        _check_path(self.path)
        _check_owner(self.mode, self.uid, self.gid)

    def __repr__(self) -> str:
        return f"GuestDirectory({self.path!r}, mode={self.mode:#o}, uid={self.uid}, gid={self.gid})"


@dataclasses.dataclass(frozen=True, repr=False)
class GuestFile:
    """A file to write in the guest. ``content`` is a :class:`Secret` for private keys, whose
    bytes never show in ``repr``/``str``; :meth:`data` gives the bytes to write."""

    path: str
    content: bytes | Secret
    mode: int = 0o644
    uid: int = 0
    gid: int = 0

    def __post_init__(self) -> None:
        _check_path(self.path)
        _check_owner(self.mode, self.uid, self.gid)
        if not isinstance(self.content, bytes | Secret):
            raise TypeError(f"content must be bytes or Secret, not {type(self.content).__name__}")

    @property
    def secret(self) -> bool:
        return isinstance(self.content, Secret)

    def data(self) -> bytes:
        """The bytes to write (revealed for a secret: call only to write them)."""
        return self.content.reveal() if isinstance(self.content, Secret) else self.content

    def __repr__(self) -> str:
        size = (
            repr(self.content)
            if isinstance(self.content, Secret)
            else (f"{len(self.content)} bytes")
        )
        return (
            f"GuestFile({self.path!r}, mode={self.mode:#o}, uid={self.uid}, gid={self.gid}, {size})"
        )

    __str__ = __repr__


@dataclasses.dataclass(frozen=True)
class GuestSetup:
    """Everything the guest needs before the payload so that it looks like a real grid host.

    ``hostname`` is the VM's full name (what its certificate names); ``kernel_hostname`` is
    what ``hostname`` and ``/etc/hostname`` get: the same name, or its first label when the
    full name is longer than Linux allows (64); ``/etc/hosts`` maps both to 127.0.1.1.
    """

    hostname: str
    kernel_hostname: str
    directories: tuple[GuestDirectory, ...]
    files: tuple[GuestFile, ...]
    commands: tuple[tuple[str, ...], ...]
    certificate: CertificateSummary | None = None

    def file(self, path: str) -> GuestFile:
        for guest_file in self.files:
            if guest_file.path == path:
                return guest_file
        raise KeyError(path)

    def without_secrets(self) -> GuestSetup:
        """This plan without its secret files (the host key): for a guest whose root is not
        to be trusted with them. The certificate, the CA and the hostname stay."""
        return dataclasses.replace(self, files=tuple(f for f in self.files if not f.secret))

    def with_existing_hosts(self, existing: bytes) -> GuestSetup:
        """This plan with ``/etc/hosts`` merged into the guest's own ``existing`` file rather
        than replacing it (for a VM layer that reads the file first)."""
        merged = merge_etc_hosts(existing, self.hostname)
        files = tuple(
            dataclasses.replace(f, content=merged) if f.path == HOSTS_PATH else f
            for f in self.files
        )
        return dataclasses.replace(self, files=files)

    def ad_attributes(self) -> dict[str, str | int]:
        """Public facts for the job ad. The hostname goes into ``GliteVmGuestHostname``, not
        ``GliteVmHostname``: a requeued job must not look as if it had asked for the name."""
        attributes: dict[str, str | int] = {
            "GliteVmGuestHostname": self.hostname,
            "GliteVmHostCertSource": self.certificate.source if self.certificate else "none",
        }
        if self.certificate is not None:
            attributes["GliteVmHostCertSerial"] = f"{self.certificate.serial:x}"
            attributes["GliteVmHostCertNotAfter"] = int(self.certificate.not_after.timestamp())
            attributes["GliteVmHostCertSha256"] = self.certificate.sha256
        return attributes


def hosts_entry(hostname: str) -> str:
    short = hostname.split(".", 1)[0]
    names = hostname if short == hostname else f"{hostname} {short}"
    return f"{HOSTS_ADDRESS}\t{names}"


def render_etc_hosts(hostname: str) -> bytes:
    """A complete ``/etc/hosts`` for the guest (localhost, this host, IPv6 basics)."""
    return (
        "# written by glite-vm\n"
        "127.0.0.1\tlocalhost\n"
        f"{hosts_entry(hostname)}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
        "ff02::1\tip6-allnodes\n"
        "ff02::2\tip6-allrouters\n"
    ).encode()


def merge_etc_hosts(existing: bytes, hostname: str) -> bytes:
    """``existing`` with its ``127.0.1.1`` line and other mentions of this host's names removed
    and this host's line added after the IPv4 loopback line. Other lines stay as they were."""
    ours = {hostname, hostname.split(".", 1)[0]}
    kept: list[str] = []
    for line in existing.decode("utf-8", "surrogateescape").splitlines():
        body, hash_mark, comment = line.partition("#")
        fields = body.split()
        if not fields:
            kept.append(line)
            continue
        if fields[0] == HOSTS_ADDRESS:
            continue
        names = [n for n in fields[1:] if n.lower() not in ours]
        if len(names) == len(fields) - 1:
            kept.append(line)
        elif names:
            kept.append(
                "\t".join([fields[0], " ".join(names)])
                + (f" {hash_mark}{comment}" if hash_mark else "")
            )
    loopback = [i for i, line in enumerate(kept) if line.split("#")[0].split()[:1] == ["127.0.0.1"]]
    kept.insert(loopback[-1] + 1 if loopback else 0, hosts_entry(hostname))
    return ("\n".join(kept) + "\n").encode("utf-8", "surrogateescape")


def _signing_policy(cas: Sequence[x509.Certificate]) -> bytes | None:
    """A Globus signing policy letting each CA sign any subject (this is a test site's trust
    directory); None if a CA's name cannot be quoted in that format."""
    lines = ["# Globus signing policy written by glite-vm"]
    for cert in cas:
        oneline = subject_oneline(cert)
        if "'" in oneline or '"' in oneline:
            return None
        lines += [
            f"access_id_CA      X509         '{oneline}'",
            "pos_rights        globus        CA:sign",
            "cond_subjects     globus        '\"*\"'",
        ]
    return ("\n".join(lines) + "\n").encode()


def trust_directory_files(ca_pems: Sequence[bytes]) -> list[GuestFile]:
    """The files an OpenSSL hashed trust directory needs for these CA certificates.

    Each certificate is written as ``<hash>.<n>`` where ``<hash>`` is ``openssl x509 -hash``
    and ``n`` counts certificates sharing a hash, and again under its OpenSSL 0.9.8 hash
    (``-subject_hash_old``) for old grid software, as IGTF distributions do; each hash also
    gets a ``<hash>.signing_policy`` for Globus GSI.
    """
    certs: list[x509.Certificate] = []
    for pem in ca_pems:
        for cert in split_pem_certificates(pem):
            if cert not in certs:
                certs.append(cert)
    by_hash: dict[str, list[x509.Certificate]] = {}
    for cert in certs:
        by_hash.setdefault(subject_hash(cert), []).append(cert)
    for cert in certs:
        group = by_hash.setdefault(subject_hash_old(cert), [])
        if cert not in group:
            group.append(cert)
    files = []
    for digest, group in by_hash.items():
        for index, cert in enumerate(group):
            files.append(
                GuestFile(
                    f"{TRUST_DIR}/{digest}.{index}",
                    cert.public_bytes(serialization.Encoding.PEM),
                    0o644,
                )
            )
        policy = _signing_policy(group)
        if policy is not None:
            files.append(GuestFile(f"{TRUST_DIR}/{digest}.signing_policy", policy, 0o644))
    return files


def plan_guest_setup(
    hostname: str,
    credentials: HostCredentials | None = None,
    *,
    extra_ca_pems: Sequence[bytes] = (),
) -> GuestSetup:
    """The guest's identity as data: hostname, ``/etc/hosts``, host certificate and key, CAs.

    Files: ``/etc/grid-security/hostcert.pem`` 0644 root, ``/etc/grid-security/hostkey.pem``
    0400 root (a :class:`Secret`), the CA certificates of ``credentials`` and
    ``extra_ca_pems`` in ``/etc/grid-security/certificates`` (see
    :func:`trust_directory_files`), ``/etc/hostname`` and ``/etc/hosts``. Command: ``hostname``.
    """
    hostname = validate_hostname(hostname, "hostname")
    kernel_hostname = (
        hostname if len(hostname) <= KERNEL_HOSTNAME_MAX else hostname.split(".", 1)[0]
    )
    ca_pems = [*(credentials.ca_pems if credentials else ()), *extra_ca_pems]
    directories: list[GuestDirectory] = []
    files: list[GuestFile] = []
    if credentials is not None or ca_pems:
        directories.append(GuestDirectory(GRID_SECURITY_DIR, 0o755))
    if ca_pems:
        directories.append(GuestDirectory(TRUST_DIR, 0o755))
        files += trust_directory_files(ca_pems)
    if credentials is not None:
        if credentials.hostname != hostname:
            raise ValueError(
                f"credentials are for {credentials.hostname!r}, the VM is {hostname!r}"
            )
        files.append(GuestFile(HOSTCERT_PATH, credentials.cert_pem, 0o644))
        files.append(GuestFile(HOSTKEY_PATH, credentials.key_pem, 0o400))
    files.append(GuestFile(HOSTNAME_PATH, f"{kernel_hostname}\n".encode(), 0o644))
    files.append(GuestFile(HOSTS_PATH, render_etc_hosts(hostname), 0o644))
    return GuestSetup(
        hostname=hostname,
        kernel_hostname=kernel_hostname,
        directories=tuple(directories),
        files=tuple(files),
        commands=(("hostname", kernel_hostname),),
        certificate=credentials.summary() if credentials else None,
    )


def prepare_guest_identity(
    settings: Settings,
    *,
    host: str,
    slot: str,
    job_id: str,
    requested: str | None,
    runtime: timedelta | None = None,
    now: datetime | None = None,
) -> GuestSetup:
    """Hostname, certificate and trust for one job's VM, as a :class:`GuestSetup`.

    The one call the VM layer needs: :func:`resolve_hostname`, then :func:`host_credentials`
    (pre-issued, minted or none, as the settings say), then :func:`plan_guest_setup`. With no
    certificate source but ``GLITE_VM_CA_CERT`` set, the CA certificates are still installed.
    Raises hold-class errors for the job's mistakes (GliteVmHostname, missing pre-issued pair)
    and requeue-class :class:`IdentityConfigError` for the host's.
    """
    hostname = resolve_hostname(settings, host=host, slot=slot, job_id=job_id, requested=requested)
    credentials = host_credentials(settings, hostname, runtime=runtime, now=now)
    extra: tuple[bytes, ...] = ()
    if credentials is None and settings.ca_cert is not None:
        extra = tuple(
            c.public_bytes(serialization.Encoding.PEM) for c in load_ca_bundle(settings.ca_cert)
        )
    return plan_guest_setup(hostname, credentials, extra_ca_pems=extra)
