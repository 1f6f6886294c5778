"""The trust boundary, attacked for real: a root service, real guests, two real local users.

Each test performs one attack of docs/reliability.md's table ("Trust boundaries") the way a job
or a local user with a shell on the execute host would, and checks what the attacker gets:
nothing. The service runs with a slot layout of 3 slots (``slot3`` root-enabled) of 512 MiB
and 1 GiB disk, a local CA that mints host keys, and a ``qemu-img`` that can be slowed down;
:class:`~tests.service.svc_support.FakeStarter` stands in for condor_starter where a call must
come from inside a job.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.identity.ca_files import init_ca
from tests.service.conftest import new_state_dir, service_env
from tests.service.svc_support import (
    ROOT_SLOT,
    THREE_SLOTS,
    USER_SLOT,
    Account,
    FakeStarter,
    ServiceProcess,
    as_user,
    call,
    domain_running,
    job_ad,
    make_scratch,
    ok,
    prepare,
    read_as,
    stdout_of,
    wait_for,
)
from tests.support import GuestVariant, dash_initrd, guest_catalogue

pytestmark = pytest.mark.vm

SLOT_ENV = THREE_SLOTS.knobs()

# qemu-img in front of the real one: `create` lingers 3 s afterwards while $SHIM/slow exists,
# as on a slow disk, so whatever mode the new overlay has can be seen by others meanwhile.
QEMU_IMG_SHIM = """#!/bin/sh
"{real}" "$@"
status=$?
case " $* " in *" create "*) [ -e "$GLITE_VM_TEST_SHIM/slow" ] && sleep 3 ;; esac
exit $status
"""


class Boundary:
    def __init__(self, svc: ServiceProcess, root: Path, state: Path, starter: Path) -> None:
        self.svc = svc
        self.root = root
        self.state = state
        self.starter_binary = starter
        self.shim = root / "shim"

    def starter(self, slot: tuple[str, int], started_by: Account | None = None) -> FakeStarter:
        return FakeStarter(
            self.starter_binary, self.svc, slot[0], slot_type=slot[1], started_by=started_by
        )


@pytest.fixture(scope="module")
def boundary(
    svc_root: Path, guest_dir: Path, hypervisor_probe: Path, fake_starter: Path, alice: Account
) -> Iterator[Boundary]:
    root = svc_root / "boundary"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)
    manifest = json.loads((guest_dir / "guests.json").read_text())
    dash = dash_initrd(guest_dir / manifest["direct"]["initrd"], root / "dash-initrd.img")
    catalogue = guest_catalogue(
        guest_dir,
        root / "repo",
        direct={"test-direct": ""},
        disk="test-disk",
        variants={"test-dash": GuestVariant(initrd=dash)},
    )
    ca = init_ca(root / "ca", name="glite-vm boundary test CA")
    shim = root / "shim"
    shim.mkdir(mode=0o755)
    real = shutil.which("qemu-img")
    assert real is not None
    (shim / "qemu-img").write_text(QEMU_IMG_SHIM.format(real=real))
    (shim / "qemu-img").chmod(0o755)
    env = service_env(
        root,
        catalogue,
        {
            **SLOT_ENV,
            "PATH": f"{shim}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "GLITE_VM_TEST_SHIM": str(shim),
            "GLITE_VM_CA_CERT": str(ca.cert_path),
            "GLITE_VM_CA_KEY": str(ca.key_path),
        },
    )
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield Boundary(svc, root, state, fake_starter)
    finally:
        from tests.service.conftest import check_nothing_left  # noqa: PLC0415

        check_nothing_left(svc, state)


def teardown_quietly(b: Boundary, who: Account, vm: str) -> None:
    call(b.svc, who, "teardown", vm=vm, failed=False)


# -- 1. root in the guest through the job's environment ----------------------------------------

FAKE_ID = """#!/bin/sh
echo "fake-id-ran-as=$(/bin/busybox id -u)" >> /tmp/glite-owned
exec /bin/busybox id "$@"
"""


def test_the_jobs_environment_never_reaches_a_root_step(boundary: Boundary, alice: Account) -> None:
    """A job sets PATH=.:... and ships an ``id`` and a ``tar``: no root step of glite-vm (work
    directory, copy in, the switch to the guest user, copy out) may run them."""
    scratch = make_scratch(boundary.root, alice, "env-attack", {"id": FAKE_ID, "tar": FAKE_ID})
    for name in ("id", "tar"):
        (scratch / name).chmod(0o755)
    # On a guest whose /bin/sh looks commands up in PATH, as Debian's dash does.
    vm = prepare(boundary.svc, alice, scratch, job_ad=job_ad("test-dash"))["vm"]
    try:
        ok(call(boundary.svc, alice, "push", vm=vm, src_dir=str(scratch)))
        hostile = {"PATH": ".:/usr/bin:/bin", "ENV": "./id", "CDPATH": "/"}
        script = "echo path=$PATH; echo payload-uid=$(/bin/busybox id -u)"
        ran = ok(
            call(boundary.svc, alice, "exec", vm=vm, argv=["/bin/sh", "-c", script], env=hostile)
        )
        # The payload gets exactly its own environment, and runs as the guest user.
        assert stdout_of(ran).splitlines() == ["path=.:/usr/bin:/bin", "payload-uid=1000"]
        ok(call(boundary.svc, alice, "pull", vm=vm, dest_dir=str(scratch / "out")))
        owned = ok(
            call(boundary.svc, alice, "exec", vm=vm, argv=["/bin/sh", "-c", MARKER], env=hostile)
        )
        assert "fake-id-ran-as=0" not in stdout_of(owned), "root ran the job's own id or tar"
    finally:
        teardown_quietly(boundary, alice, vm)


MARKER = "cat /tmp/glite-owned 2>/dev/null; echo end"


# -- 2. a job's files are private from their first byte ---------------------------------------

# Run as another local user: watch the snapshot directory for new VM directories and try to
# open every file in them, as long as the attack runs; print what could be opened.
WATCHER = textwrap.dedent(
    """
    import json, os, sys, time
    root, stop, limit = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
    opened, seen, held = set(), set(), []
    print("watching", flush=True)
    while time.monotonic() < limit and not os.path.exists(stop):
        try:
            names = os.listdir(root)
        except OSError:
            names = []
        for name in names:
            seen.add(name)
            d = os.path.join(root, name)
            try:
                files = os.listdir(d)
            except OSError:
                files = ["overlay.qcow2", "xfer.img", "domain.xml", "boot.log", "record.json",
                         "vmlinuz", "initrd.img", "snapshot.qcow2"]
            for f in files:
                p = os.path.join(d, f)
                if p in opened:
                    continue
                try:
                    held.append(os.open(p, os.O_RDONLY | os.O_NONBLOCK))
                    opened.add(p)
                except OSError:
                    pass
    print(json.dumps({"seen": sorted(seen), "opened": sorted(opened)}), flush=True)
    """
)


def test_a_new_vms_files_are_private_from_their_first_byte(
    boundary: Boundary, alice: Account, bob: Account
) -> None:
    """Bob watches the snapshot directory while alice's VM is created (its overlay creation
    slowed down): he can open none of its files, not even for a moment."""
    snapshots = boundary.state / "snapshots"
    stop = boundary.root / "stop-watching"
    stop.unlink(missing_ok=True)
    watcher = subprocess.Popen(
        [*as_user(bob), sys.executable, "-c", WATCHER, str(snapshots), str(stop), "90"],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert watcher.stdout is not None
    assert watcher.stdout.readline().strip() == "watching"
    (boundary.shim / "slow").touch()
    vm = None
    try:
        vm = prepare(boundary.svc, alice, make_scratch(boundary.root, alice, "private"))["vm"]
        ok(call(boundary.svc, alice, "exec", vm=vm, argv=["true"]))
        time.sleep(1)
    finally:
        (boundary.shim / "slow").unlink(missing_ok=True)
        stop.touch()
        out, _ = watcher.communicate(timeout=60)
        if vm is not None:
            done = ok(call(boundary.svc, alice, "teardown", vm=vm, failed=True))
    report = json.loads(out.strip().splitlines()[-1])
    assert vm is not None
    # The attack ran while the VM was made: bob saw its directory appear...
    assert vm in report["seen"], report
    # ...and could open nothing in it, at any moment.
    assert [p for p in report["opened"] if f"/{vm}/" in p] == []
    # Kept files are alice's alone; bob cannot read them either.
    for kept in (done["snapshot_path"], done["boot_log_path"], done["record_path"]):
        assert read_as(bob, kept)["errno"] == 13, kept
    assert read_as(bob, Path(done["record_path"]).parent / "domain.xml")["errno"] == 13


# -- 3. host private keys never reach a guest's disk -----------------------------------------

KEY_MARKERS = (b"PRIVATE KEY-----",)
GRID = "/etc/grid-security"


def holds_any(path: Path, markers: tuple[bytes, ...]) -> list[bytes]:
    """The markers found anywhere in the file (read in chunks that overlap)."""
    found: set[bytes] = set()
    keep = max(len(m) for m in markers)
    tail = b""
    with path.open("rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            window = tail + block
            found.update(m for m in markers if m in window)
            tail = window[-keep:]
    return sorted(found)


def test_kept_snapshots_and_exports_hold_no_host_key(boundary: Boundary, alice: Account) -> None:
    """A job on a disk-root guest keeps its disk; the minted host key was written in the
    guest and the guest flushed its disk, yet the snapshot and its export hold no key."""
    scratch = make_scratch(boundary.root, alice, "keyleak")
    ad = job_ad("test-disk", GliteVmKeepSnapshot="always")
    prepared = prepare(boundary.svc, alice, scratch, job_ad=ad)
    vm = prepared["vm"]
    try:
        # The key is in place for the guest's services (root reads it; the job cannot)...
        ran = ok(
            call(
                boundary.svc,
                alice,
                "exec",
                vm=vm,
                argv=[
                    "sh",
                    "-c",
                    "ls -lL /etc/grid-security/; cat /etc/grid-security/hostkey.pem; sync",
                ],
            )
        )
        assert "hostkey.pem" in stdout_of(ran)
        assert "Permission denied" in stdout_of(ran, "stderr")
    finally:
        done = ok(call(boundary.svc, alice, "teardown", vm=vm, failed=False))
    snapshot = Path(done["snapshot_path"])
    # The setup reached the disk (a key written there would have too), the key did not.
    assert holds_any(snapshot, (b"BEGIN CERTIFICATE",)), "the guest's writes are not on disk"
    assert holds_any(snapshot, KEY_MARKERS) == [], "the host key is in the kept snapshot"
    export = scratch / "export.qcow2"
    cli = subprocess.run(
        [*as_user(alice), sys.executable, "-m", "glite_vm", "snapshots", "export", vm, str(export)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        env=boundary.svc.env,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    flat = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(export), str(scratch / "export.raw")],
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert flat.returncode == 0, flat.stderr
    assert holds_any(scratch / "export.raw", (b"BEGIN CERTIFICATE",))
    assert holds_any(scratch / "export.raw", KEY_MARKERS) == [], "the host key is in the export"
    (scratch / "export.raw").unlink()


# -- 4. slot facts come from the service, never from the caller --------------------------------

# The slot alice would like to be in, sent as slot facts only root may state.
FAKE_ROOT_SLOT = {
    "name": "slot3",
    "root_enabled": True,
    "cpus": 64,
    "memory_mib": 262144,
    "disk_kib": 1 << 31,
}


def vm_memory_mib(vm: str) -> int:
    xml = subprocess.run(
        ["virsh", "-c", "qemu:///system", "dumpxml", vm],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    import xml.etree.ElementTree as ET  # noqa: PLC0415

    memory = ET.fromstring(xml).find("memory")  # noqa: S314 - libvirt's own output
    assert memory is not None and memory.get("unit") == "KiB"
    return int(memory.text or 0) // 1024


def refused(answer: dict[str, Any], who: Account, b: Boundary) -> dict[str, Any]:
    """The answer must be an error; a VM made by mistake is torn down first."""
    if answer.get("ok"):
        teardown_quietly(b, who, answer["result"]["vm"])
        pytest.fail(f"the service made a VM it should have refused: {answer['result']['vm']}")
    return answer


def test_a_caller_cannot_claim_a_root_slot_a_size_or_a_starter(
    boundary: Boundary, alice: Account
) -> None:
    """Outside any job alice claims a root-enabled slot of 64 CPUs in slot facts she wrote, or
    sends a request for 64 CPUs past her client's checks: no root, no size beyond one slot, and
    no pinning her VM's life to someone else's process."""
    scratch = make_scratch(boundary.root, alice, "claims")
    svc = boundary.svc
    root = refused(
        call(
            svc,
            alice,
            "prepare",
            job_ad=job_ad(GliteVmRoot=True),
            slot=FAKE_ROOT_SLOT,
            scratch_dir=str(scratch),
        ),
        alice,
        boundary,
    )
    assert (root["type"], root["disposition"]) == ("RootNotPermittedError", "hold"), root
    big = refused(
        call(
            svc,
            alice,
            "prepare",
            job_ad=job_ad(RequestMemory=4096),
            slot=FAKE_ROOT_SLOT,
            scratch_dir=str(scratch),
        ),
        alice,
        boundary,
    )
    assert (big["type"], big["disposition"]) == ("RequestError", "hold"), big
    assert "4096 MiB" in big["message"] and "512 MiB" in big["message"], big["message"]
    pinned = refused(
        call(svc, alice, "prepare", job_ad=job_ad(), scratch_dir=str(scratch), starter_pid=1),
        alice,
        boundary,
    )
    assert pinned["type"] == "RequestError" and "starter_pid" in pinned["message"], pinned
    # A request she wrote herself is checked again by the service, whatever her client did.
    raw = {
        "image": "test-direct",
        "job_id": "9.0",
        "owner": "root",
        "cpus": 64,
        "root": True,
    }
    forged = refused(
        call(svc, alice, "prepare", request=raw, scratch_dir=str(scratch), slot=FAKE_ROOT_SLOT),
        alice,
        boundary,
    )
    assert forged["disposition"] == "hold", forged
    unknown = refused(
        call(svc, alice, "prepare", request={**raw, "cpus": 1, "extra": 1}, scratch_dir="/"),
        alice,
        boundary,
    )
    assert "unknown fields extra" in unknown["message"], unknown
    # Her slot facts change nothing about the VM she may have: one slot's size, her name.
    vm = prepare(svc, alice, scratch, slot=FAKE_ROOT_SLOT)
    try:
        assert vm_memory_mib(vm["vm"]) == 512
        assert not vm["ad_attributes"]["GliteVmGuestHostname"].split(".")[0].endswith("slot3")
    finally:
        teardown_quietly(boundary, alice, vm["vm"])


def test_the_starters_slot_decides_root_size_and_name(
    boundary: Boundary, alice: Account, bob: Account
) -> None:
    """Calls from inside a job (children of condor_starter) get the slot the starter runs:
    root only on the root-enabled slot, whatever slot facts the caller sends."""
    root_starter = boundary.starter(ROOT_SLOT)
    user_starter = boundary.starter(USER_SLOT)
    own_starter = boundary.starter(ROOT_SLOT, started_by=alice)
    scratch = make_scratch(boundary.root, alice, "starters")
    root_ad = job_ad(GliteVmRoot=True)
    try:
        # alice's own "condor_starter" claiming slot3 is not HTCondor's: no root.
        fake = refused(
            own_starter.call(alice, "prepare", job_ad=root_ad, scratch_dir=str(scratch)),
            alice,
            boundary,
        )
        assert fake["type"] == "RootNotPermittedError", fake
        # HTCondor's starter of a user slot: no root, whatever slot facts she sends.
        user = refused(
            user_starter.call(
                alice,
                "prepare",
                job_ad=root_ad,
                slot=FAKE_ROOT_SLOT,
                scratch_dir=str(scratch),
            ),
            alice,
            boundary,
        )
        assert user["type"] == "RootNotPermittedError", user
        assert "slot1" in user["message"], user["message"]
        # HTCondor's starter of the root-enabled slot: root, one slot's size, its name.
        prepared = ok(
            root_starter.call(
                alice,
                "prepare",
                job_ad=root_ad,
                slot={"name": "slot2"},
                scratch_dir=str(scratch),
            )
        )
        vm = prepared["vm"]
        assert prepared["ad_attributes"]["GliteVmGuestHostname"].split(".")[0].endswith("-slot3")
        assert vm_memory_mib(vm) == 512
        ran = ok(root_starter.call(alice, "exec", vm=vm, argv=["id", "-u"]))
        assert stdout_of(ran) == "0\n"
        # Bob cannot use alice's VM from inside a job of his either.
        theft = user_starter.call(bob, "exec", vm=vm, argv=["id", "-u"])
        assert theft["type"] == "AccessDeniedError", theft
    finally:
        for starter in (own_starter, user_starter):
            starter.stop()
        root_starter.stop()
    # The VM lives as long as its starter: it is reaped once the starter is gone.
    wait_for("the VM of the stopped starter reaped", lambda: not domain_running(vm), 60)
    ok(call(boundary.svc, alice, "teardown", vm=vm, failed=False))


# -- 5. one user cannot deny the service to others ---------------------------------------------

# Run as the attacker: hold N connections open without ever sending a request, and open a new
# one whenever the service closes one, for SECONDS; print how many were held at first.
FLOOD = textwrap.dedent(
    """
    import select, socket, sys, time
    path, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    end = time.monotonic() + seconds
    def connect():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            return None
    socks = []
    while len(socks) < count and time.monotonic() < end:
        s = connect()
        if s is not None:
            socks.append(s)
    print("holding", len(socks), flush=True)
    while time.monotonic() < end:
        ready, _, _ = select.select(socks, [], [], 0.2)
        for s in ready:
            socks.remove(s)
            s.close()
            again = connect()
            if again is not None:
                socks.append(again)
        time.sleep(0.02)
    """
)


def raw_exchange(path: Path, data: bytes, *, trickle: float = 0.0, limit: float = 30.0) -> bytes:
    """Send ``data`` (one byte every ``trickle`` seconds when set) and read what the service
    answers until it closes the connection or ``limit`` seconds pass."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(limit)
    s.connect(str(path))
    end = time.monotonic() + limit
    answer = b""
    try:
        with contextlib.suppress(OSError):  # the service may hang up before all is sent
            if trickle:
                for byte in data:
                    if time.monotonic() > end:
                        break
                    s.sendall(bytes([byte]))
                    time.sleep(trickle)
            else:
                s.sendall(data)
        with contextlib.suppress(OSError):
            while time.monotonic() < end:
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                answer += chunk
    finally:
        s.close()
    return answer


