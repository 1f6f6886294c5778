"""Which image references a job (or the interactive user) may name."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import requests

from glite_vm.errors import Disposition, ImageRefusedError, RequestError
from glite_vm.images._open_as import open_as
from glite_vm.images._transport import FileAccess, NotFound, Refused, open_url
from glite_vm.images.sources import check_sha256, classify_ref
from tests.support import scratch_root

SOURCES = ("https://repo.example.org/images/", "http://mirror.example.org:8080/vm")


def job(ref: str, sources: tuple[str, ...] = SOURCES) -> str:
    parsed = classify_ref(ref, sources=sources, allow_local=False)
    return f"{parsed.kind}:{parsed.value}"


def test_catalogue_names() -> None:
    assert job("debian-12") == "name:debian-12"
    assert job("el9_x86-64+build.2") == "name:el9_x86-64+build.2"
    for bad in ("-leading-dash", "has space", "semi;colon", "x" * 200):
        with pytest.raises(RequestError):
            job(bad)


@pytest.mark.parametrize(
    "url",
    [
        "https://repo.example.org/images/a.qcow2",
        "https://REPO.example.org/images/sub/dir/a.qcow2",
        "https://repo.example.org:443/images/a.qcow2",
        "http://mirror.example.org:8080/vm/a.img",
        "http://mirror.example.org:8080/vm",
        "https://repo.example.org/images/a.qcow2?sig=abc",
    ],
)
def test_urls_under_an_allowed_prefix_pass(url: str) -> None:
    assert job(url).startswith("url:")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://evil.example.com/images/a.qcow2", "allowed source"),
        ("https://repo.example.org.evil.com/images/a.qcow2", "allowed source"),
        ("https://repo.example.org@evil.example.com/images/a.qcow2", "user names"),
        ("https://user:pw@repo.example.org/images/a.qcow2", "user names"),
        ("https://repo.example.org/images/../secret/a.qcow2", "'..'"),
        ("https://repo.example.org/images/%2e%2e/secret/a.qcow2", "'..'"),
        ("https://repo.example.org/imagesX/a.qcow2", "allowed source"),
        ("http://repo.example.org/images/a.qcow2", "allowed source"),  # scheme differs
        ("http://mirror.example.org/vm/a.img", "allowed source"),  # port differs
        ("http://mirror.example.org:8080/vm-evil/a.img", "allowed source"),
        ("file:///etc/shadow", "allowed source"),
        ("http://169.254.169.254/latest/meta-data", "allowed source"),
    ],
)
def test_urls_a_job_may_not_name(url: str, why: str) -> None:
    with pytest.raises(ImageRefusedError, match=why) as info:
        job(url)
    assert info.value.disposition is Disposition.HOLD


def test_nothing_is_allowed_when_no_source_is_configured() -> None:
    with pytest.raises(ImageRefusedError, match="none are configured"):
        job("https://repo.example.org/images/a.qcow2", sources=())


def test_other_schemes_are_request_errors() -> None:
    for url in ("ftp://repo.example.org/a.qcow2", "nbd://host/export", "json:{}://x"):
        with pytest.raises(RequestError):
            job(url)


def test_a_job_may_not_name_a_host_path() -> None:
    with pytest.raises(ImageRefusedError, match="host path"):
        job("/var/lib/images/a.qcow2")
    with pytest.raises(RequestError, match="relative path"):
        job("images/a.qcow2")


def test_file_prefix_admits_only_paths_really_inside_it(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.qcow2").write_bytes(b"x")
    os.symlink("/etc/shadow", allowed / "escape.qcow2")
    sources = (allowed.as_uri() + "/",)
    assert job((allowed / "a.qcow2").as_uri(), sources).startswith("url:file://")
    assert job(str(allowed / "a.qcow2"), sources).startswith("url:file://")
    with pytest.raises(ImageRefusedError):
        job((allowed / "escape.qcow2").as_uri(), sources)  # symlink out of the prefix
    with pytest.raises(ImageRefusedError):
        job(str(tmp_path / "allowed-not" / "a.qcow2"), sources)


def test_the_interactive_user_may_name_paths_and_any_url(tmp_path: Path) -> None:
    local = classify_ref(str(tmp_path / "a.qcow2"), sources=(), allow_local=True)
    assert (local.kind, local.value, local.label) == (
        "url",
        (tmp_path / "a.qcow2").as_uri(),
        str(tmp_path / "a.qcow2"),
    )
    assert classify_ref("https://x.example/a.img", sources=(), allow_local=True).kind == "url"
    # Safety of the URL's shape still applies.
    with pytest.raises(ImageRefusedError):
        classify_ref("https://u:p@x.example/a.img", sources=(), allow_local=True)


def test_sha256_is_normalised_and_checked() -> None:
    assert check_sha256("AB" * 32) == "ab" * 32
    assert check_sha256(None) is None
    with pytest.raises(RequestError):
        check_sha256("abc")


# --- opening a job's file: the check is made on what was opened ------------------------------


def _open(url: str, access: FileAccess) -> bytes:
    with (
        requests.Session() as session,
        open_url(session, url, timeout=5.0, file_access=access) as stream,
    ):
        return b"".join(stream.chunks())


def test_the_opened_files_real_path_must_lie_under_a_file_prefix(tmp_path: Path) -> None:
    """A link in the allowed directory that leads outside it is refused when opened, whatever
    the path looked like when it was checked (here: not checked at all)."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "inside.img").write_bytes(b"inside")
    (tmp_path / "outside.img").write_bytes(b"outside")
    os.symlink("../outside.img", allowed / "leads-out.img")
    os.symlink("inside.img", allowed / "stays-in.img")
    access = FileAccess(within=(allowed.as_uri() + "/",))
    assert _open((allowed / "inside.img").as_uri(), access) == b"inside"
    assert _open((allowed / "stays-in.img").as_uri(), access) == b"inside"
    with pytest.raises(Refused, match="outside the allowed sources"):
        _open((allowed / "leads-out.img").as_uri(), access)
    # The catalogue's files and the person at the keyboard are not confined.
    assert _open((allowed / "leads-out.img").as_uri(), FileAccess()) == b"outside"


