"""Guest identity in a real guest: hostname, host certificate and key, trusted CA, who can read
what. One VM (a non-root job's) serves the whole module; plans are applied to it in turn."""

from __future__ import annotations

import base64
import dataclasses
import logging
import shutil
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from glite_vm.config import Settings
from glite_vm.errors import AgentError, Disposition
from glite_vm.identity.ca_files import CaFiles, init_ca, issue_to_directory
from glite_vm.identity.credentials import not_valid_after, not_valid_before
from glite_vm.identity.errors import HostCertificateError
from glite_vm.identity.guest import (
    GRID_SECURITY_DIR,
    HOSTCERT_PATH,
    HOSTKEY_PATH,
    TRUST_DIR,
    GuestFile,
    GuestSetup,
    prepare_guest_identity,
)
from glite_vm.vm.guest_setup import SECRETS_DIR, apply_guest_setup
from glite_vm.vm.lifecycle import Vm, VmHost
from tests.support import LocalImage, domains_under
from tests.vm.guest_calls import as_root, payload, vm_request

pytestmark = pytest.mark.vm

OPENSSL = shutil.which("openssl") or "openssl-is-required-for-these-tests"
EXECUTE_HOST = "node1.example.org"
JOB_ID = "4242.0"
SLOT = "slot1_2@node1.example.org"
HOSTNAME = "node1-slot1-2.example.org"  # the default pattern {host}-{slot}.{domain}
OTHER_SLOT = "slot1_3@node1.example.org"
OTHER_HOSTNAME = "node1-slot1-3.example.org"
RUNTIME = timedelta(hours=2)
IMAGE_HOSTS_LINE = "10.1.2.3\tsite-service.example.org"


# -- helpers ---------------------------------------------------------------------------------


def openssl(*args: str) -> str:
    return subprocess.run(
        [OPENSSL, *args], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()


def key_material(key_pem: bytes) -> list[bytes]:
    """Pieces of a PEM key that must never be seen: its body lines and its base64 as a whole."""
    lines = [line for line in key_pem.splitlines() if line and not line.startswith(b"-----")]
    return [*lines, base64.b64encode(key_pem), b"PRIVATE KEY"]


def leaked(text: str | bytes, key_pem: bytes) -> list[bytes]:
    data = text.encode() if isinstance(text, str) else text
    return [piece for piece in key_material(key_pem) if piece in data]


def identity(settings: Settings, slot: str = SLOT) -> GuestSetup:
    return prepare_guest_identity(
        settings, host=EXECUTE_HOST, slot=slot, job_id=JOB_ID, requested=None, runtime=RUNTIME
    )


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaFiles:
    return init_ca(tmp_path_factory.mktemp("ca") / "ca", name="glite-vm VM test CA")


@pytest.fixture(scope="module")
def minted(vm_settings: Settings, ca: CaFiles) -> GuestSetup:
    settings = dataclasses.replace(vm_settings, ca_cert=ca.cert_path, ca_key=ca.key_path)
    return identity(settings)


@dataclasses.dataclass
class Guest:
    vm: Vm
    applied: GuestSetup | None = None


@pytest.fixture(scope="module")
def guest(vm_host: VmHost, direct_image: LocalImage) -> Iterator[Guest]:
    vm = vm_host.start(vm_request(vm_host.settings, keep_snapshot="never"), direct_image)
    with vm:
        vm.wait_ready()
        # an entry of the image's own /etc/hosts, which the setup must keep
        as_root(vm, f"printf '%s\\n' '{IMAGE_HOSTS_LINE}' >> /etc/hosts")
        yield Guest(vm)


@pytest.fixture
def minted_vm(guest: Guest, minted: GuestSetup) -> Vm:
    """The module's VM with the CA-minted identity applied (again, if another test changed it)."""
    if guest.applied is not minted:
        guest.applied = None
        apply_guest_setup(guest.vm, minted)
        guest.applied = minted
    return guest.vm


# -- hostname --------------------------------------------------------------------------------


def test_hostname_in_the_guest_is_the_resolved_one(minted_vm: Vm, minted: GuestSetup) -> None:
    assert minted.hostname == HOSTNAME
    out = payload(minted_vm, "hostname; uname -n; cat /etc/hostname")
    assert out.result.exit_code == 0, out.stderr
    assert out.text.split("\n") == [HOSTNAME, HOSTNAME, HOSTNAME, ""]


def test_etc_hosts_names_this_host_and_keeps_the_image_entries(minted_vm: Vm) -> None:
    out = payload(minted_vm, "cat /etc/hosts")
    lines = out.text.splitlines()
    assert f"127.0.1.1\t{HOSTNAME} node1-slot1-2" in lines
    assert IMAGE_HOSTS_LINE in lines
    assert "glite-guest" not in out.text  # the image's old name for itself is gone
    assert lines.index("127.0.0.1\tlocalhost") < lines.index(f"127.0.1.1\t{HOSTNAME} node1-slot1-2")


# -- certificate, key, trust -----------------------------------------------------------------


def test_minted_certificate_read_back_verifies_against_the_ca(
    minted_vm: Vm, minted: GuestSetup, ca: CaFiles
) -> None:
    out = payload(minted_vm, f"cat {HOSTCERT_PATH}")  # the job may read the certificate
    assert out.result.exit_code == 0, out.stderr
    cert = x509.load_pem_x509_certificate(out.stdout)
    ca_cert = ca.authority.certificate
    ca_key = ca_cert.public_key()
    assert isinstance(ca_key, rsa.RSAPublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(  # raises InvalidSignature if the CA did not sign it
        cert.signature,
        cert.tbs_certificate_bytes,
        padding.PKCS1v15(),
        cert.signature_hash_algorithm,
    )
    assert cert.issuer == ca_cert.subject
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOSTNAME]
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == [HOSTNAME]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    now = datetime.now(UTC)
    assert not_valid_before(cert) <= now < not_valid_after(cert)
    # the job's expected run time plus the default one-hour margin, from when it was minted
    expected_end = now + RUNTIME + timedelta(seconds=Settings().cert_margin)
    assert expected_end - timedelta(minutes=10) < not_valid_after(cert) <= expected_end
    assert minted.certificate is not None
    assert cert.serial_number == minted.certificate.serial


def test_key_in_the_guest_is_the_certificate_key(minted_vm: Vm, minted: GuestSetup) -> None:
    key_pem = minted_vm.agent.read_file(HOSTKEY_PATH)  # root reads it
    cert_pem = minted_vm.agent.read_file(HOSTCERT_PATH)
    key = serialization.load_pem_private_key(key_pem, password=None)
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)
    assert key_pem == minted.file(HOSTKEY_PATH).data()


