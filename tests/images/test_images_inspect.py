"""Hostile and unsupported images are refused before anything opens them read-write."""

from __future__ import annotations

import hashlib
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from glite_vm.config import Settings
from glite_vm.errors import Disposition, HypervisorError, ImageRefusedError
from glite_vm.images.acquire import acquire_image
from glite_vm.images.inspect import Limits, inspect_image
from glite_vm.units import GIB, MIB, TIB
from tests.images.images_helpers import Repo, qemu_img, random_bytes
from tests.images.images_http import LoopbackServer

LIMITS = Limits(max_virtual_bytes=64 * GIB, max_file_bytes=32 * GIB)


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    return tmp_path / "canary.bin"


def backing_file_image(tmp_path: Path) -> Path:
    # -u: qemu-img does not open the backing file; nothing ever reads /etc/shadow.
    path = tmp_path / "backing.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", str(path), "1M")
    return path


def data_file_image(tmp_path: Path, canary: Path) -> tuple[Path, str]:
    """A qcow2 whose external data file is a canary this test owns; returns its digest."""
    path = tmp_path / "datafile.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={canary}", str(path), "1M")
    # qemu-img create truncated the canary; give it content whose digest we can watch.
    canary.write_bytes(random_bytes(MIB, 99))
    return path, hashlib.sha256(canary.read_bytes()).hexdigest()


def huge_image(tmp_path: Path) -> Path:
    path = tmp_path / "huge.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "100T")
    return path


def test_plain_qcow2_and_raw_pass_and_formats_are_pinned(tmp_path: Path) -> None:
    q = tmp_path / "ok.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "64M")
    info = inspect_image(q, source="ok", limits=LIMITS)
    assert (info.format, info.virtual_size) == ("qcow2", 64 * MIB)
    r = tmp_path / "ok.raw"
    r.write_bytes(random_bytes(MIB, 1))
    info = inspect_image(r, source="ok", limits=LIMITS)
    assert (info.format, info.virtual_size, info.file_size) == ("raw", MIB, MIB)


def test_backing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageRefusedError, match="backing file") as info:
        inspect_image(backing_file_image(tmp_path), source="evil", limits=LIMITS)
    assert info.value.disposition is Disposition.HOLD


def test_external_data_file_is_refused_and_the_target_is_untouched(
    tmp_path: Path, canary: Path
) -> None:
    image, digest = data_file_image(tmp_path, canary)
    with pytest.raises(ImageRefusedError, match="external data file"):
        inspect_image(image, source="evil", limits=LIMITS)
    assert hashlib.sha256(canary.read_bytes()).hexdigest() == digest


def test_data_file_is_refused_from_the_header_before_qemu_img_runs(
    tmp_path: Path, canary: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, digest = data_file_image(tmp_path, canary)
    backing = backing_file_image(tmp_path)
    good = tmp_path / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(good), "1M")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no qemu-img to be found
    with pytest.raises(ImageRefusedError, match="external data file"):
        inspect_image(image, source="evil", limits=LIMITS)
    with pytest.raises(ImageRefusedError, match="backing file"):
        inspect_image(backing, source="evil", limits=LIMITS)
    # A harmless image does need qemu-img's opinion: without it the host is at fault.
    with pytest.raises(HypervisorError) as info:
        inspect_image(good, source="good", limits=LIMITS)
    assert info.value.disposition is Disposition.REQUEUE
    assert hashlib.sha256(canary.read_bytes()).hexdigest() == digest


def test_huge_virtual_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageRefusedError, match=r"virtual size 100\.0 TiB exceeds"):
        inspect_image(huge_image(tmp_path), source="huge", limits=LIMITS)
    assert (
        inspect_image(
            huge_image(tmp_path), source="huge", limits=Limits(200 * TIB, GIB)
        ).virtual_size
        == 100 * TIB
    )


def test_other_formats_are_refused_by_name(tmp_path: Path) -> None:
    vmdk = tmp_path / "disk.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "1M")
    with pytest.raises(ImageRefusedError, match="format vmdk is not supported"):
        inspect_image(vmdk, source="disk.vmdk", limits=LIMITS)
    vdi = tmp_path / "disk.vdi"
    qemu_img("create", "-q", "-f", "vdi", str(vdi), "1M")
    with pytest.raises(ImageRefusedError, match="format vdi"):
        inspect_image(vdi, source="disk.vdi", limits=LIMITS)


def test_encrypted_and_malformed_qcow2_are_refused(tmp_path: Path) -> None:
    # A LUKS-encrypted qcow2 from qemu-img needs a PBKDF benchmark that fails at random on a
    # busy 2-core machine ("Unable to get accurate CPU usage"), so set crypt_method (offset 32)
    # in a plain image's header: 2 is what qemu-img writes for encrypt.format=luks.
    enc = tmp_path / "enc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(enc), "1M")
    header = bytearray(enc.read_bytes())
    header[32:36] = (2).to_bytes(4, "big")
    enc.write_bytes(bytes(header))
    with pytest.raises(ImageRefusedError, match="encrypted"):
        inspect_image(enc, source="enc", limits=LIMITS)
    whole = tmp_path / "whole.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(whole), "1M")
    broken = tmp_path / "broken.qcow2"
    data = bytearray(whole.read_bytes())
    data[20:24] = (99).to_bytes(4, "big")  # cluster_bits: nonsense only QEMU's parser checks
    broken.write_bytes(bytes(data))
    with pytest.raises(ImageRefusedError, match="qemu-img cannot read it as qcow2"):
        inspect_image(broken, source="broken", limits=LIMITS)


