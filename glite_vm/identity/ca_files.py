"""Key material on disk for the CLI: a new CA's files, and pairs pre-issued into a directory.

Invariants: a file is created with its final mode from the first byte (no window with wider
rights) and never follows a link; nothing is overwritten; when the second file of a pair cannot
be written, the first is removed, so no half pair is left.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime, timedelta
from pathlib import Path

from glite_vm.identity.ca import LocalCA
from glite_vm.identity.credentials import HostCredentials
from glite_vm.identity.hostname import validate_hostname
from glite_vm.identity.preissued import HOST_CERT_FILE, HOST_KEY_FILE
from glite_vm.identity.secret import Secret

CA_CERT_FILE = "ca.pem"
CA_KEY_FILE = "ca.key"


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
