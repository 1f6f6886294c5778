"""`glite-vm ca init` / `glite-vm ca issue`, driven through the real `glite_vm.cli.main`."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

import glite_vm.cli.main
from glite_vm.config import Settings
from glite_vm.identity.ca import LocalCA
from glite_vm.identity.certs import host_credentials
from glite_vm.identity.credentials import not_valid_after, not_valid_before
from glite_vm.identity.preissued import load_preissued


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("GLITE_VM_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("GLITE_VM_CONFIG", str(tmp_path / "no-config.toml"))
    # The CLI imports every sub-command module it lists; some belong to parts of glite-vm that
    # are still being written. Run the real main() with just this module.
    monkeypatch.setattr(glite_vm.cli.main, "_COMMAND_MODULES", ("glite_vm.cli.identity",))


def printed_settings(output: str) -> dict[str, str]:
    """The `KNOB = value` lines the command printed, as Settings keys."""
    found = re.findall(r"^\s*GLITE_VM_([A-Z_]+) = (.+)$", output, re.MULTILINE)
    return {key.lower(): value for key, value in found}


def test_ca_init_creates_a_ca_and_prints_settings_that_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "site-ca"
    code = glite_vm.cli.main.main(
        ["ca", "init", str(directory), "--days", "30", "--name", "Test Site CA", "--key-type", "ec"]
    )
    out = capsys.readouterr().out
    assert code == 0
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Test Site CA"
    assert (not_valid_after(cert) - not_valid_before(cert)).days == 30
    assert printed_settings(out) == {"ca_cert": str(cert_path), "ca_key": str(key_path)}
    assert f"export GLITE_VM_CA_CERT={cert_path} GLITE_VM_CA_KEY={key_path}" in out
    hash_shown = re.search(r"subject hash ([0-9a-f]{8})", out)
    assert hash_shown is not None
    openssl_hash = subprocess.run(
        ["openssl", "x509", "-in", str(cert_path), "-noout", "-hash"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert hash_shown.group(1) == openssl_hash
    assert "PRIVATE KEY" not in out
    # the printed settings are all a site needs to mint host certificates
    minted = host_credentials(Settings.from_strings(printed_settings(out)), "vm1.example.org")
    assert minted is not None and minted.certificate.issuer == cert.subject


def test_ca_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path), "--key-type", "ec"]) == 0
    key_before = (tmp_path / "ca.key").read_bytes()
    capsys.readouterr()
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path), "--key-type", "ec"]) == 125
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ca.key").read_bytes() == key_before


def test_ca_init_default_name_and_rsa(tmp_path: Path) -> None:
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path)]) == 0
    ca = LocalCA.load(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert ca.certificate.subject.rfc4514_string().startswith("CN=glite-vm test CA ")
    assert ca.certificate.public_key().key_size == 3072  # type: ignore[union-attr]


def test_ca_init_rejects_bad_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        glite_vm.cli.main.main(["ca", "init", str(tmp_path), "--days", "0"])
    assert stopped.value.code == 125  # glite-vm's one failure status, usage errors included
    assert "at least 1" in capsys.readouterr().err
    assert not (tmp_path / "ca.key").exists()


def test_ca_issue_preissues_a_pair_the_directory_mode_accepts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path / "ca"), "--key-type", "ec"]) == 0
    monkeypatch.setenv("GLITE_VM_CA_CERT", str(tmp_path / "ca" / "ca.pem"))
    monkeypatch.setenv("GLITE_VM_CA_KEY", str(tmp_path / "ca" / "ca.key"))
    monkeypatch.setenv("GLITE_VM_HOST_CERT_DIR", str(tmp_path / "certs"))
    capsys.readouterr()
    code = glite_vm.cli.main.main(
        ["ca", "issue", "CE01.example.org", "--days", "10", "--key-type", "ec"]
    )
    out = capsys.readouterr().out
    assert code == 0
    pair = tmp_path / "certs" / "ce01.example.org"
    assert stat.S_IMODE((pair / "hostkey.pem").stat().st_mode) == 0o400
    assert stat.S_IMODE((pair / "hostcert.pem").stat().st_mode) == 0o644
    assert printed_settings(out) == {
        "host_cert_dir": str(tmp_path / "certs"),
        "ca_cert": str(tmp_path / "ca" / "ca.pem"),
    }
    loaded = load_preissued(tmp_path / "certs", "ce01.example.org")
    assert loaded.hostname == "ce01.example.org"
    assert "PRIVATE KEY" not in out


def test_ca_issue_needs_a_ca_and_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert glite_vm.cli.main.main(["ca", "issue", "vm.example.org"]) == 125
    assert "request error: ca issue: no CA" in capsys.readouterr().err
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path / "ca"), "--key-type", "ec"]) == 0
    ca_args = ["--ca-cert", str(tmp_path / "ca/ca.pem"), "--ca-key", str(tmp_path / "ca/ca.key")]
    capsys.readouterr()
    assert glite_vm.cli.main.main(["ca", "issue", "vm.example.org", *ca_args]) == 125
    assert "no certificate directory" in capsys.readouterr().err


def test_ca_issue_refuses_a_bad_hostname(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path / "ca"), "--key-type", "ec"]) == 0
    capsys.readouterr()
    code = glite_vm.cli.main.main(
        [
            "ca",
            "issue",
            "../escape",
            "--ca-cert",
            str(tmp_path / "ca/ca.pem"),
            "--ca-key",
            str(tmp_path / "ca/ca.key"),
            "--cert-dir",
            str(tmp_path / "certs"),
        ]
    )
    assert code == 125
    err = capsys.readouterr().err
    assert "request error" in err and "hostname" in err
    assert not (tmp_path / "escape").exists() and not (tmp_path / "certs").exists()


def test_ca_with_a_broken_ca_key_is_reported_as_a_host_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path / "ca"), "--key-type", "ec"]) == 0
    (tmp_path / "ca/ca.key").write_bytes(b"not a key")
    capsys.readouterr()
    code = glite_vm.cli.main.main(
        [
            "ca",
            "issue",
            "vm.example.org",
            "--ca-cert",
            str(tmp_path / "ca/ca.pem"),
            "--ca-key",
            str(tmp_path / "ca/ca.key"),
            "--cert-dir",
            str(tmp_path / "certs"),
        ]
    )
    assert code == 125
    err = capsys.readouterr().err
    assert "host error" in err and "GLITE_VM_CA_KEY" in err


def test_ca_issue_with_its_defaults_says_nothing_about_cutting_short(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A CA of `ca init` and a pair of `ca issue`, both with their defaults (365 days): the
    pair ends with the CA, and that is no news worth a warning."""
    assert glite_vm.cli.main.main(["ca", "init", str(tmp_path / "ca"), "--key-type", "ec"]) == 0
    ca_args = ["--ca-cert", str(tmp_path / "ca/ca.pem"), "--ca-key", str(tmp_path / "ca/ca.key")]
    issue = ["ca", "issue", *ca_args, "--cert-dir", str(tmp_path / "certs")]
    capsys.readouterr()
    assert glite_vm.cli.main.main([*issue, "vm.example.org", "--key-type", "ec"]) == 0
    err = capsys.readouterr().err
    assert err == "", err
    assert "cut short" not in caplog.text  # the library's warning, wherever logging goes
    ca = LocalCA.load(tmp_path / "ca/ca.pem", tmp_path / "ca/ca.key")
    pair = load_preissued(tmp_path / "certs", "vm.example.org")
    assert not_valid_after(pair.certificate) <= not_valid_after(ca.certificate)
    assert (not_valid_after(pair.certificate) - not_valid_before(pair.certificate)).days >= 363
    # asking for more than the CA has left is cut, and said once, by the CLI
    assert (
        glite_vm.cli.main.main([*issue, "vm2.example.org", "--key-type", "ec", "--days", "1000"])
        == 0
    )
    err = capsys.readouterr().err
    assert err.count("would outlive the CA") == 1 and "WARNING" not in err, err