@dataclasses.dataclass(frozen=True)
class _User:
    uid: int
    gid: int
    groups: tuple[int, ...]


@pytest.fixture
def someone() -> _User:
    if os.geteuid() != 0:
        pytest.skip("needs root: the file is opened as another user")
    from tests.service.svc_support import ensure_account  # noqa: PLC0415

    account = ensure_account("gvm-alice")
    return _User(account.uid, account.gid, ())


def test_a_file_is_opened_with_the_readers_rights(someone: _User) -> None:
    with scratch_root("gvm-open-as-", "GLITE_VM_TEST_KEEP") as tmp_path:
        _check_open_as(tmp_path, someone)


def _check_open_as(tmp_path: Path, someone: _User) -> None:
    readable = tmp_path / "theirs.img"
    readable.write_bytes(b"theirs")
    os.chown(readable, someone.uid, someone.gid)
    readable.chmod(0o600)
    secret = tmp_path / "roots.img"
    secret.write_bytes(b"root only")
    secret.chmod(0o600)
    access = FileAccess(within=(tmp_path.as_uri() + "/",), reader=someone)
    assert _open(readable.as_uri(), access) == b"theirs"
    with pytest.raises(Refused, match=f"uid {someone.uid}, the job's owner, may not read"):
        _open(secret.as_uri(), access)
    # A FIFO does not stall the open (non-blocking); it is not a file.
    os.mkfifo(tmp_path / "fifo.img", 0o666)
    with pytest.raises(NotFound, match="not a regular file"):
        _open((tmp_path / "fifo.img").as_uri(), access)
    # The descriptor that comes back is the file the reader opened, nothing else.
    fd = open_as(someone, str(readable))
    try:
        assert os.fstat(fd).st_ino == readable.stat().st_ino
        assert os.readlink(f"/proc/self/fd/{fd}") == str(readable)
    finally:
        os.close(fd)
    with pytest.raises(PermissionError):
        open_as(someone, str(secret))
