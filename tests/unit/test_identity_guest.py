"""The guest-setup plan: files, directories and commands the VM layer applies before the payload."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from hypothesis import given
from hypothesis import strategies as st

from glite_vm.config import Settings
from glite_vm.errors import Disposition, RequestError
from glite_vm.identity.ca import LocalCA
from glite_vm.identity.ca_files import init_ca, issue_to_directory
from glite_vm.identity.credentials import HostCredentials
from glite_vm.identity.errors import HostCertificateError
from glite_vm.identity.guest import (
    HOSTCERT_PATH,
    HOSTKEY_PATH,
    TRUST_DIR,
    GuestDirectory,
    GuestFile,
    merge_etc_hosts,
    plan_guest_setup,
    prepare_guest_identity,
)
from glite_vm.identity.secret import Secret

OPENSSL = shutil.which("openssl") or "openssl-is-required-for-these-tests"
HOST = "node1-slot1.example.org"


@pytest.fixture(scope="module")
def ca() -> LocalCA:
    return LocalCA.generate("glite-vm guest test CA", days=30, key_type="ec")


@pytest.fixture(scope="module")
def credentials(ca: LocalCA) -> HostCredentials:
    return ca.issue(HOST, lifetime=timedelta(hours=2), key_type="ec")


def openssl_out(*args: str) -> str:
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, check=True).stdout


def materialise(files: tuple[GuestFile, ...], root: Path) -> None:
    """Write a plan's files under ``root`` the way the VM layer writes them in the guest."""
    for guest_file in files:
        target = root / guest_file.path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(guest_file.data())


def test_certificate_and_key_land_with_grid_modes_and_owner(
    credentials: HostCredentials,
) -> None:
    setup = plan_guest_setup(HOST, credentials)
    cert, key = setup.file(HOSTCERT_PATH), setup.file(HOSTKEY_PATH)
    assert (cert.mode, cert.uid, cert.gid, cert.secret) == (0o644, 0, 0, False)
    assert cert.data() == credentials.cert_pem
    assert (key.mode, key.uid, key.gid, key.secret) == (0o400, 0, 0, True)
    assert key.data() == credentials.key_pem.reveal()
    assert [d.path for d in setup.directories] == ["/etc/grid-security", TRUST_DIR]
    assert all((d.mode, d.uid, d.gid) == (0o755, 0, 0) for d in setup.directories)


