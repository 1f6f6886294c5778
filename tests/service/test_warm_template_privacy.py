"""Warm-start templates against local users, attacked for real: a root service (started with
umask 000, as a careless admin's shell might) makes a template behind alice's first job and
restores her second from it, while alice and bob walk the image cache and the VM directories
the whole time trying to open every file (by name where a directory cannot be listed) and to
plant a symlink (to a canary) in every directory. Afterwards alice, who learns her template's
key from her own boot log, tries to read its memory state, disk layer and boot log, and the
copies in her VM's directory."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.vm.record import SAVED_STATE, TEMPLATE_LAYER
from tests.service.conftest import check_nothing_left, new_state_dir, service_env
from tests.service.svc_support import (
    Account,
    ServiceProcess,
    as_user,
    call,
    make_scratch,
    ok,
    prepare,
    read_as,
    wait_for,
)

pytestmark = pytest.mark.vm
BUILD_WAIT = 240.0

# bob's side: walk the trees, open every file he finds, plant a symlink to the canary in
# every directory he reaches; a JSON report at the end
WALKER = textwrap.dedent(
    """
    import json, os, sys, time
    roots, stop, canary = sys.argv[1].split(":"), sys.argv[2], sys.argv[3]
    limit = time.monotonic() + float(sys.argv[4])
    opened, dirs, planted, held = set(), set(), set(), []
    print("walking", flush=True)
    guesses = ["state.sav", "template-layer.qcow2", "overlay.qcow2", "domain.xml", "boot.log",
               "layer.qcow2", "template.json", "xfer.img", "vmlinuz", "initrd.img"]
    while time.monotonic() < limit and not os.path.exists(stop):
        for top in roots:
            for path, subdirs, files in os.walk(top):
                dirs.add(path)
                # directories that cannot be listed (0711): their files' names are known
                files = files + [os.path.join(d, g) for d in subdirs for g in guesses]
                for f in files:
                    p = os.path.join(path, f)
                    if p in opened:
                        continue
                    try:
                        held.append(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
                        opened.add(p)
                    except OSError:
                        pass
                link = os.path.join(path, "planted-link")
                try:
                    os.symlink(canary, link)
                    planted.add(link)
                except FileExistsError:
                    planted.add(link)
                except OSError:
                    pass
                for held_fd in held[256:]:
                    os.close(held_fd)
                del held[256:]
        time.sleep(0.05)
    print(json.dumps({"opened": sorted(opened), "dirs": sorted(dirs),
                      "planted": sorted(planted)}), flush=True)
    """
)


@pytest.fixture(scope="module")
def careless(svc_root: Path, catalogue: Path, hypervisor_probe: Path) -> Iterator[ServiceProcess]:
    """The service of this module: warm start for every image, started under umask 000."""
    root = svc_root / "template-privacy"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)
    env = service_env(root, catalogue, {"GLITE_VM_WARM_IMAGES": "*"})
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    old = os.umask(0)
    try:
        svc.start()
    finally:
        os.umask(old)
    try:
        yield svc
    finally:
        check_nothing_left(svc, state)


def complete_templates(templates: Path) -> list[Path]:
    return [p for p in templates.glob("*/template.json")] if templates.is_dir() else []


def test_templates_and_their_copies_are_roots_alone_under_any_umask(
    careless: ServiceProcess,
    svc_root: Path,
    alice: Account,
    bob: Account,
    canary: tuple[Path, bytes],
) -> None:
    root = svc_root / "template-privacy"
    state = root / "state"
    cache, snapshots = state / "cache", state / "snapshots"
    canary_path, secret = canary
    canary_digest = hashlib.sha256(canary_path.read_bytes()).hexdigest()
    stop = root / "stop-walking"
    walkers = {
        who.name: subprocess.Popen(
            [
                *as_user(who),
                sys.executable,
                "-c",
                WALKER,
                f"{cache}:{snapshots}",
                str(stop),
                str(canary_path),
                str(BUILD_WAIT + 200),
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        for who in (alice, bob)
    }
    for walker in walkers.values():
        assert walker.stdout is not None
        assert walker.stdout.readline().strip() == "walking"
    vm = None
    try:
        first = prepare(careless, alice, make_scratch(root, alice, "cold"))
        assert first["ad_attributes"]["GliteVmWarmStart"] is False
        ok(call(careless, alice, "teardown", vm=first["vm"], failed=False))
        wait_for(
            "the template built behind the first job",
            lambda: bool(complete_templates(cache / "templates")),
            BUILD_WAIT,
            step=1.0,
        )
        second = prepare(careless, alice, make_scratch(root, alice, "warm"))
        vm = second["vm"]
        assert second["ad_attributes"]["GliteVmWarmStart"] is True
        # alice learns the template's key from her own boot log, and goes for its files
        boot_log = base64_read(alice, second["boot_log_path"])
        key = boot_log.split(b"warm start from template ", 1)[1][:64].decode()
        template = cache / "templates" / key
        assert (template / "template.json").exists()
        for name in ("state.sav", "layer.qcow2", "boot.log", "template.json"):
            for who in (alice, bob):
                assert read_as(who, template / name)["errno"] == 13, (who.name, name)
        vm_dir = Path(second["boot_log_path"]).parent
        for name in (TEMPLATE_LAYER, SAVED_STATE, "overlay.qcow2", "domain.xml"):
            answer = read_as(alice, vm_dir / name)
            assert not answer["ok"] and answer["errno"] in (2, 13), (name, answer)
    finally:
        if vm is not None:
            ok(call(careless, alice, "teardown", vm=vm, failed=False))
        stop.touch()
        outs = {name: w.communicate(timeout=120)[0] for name, w in walkers.items()}
    for name, out in outs.items():
        report = json.loads(out.strip().splitlines()[-1])
        # nothing planted anywhere: no directory of the cache or of VMs let them write (but
        # alice's own torn-down VM's, which is hers by design: docs/service.md)
        planted = [p for p in report["planted"] if f"/glite-vm-{name}-" not in p]
        assert planted == [], (name, planted)
        # the templates never listed, no file of them or of a VM opened (but alice's boot log)
        assert not [d for d in report["dirs"] if "/templates" in d], (name, report["dirs"])
        opened = [p for p in report["opened"] if "/templates/" in p or "/snapshots/" in p]
        if name == alice.name:  # what a VM's owner is given: boot log, then record, snapshot
            given = ("/boot.log", "/record.json", "/snapshot.qcow2")
            opened = [p for p in opened if not p.endswith(given)]
        assert opened == [], (name, opened)
    assert hashlib.sha256(canary_path.read_bytes()).hexdigest() == canary_digest
    assert secret not in careless.log().encode()
    # the modes, as root sees them: umask 000 changed none of them
    (meta,) = complete_templates(cache / "templates")
    template = meta.parent
    expected = {
        cache / "templates": 0o700,
        template: 0o700,
        template / "state.sav": 0o600,
        template / "boot.log": 0o600,
    }
    for path, mode in expected.items():
        st = path.lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode), (path, oct(st.st_mode))
    layer = (template / "layer.qcow2").lstat()
    assert layer.st_uid == 0 and stat.S_IMODE(layer.st_mode) in (0o440, 0o400)
    for path in [cache, *cache.iterdir(), snapshots]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert not mode & 0o022, f"{path} is writable by others: {oct(mode)}"


def base64_read(who: Account, path: str) -> bytes:
    return base64.b64decode(ok(read_as(who, path)))