def test_guest_trust_directory_verifies_the_host_certificate(
    minted_vm: Vm, ca: CaFiles, tmp_path: Path
) -> None:
    """The CA sits under OpenSSL's own hash names; `openssl verify -CApath` on a copy of the
    guest's directory accepts the guest's host certificate."""
    names = as_root(minted_vm, f"ls {TRUST_DIR}").decode().split()
    new_hash = openssl("x509", "-hash", "-noout", "-in", str(ca.cert_path))
    old_hash = openssl("x509", "-subject_hash_old", "-noout", "-in", str(ca.cert_path))
    assert f"{new_hash}.0" in names
    assert f"{old_hash}.0" in names
    capath = tmp_path / "certificates"
    capath.mkdir()
    for name in names:
        (capath / name).write_bytes(minted_vm.agent.read_file(f"{TRUST_DIR}/{name}"))
    assert (capath / f"{new_hash}.0").read_bytes() == ca.cert_path.read_bytes()
    hostcert = tmp_path / "hostcert.pem"
    hostcert.write_bytes(minted_vm.agent.read_file(HOSTCERT_PATH))
    verdict = openssl("verify", "-CApath", str(capath), "-purpose", "sslserver", str(hostcert))
    assert verdict == f"{hostcert}: OK"


def test_modes_and_owners_as_the_job_sees_them(minted_vm: Vm, ca: CaFiles) -> None:
    new_hash = openssl("x509", "-hash", "-noout", "-in", str(ca.cert_path))
    paths = [GRID_SECURITY_DIR, TRUST_DIR, f"{TRUST_DIR}/{new_hash}.0", HOSTCERT_PATH, HOSTKEY_PATH]
    out = payload(
        minted_vm, "stat -L -c '%A %u %g %n' " + " ".join(paths) + f"; readlink {HOSTKEY_PATH}"
    )
    assert out.result.exit_code == 0, out.stderr
    assert out.text.splitlines() == [
        f"drwxr-xr-x 0 0 {GRID_SECURITY_DIR}",
        f"drwxr-xr-x 0 0 {TRUST_DIR}",
        f"-rw-r--r-- 0 0 {TRUST_DIR}/{new_hash}.0",
        f"-rw-r--r-- 0 0 {HOSTCERT_PATH}",
        f"-r-------- 0 0 {HOSTKEY_PATH}",
        f"{SECRETS_DIR}/0-hostkey.pem",  # the key's bytes live in RAM only
    ]


def test_a_user_job_cannot_read_the_key(minted_vm: Vm, minted: GuestSetup) -> None:
    out = payload(minted_vm, f"id -u >&2; cat {HOSTKEY_PATH}")
    uid, *rest = out.stderr.decode().splitlines()
    assert uid == "1000"
    assert out.result.exit_code != 0
    assert "Permission denied" in "\n".join(rest)
    assert leaked(out.stdout, minted.file(HOSTKEY_PATH).data()) == []
    assert out.stdout == b""


