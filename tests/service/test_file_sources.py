"""Custom images from an allowed ``file://`` directory, named by a job, through the real service.

The site allows ``file://<root>/allowed/`` (GLITE_VM_CUSTOM_IMAGE_SOURCES), and alice may write
into a directory there. The root service reads what a job names. The attacks: alice swaps a
symbolic link between the service's check and its open, towards a root-only canary the test
made; bob names alice's private image. Neither may bring a byte the job's owner could not read
into the cache or a guest. A cached custom image is readable by no other local user, and QEMU
still boots from it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import secrets
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import check_nothing_left, new_state_dir, service_env
from tests.service.svc_support import (
    Account,
    ServiceProcess,
    as_user,
    call,
    job_ad,
    make_scratch,
    ok,
    read_as,
    stdout_of,
)

pytestmark = pytest.mark.vm

RACE_ATTEMPTS = 100  # prepare calls while the link flips (a second each, 4 s with a VM)
RACE_SECONDS = 240.0
RACE_HITS = 3  # opens that found the canary behind the link: proof the race really happened
FLIPPER = r"""
import os, sys, time
link, first, second, stop = sys.argv[1:5]
deadline = time.monotonic() + float(sys.argv[5])
tmp = link + ".flip"
flips = 0
while time.monotonic() < deadline and not os.path.exists(stop):
    for target in (first, second):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.rename(tmp, link)
        flips += 1
print(flips)
"""


@dataclasses.dataclass(frozen=True)
class Sources:
    allowed: Path  # the directory GLITE_VM_CUSTOM_IMAGE_SOURCES names
    alices: Path  # alice's own directory inside it
    canary: Path  # root-only (0600), a valid raw disk image holding the secret
    secret: bytes
    root: Path

    @property
    def env(self) -> dict[str, str]:
        return {"GLITE_VM_CUSTOM_IMAGE_SOURCES": self.allowed.as_uri() + "/"}

    def url(self, name: str) -> str:
        return (self.alices / name).as_uri()


@pytest.fixture(scope="module")
def sources(svc_root: Path, alice: Account) -> Sources:
    root = svc_root / "file-sources"
    root.mkdir(mode=0o711)
    allowed = root / "allowed"
    allowed.mkdir(mode=0o755)
    alices = allowed / "alice"
    alices.mkdir(mode=0o755)
    os.chown(alices, alice.uid, alice.gid)
    canaries = root / "canary"
    canaries.mkdir(mode=0o711)
    secret = f"CANARY-{secrets.token_hex(16)}".encode()
    canary = canaries / "root-only.img"
    canary.write_bytes((secret + b"\n").ljust(64 * 1024, b"\0"))
    canary.chmod(0o600)
    return Sources(allowed, alices, canary, secret, root)


def alices_file(sources: Sources, alice: Account, name: str, data: bytes, mode: int) -> Path:
    path = sources.alices / name
    path.write_bytes(data)
    os.chown(path, alice.uid, alice.gid)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def own_service(
    root: Path, catalogue: Path, probe: Path, extra: dict[str, str]
) -> Iterator[tuple[ServiceProcess, Path]]:
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", probe)
    env = service_env(root, catalogue, extra)
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield svc, state
    finally:
        check_nothing_left(svc, state)


def files_holding(state: Path, secret: bytes) -> list[str]:
    """Files of the service's state (cache, VM directories) whose bytes contain ``secret``."""
    found = []
    for path in sorted(state.rglob("*")):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink() and secret in path.read_bytes():
                found.append(str(path.relative_to(state)))
    return found


def base_digests(state: Path) -> set[str]:
    """The image digests the VMs of this service were made from (their records)."""
    digests = set()
    for record in (state / "snapshots").glob("*/record.json"):
        digests.add(json.loads(record.read_text())["image_sha256"])
    return digests


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def outcome(answer: dict[str, Any]) -> str:
    """What happened to one prepare call during the race."""
    if answer["ok"]:
        return "booted"
    message = str(answer.get("message", ""))
    if answer["type"] == "ImageRefusedError" and "allowed source" in message:
        return "refused by the check"  # the check itself saw the canary
    if answer["type"] == "ImageRefusedError" and "may not read" in message:
        return "refused at the open"  # the open found the canary behind the link
    if answer["type"] in ("BootError", "ImageBootError"):
        return "started"  # alice's image was opened and a VM started from it (it has no
        # boot loader: the firmware says so at once, or the boot times out)
    raise AssertionError(f"unexpected answer during the race: {answer}")


@pytest.fixture(scope="module")
def race_service(
    sources: Sources, svc_root: Path, catalogue: Path, hypervisor_probe: Path
) -> Iterator[tuple[ServiceProcess, Path]]:
    """A service allowing the file sources, with a short boot timeout: the images of these
    tests do not boot, each VM fails after 3 s, and the question is only which file the cache
    took in."""
    extra = {**sources.env, "GLITE_VM_BOOT_TIMEOUT": "3"}
    with own_service(svc_root / "race", catalogue, hypervisor_probe, extra) as running:
        yield running


