"""Warm start and ``/etc/machine-id``: every VM restored from one template gets a machine id of
its own, and a guest whose machine id is not a plain file of its own is left alone.

The direct test guest has no ``/etc/machine-id``; this module's image is that guest with one
(a cpio archive with the file, appended to its initramfs, which the kernel unpacks over the
first). One template of it serves the whole module.
"""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.images.cache import ImageCache
from glite_vm.images.templates import TemplateStore
from glite_vm.request import JobRequest
from glite_vm.service.api import PrepareResult
from glite_vm.service.local import LocalService
from glite_vm.slots import SlotFacts
from glite_vm.vm.agent import GuestAgent
from glite_vm.vm.warm import refresh_clone
from tests.service.warm_support import wait_for_builds, warm_local_service
from tests.support import GuestVariant, guest_catalogue

pytestmark = pytest.mark.vm
IMAGE = "test-machine-id"
TEMPLATE_ID = secrets.token_hex(16)  # the image's (so the template's) machine id
BUILD_WAIT = 300.0  # seconds a background template build may take on a loaded host
MACHINE_ID = re.compile(r"^[0-9a-f]{32}\n$")


def initrd_with_machine_id(initrd: Path, dest: Path, machine_id: str) -> Path:
    """``initrd`` with ``/etc/machine-id`` added: a newc cpio archive appended to it."""
    work = dest.parent / f"{dest.name}.d"
    (work / "etc").mkdir(parents=True)
    (work / "etc" / "machine-id").write_text(machine_id + "\n")
    (work / "etc" / "machine-id").chmod(0o444)
    packed = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],
        input=b"etc/machine-id\n",
        cwd=work,
        capture_output=True,
        timeout=60,
        check=True,
    )
    first = initrd.read_bytes()
    # the kernel takes an archive after the first only at a 4-byte boundary (zeros between
    # archives are skipped)
    dest.write_bytes(first + b"\0" * (-len(first) % 512) + packed.stdout)
    return dest


@pytest.fixture(scope="module")
def warm(
    svc_root: Path, guest_dir: Path, guests: dict[str, Any], hypervisor_probe: Path
) -> Iterator[LocalService]:
    """A service whose one template of :data:`IMAGE` is made by a first, cold, job."""
    root = svc_root / "warm-machine-id"
    root.mkdir(mode=0o711)
    initrd = initrd_with_machine_id(
        guest_dir / guests["direct"]["initrd"], root / "initrd.img", TEMPLATE_ID
    )
    catalogue = guest_catalogue(
        guest_dir, root / "repo", variants={IMAGE: GuestVariant(initrd=initrd)}
    )
    with warm_local_service(
        root / "state", catalogue, hypervisor_probe, warm_images=(IMAGE,)
    ) as service:
        first = prepare(service, root, 0)
        try:
            assert first.ad_attributes["GliteVmWarmStart"] is False
            # the image's machine id, which its template's guest booted with
            assert machine_id(service, first.vm) == TEMPLATE_ID + "\n"
        finally:
            service.teardown(first.vm, failed=False)
        wait_for_builds()
        assert len(TemplateStore(ImageCache(service.settings)).entries()) == 1
        yield service


def prepare(service: LocalService, root: Path, n: int) -> PrepareResult:
    scratch = root / f"job{n}"
    scratch.mkdir()
    job = JobRequest.create(
        service.settings, image=IMAGE, job_id=f"78.{n}", owner="root", keep_snapshot="never"
    )
    return service.prepare(
        job, scratch_dir=str(scratch), starter_pid=None, slot=SlotFacts(name=f"slot1_{n}")
    )


def as_root(service: LocalService, vm: str, script: str) -> str:
    """``script`` run by root in the guest (through its agent); its stdout."""
    agent = GuestAgent(service.host.conn.lookupByName(vm))
    st = agent.run(["/bin/sh", "-c", script], timeout=60)
    assert (st.exitcode, st.signal) == (0, None), st.stderr
    return st.stdout.decode()