def test_a_flood_of_connections_by_one_user_does_not_fail_another_users_job(
    boundary: Boundary, alice: Account, bob: Account
) -> None:
    flood = subprocess.Popen(
        [*as_user(bob), sys.executable, "-c", FLOOD, str(boundary.svc.socket_path), "600", "120"],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert flood.stdout is not None
        held = flood.stdout.readline().split()
        assert held[0] == "holding", held
        scratch = make_scratch(boundary.root, alice, "flooded")
        vm = prepare(boundary.svc, alice, scratch)["vm"]
        ran = ok(call(boundary.svc, alice, "exec", vm=vm, argv=["echo", "served"]))
        assert stdout_of(ran) == "served\n"
        ok(call(boundary.svc, alice, "teardown", vm=vm, failed=False))
    finally:
        flood.kill()
        flood.wait(timeout=30)
    assert "Traceback" not in boundary.svc.log()


def test_slow_deep_and_huge_requests_are_cut_off_cleanly(boundary: Boundary, bob: Account) -> None:
    path = boundary.svc.socket_path
    # A request trickled in a byte at a time is cut off at the request deadline.
    started = time.monotonic()
    answer = raw_exchange(path, b'{"v": 2, "op": "ping", "args": {}}\n', trickle=1.0, limit=40)
    took = time.monotonic() - started
    assert took < 25, f"a trickled request held its connection for {took:.0f} s"
    assert b"ProtocolError" in answer, answer
    # Deep nesting is refused with a message, not a crash of the call.
    deep = raw_exchange(path, b'{"v": 2, "op": "ping", "args": ' + b"[" * 100_000 + b"\n")
    assert b"ProtocolError" in deep and b"nest" in deep, deep[:300]
    # A request over the size bound is refused before it is read whole.
    huge = raw_exchange(path, b'{"v": 2, "op": "ping", "args": {"x": "' + b"a" * (20 << 20))
    assert b"ProtocolError" in huge and b"longer" in huge, huge[:300]
    assert "Traceback" not in boundary.svc.log()


def stopped(vm: str) -> Callable[[], bool]:
    return lambda: not domain_running(vm)


LIFETIME = 40


def test_vms_started_outside_htcondor_are_capped_per_user_and_in_lifetime(
    svc_root: Path, guest_dir: Path, hypervisor_probe: Path, alice: Account, bob: Account
) -> None:
    root = svc_root / "unmanaged"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)
    catalogue = guest_catalogue(guest_dir, root / "repo", direct={"test-direct": ""})
    env = service_env(
        root,
        catalogue,
        {
            **SLOT_ENV,
            "GLITE_VM_MAX_UNMANAGED_VMS_PER_USER": "2",
            # long enough for three boots on a loaded host (at 15 s the first VM was reaped
            # before the third prepare, which then found room), short for the reaper's wait
            "GLITE_VM_UNMANAGED_VM_LIFETIME": str(LIFETIME),
        },
    )
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        first = prepare(svc, alice, make_scratch(root, alice, "u1"))["vm"]
        second = prepare(svc, alice, make_scratch(root, alice, "u2"))["vm"]
        third = call(svc, alice, "prepare", job_ad=job_ad(), scratch_dir=str(root / "u1"))
        if third.get("ok"):
            ok(call(svc, alice, "teardown", vm=third["result"]["vm"], failed=False))
        assert third.get("type") == "AccessDeniedError", third
        assert "2 VMs" in third["message"], third["message"]
        # The cap is alice's: bob still gets his VM.
        bobs = prepare(svc, bob, make_scratch(root, bob, "b1"))["vm"]
        # Past their lifetime the reaper takes them, and says why.
        for name in (first, second):
            wait_for(f"{name} reaped", stopped(name), LIFETIME + 60)
        assert "outside HTCondor" in svc.log()
        for name, who in ((first, alice), (second, alice), (bobs, bob)):
            call(svc, who, "teardown", vm=name, failed=False)
    finally:
        from tests.service.conftest import check_nothing_left  # noqa: PLC0415

        check_nothing_left(svc, state)