def test_ca_is_named_by_the_hash_openssl_computes(
    credentials: HostCredentials, ca: LocalCA, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    new, old = openssl_out(
        "x509", "-in", str(ca_file), "-noout", "-hash", "-subject_hash_old"
    ).split()
    setup = plan_guest_setup(HOST, credentials)
    assert setup.file(f"{TRUST_DIR}/{new}.0").data() == ca.cert_pem
    assert setup.file(f"{TRUST_DIR}/{old}.0").data() == ca.cert_pem
    policy = setup.file(f"{TRUST_DIR}/{new}.signing_policy").data().decode()
    assert "access_id_CA      X509         '/CN=glite-vm guest test CA'" in policy
    assert "CA:sign" in policy
    assert all(f.mode == 0o644 and f.uid == 0 for f in setup.files if f.path.startswith(TRUST_DIR))


def test_openssl_finds_the_ca_in_the_planned_trust_directory(
    credentials: HostCredentials, tmp_path: Path
) -> None:
    """The proof that matters: OpenSSL's directory lookup verifies the host certificate."""
    setup = plan_guest_setup(HOST, credentials)
    materialise(setup.files, tmp_path)
    trust = tmp_path / TRUST_DIR.lstrip("/")
    result = subprocess.run(
        [
            OPENSSL,
            "verify",
            "-purpose",
            "sslserver",
            "-CApath",
            str(trust),
            str(tmp_path / HOSTCERT_PATH.lstrip("/")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # and an empty trust directory does not: the lookup really went through the hash name
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        subprocess.run(
            [OPENSSL, "verify", "-CApath", str(empty), str(tmp_path / HOSTCERT_PATH.lstrip("/"))],
            capture_output=True,
            check=False,
        ).returncode
        != 0
    )


def test_cas_sharing_a_subject_get_numbered_files(tmp_path: Path) -> None:
    first = LocalCA.generate("Same Name CA", days=5, key_type="ec")
    second = LocalCA.generate("Same Name CA", days=5, key_type="ec")
    host = second.issue(HOST, lifetime=timedelta(hours=1), key_type="ec")
    setup = plan_guest_setup(HOST, host, extra_ca_pems=[first.cert_pem, first.cert_pem])
    names = sorted(f.path.rsplit("/", 1)[1] for f in setup.files if f.path.startswith(TRUST_DIR))
    hashes = sorted({n.split(".")[0] for n in names})
    assert len(hashes) == 2  # new-style and old-style hash
    assert names == sorted(
        [f"{h}.{n}" for h in hashes for n in ("0", "1")] + [f"{h}.signing_policy" for h in hashes]
    )
    policy = setup.file(f"{TRUST_DIR}/{hashes[0]}.signing_policy").data().decode()
    assert policy.count("access_id_CA") == 2
    materialise(setup.files, tmp_path)
    result = subprocess.run(
        [
            OPENSSL,
            "verify",
            "-CApath",
            str(tmp_path / TRUST_DIR.lstrip("/")),
            str(tmp_path / HOSTCERT_PATH.lstrip("/")),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hostname_files_and_command() -> None:
    setup = plan_guest_setup(HOST)
    assert setup.kernel_hostname == HOST
    assert setup.commands == (("hostname", HOST),)
    assert setup.file("/etc/hostname").data() == f"{HOST}\n".encode()
    hosts = setup.file("/etc/hosts").data().decode()
    assert f"127.0.1.1\t{HOST} node1-slot1\n" in hosts
    assert "127.0.0.1\tlocalhost\n" in hosts
    assert setup.directories == ()
    assert not any(f.path.startswith("/etc/grid-security") for f in setup.files)
    assert setup.certificate is None


def test_a_name_too_long_for_the_kernel_keeps_its_first_label() -> None:
    long_name = "vm-" + "a" * 50 + "." + "b" * 30 + ".example.org"
    setup = plan_guest_setup(long_name)
    assert setup.kernel_hostname == "vm-" + "a" * 50
    assert setup.commands == (("hostname", setup.kernel_hostname),)
    hosts = setup.file("/etc/hosts").data().decode()
    assert f"127.0.1.1\t{long_name} {setup.kernel_hostname}\n" in hosts


def test_credentials_for_another_host_are_refused(credentials: HostCredentials) -> None:
    with pytest.raises(ValueError, match="credentials are for"):
        plan_guest_setup("other.example.org", credentials)


def test_the_plan_never_shows_the_key(
    credentials: HostCredentials, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        setup = plan_guest_setup(HOST, credentials)
        logging.getLogger("test").info("applying %s; files %s", setup, setup.files)
    key_lines = [
        ln for ln in credentials.key_pem.reveal().decode().splitlines() if not ln.startswith("--")
    ]
    texts = [
        repr(setup),
        str(setup),
        caplog.text,
        repr(setup.file(HOSTKEY_PATH)),
        repr(dataclasses.asdict(setup)),
        str(setup.ad_attributes()),
    ]
    for text in texts:
        assert "PRIVATE KEY" not in text
        assert all(line not in text for line in key_lines)
    assert "<secret: " in repr(setup.file(HOSTKEY_PATH))


def test_ad_attributes_describe_the_identity(credentials: HostCredentials) -> None:
    attributes = plan_guest_setup(HOST, credentials).ad_attributes()
    cert = credentials.certificate
    assert attributes["GliteVmGuestHostname"] == HOST
    assert "GliteVmHostname" not in attributes  # that one is the job's request
    assert attributes["GliteVmHostCertSource"] == "minted"
    assert attributes["GliteVmHostCertSerial"] == f"{cert.serial_number:x}"
    assert attributes["GliteVmHostCertSha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert plan_guest_setup(HOST).ad_attributes() == {
        "GliteVmGuestHostname": HOST,
        "GliteVmHostCertSource": "none",
    }


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"path": "etc/hosts"}, "absolute"),
        ({"path": "/etc/../etc/shadow"}, "normalised"),
        ({"path": "/etc//hosts"}, "normalised"),
        ({"path": "//etc/hosts"}, "absolute"),
        ({"path": "/"}, "absolute"),
        ({"mode": 0o10000}, "mode"),
        ({"uid": -1}, "ids"),
    ],
)
def test_guest_files_refuse_odd_paths_and_modes(kwargs: dict[str, object], problem: str) -> None:
    values: dict[str, object] = {"path": "/etc/x", "content": b"", "mode": 0o644, **kwargs}
    with pytest.raises(ValueError, match=problem):
        GuestFile(**values)  # type: ignore[arg-type]
    directory_values = {k: v for k, v in values.items() if k != "content"}
    with pytest.raises(ValueError, match=problem):
        GuestDirectory(**directory_values)  # type: ignore[arg-type]


def test_secret_compares_and_hides() -> None:
    assert Secret(b"abc") == Secret(b"abc")
    assert Secret(b"abc") != Secret(b"abd")
    assert len(Secret(b"abc")) == 3
    assert "abc" not in repr(Secret(b"abc")) and "abc" not in f"{Secret(b'abc')}"
    with pytest.raises(TypeError):
        Secret("text")  # type: ignore[arg-type]


# -- /etc/hosts of an existing image ------------------------------------------------------------

IMAGE_HOSTS = b"""# image's hosts
127.0.0.1\tlocalhost
127.0.1.1\tdebian-12 debian
10.0.0.5\tnfs.example.org nfs
10.0.0.6\tnode1-slot1.example.org alias  # stale entry
\xff\xfe odd bytes kept
::1\tlocalhost ip6-localhost
"""


def test_merging_keeps_the_images_entries_and_replaces_this_hosts() -> None:
    merged = merge_etc_hosts(IMAGE_HOSTS, HOST).split(b"\n")
    assert merged[:3] == [
        b"# image's hosts",
        b"127.0.0.1\tlocalhost",
        f"127.0.1.1\t{HOST} node1-slot1".encode(),
    ]
    assert b"10.0.0.5\tnfs.example.org nfs" in merged
    assert b"10.0.0.6\talias # stale entry" in merged
    assert b"\xff\xfe odd bytes kept" in merged
    assert b"::1\tlocalhost ip6-localhost" in merged
    assert not any(b"debian-12" in line for line in merged)


def test_with_existing_hosts_replaces_only_etc_hosts(credentials: HostCredentials) -> None:
    setup = plan_guest_setup(HOST, credentials)
    merged = setup.with_existing_hosts(IMAGE_HOSTS)
    assert merged.file("/etc/hosts").data() == merge_etc_hosts(IMAGE_HOSTS, HOST)
    assert [f for f in merged.files if f.path != "/etc/hosts"] == [
        f for f in setup.files if f.path != "/etc/hosts"
    ]


def test_without_secrets_keeps_all_but_the_key(credentials: HostCredentials) -> None:
    setup = plan_guest_setup(HOST, credentials)
    bare = setup.without_secrets()
    assert [f.path for f in setup.files if f.secret] == ["/etc/grid-security/hostkey.pem"]
    assert bare.files == tuple(f for f in setup.files if not f.secret)
    assert (bare.hostname, bare.directories, bare.commands) == (
        setup.hostname,
        setup.directories,
        setup.commands,
    )


@given(existing=st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_merged_hosts_name_this_host_exactly_once(existing: bytes) -> None:
    lines = merge_etc_hosts(existing, HOST).decode("utf-8", "surrogateescape").splitlines()
    mentions = [ln for ln in lines if HOST in ln.split("#")[0].split()]
    assert mentions == [f"127.0.1.1\t{HOST} node1-slot1"]


# -- end to end from settings ---------------------------------------------------------------------


def test_prepare_with_a_local_ca(tmp_path: Path) -> None:
    files = init_ca(tmp_path / "ca", name="Prep CA", days=3, key_type="ec")
    settings = Settings.from_strings(
        {"ca_cert": str(files.cert_path), "ca_key": str(files.key_path), "host_key_type": "ec"}
    )
    setup = prepare_guest_identity(
        settings, host="node1.example.org", slot="slot1", job_id="7.0", requested=None
    )
    assert setup.hostname == "node1-slot1.example.org"
    assert setup.certificate is not None and setup.certificate.source == "minted"
    cert = x509.load_pem_x509_certificate(setup.file(HOSTCERT_PATH).data())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [setup.hostname]


def test_prepare_with_preissued_pairs_and_a_job_hostname(tmp_path: Path, ca: LocalCA) -> None:
    issue_to_directory(ca, "ce.example.org", tmp_path / "certs", key_type="ec")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    settings = Settings(host_cert_dir=tmp_path / "certs", ca_cert=ca_file, allow_job_hostname=True)
    setup = prepare_guest_identity(
        settings, host="node1", slot="slot1", job_id="7.0", requested="CE.example.org"
    )
    assert setup.hostname == "ce.example.org"
    assert setup.certificate is not None and setup.certificate.source == "preissued"
    with pytest.raises(HostCertificateError) as caught:
        prepare_guest_identity(
            settings, host="node1", slot="slot1", job_id="7.0", requested="se.example.org"
        )
    assert caught.value.disposition is Disposition.HOLD


def test_prepare_without_certificates_still_installs_the_sites_ca(
    tmp_path: Path, ca: LocalCA
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem)
    setup = prepare_guest_identity(
        Settings(ca_cert=ca_file), host="n", slot="slot2", job_id="1.0", requested=None
    )
    assert setup.certificate is None
    assert any(f.path.startswith(TRUST_DIR) for f in setup.files)
    assert not any(f.path in (HOSTCERT_PATH, HOSTKEY_PATH) for f in setup.files)


def test_prepare_refuses_a_job_hostname_the_site_does_not_allow() -> None:
    with pytest.raises(RequestError) as caught:
        prepare_guest_identity(
            Settings(), host="n", slot="slot1", job_id="1.0", requested="mine.example.org"
        )
    assert caught.value.field == "GliteVmHostname"