def test_the_key_never_shows_in_an_error_or_a_log(
    guest: Guest,
    minted: GuestSetup,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """A real failure while the key is being written: the RAM file system for secrets is
    full (a full tmpfs mounted there first, which the setup then uses)."""
    vm = guest.vm
    full = SECRETS_DIR
    as_root(
        vm,
        f"mkdir -p {full} && mount -t tmpfs -o size=4k,mode=0711 tmpfs {full} && "
        f"(dd if=/dev/zero of={full}/fill bs=4096 count=8 2>/dev/null || true)",
    )
    key = minted.file(HOSTKEY_PATH)
    target = "/run/glite-vm-test-hostkey.pem"
    plan = dataclasses.replace(
        minted,
        directories=(),
        files=(GuestFile(target, key.content, 0o400),),
        commands=(),
    )
    try:
        with caplog.at_level(logging.DEBUG), pytest.raises(AgentError) as info:
            apply_guest_setup(vm, plan)
        remains = as_root(vm, f"ls -A {full}").decode().split()
    finally:
        as_root(vm, f"umount {full}; rm -f {target}")
    err = info.value
    assert err.disposition is Disposition.REQUEUE
    assert target in str(err)
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and len(chain) < 10:
        chain.append(link)
        link = link.__cause__ or link.__context__
    captured = capfd.readouterr()
    seen = [
        *(str(e) for e in chain),
        *(repr(e) for e in chain),
        caplog.text,
        captured.out,
        captured.err,
    ]
    secret = key.data()
    for text in seen:
        assert leaked(text, secret) == [], text
    assert remains == ["fill"], "a partial key was left behind"


# -- pre-issued certificates -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory: pytest.TempPathFactory, ca: CaFiles) -> Path:
    """Pre-issued pairs for two slots' hostnames, as a site with registered names has them."""
    directory = tmp_path_factory.mktemp("preissued")
    for name in (HOSTNAME, OTHER_HOSTNAME):
        issue_to_directory(ca.authority, name, directory, days=30)
    return directory


def test_preissued_directory_gives_the_guest_its_own_pair(
    guest: Guest, vm_settings: Settings, ca: CaFiles, cert_dir: Path
) -> None:
    settings = dataclasses.replace(vm_settings, host_cert_dir=cert_dir, ca_cert=ca.cert_path)
    setup = identity(settings, slot=OTHER_SLOT)
    assert setup.certificate is not None and setup.certificate.source == "preissued"
    guest.applied = None
    apply_guest_setup(guest.vm, setup)
    guest.applied = setup
    out = payload(guest.vm, f"hostname; cat {HOSTCERT_PATH}")
    name, _, cert_pem = out.stdout.partition(b"\n")
    assert name.decode() == OTHER_HOSTNAME
    assert cert_pem == (cert_dir / OTHER_HOSTNAME / "hostcert.pem").read_bytes()
    assert cert_pem != (cert_dir / HOSTNAME / "hostcert.pem").read_bytes()
    key_pem = guest.vm.agent.read_file(HOSTKEY_PATH)
    assert key_pem == (cert_dir / OTHER_HOSTNAME / "hostkey.pem").read_bytes()


def break_pair(cert_dir: Path, how: str) -> None:
    pair = cert_dir / HOSTNAME
    if how == "missing":
        (pair / "hostkey.pem").unlink()
    else:  # another host's key next to this host's certificate
        foreign = (cert_dir / OTHER_HOSTNAME / "hostkey.pem").read_bytes()
        (pair / "hostkey.pem").unlink()
        (pair / "hostkey.pem").write_bytes(foreign)


BROKEN_PAIRS = {"missing": "no pre-issued hostkey.pem", "mismatched": "does not match"}


@pytest.mark.parametrize("how", sorted(BROKEN_PAIRS))
def test_unusable_preissued_pair_holds_the_job_before_any_vm_boots(
    vm_host: VmHost, direct_image: LocalImage, ca: CaFiles, tmp_path: Path, how: str
) -> None:
    vm_settings = vm_host.settings
    cert_dir = tmp_path / "preissued"
    for name in (HOSTNAME, OTHER_HOSTNAME):
        issue_to_directory(ca.authority, name, cert_dir, days=30)
    foreign_key = (cert_dir / OTHER_HOSTNAME / "hostkey.pem").read_bytes()
    break_pair(cert_dir, how)
    settings = dataclasses.replace(vm_settings, host_cert_dir=cert_dir, ca_cert=ca.cert_path)
    snapshots = vm_settings.effective_snapshot_dir
    snapshots.mkdir(parents=True, exist_ok=True)
    domains_before = domains_under(snapshots)
    vm_dirs_before = set(snapshots.iterdir())

    def start_job() -> Vm:
        # the order a job's start follows: its identity first, then the VM
        setup = identity(settings)
        vm = vm_host.start(vm_request(settings, keep_snapshot="never"), direct_image)
        vm.wait_ready()
        apply_guest_setup(vm, setup)
        return vm

    with pytest.raises(HostCertificateError) as info:
        start_job().teardown(failed=True)
    err = info.value
    assert err.disposition is Disposition.HOLD
    assert BROKEN_PAIRS[how] in str(err) and HOSTNAME in str(err)
    assert leaked(str(err), foreign_key) == []
    assert domains_under(snapshots) == domains_before
    assert set(snapshots.iterdir()) == vm_dirs_before