def filled_image(tmp_path: Path) -> Path:
    """A qcow2 with 8 MiB of data in it (so that cutting it loses clusters)."""
    raw = tmp_path / "data.raw"
    raw.write_bytes(random_bytes(8 * MIB, 7))
    path = tmp_path / "filled.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path))
    return path


def leaky_image(tmp_path: Path) -> Path:
    """A qcow2 with one leaked cluster (counted, used by nothing): wasteful, harmless."""
    path = tmp_path / "leaky.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(path), "1M")
    data = bytearray(path.read_bytes())
    cluster = 1 << struct.unpack_from(">I", data, 20)[0]
    (refcount_table,) = struct.unpack_from(">Q", data, 48)
    (refcount_block,) = struct.unpack_from(">Q", data, refcount_table)
    end = -(-len(data) // cluster)
    data = bytearray(data.ljust((end + 1) * cluster, b"\0"))
    struct.pack_into(">H", data, refcount_block + 2 * end, 1)  # 16-bit refcounts (v3 default)
    path.write_bytes(bytes(data))
    return path


def test_a_truncated_qcow2_is_refused_as_damaged(tmp_path: Path) -> None:
    whole = filled_image(tmp_path)
    assert inspect_image(whole, source="whole", limits=LIMITS).format == "qcow2"
    cut = tmp_path / "cut.qcow2"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ImageRefusedError) as info:
        inspect_image(cut, source="cut.qcow2", limits=LIMITS)
    assert info.value.disposition is Disposition.HOLD
    message = str(info.value)
    assert message.startswith("image cut.qcow2 refused: it is damaged (truncated or corrupt): ")
    assert "qemu-img check found" in message and "corruptions (first: ERROR" in message
    assert "upload it again" in message
    assert len(message) < 600  # one complaint quoted, not one per lost cluster


def test_a_qcow2_with_leaked_clusters_is_accepted(tmp_path: Path) -> None:
    leaky = leaky_image(tmp_path)
    check = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(leaky)], capture_output=True, check=False
    )
    assert check.returncode == 3, check.stdout  # qemu-img's "leaks, no corruption"
    assert inspect_image(leaky, source="leaky", limits=LIMITS).virtual_size == MIB


def test_declared_format_must_match_the_file(tmp_path: Path) -> None:
    q = tmp_path / "ok.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(q), "1M")
    with pytest.raises(ImageRefusedError, match="catalogue says format raw but the file is qcow2"):
        inspect_image(q, source="ok", limits=LIMITS, declared_format="raw")


def test_file_size_cap(tmp_path: Path) -> None:
    r = tmp_path / "r.raw"
    r.write_bytes(random_bytes(2 * MIB, 3))
    with pytest.raises(ImageRefusedError, match=r"file size 2\.0 MiB exceeds"):
        inspect_image(r, source="r", limits=Limits(GIB, MIB))


# --- the same checks on the acquire path -------------------------------------------------------


@pytest.mark.parametrize("kind", ["backing", "data_file", "huge", "truncated"])
def test_hostile_custom_images_from_a_job_are_refused_and_not_cached(
    kind: str,
    tmp_path: Path,
    canary: Path,
    server: LoopbackServer,
    settings_for: Callable[..., Settings],
) -> None:
    settings = settings_for(custom_image_sources=(server.url("custom/"),))
    digest = None
    if kind == "backing":
        image = backing_file_image(tmp_path)
    elif kind == "data_file":
        image, digest = data_file_image(tmp_path, canary)
    elif kind == "huge":
        image = huge_image(tmp_path)
    else:
        image = tmp_path / "truncated.qcow2"
        data = filled_image(tmp_path).read_bytes()
        image.write_bytes(data[: len(data) // 2])
    server.put(f"custom/{kind}.qcow2", image.read_bytes())
    with pytest.raises(ImageRefusedError) as info:
        acquire_image(settings, server.url(f"custom/{kind}.qcow2"), job_id="1.0")
    assert info.value.disposition is Disposition.HOLD
    cache = settings.effective_cache_dir
    assert list((cache / "blobs").iterdir()) == []
    assert list((cache / "partial").iterdir()) == []
    if digest is not None:
        assert hashlib.sha256(canary.read_bytes()).hexdigest() == digest


def test_hostile_local_path_is_refused_for_the_interactive_user_too(
    tmp_path: Path, canary: Path, settings: Settings
) -> None:
    image, digest = data_file_image(tmp_path, canary)
    with pytest.raises(ImageRefusedError, match="external data file"):
        acquire_image(settings, str(image), job_id="cli", allow_local=True)
    assert hashlib.sha256(canary.read_bytes()).hexdigest() == digest


def test_catalogue_image_with_a_backing_file_is_refused(
    tmp_path: Path, repo: Repo, settings: Settings
) -> None:
    repo.publish("evil", backing_file_image(tmp_path).read_bytes(), fmt="qcow2")
    with pytest.raises(ImageRefusedError, match="backing file"):
        acquire_image(settings, "evil", job_id="1.0")


def test_file_too_large_is_refused_before_writing(
    server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(custom_image_sources=(server.url("custom/"),), max_image_file_bytes=MIB)
    server.put("custom/big.img", random_bytes(2 * MIB, 5))
    with pytest.raises(ImageRefusedError, match=r"file size 2\.0 MiB exceeds"):
        acquire_image(settings, server.url("custom/big.img"), job_id="1.0")
    assert list((settings.effective_cache_dir / "partial").iterdir()) == []
