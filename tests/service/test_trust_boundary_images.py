"""A custom image is its author's guest: what glite-vm puts into it, attacked for real.

A job may name a custom image from a source the site allows (``GLITE_VM_CUSTOM_IMAGE_SOURCES``);
whoever made that image is root in its guest, whatever the job's ``GliteVmRoot`` and the
slot say. Real root service, a real disk-boot guest altered the way an image author would,
the local user ``gvm-alice``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.identity.ca_files import init_ca
from tests.service.conftest import check_nothing_left, new_state_dir, service_env
from tests.service.svc_support import (
    Account,
    ServiceProcess,
    call,
    job_ad,
    make_scratch,
    ok,
    prepare,
    stdout_of,
)
from tests.support import guest_catalogue

pytestmark = pytest.mark.vm

# The test disk guest's /sbin/init with one line more, as a hostile image's author would add:
# as root, copy the host key glite-vm installs to where the job's unprivileged user reads it.
HOSTILE_INIT = """#!/bin/sh
. /etc/glite-guest/common.sh
mount -o remount,rw / 2>/dev/null
mount_basics
chmod 1777 /tmp /var/tmp
( while :; do
    if [ -r /etc/grid-security/hostkey.pem ]; then
        cat /etc/grid-security/hostkey.pem > /tmp/stolen-key; chmod 644 /tmp/stolen-key
    fi
    sleep 1
  done ) &
say "disk-boot guest root file system up, kernel $(uname -r)"
start_services
pid1_loop
"""


def hostile_disk_image(src: Path, dest: Path, init: str) -> Path:
    """``src`` (the test disk guest) with ``init`` as its root file system's /sbin/init,
    written into its ext4 partition with debugfs (nothing is mounted); ``dest`` (qcow2)."""
    work = dest.parent / "hostile-work"
    work.mkdir()
    raw = work / "disk.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(src), str(raw)],
        check=True,
        timeout=120,
    )
    table = json.loads(
        subprocess.run(
            ["sfdisk", "-J", str(raw)], check=True, capture_output=True, text=True, timeout=30
        ).stdout
    )
    root = table["partitiontable"]["partitions"][1]["start"] * 512
    (work / "init").write_text(init)
    (work / "init").chmod(0o755)
    commands = work / "commands"
    commands.write_text(
        f"rm /sbin/init\nwrite {work / 'init'} /sbin/init\nsif /sbin/init mode 0100755\n"
    )
    subprocess.run(
        ["debugfs", "-w", "-f", str(commands), f"{raw}?offset={root}"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(dest)],
        check=True,
        timeout=120,
    )
    shutil.rmtree(work)
    dest.chmod(0o644)
    return dest


class Site:
    def __init__(self, svc: ServiceProcess, root: Path, custom: Path) -> None:
        self.svc = svc
        self.root = root
        self.custom = custom


@pytest.fixture(scope="module")
def site(svc_root: Path, guest_dir: Path, hypervisor_probe: Path) -> Iterator[Site]:
    root = svc_root / "images"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)
    catalogue = guest_catalogue(guest_dir, root / "repo", disk="test-disk")
    custom = root / "custom"
    custom.mkdir(mode=0o755)
    manifest = json.loads((guest_dir / "guests.json").read_text())
    hostile_disk_image(guest_dir / manifest["disk"]["disk"], custom / "hostile.qcow2", HOSTILE_INIT)
    ca = init_ca(root / "ca", name="glite-vm custom image test CA")
    env = service_env(
        root,
        catalogue,
        {
            "GLITE_VM_SLOTS": "3",
            "GLITE_VM_ROOT_SLOTS": "1",
            "GLITE_VM_SLOT_MEMORY_BYTES": "512MiB",
            "GLITE_VM_SLOT_DISK_BYTES": "2GiB",
            "GLITE_VM_CUSTOM_IMAGE_SOURCES": custom.as_uri() + "/",
            "GLITE_VM_CA_CERT": str(ca.cert_path),
            "GLITE_VM_CA_KEY": str(ca.key_path),
        },
    )
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield Site(svc, root, custom)
    finally:
        check_nothing_left(svc, state)


READ_THE_KEY = "sleep 3; cat /tmp/stolen-key 2>/dev/null; id -u; ls /etc/grid-security"


def test_a_custom_image_gets_no_host_key_unless_its_job_may_be_root(
    site: Site, alice: Account
) -> None:
    """Alice may not run jobs as root; her job names a custom image whose author made its init
    copy the host key to /tmp. Her payload runs unprivileged, as it should, and must still not
    read the key: glite-vm withholds secrets from a guest whose root is not the site's (the
    certificate and the CA are still installed)."""
    scratch = make_scratch(site.root, alice, "hostile-image")
    image = (site.custom / "hostile.qcow2").as_uri()
    vm = prepare(site.svc, alice, scratch, job_ad=job_ad(image))["vm"]
    try:
        ran = ok(call(site.svc, alice, "exec", vm=vm, argv=["sh", "-c", READ_THE_KEY]))
        out = stdout_of(ran)
        assert "1000" in out.split(), f"the payload did not run unprivileged: {out}"
        assert "PRIVATE KEY" not in out, "a custom image's root handed the host key to the job"
        assert "hostcert.pem" in out.split() and "hostkey.pem" not in out.split(), out
    finally:
        ok(call(site.svc, alice, "teardown", vm=vm, failed=False))
