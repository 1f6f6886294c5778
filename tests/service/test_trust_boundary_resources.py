"""What a caller or a guest can make the root service hold or hand out, attacked for real.

More rows of docs/reliability.md's "Trust boundaries" table: a local user's job ad that makes the
ClassAd library recurse or allocate without end, a local user taking a descriptor from the
service's copy process, and a guest whose output stream names headers of a gigabyte. Real root
service, real guests, the local users ``gvm-alice`` and ``gvm-bob``; the slot layout of
``test_trust_boundary.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.service import protocol
from tests.service.conftest import check_nothing_left, new_state_dir, service_env
from tests.service.svc_support import (
    ROOT_SLOT,
    THREE_SLOTS,
    Account,
    FakeStarter,
    ServiceProcess,
    as_user,
    call,
    driver_request,
    make_scratch,
    ok,
    prepare,
    running_service,
    stdout_of,
    wait_for,
)
from tests.support import GuestVariant, dash_initrd, guest_catalogue

pytestmark = pytest.mark.vm

SLOT_ENV = THREE_SLOTS.knobs()
MIB = 1 << 20


class Site:
    def __init__(self, svc: ServiceProcess, root: Path, catalogue: Path, starter: Path) -> None:
        self.svc = svc
        self.root = root
        self.catalogue = catalogue
        self.starter_binary = starter

    def root_starter(self) -> FakeStarter:
        return FakeStarter(self.starter_binary, self.svc, ROOT_SLOT[0], slot_type=ROOT_SLOT[1])


@pytest.fixture(scope="module")
def site(
    svc_root: Path, guest_dir: Path, hypervisor_probe: Path, fake_starter: Path
) -> Iterator[Site]:
    root = svc_root / "resources"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)
    manifest = json.loads((guest_dir / "guests.json").read_text())
    dash = dash_initrd(guest_dir / manifest["direct"]["initrd"], root / "dash-initrd.img")
    catalogue = guest_catalogue(
        guest_dir,
        root / "repo",
        direct={"test-direct": ""},
        variants={"test-dash": GuestVariant(initrd=dash)},
    )
    env = service_env(root, catalogue, SLOT_ENV)
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield Site(svc, root, catalogue, fake_starter)
    finally:
        check_nothing_left(svc, state)


def peak_memory(pid: int) -> int:
    """The most memory process ``pid`` ever had resident (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def raw_call(svc: ServiceProcess, who: Account, line: bytes, where: Path) -> dict[str, Any]:
    """Send ``line`` to the service as ``who``, byte for byte (no client-side checks)."""
    where.write_bytes(line)
    where.chmod(0o644)
    request = {"op": "raw", "socket": str(svc.socket_path), "line_file": str(where)}
    driver = Path(__file__).resolve().parent / "driver.py"
    proc = subprocess.run(
        [*as_user(who), sys.executable, str(driver), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer


def prepare_line(classad: str, scratch: Path) -> bytes:
    """A prepare that carries a job ad, as the first protocol did (it now takes a validated
    request; the hook, not the service, reads the ad)."""
    request = {
        "v": protocol.VERSION,
        "op": "prepare",
        "args": {"job_ad": {"classad": classad}, "scratch_dir": str(scratch)},
    }
    return json.dumps(request).encode() + b"\n"


# -- a job ad the ClassAd library cannot take ------------------------------------------------

BASE_AD = 'ClusterId = 7; ProcId = 0; Owner = "mallory"; GliteVmImage = "test-direct"; '


def long_sum(terms: int) -> str:
    """``RequestMemory = 1 + 1 + ... + 1``: a left-leaning tree ``terms`` deep, which the
    ClassAd library parses, prints and frees recursively."""
    return "[" + BASE_AD + "RequestMemory = " + "+".join(["1"] * terms) + "]"


def doubling_strings(levels: int, seed: int) -> str:
    """``RequestMemory = size(S0)`` where each S doubles the next: ``seed`` bytes in the ad
    become ``seed * 2**levels`` bytes when it is evaluated."""
    lines = [BASE_AD, "RequestMemory = size(S0);"]
    lines += [f"S{i} = strcat(S{i + 1}, S{i + 1});" for i in range(levels)]
    lines.append(f'S{levels} = "' + "x" * seed + '";')
    return "[" + "\n".join(lines) + "]"


def test_a_job_ad_cannot_crash_or_swell_the_service(
    site: Site, svc_root: Path, hypervisor_probe: Path, alice: Account, bob: Account
) -> None:
    """Bob, with no job at all, sends a prepare whose job ad is a sum of 120,000 ones (240 KB,
    within every bound of the request) and one whose RequestMemory doubles a 1 MB string nine
    times. The ClassAd library parses, prints and evaluates without bounds (the first overflowed
    the service's stack, the second made it build a 512 MB string), so the service reads no job
    ad at all: it refuses both unread, stays up for alice and takes no memory for them."""
    root = svc_root / "ad-bombs"
    root.mkdir(mode=0o711)
    new_state_dir(root / "state", hypervisor_probe)
    with running_service(root, site.catalogue, SLOT_ENV) as svc:
        scratch = make_scratch(root, bob, "bob")
        before = peak_memory(svc.pid)
        answers = []
        for name, ad in (("deep", long_sum(120_000)), ("wide", doubling_strings(9, MIB))):
            answers.append(raw_call(svc, bob, prepare_line(ad, scratch), root / f"{name}.json"))
            assert svc.proc is not None
            assert svc.proc.poll() is None, f"the {name} job ad killed the service: {answers}"
            assert ok(call(svc, alice, "ping"))["caller_uid"] == alice.uid
        grown = peak_memory(svc.pid) - before
        for answer in answers:
            assert not answer["ok"], answer
            assert answer["type"] == "ProtocolError", answer
            assert "argument 'request'" in answer["message"], answer
        assert grown < 256 * MIB, f"one job ad made the root service take {grown // MIB} MiB"
        assert "Traceback" not in svc.log()


# -- a descriptor taken from the service's copy process -----------------------------------------

# Run as the attacker while her files are copied in: find her own processes that run the
# service's copy (started by root, then switched to her uid), take every descriptor they hold
# (pidfd_getfd needs no more than ptrace rights over one's own processes) and keep those of
# files (not pipes) she could not open herself with the same access; write one byte 1 GiB past
# the end of each writable one (a sparse write: what a thief could go on doing after the VM is
# gone, on a file no quota of hers counts).
THIEF = textwrap.dedent(
    """
    import ctypes, errno, fcntl, json, os, stat, sys, time
    stop, limit = sys.argv[1], time.monotonic() + float(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    me, seen, stolen = os.getuid(), set(), []
    def mine_too(fd, mode):  # can she open that file herself, with that access?
        try:
            os.close(os.open("/proc/self/fd/%d" % fd, mode | os.O_NONBLOCK))
        except OSError as exc:
            return exc.errno not in (errno.EACCES, errno.EPERM)
        return True
    print("watching", flush=True)
    while time.monotonic() < limit and not os.path.exists(stop):
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in seen or int(pid) == os.getpid():
                continue
            try:
                if os.stat("/proc/" + pid).st_uid != me:
                    continue
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if b"glite_vm.service._sandbox_io" not in f.read().split(b"\\0"):
                        continue
                pidfd = os.pidfd_open(int(pid))
                fds = [int(n) for n in os.listdir("/proc/%s/fd" % pid)]
            except OSError:
                continue
            seen.add(pid)
            for n in fds:
                fd = libc.syscall(438, pidfd, n, 0)  # pidfd_getfd
                if fd < 0:
                    continue
                access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                st = os.fstat(fd)
                a_file = stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)
                if a_file and not mine_too(fd, access):
                    entry = {"path": os.readlink("/proc/self/fd/%d" % fd), "uid": st.st_uid,
                             "size": st.st_size, "writable": access != os.O_RDONLY}
                    if entry["writable"]:
                        try:
                            os.pwrite(fd, b"!", st.st_size + (1 << 30))
                            entry["grew"] = os.fstat(fd).st_size - st.st_size
                        except OSError as exc:
                            entry["error"] = str(exc)
                    stolen.append(entry)
                os.close(fd)
            os.close(pidfd)
    print(json.dumps({"seen": len(seen), "stolen": stolen}), flush=True)
    """
)


def test_no_caller_gets_a_descriptor_it_could_not_open_itself(site: Site, alice: Account) -> None:
    """While alice's input files are copied into her VM, a process of hers takes every
    descriptor the service's copy process holds: none may be of a file she could not open
    herself (the VM's transfer disk belongs to root, or to QEMU's user while the VM runs, and
    its size is her disk request: a writable descriptor of it lets her grow it without end,
    on no quota of hers, even after the VM is gone)."""
    scratch = make_scratch(site.root, alice, "thief")
    (scratch / "input.bin").write_bytes(os.urandom(64 * MIB))
    os.chown(scratch / "input.bin", alice.uid, alice.gid)
    stop = site.root / "stop-thief"
    thief = subprocess.Popen(
        [*as_user(alice), sys.executable, "-c", THIEF, str(stop), "240"],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    assert thief.stdout is not None
    assert thief.stdout.readline().strip() == "watching"
    vm = prepare(site.svc, alice, scratch)["vm"]
    try:
        for _ in range(3):
            assert ok(call(site.svc, alice, "push", vm=vm, src_dir=str(scratch))) > 64 * MIB
        ran = ok(call(site.svc, alice, "exec", vm=vm, argv=["ls", "-l", "input.bin"]))
        assert str(64 * MIB) in stdout_of(ran)
    finally:
        stop.touch()
        out, _ = thief.communicate(timeout=60)
        ok(call(site.svc, alice, "teardown", vm=vm, failed=False))
    report = json.loads(out.strip().splitlines()[-1])
    assert report["seen"] >= 1, "the attack never saw the copy process; it proves nothing"
    assert report["stolen"] == [], report


# Run as the attacker while her files are copied in: take the pipes of the service's copy
# process (as THIEF does), write up to 512 MiB into each one she may write (its answer to the
# service among them), print what she wrote, and keep every pipe open until told to stop or
# HOLD seconds have passed: the service must neither read what she wrote nor wait for her.
FLOODER = textwrap.dedent(
    """
    import ctypes, fcntl, json, os, select, stat, sys, time
    stop, hold = sys.argv[1], float(sys.argv[2])
    libc = ctypes.CDLL(None, use_errno=True)
    me, seen, kept, written = os.getuid(), set(), [], {}
    print("watching", flush=True)
    limit = time.monotonic() + 240
    while not written and time.monotonic() < limit and not os.path.exists(stop):
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid in seen or int(pid) == os.getpid():
                continue
            try:
                if os.stat("/proc/" + pid).st_uid != me:
                    continue
                with open("/proc/%s/cmdline" % pid, "rb") as f:
                    if b"glite_vm.service._sandbox_io" not in f.read().split(b"\\0"):
                        continue
                pidfd = os.pidfd_open(int(pid))
                fds = [int(n) for n in os.listdir("/proc/%s/fd" % pid)]
            except OSError:
                continue
            seen.add(pid)
            for n in fds:
                fd = libc.syscall(438, pidfd, n, 0)  # pidfd_getfd
                if fd < 0:
                    continue
                kept.append(fd)
                access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
                if stat.S_ISFIFO(os.fstat(fd).st_mode) and access != os.O_RDONLY:
                    written[n] = 0
                    os.set_blocking(fd, False)
                    chunk, end = b"x" * (1 << 20), time.monotonic() + 30
                    while written[n] < (1 << 29) and time.monotonic() < end:
                        try:
                            written[n] += os.write(fd, chunk)
                        except BlockingIOError:
                            select.select([], [fd], [], 0.5)
                        except OSError:
                            break
            break
    print(json.dumps({"written": written}), flush=True)
    end = time.monotonic() + hold
    while time.monotonic() < end and not os.path.exists(stop):
        time.sleep(0.1)
    """
)


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_caller_holding_the_copys_pipes_costs_the_service_nothing(
    site: Site, alice: Account, bob: Account
) -> None:
    """Alice takes the pipes of her copy process and writes 512 MiB into each (its answer
    to the service too), then keeps them open. Her push may fail, but it ends while she still
    holds them, the service reads none of it, keeps no descriptor of hers, and serves bob."""
    scratch = make_scratch(site.root, alice, "flooder")
    (scratch / "input.bin").write_bytes(os.urandom(64 * MIB))
    os.chown(scratch / "input.bin", alice.uid, alice.gid)
    vm = prepare(site.svc, alice, scratch)["vm"]
    stop = site.root / "stop-flooder"
    flooder = subprocess.Popen(
        [*as_user(alice), sys.executable, "-c", FLOODER, str(stop), "150"],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert flooder.stdout is not None
        assert flooder.stdout.readline().strip() == "watching"
        descriptors = open_descriptors(site.svc.pid)
        before = peak_memory(site.svc.pid)
        call(site.svc, alice, "push", vm=vm, src_dir=str(scratch))
        assert flooder.poll() is None, "the push only ended once the attacker let go"
        report = json.loads(flooder.stdout.readline())
        assert report["written"], "the attack never reached the copy process; it proves nothing"
        grown = peak_memory(site.svc.pid) - before
        assert grown < 256 * MIB, f"the service read {grown // MIB} MiB of the attacker's"
        wait_for(
            "the service to close the finished copy's pipes",
            lambda: open_descriptors(site.svc.pid) <= descriptors,
            30,
        )
        assert ok(call(site.svc, bob, "ping"))["caller_uid"] == bob.uid
    finally:
        stop.touch()
        flooder.wait(timeout=60)
        ok(call(site.svc, alice, "teardown", vm=vm, failed=False))


# Run as the attacker: from THREADS threads, connect to the service as fast as the kernel lets
# her (without ever sending a request, closing what she holds past 64 per thread), for SECONDS:
# the socket's queue of connections not yet accepted stays as full as she can keep it.
JAMMER = textwrap.dedent(
    """
    import socket, sys, threading, time
    path, threads, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    end = time.monotonic() + seconds
    def jam():
        held = []
        while time.monotonic() < end:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
                held.append(s)
            except OSError:
                s.close()
            if len(held) > 64:
                held.pop(0).close()
        for s in held:
            s.close()
    workers = [threading.Thread(target=jam) for _ in range(threads)]
    for w in workers:
        w.start()
    print("jamming", flush=True)
    for w in workers:
        w.join()
    """
)


def test_a_jammed_connection_queue_does_not_turn_another_user_away(
    site: Site, alice: Account, bob: Account
) -> None:
    """Bob keeps the service's queue of not yet accepted connections full, from 8 threads.
    Alice's calls must still get through (a call turned away is a job sent back to the queue)."""
    jammer = subprocess.Popen(
        [*as_user(bob), sys.executable, "-c", JAMMER, str(site.svc.socket_path), "8", "90"],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert jammer.stdout is not None
        assert jammer.stdout.readline().strip() == "jamming"
        answers = [call(site.svc, alice, "ping") for _ in range(20)]
    finally:
        jammer.kill()
        jammer.wait(timeout=30)
    turned_away = [a for a in answers if not a["ok"]]
    assert turned_away == [], f"{len(turned_away)} of 20 calls turned away: {turned_away[0]}"


# -- tar headers of a gigabyte in the guest's output ---------------------------------------------


def tar_header(name: str, kind: bytes, size: int) -> bytes:
    """One 512-byte tar header (ustar) of type ``kind`` that states ``size`` bytes of data."""
    header = bytearray(512)
    header[0 : len(name)] = name.encode()
    header[100:108] = b"%07o\0" % 0o644
    header[108:116] = header[116:124] = b"%07o\0" % 0
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"%011o\0" % 0
    header[156:157] = kind
    header[257:265] = b"ustar\x0000"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


HOSTILE_TAR = """#!/bin/sh
# a root job's tar: copy-out sends the job's prepared archive instead of the work directory
case "$1" in -c*) exec cat /var/tmp/glite-vm-job/out.tar ;; esac
exec /bin/busybox tar "$@"
"""


def test_tar_headers_from_the_guest_are_bounded(site: Site, alice: Account) -> None:
    """A root job's output stream is one pax header (then one GNU long-name header) that says
    its data is nearly the whole transfer disk (1 GiB of zeros there): reading it into memory
    would take a gigabyte, in the service when root pulls, in a process of the job's owner
    (outside the job's own memory limit) otherwise. Refused, naming the header, without the
    service's memory growing by the header's size."""
    scratch = make_scratch(site.root, alice, "headers")
    claim = (1 << 30) - 8 * MIB
    (scratch / "pax.tar").write_bytes(tar_header("././@PaxHeader", b"x", claim))
    (scratch / "long.tar").write_bytes(tar_header("././@LongLink", b"L", claim))
    (scratch / "tar").write_text(HOSTILE_TAR)
    for p in scratch.iterdir():
        os.chown(p, alice.uid, alice.gid)
    out = site.root / "headers-out"
    out.mkdir(mode=0o700)
    starter = site.root_starter()
    try:
        ad = {
            "ClusterId": 7,
            "ProcId": 0,
            "Owner": alice.name,
            "GliteVmImage": "test-dash",
            "GliteVmRoot": True,
        }
        vm = ok(starter.call(alice, "prepare", job_ad=ad, scratch_dir=str(scratch)))["vm"]
        ok(starter.call(alice, "push", vm=vm, src_dir=str(scratch)))
        install = "mkdir -p /usr/local/bin && cp tar /usr/local/bin/ && chmod 755 /usr/local/bin/*"
        ok(starter.call(alice, "exec", vm=vm, argv=["sh", "-c", install]))
        before = peak_memory(site.svc.pid)
        for archive in ("pax.tar", "long.tar"):
            ok(starter.call(alice, "exec", vm=vm, argv=["cp", archive, "out.tar"]))
            # As the job's owner (the copy runs in a process of hers)...
            mine = starter.call(alice, "pull", vm=vm, dest_dir=str(scratch / "out"))
            assert not mine["ok"], mine
            assert mine["disposition"] == "hold" and "header" in mine["message"], mine
            # ...and as root (an admin's pull; the copy runs in the service).
            theirs = call_as_root(site.svc, "pull", vm=vm, dest_dir=str(out))
            assert not theirs["ok"] and "header" in theirs["message"], theirs
        grown = peak_memory(site.svc.pid) - before
        assert grown < 256 * MIB, f"a guest's tar header made the service take {grown // MIB} MiB"
        ok(starter.call(alice, "teardown", vm=vm, failed=False))
    finally:
        starter.stop()


def call_as_root(svc: ServiceProcess, op: str, **args: Any) -> dict[str, Any]:
    """A driver call from root (whose copies run inside the service)."""
    driver = Path(__file__).resolve().parent / "driver.py"
    request = driver_request(svc, op, **args)
    proc = subprocess.run(
        [sys.executable, str(driver), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd="/",
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return answer
