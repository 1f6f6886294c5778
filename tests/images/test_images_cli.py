"""`glite-vm images|cache|catalogue` through the real argument parser and handlers."""

from __future__ import annotations

import argparse
import io
import json
import os
from pathlib import Path

import pytest

from glite_vm.cli import images as cli
from glite_vm.cli.progress import ProgressBar
from glite_vm.config import Settings
from glite_vm.errors import RequestError, UserError
from glite_vm.images.acquire import acquire_image
from glite_vm.images.cache import ImageCache
from glite_vm.units import MIB
from tests.images.images_helpers import Repo, qemu_img, random_bytes


def run(settings: Settings, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="glite-vm")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    args = parser.parse_args(list(argv))
    code: int = args.handler(args, settings)
    return code


def test_images_list_shows_what_is_cached(
    repo: Repo, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    repo.publish("alpha", random_bytes(MIB, 1), os="Alpha OS")
    repo.publish("beta", random_bytes(2 * MIB, 2))
    acquire_image(settings, "alpha", job_id="1.0").release()
    assert run(settings, "images", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "OS", "ARCH", "BOOT", "SIZE", "CACHED"]
    assert lines[1].split() == ["alpha", "Alpha", "OS", "x86_64", "disk", "1.0", "MiB", "yes"]
    assert lines[2].split()[-1] == "no"
    assert run(settings, "images", "list", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["cached"]) for r in rows] == [("alpha", True), ("beta", False)]


def test_images_pull_names_and_local_paths_quietly_in_batch(
    repo: Repo,
    settings: Settings,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo.publish("alpha", random_bytes(MIB, 3))
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "mine.qcow2"), "8M")
    monkeypatch.chdir(tmp_path)
    assert run(settings, "images", "pull", "alpha", "./mine.qcow2") == 0
    out, err = capsys.readouterr()
    assert err == ""  # not a terminal: no progress bar
    first, second = (line.split("\t") for line in out.splitlines())
    assert first[0] == "alpha" and first[1] == "raw" and first[4].startswith("fetched")
    assert second[0] == str(tmp_path / "mine.qcow2") and second[1] == "qcow2"
    assert ImageCache(settings).status().live_leases == 0  # pull leaves nothing leased
    assert run(settings, "images", "pull", "alpha") == 0
    assert capsys.readouterr().out.rstrip().endswith("cached")


def test_images_pull_reports_errors_with_their_class(
    repo: Repo, settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo.publish("alpha", random_bytes(MIB, 4))
    assert run(settings, "images", "pull", "nope", "alpha") == 125
    out, err = capsys.readouterr()
    assert "glite-vm: nope: request error: unknown image 'nope'; known: alpha" in err
    assert out.startswith("alpha\t")  # the other image was still pulled
    evil = tmp_path / "evil.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", str(evil), "1M")
    assert run(settings, "images", "pull", str(evil)) == 125
    assert "backing file" in capsys.readouterr().err


def test_progress_bar_on_request(
    repo: Repo, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    repo.publish("alpha", random_bytes(3 * MIB, 5))
    assert run(settings, "images", "pull", "--progress", "always", "alpha") == 0
    err = capsys.readouterr().err
    assert "\ralpha [" in err and "100.0% 3.0 MiB/3.0 MiB" in err and err.endswith("\n")


def test_progress_bar_throttles_and_handles_unknown_totals() -> None:
    stream = io.StringIO()
    bar = ProgressBar("x", stream, force=True)
    for i in range(1000):
        bar.update(i * 1000, None)
    assert 1 <= stream.getvalue().count("\r") <= 3  # redrawn at most ten times a second
    bar.close()
    assert stream.getvalue().endswith("\n")


def test_cache_status_prune_verify(
    repo: Repo, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    a = repo.publish("alpha", random_bytes(MIB, 6))["sha256"]
    b = repo.publish("beta", random_bytes(2 * MIB, 7))["sha256"]
    acquire_image(settings, "alpha", job_id="1.0").release()
    held = acquire_image(settings, "beta", job_id="42.0")
    assert run(settings, "cache", "status") == 0
    out = capsys.readouterr().out
    assert "entries    2; leases 1 live, 0 dead" in out
    assert "42.0" in out and "used 3.0 MiB" in out
    assert run(settings, "cache", "status", "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["used_bytes"] == 3 * MIB
    assert {e["sha256"]: len(e["leases"]) for e in status["entries"]} == {a: 0, b: 1}

    assert run(settings, "cache", "verify") == 0
    assert "2 file(s) checked, 0 bad" in capsys.readouterr().out

    assert run(settings, "cache", "prune", "--to", "1MiB", "--dry-run") == 1  # beta is leased
    out = capsys.readouterr().out
    assert "would remove 1 image file(s), 1.0 MiB" in out and a[:12] in out and "alpha" in out
    assert "images in use by jobs stay" in out
    assert len(ImageCache(settings).entries()) == 2  # a dry run removes nothing
    with pytest.raises(UserError, match="confirm with --yes"):  # a script that did not say so
        run(settings, "cache", "prune", "--to", "1MiB")
    assert "will remove 1 image file(s), 1.0 MiB" in capsys.readouterr().out
    assert len(ImageCache(settings).entries()) == 2
    with pytest.raises(RequestError, match="'20' has no unit"):
        run(settings, "cache", "prune", "--to", "20")
    assert run(settings, "cache", "prune", "--to", "1MiB", "--yes") == 1  # still above target
    out = capsys.readouterr().out
    assert "will remove 1 image file(s), 1.0 MiB" in out
    assert "removed 1 image file(s), freed 1.0 MiB" in out and "in use were kept" in out
    held.release()
    assert run(settings, "cache", "prune", "--to", "0B", "--yes") == 0
    assert ImageCache(settings).entries() == []


def test_cache_verify_exit_code_on_corruption(
    repo: Repo, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    sha = repo.publish("alpha", random_bytes(MIB, 8))["sha256"]
    acquire_image(settings, "alpha", job_id="1.0").release()
    blob = ImageCache(settings).blob_path(sha)
    os.chmod(blob, 0o644)
    blob.write_bytes(b"changed")
    assert run(settings, "cache", "verify", "--keep-bad") == 1
    assert f"BAD  {sha}" in capsys.readouterr().out
    assert blob.exists()


def test_catalogue_build(
    tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", str(root / "el9.qcow2"), "16M")
    out = tmp_path / "out.json"
    assert run(settings, "catalogue", "build", str(root), "-o", str(out), "--guest-user", "g") == 0
    assert f"wrote {out}: 1 image(s)" in capsys.readouterr().out
    (entry,) = json.loads(out.read_text())["images"]
    assert (entry["name"], entry["format"], entry["guest_user"]) == ("el9", "qcow2", "g")