# -- 6. output bombs -----------------------------------------------------------------------------


def _octal(n: int, width: int) -> bytes:
    return b"%0*o" % (width - 1, n) + b"\0"


def sparse_member(name: str, real_size: int, data: bytes = b"tail\n") -> bytes:
    """One old-GNU sparse ('S') tar member: ``data`` at the end of a ``real_size`` file whose
    rest is a hole. The archive holds a few hundred bytes whatever ``real_size`` says."""
    header = bytearray(512)
    header[0 : len(name)] = name.encode()
    header[100:108] = _octal(0o644, 8)
    header[108:116] = header[116:124] = _octal(0, 8)
    header[124:136] = _octal(len(data), 12)
    header[136:148] = _octal(0, 12)
    header[156:157] = b"S"
    header[257:265] = b"ustar  \0"
    header[386:398] = _octal(real_size - len(data), 12)  # sparse map: one region at the end
    header[398:410] = _octal(len(data), 12)
    header[483:495] = _octal(real_size, 12)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header) + data + b"\0" * (-len(data) % 512)


HOSTILE_TAR = """#!/bin/sh
# a root job's tar: copy-out sends the job's prepared archive instead of the work directory
case "$1" in -c*) exec cat /var/tmp/glite-vm-job/out.tar ;; esac
exec /bin/busybox tar "$@"
"""