def machine_id(service: LocalService, vm: str) -> str:
    return as_root(service, vm, "cat /etc/machine-id")


def test_warm_started_vms_get_machine_ids_of_their_own(warm: LocalService, svc_root: Path) -> None:
    root = svc_root / "warm-machine-id"
    seen = []
    for n in (1, 2):
        prepared = prepare(warm, root, n)
        try:
            assert prepared.ad_attributes["GliteVmWarmStart"] is True
            seen.append(machine_id(warm, prepared.vm))
            # renewed by a rename: no temporary file left in /etc; readable by everyone
            listing = as_root(warm, prepared.vm, "ls -a /etc; stat -c %a /etc/machine-id")
            assert "machine-id.glite-vm" not in listing
            assert int(listing.split()[-1], 8) & 0o044 == 0o044, listing.split()[-1]
        finally:
            warm.teardown(prepared.vm, failed=False)
    for found in seen:
        assert MACHINE_ID.match(found), found
        assert found != TEMPLATE_ID + "\n"
    assert seen[0] != seen[1]


def test_a_machine_id_that_is_a_link_or_empty_is_left_alone(
    warm: LocalService, svc_root: Path
) -> None:
    """The refresh of a restored guest (what every warm start runs), run again in one such
    guest after its machine id was made a link, then an empty file."""
    prepared = prepare(warm, svc_root / "warm-machine-id", 3)
    try:
        assert prepared.ad_attributes["GliteVmWarmStart"] is True
        domain = warm.host.conn.lookupByName(prepared.vm)
        kept = secrets.token_hex(16)
        as_root(
            warm,
            prepared.vm,
            f"echo {kept} > /run/kept-id && rm /etc/machine-id && "
            "ln -s /run/kept-id /etc/machine-id",
        )
        refresh_clone(domain, mac=None)
        after = as_root(warm, prepared.vm, "readlink /etc/machine-id; cat /run/kept-id; ls /etc")
        assert after.split("\n")[:2] == ["/run/kept-id", kept]
        assert "machine-id.glite-vm" not in after

        as_root(warm, prepared.vm, "rm /etc/machine-id && : > /etc/machine-id")
        refresh_clone(domain, mac=None)
        emptied = as_root(warm, prepared.vm, "wc -c < /etc/machine-id; ls -a /etc")
        assert emptied.split()[0] == "0" and "machine-id.glite-vm" not in emptied
    finally:
        warm.teardown(prepared.vm, failed=False)


def test_a_machine_id_mounted_from_run_is_renewed_where_it_lives(
    warm: LocalService, svc_root: Path
) -> None:
    """systemd keeps a machine id it could not commit to /etc (a read-only /etc, or its first
    boot before systemd-machine-id-commit) in /run/machine-id, mounted over /etc/machine-id:
    a file that cannot be renamed over. Such a template's id is renewed in that file too, and
    nothing is left in /etc."""
    prepared = prepare(warm, svc_root / "warm-machine-id", 4)
    try:
        assert prepared.ad_attributes["GliteVmWarmStart"] is True
        domain = warm.host.conn.lookupByName(prepared.vm)
        shared = as_root(
            warm,
            prepared.vm,
            "cp /etc/machine-id /run/machine-id && "
            "mount --bind /run/machine-id /etc/machine-id && cat /etc/machine-id",
        )
        refresh_clone(domain, mac=None)
        after = as_root(warm, prepared.vm, "cat /etc/machine-id /run/machine-id; ls -a /etc")
        renewed, in_run, listing = after.split("\n", 2)
        assert MACHINE_ID.match(renewed + "\n") and renewed + "\n" != shared
        assert in_run == renewed
        assert "machine-id.glite-vm" not in listing
    finally:
        warm.teardown(prepared.vm, failed=False)
