"""The central catalogue: parsing, local copy, revalidation, stale fallback, and building one."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from glite_vm.config import Settings
from glite_vm.errors import (
    CatalogueError,
    CatalogueInputError,
    ChecksumMismatchError,
    Disposition,
    DownloadError,
    UnknownImageError,
)
from glite_vm.images.acquire import acquire_image
from glite_vm.images.build import build_catalogue, write_catalogue
from glite_vm.images.catalogue import CatalogueStore, catalogue_url, load_catalogue, parse_catalogue
from glite_vm.images.inspect import Limits
from glite_vm.units import MIB
from tests.images.images_helpers import Repo, qemu_img, random_bytes, sha256_of
from tests.images.images_http import Fault, LoopbackServer

SHA = "a" * 64


def doc(*images: dict[str, object], version: int = 1) -> bytes:
    return json.dumps({"version": version, "images": list(images)}).encode()


def test_parse_resolves_relative_urls_and_reads_kernel_entries() -> None:
    entries = parse_catalogue(
        doc(
            {
                "name": "d12",
                "url": "d12.qcow2",
                "sha256": SHA,
                "size": 5,
                "format": "qcow2",
                "os": "Debian 12",
                "guest_user": "glite",
                "description": "plain",
            },
            {
                "name": "tiny",
                "url": "https://cdn.example/t.raw",
                "sha256": SHA.upper(),
                "format": "raw",
                "boot": "kernel",
                "cmdline": "console=ttyS0",
                "kernel": {"url": "k/vmlinuz", "sha256": SHA},
                "initrd": {"url": "/abs/initrd", "sha256": SHA, "size": 9},
            },
        ),
        "https://repo.example/vm/catalogue.json",
    )
    d12, tiny = entries["d12"], entries["tiny"]
    assert d12.url == "https://repo.example/vm/d12.qcow2"
    assert (d12.size, d12.format, d12.os) == (5, "qcow2", "Debian 12")
    assert (d12.arch, d12.boot) == ("x86_64", "disk")
    assert tiny.url == "https://cdn.example/t.raw" and tiny.sha256 == SHA
    assert tiny.kernel is not None and tiny.kernel.url == "https://repo.example/vm/k/vmlinuz"
    assert tiny.initrd is not None and tiny.initrd.url == "https://repo.example/abs/initrd"
    assert tiny.initrd.size == 9 and tiny.cmdline == "console=ttyS0"


def test_bad_entries_are_skipped_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    good = {"name": "ok", "url": "ok.img", "sha256": SHA, "format": "raw"}
    bad = [
        {"name": "no-digest", "url": "x.img", "format": "raw"},
        {"name": "short", "url": "x.img", "sha256": "abc", "format": "raw"},
        {"name": "vmdk", "url": "x.vmdk", "sha256": SHA, "format": "vmdk"},
        {"name": "ftp", "url": "ftp://x/y.img", "sha256": SHA, "format": "raw"},
        {"name": "bad name!", "url": "x.img", "sha256": SHA, "format": "raw"},
        {"name": "nokernel", "url": "x.img", "sha256": SHA, "format": "raw", "boot": "kernel"},
        {"name": "neg", "url": "x.img", "sha256": SHA, "format": "raw", "size": -1},
        dict(good),  # duplicate name
        "not an object",
    ]
    with caplog.at_level(logging.WARNING):
        entries = parse_catalogue(doc(good, *bad), "file:///repo/catalogue.json")  # type: ignore[arg-type]
    assert list(entries) == ["ok"]
    assert caplog.text.count("skipped") == len(bad)


@pytest.mark.parametrize(
    "body", [b"{not json", b"[]", doc(version=2), b'{"version": 1}', b'{"version": 1, "images": 3}']
)
def test_structurally_broken_catalogue_is_a_host_error(body: bytes) -> None:
    with pytest.raises(CatalogueError) as info:
        parse_catalogue(body, "file:///c.json")
    assert info.value.disposition is Disposition.REQUEUE


def test_catalogue_locations() -> None:
    assert catalogue_url("https://r.example/vm/") == "https://r.example/vm/catalogue.json"
    assert catalogue_url("/srv/repo/") == "file:///srv/repo/catalogue.json"
    assert catalogue_url("/srv/repo/c.json") == "file:///srv/repo/c.json"
    for bad in ("", "relative/c.json", "ftp://r.example/c.json"):
        with pytest.raises(CatalogueError):
            catalogue_url(bad)


def test_local_copy_is_used_within_max_age_then_revalidated_with_etag(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    repo.publish("alpha", b"x" * 512)
    settings = settings_for(catalogue_max_age=3600)
    assert load_catalogue(settings).names() == ["alpha"]
    assert load_catalogue(settings).names() == ["alpha"]
    assert len(server.requests("catalogue.json")) == 1  # second answer came from the copy
    cat = load_catalogue(settings, max_age=0)
    gets = server.requests("catalogue.json")
    assert [g.status for g in gets] == [200, 304]
    assert gets[1].headers["If-None-Match"] == server.files["/catalogue.json"].etag
    assert cat.names() == ["alpha"] and not cat.stale and cat.age() < 5


def test_revalidation_with_last_modified_when_there_is_no_etag(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    repo.publish("alpha", b"x" * 512)
    server.fault("catalogue.json", Fault(etag=False))
    load_catalogue(settings, max_age=0)
    load_catalogue(settings, max_age=0)
    gets = server.requests("catalogue.json")
    assert [g.status for g in gets] == [200, 304]
    assert "If-None-Match" not in gets[1].headers
    assert gets[1].headers["If-Modified-Since"] == server.files["/catalogue.json"].last_modified


def test_without_validators_the_catalogue_is_fetched_whole_each_time(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    repo.publish("alpha", b"x" * 512)
    server.fault("catalogue.json", Fault(validators=False))
    load_catalogue(settings, max_age=0)
    load_catalogue(settings, max_age=0)
    assert [g.status for g in server.requests("catalogue.json")] == [200, 200]


def test_unreachable_repository_uses_the_local_copy_with_its_age(
    repo: Repo,
    server: LoopbackServer,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    repo.publish("alpha", b"x" * 512)
    load_catalogue(settings)
    store = CatalogueStore(settings.effective_cache_dir, repo.catalogue_url)
    copy = store.read()
    assert copy is not None
    store.write_meta(copy[0], copy[1], time.time() - 3 * 3600)  # confirmed three hours ago
    server.stop()
    with caplog.at_level(logging.WARNING):
        cat = load_catalogue(settings, max_age=0)
    assert cat.stale and cat.names() == ["alpha"]
    assert "last confirmed 3h00m ago" in caplog.text


def test_broken_new_catalogue_falls_back_to_the_local_copy(
    repo: Repo, server: LoopbackServer, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    repo.publish("alpha", b"x" * 512)
    load_catalogue(settings)
    server.put("catalogue.json", b"{ half a docu")
    with caplog.at_level(logging.WARNING):
        cat = load_catalogue(settings, max_age=0)
    assert cat.stale and cat.names() == ["alpha"]
    assert "not valid JSON" in caplog.text


def test_unreachable_repository_without_a_local_copy_is_requeue_class(
    server: LoopbackServer, settings: Settings
) -> None:
    server.stop()
    with pytest.raises(DownloadError) as info:
        load_catalogue(settings)
    assert info.value.disposition is Disposition.REQUEUE


def test_no_catalogue_configured(settings_for: Callable[..., Settings]) -> None:
    with pytest.raises(CatalogueError, match="GLITE_VM_CATALOGUE"):
        acquire_image(settings_for(catalogue=""), "alpha", job_id="1.0")


def test_unknown_image_is_held_with_the_known_names(repo: Repo, settings: Settings) -> None:
    repo.publish("alpha", b"x" * 512)
    repo.publish("beta", b"y" * 512)
    with pytest.raises(UnknownImageError) as info:
        acquire_image(settings, "gamma", job_id="1.0")
    assert info.value.disposition is Disposition.HOLD
    assert str(info.value) == "unknown image 'gamma'; known: alpha, beta"


def test_an_image_added_since_the_local_copy_is_found(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(catalogue_max_age=3600)
    repo.publish("alpha", random_bytes(MIB, 1))
    load_catalogue(settings)
    time.sleep(1.1)  # the copy must be older than a second to be worth asking again
    entry = repo.publish("beta", random_bytes(MIB, 2))
    with acquire_image(settings, "beta", job_id="1.0") as lease:
        assert lease.image.sha256 == entry["sha256"]


def test_pinned_digest_must_match_the_catalogue(repo: Repo, settings: Settings) -> None:
    entry = repo.publish("alpha", b"x" * 512)
    with acquire_image(settings, "alpha", sha256=entry["sha256"], job_id="1.0"):
        pass
    with pytest.raises(ChecksumMismatchError, match="checksum mismatch for alpha") as info:
        acquire_image(settings, "alpha", sha256="b" * 64, job_id="1.0")
    assert info.value.disposition is Disposition.HOLD


# --- building a catalogue -------------------------------------------------------------------------


def make_repository(root: Path) -> Path:
    root.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(root / "debian-12.qcow2"), "64M")
    (root / "debian-12.qcow2.json").write_text(
        json.dumps({"os": "Debian 12", "guest_user": "debian", "description": "build host"})
    )
    (root / "plain.raw").write_bytes(random_bytes(MIB, 3))
    (root / "tiny.img").write_bytes(random_bytes(MIB, 4))
    (root / "vmlinuz").write_bytes(random_bytes(100_000, 5))
    (root / "initrd.img").write_bytes(random_bytes(50_000, 6))
    (root / "tiny.img.json").write_text(
        json.dumps(
            {
                "name": "tiny-vm",
                "kernel": "vmlinuz",
                "initrd": "initrd.img",
                "cmdline": "console=ttyS0",
                "os": "busybox",
            }
        )
    )
    (root / "README").write_text("not an image")
    return root


LIMITS = Limits(max_virtual_bytes=1 << 40, max_file_bytes=1 << 40)


def test_build_catalogue_then_hosts_acquire_from_it(
    tmp_path: Path, settings_for: Callable[..., Settings]
) -> None:
    root = make_repository(tmp_path / "repo")
    out = write_catalogue(
        build_catalogue(root, limits=LIMITS, default_guest_user="glite"), root / "catalogue.json"
    )
    data = json.loads(out.read_text())
    by_name = {e["name"]: e for e in data["images"]}
    assert sorted(by_name) == ["debian-12", "plain", "tiny-vm"]  # initrd.img is not an image
    d12 = by_name["debian-12"]
    assert (d12["format"], d12["virtual_size"], d12["url"]) == (
        "qcow2",
        64 * MIB,
        "debian-12.qcow2",
    )
    assert (d12["os"], d12["guest_user"], d12["boot"]) == ("Debian 12", "debian", "disk")
    assert d12["sha256"] == sha256_of(root / "debian-12.qcow2")
    assert by_name["plain"]["guest_user"] == "glite"
    tiny = by_name["tiny-vm"]
    assert tiny["boot"] == "kernel" and tiny["kernel"]["url"] == "vmlinuz"
    assert tiny["initrd"]["sha256"] == sha256_of(root / "initrd.img")

    settings = settings_for(catalogue=str(root) + "/")  # a file:// repository
    with acquire_image(settings, "tiny-vm", job_id="1.0") as lease:
        image = lease.image
        assert image.format == "raw" and image.cmdline == "console=ttyS0"
        assert (
            image.kernel is not None
            and image.kernel.read_bytes() == (root / "vmlinuz").read_bytes()
        )
    with acquire_image(settings, "debian-12", job_id="1.0") as lease:
        assert lease.image.format == "qcow2" and lease.image.guest_user == "debian"


def test_build_with_base_url(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo")
    data = build_catalogue(root, limits=LIMITS, base_url="https://repo.example/vm/")
    assert {e["url"] for e in data["images"]} == {
        "https://repo.example/vm/debian-12.qcow2",
        "https://repo.example/vm/plain.raw",
        "https://repo.example/vm/tiny.img",
    }


def test_build_refuses_what_hosts_would_refuse(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo")
    qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/shadow",
        "-F",
        "raw",
        str(root / "evil.qcow2"),
        "1M",
    )
    with pytest.raises(Exception, match="backing file"):
        build_catalogue(root, limits=LIMITS)


def test_build_rejects_bad_sidecars_as_the_admins_input(tmp_path: Path) -> None:
    root = make_repository(tmp_path / "repo")
    (root / "plain.raw.json").write_text(json.dumps({"kernel": "../../etc/passwd"}))
    with pytest.raises(CatalogueInputError, match="not a file in this directory") as info:
        build_catalogue(root, limits=LIMITS)
    assert info.value.is_user_error  # what `catalogue build` was given, not a host problem
    (root / "plain.raw.json").write_text(json.dumps({"colour": "blue"}))
    with pytest.raises(CatalogueInputError, match="unknown keys colour"):
        build_catalogue(root, limits=LIMITS)
    with pytest.raises(CatalogueInputError, match="is not a directory"):
        build_catalogue(tmp_path / "nonexistent", limits=LIMITS)