def allocated(path: Path) -> int:
    return sum(p.lstat().st_blocks * 512 for p in [path, *path.rglob("*")])


def test_a_sparse_tar_from_the_guest_cannot_fill_the_host(
    boundary: Boundary, alice: Account
) -> None:
    """A root job replaces the guest's tar: copy-out then sends a 4 GiB sparse member (a few
    hundred bytes on the transfer disk). The job asked for 1 GiB of disk: refused, and nothing
    of that size lands on the host; a sparse file within the request lands sparse."""
    scratch = make_scratch(boundary.root, alice, "bomb")
    (scratch / "bomb.tar").write_bytes(sparse_member("big", 4 << 30) + b"\0" * 1024)
    (scratch / "fine.tar").write_bytes(sparse_member("holey", 256 << 20) + b"\0" * 1024)
    (scratch / "tar").write_text(HOSTILE_TAR)
    for p in scratch.iterdir():
        os.chown(p, alice.uid, alice.gid)
    starter = boundary.starter(ROOT_SLOT)
    try:
        # The dash guest: its /bin/sh finds the job's tar in PATH, as on Debian images.
        ad = job_ad("test-dash", GliteVmRoot=True)
        vm = ok(starter.call(alice, "prepare", job_ad=ad, scratch_dir=str(scratch)))["vm"]
        ok(starter.call(alice, "push", vm=vm, src_dir=str(scratch)))
        install = (
            "mkdir -p /usr/local/bin && cp tar /usr/local/bin/ && chmod 755 /usr/local/bin/tar"
            " && cp bomb.tar out.tar"
        )
        installed = ok(starter.call(alice, "exec", vm=vm, argv=["sh", "-c", install]))
        assert installed["outcome"]["exit_code"] == 0, stdout_of(installed, "stderr")
        out = scratch / "out"
        bomb = starter.call(alice, "pull", vm=vm, dest_dir=str(out))
        assert not bomb.get("ok"), "a 4 GiB output of a job with 1 GiB of disk was accepted"
        assert "RequestDisk" in bomb["message"], bomb["message"]
        assert allocated(scratch) < 8 << 20
        ok(starter.call(alice, "exec", vm=vm, argv=["cp", "fine.tar", "out.tar"]))
        files = ok(starter.call(alice, "pull", vm=vm, dest_dir=str(out)))
        assert files == ["holey"]
        holey = out / "holey"
        assert holey.stat().st_size == 256 << 20
        assert holey.read_bytes()[-5:] == b"tail\n"
        assert allocated(out) < 8 << 20, "a sparse output was written out in full"
        ok(starter.call(alice, "teardown", vm=vm, failed=False))
    finally:
        starter.stop()