def test_a_job_cannot_use_an_image_its_owner_may_not_read(
    race_service: tuple[ServiceProcess, Path],
    sources: Sources,
    svc_root: Path,
    alice: Account,
    bob: Account,
) -> None:
    """Bob names alice's private image in the allowed directory: the service reads it with
    bob's rights, so it is refused, and nothing of it reaches the cache."""
    svc, state = race_service
    alices_file(sources, alice, "private.img", b"alice only\n".ljust(65536, b"\0"), 0o600)
    bobs = make_scratch(svc_root / "race", bob, "bob-names-alices")
    ad = job_ad(sources.url("private.img"))
    answer = call(svc, bob, "prepare", job_ad=ad, scratch_dir=str(bobs))
    assert not answer["ok"], "bob's job got alice's private image"
    assert answer["type"] == "ImageRefusedError" and answer["disposition"] == "hold", answer
    assert "may not read" in answer["message"] and f"uid {bob.uid}" in answer["message"]
    assert files_holding(state, b"alice only") == []
    assert not base_digests(state)


def test_a_link_swapped_after_the_check_never_brings_a_root_only_file_in(
    race_service: tuple[ServiceProcess, Path],
    sources: Sources,
    svc_root: Path,
    alice: Account,
    bob: Account,
) -> None:
    """The check and the open are one: a race between them finds only what alice may read."""
    svc, state = race_service
    before = sources.canary.read_bytes()
    canary_digest = sha256_of(sources.canary)
    mine = alices_file(sources, alice, "mine.img", b"alice's own\n".ljust(65536, b"\0"), 0o600)
    link = sources.alices / "current.img"
    stop = sources.root / "stop-flipping"
    # Both targets relative and short: ext4 keeps them inside the inode, so neither state of
    # the link lasts longer than the other (a long target costs a block, and time).
    canary_target = os.path.relpath(sources.canary, sources.alices)
    argv = [str(link), mine.name, canary_target, str(stop), str(RACE_SECONDS + 60)]
    flipper = subprocess.Popen(
        [*as_user(alice), sys.executable, "-c", FLIPPER, *argv],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    seen: collections.Counter[str] = collections.Counter()
    deadline = time.monotonic() + RACE_SECONDS
    try:
        for attempt in range(RACE_ATTEMPTS):
            if time.monotonic() > deadline:
                break
            if seen["refused at the open"] >= RACE_HITS and seen["started"] >= 1:
                break
            scratch = make_scratch(svc_root / "race", alice, f"race-{attempt}")
            ad = job_ad(sources.url(link.name))
            answer = call(svc, alice, "prepare", job_ad=ad, scratch_dir=str(scratch))
            if answer["ok"]:
                ok(call(svc, alice, "teardown", vm=answer["result"]["vm"], failed=False))
            seen[outcome(answer)] += 1
            leaked = files_holding(state, sources.secret)
            assert not leaked, (
                f"attempt {attempt}: the root-only canary's bytes landed in {leaked} "
                f"(outcomes so far: {dict(seen)})"
            )
            assert canary_digest not in base_digests(state), "a VM was made from the canary"
    finally:
        stop.touch()
        flips, _ = flipper.communicate(timeout=60)
    assert int(flips) > 1000, f"the link hardly flipped: {flips}"
    assert seen["refused at the open"] >= RACE_HITS, f"the race hardly hit: {dict(seen)}"
    assert seen["started"] >= 1, dict(seen)
    assert sources.canary.read_bytes() == before
    assert base_digests(state) == {sha256_of(mine)}
    blobs = [p for p in (state / "cache" / "blobs").iterdir() if p.suffix != ".json"]
    assert blobs
    for blob in blobs:
        assert read_as(bob, blob).get("errno") == errno.EACCES, f"bob reads {blob}"


@pytest.fixture(scope="module")
def bootable(sources: Sources, guest_dir: Path, guests: dict[str, Any], alice: Account) -> Path:
    """The disk-boot test guest as alice's own image (0600) in the allowed directory."""
    disk = (guest_dir / guests["disk"]["disk"]).read_bytes()
    return alices_file(sources, alice, "bootable.qcow2", disk, 0o600)


@pytest.fixture(scope="module")
def boot_service(
    sources: Sources, svc_root: Path, catalogue: Path, hypervisor_probe: Path
) -> Iterator[tuple[ServiceProcess, Path]]:
    with own_service(svc_root / "boot", catalogue, hypervisor_probe, sources.env) as running:
        yield running


def test_a_custom_file_image_boots_and_stays_private_in_the_cache(
    boot_service: tuple[ServiceProcess, Path],
    bootable: Path,
    svc_root: Path,
    alice: Account,
    bob: Account,
) -> None:
    """QEMU under qemu:///system boots from the cached copy; no other local user can read it."""
    svc, state = boot_service
    scratch = make_scratch(svc_root / "boot", alice, "custom")
    ad = job_ad(bootable.as_uri())
    prepared = ok(call(svc, alice, "prepare", job_ad=ad, scratch_dir=str(scratch)))
    vm = prepared["vm"]
    try:
        ran = ok(call(svc, alice, "exec", vm=vm, argv=["sh", "-c", "id -un"]))
        assert stdout_of(ran).strip() == prepared["guest_user"]
    finally:
        ok(call(svc, alice, "teardown", vm=vm, failed=False))
    digest = prepared["ad_attributes"]["GliteVmImageDigest"]
    assert digest == sha256_of(bootable)
    blob = state / "cache" / "blobs" / digest
    st = blob.stat()
    assert stat.S_IMODE(st.st_mode) & 0o007 == 0, oct(st.st_mode)  # nothing for others
    assert stat.S_IMODE(st.st_mode) & 0o222 == 0, oct(st.st_mode)  # and read-only
    assert st.st_uid == 0
    for who in (bob, alice):  # alice has her own copy; the cache's is nobody else's business
        answer = read_as(who, blob)
        assert answer.get("errno") == errno.EACCES, (who.name, answer)
