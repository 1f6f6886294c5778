"""Warm start through the one engine (LocalService in-process, as root): VMs restored from a
template of the direct-kernel test guest are guests of their own — clock, random numbers,
hostname, host certificate, files — and any template problem boots cold and rebuilds it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.identity.ca_files import CaFiles, init_ca
from glite_vm.images.acquire import acquire_image
from glite_vm.images.cache import ImageCache
from glite_vm.images.templates import TemplateStore
from glite_vm.request import JobRequest, vm_request
from glite_vm.service import events
from glite_vm.service.api import PrepareResult
from glite_vm.service.local import LocalService
from glite_vm.service.vm_state import VmRecord
from glite_vm.service.warm_start import template_key
from glite_vm.slots import SlotFacts
from glite_vm.vm.guest_run import GUEST_WORKDIR
from glite_vm.vm.save_image import HEADER_SIZE, read_header
from glite_vm.vm.warm import RESEED_DIRS, refresh_clone
from tests.service.warm_support import wait_for_builds, warm_local_service

pytestmark = pytest.mark.vm
IMAGE = "test-direct"
# One shell line, so that the host's clock brackets the guest's: the clock in microseconds
# (busybox's date has no %N; `date +%s` alone cut up to a second off, so a clone 0.3 s behind
# the host could read as 1.3 s behind), 32 random bytes, hostname, the host certificate's
# digest, the kernel's boot id, then what other jobs left in the places a job can write to.
PROBE = (
    "adjtimex | awk '/time.tv_sec/ {s = $2} /time.tv_usec/ {u = $2} "
    'END {printf "%d.%06d\\n", s, u}\'; '
    "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; "
    "sha256sum /etc/grid-security/hostcert.pem | cut -c1-64; "
    "cat /proc/sys/kernel/random/boot_id; "
    "ls /tmp /root /var/tmp . 2>/dev/null | grep -c '^left-by-' || true; "
    "echo secret > /tmp/left-by-$$; echo secret > /root/left-by-$$; echo secret > left-by-$$"
)


@dataclasses.dataclass(frozen=True)
class Seen:
    before: float
    after: float
    clock: float
    random: str
    hostname: str
    cert: str
    boot_id: str
    leftovers: int


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CaFiles:
    return init_ca(tmp_path_factory.mktemp("warm-ca") / "ca", name="glite-vm warm test CA")


@pytest.fixture
def warm(
    svc_root: Path,
    catalogue: Path,
    hypervisor_probe: Path,
    ca: CaFiles,
    request: pytest.FixtureRequest,
) -> Iterator[LocalService]:
    with warm_local_service(
        svc_root / f"warm-{request.node.name[:40]}",
        catalogue,
        hypervisor_probe,
        warm_images=(IMAGE,),
        ca_cert=ca.cert_path,
        ca_key=ca.key_path,
        hostname_pattern="{slot}.warm.example.org",
    ) as service:
        yield service


def templates(service: LocalService) -> TemplateStore:
    return TemplateStore(ImageCache(service.settings))


def template_keys(service: LocalService) -> set[str]:
    return {e.sha256 for e in templates(service).entries()}


def job(
    service: LocalService, n: int, memory_mib: int | None = None, keep: str = "never"
) -> JobRequest:
    return JobRequest.create(
        service.settings,
        image=IMAGE,
        job_id=f"77.{n}",
        owner="root",
        keep_snapshot=keep,
        memory_mib=memory_mib,
    )


def prepare(
    service: LocalService,
    scratch: Path,
    n: int,
    memory_mib: int | None = None,
    keep: str = "never",
) -> PrepareResult:
    directory = scratch / f"job{n}"
    directory.mkdir(parents=True)
    slot = SlotFacts(name=f"slot1_{n}")
    return service.prepare(
        job(service, n, memory_mib, keep), scratch_dir=str(directory), starter_pid=None, slot=slot
    )


def probe(service: LocalService, vm: str) -> Seen:
    out = bytearray()
    before = time.time()
    outcome = service.exec(vm, ["sh", "-c", PROBE], stdout=out.extend)
    after = time.time()
    assert outcome.exit_code == 0
    clock, random, hostname, cert, boot_id, leftovers = out.decode().split("\n")[:6]
    return Seen(before, after, float(clock), random, hostname, cert, boot_id, int(leftovers))


class Collected:
    """The user's end of a one-command shell: no keys, everything shown is kept."""

    def __init__(self) -> None:
        self.shown = bytearray()

    def ready(self) -> None:
        pass

    def output(self, data: bytes) -> bool:
        self.shown.extend(data)
        return True

    def events(self, timeout: float) -> list[tuple[str, bytes | tuple[int, int]]] | None:
        time.sleep(min(timeout, 0.05))
        return []


def shell_hostname(service: LocalService, vm: str) -> str:
    """``hostname`` through ``glite-vm shell``'s path: the VM's own second serial port."""
    terminal = Collected()
    outcome = service.shell(vm, terminal, argv=["hostname"], interactive=False)
    assert outcome.exit_code == 0, terminal.shown
    return terminal.shown.decode(errors="replace").strip()


def warm_starts(service: LocalService) -> dict[str, float]:
    """What the service's metrics say of its warm starts (what Prometheus would scrape)."""
    registry = service.registry.metrics.registry
    return {
        o: registry.get_sample_value("glite_vm_warm_starts_total", {"outcome": o}) or 0.0
        for o in ("restored", "fallback")
    }


def cold_then_template(service: LocalService, scratch: Path) -> None:
    """A first job boots cold and has the template built behind it."""
    first = prepare(service, scratch, 0)
    try:
        assert first.ad_attributes["GliteVmWarmStart"] is False
    finally:
        service.teardown(first.vm, failed=False)
    wait_for_builds()
    assert len(template_keys(service)) == 1


def test_warm_started_vms_are_guests_of_their_own(warm: LocalService, svc_root: Path) -> None:
    scratch = svc_root / "warm-own"
    cold_then_template(warm, scratch)
    seen = []
    for n in (1, 2):
        prepared = prepare(warm, scratch, n)
        try:
            assert prepared.ad_attributes["GliteVmWarmStart"] is True
            boot_log = Path(prepared.boot_log_path).read_text(errors="replace")
            assert boot_log.startswith("glite-vm: warm start from template ")
            assert "Linux version" in boot_log  # the template's boot, as its guest logged it
            seen.append(probe(warm, prepared.vm))
            # the restored VM's shell port is its own socket, not the template's
            assert shell_hostname(warm, prepared.vm) == seen[-1].hostname
        finally:
            warm.teardown(prepared.vm, failed=False)
    assert warm_starts(warm) == {"restored": 2, "fallback": 0}
    a, b = seen
    for s in seen:  # the host's clock, not the clock of the template's save
        assert s.before - 1 <= s.clock <= s.after + 1, s
        assert s.leftovers == 0  # nothing another job (or the template) wrote
    assert a.random != b.random and len(a.random) == 64
    assert (a.hostname, b.hostname) == ("slot1-1.warm.example.org", "slot1-2.warm.example.org")
    assert a.cert != b.cert and len(a.cert) == 64
    assert a.boot_id != b.boot_id


def test_concurrent_restores_of_one_template(warm: LocalService, svc_root: Path) -> None:
    scratch = svc_root / "warm-many"
    cold_then_template(warm, scratch)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: prepare(warm, scratch, n), range(1, 5)))
    try:
        assert [r.ad_attributes["GliteVmWarmStart"] for r in results] == [True] * 4
        seen = [probe(warm, r.vm) for r in results]
    finally:
        for r in results:
            warm.teardown(r.vm, failed=False)
    assert len({s.random for s in seen}) == 4
    assert len({s.hostname for s in seen}) == 4


def test_a_corrupted_template_boots_cold_and_is_rebuilt(warm: LocalService, svc_root: Path) -> None:
    scratch = svc_root / "warm-corrupt"
    cold_then_template(warm, scratch)
    (old,) = templates(warm).entries()
    state = old.path / "state.sav"
    header = read_header(state)
    with state.open("r+b") as f:  # QEMU's migration stream, overwritten at its start
        f.seek(HEADER_SIZE + header.data_len)
        f.write(b"\xa5" * 4096)
    prepared = prepare(warm, scratch, 1)
    try:
        assert prepared.ad_attributes["GliteVmWarmStart"] is False
        assert probe(warm, prepared.vm).hostname == "slot1-1.warm.example.org"
    finally:
        warm.teardown(prepared.vm, failed=False)
    log = events.event_log_path(warm.settings.state_dir)
    fallbacks = [e for e in events.read_events(log) if e.event == events.WARM_FALLBACK]
    assert len(fallbacks) == 1 and fallbacks[0].job == "77.1"
    assert warm_starts(warm) == {"restored": 0, "fallback": 1}
    assert f"warm start from template {old.sha256} failed, booting cold" in (
        fallbacks[0].reason or ""
    )
    wait_for_builds()
    (new,) = templates(warm).entries()
    assert new.sha256 == old.sha256 and new.created > old.created
    again = prepare(warm, scratch, 2)
    try:
        assert again.ad_attributes["GliteVmWarmStart"] is True
    finally:
        warm.teardown(again.vm, failed=False)


def test_a_changed_key_is_another_template(warm: LocalService, svc_root: Path) -> None:
    """A VM of another shape gets no restore of a template made for a different one; its own
    template is built after its cold boot. A template whose image left the cache goes."""
    scratch = svc_root / "warm-key"
    cold_then_template(warm, scratch)
    (first,) = template_keys(warm)
    other = prepare(warm, scratch, 1, memory_mib=640)
    try:
        assert other.ad_attributes["GliteVmWarmStart"] is False
    finally:
        warm.teardown(other.vm, failed=False)
    wait_for_builds()
    keys = template_keys(warm)
    assert first in keys and len(keys) == 2
    with acquire_image(warm.settings, IMAGE, job_id="t/1") as lease:
        image = lease.image
        request = vm_request(job(warm, 9), SlotFacts(name="slot1_9"), warm.settings)
        key = template_key(warm.host, request, image)
        assert key.digest == first
        store = templates(warm)
        assert store.find(key, image.path) is not None
        # the same key on another cached image (its digest's file replaced): not this template
        assert store.find(key, image.path.with_name("0" * 64)) is None
        assert first not in template_keys(warm)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GLITE_VM_STATE_DIR": str(warm.settings.state_dir),
        "GLITE_VM_CATALOGUE": warm.settings.catalogue,
        "GLITE_VM_CONFIG": "/nonexistent",
        "GLITE_VM_DEFAULT_MEMORY_MIB": "512MiB",
        "GLITE_VM_DEFAULT_DISK_BYTES": "1GiB",
    }
    made = subprocess.run(
        [sys.executable, "-m", "glite_vm", "images", "warm", IMAGE, "--own"],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    assert made.stdout.split("\t")[:2] == [IMAGE, first]  # the same VM shape: the same key
    assert first in template_keys(warm)


def test_a_template_whose_files_changed_boots_cold(warm: LocalService, svc_root: Path) -> None:
    scratch = svc_root / "warm-truncated"
    cold_then_template(warm, scratch)
    (old,) = templates(warm).entries()
    state = old.path / "state.sav"
    with state.open("r+b") as f:
        f.truncate(state.stat().st_size // 2)
    prepared = prepare(warm, scratch, 1)
    try:
        assert prepared.ad_attributes["GliteVmWarmStart"] is False
    finally:
        warm.teardown(prepared.vm, failed=False)
    log = events.event_log_path(warm.settings.state_dir)
    (fallback,) = [e for e in events.read_events(log) if e.event == events.WARM_FALLBACK]
    assert f"template {old.sha256} was incomplete or changed; removed" in (fallback.reason or "")
    wait_for_builds()
    assert template_keys(warm) == {old.sha256}


def test_the_snapshot_of_a_warm_start_boots_and_exports(warm: LocalService, svc_root: Path) -> None:
    """Its kept disk holds the template's layer too and backs onto the cached image alone, so
    `glite-vm snapshots boot` and `export` treat it as any other."""
    scratch = svc_root / "warm-snapshot"
    cold_then_template(warm, scratch)
    prepared = prepare(warm, scratch, 1, keep="always")
    try:
        assert prepared.ad_attributes["GliteVmWarmStart"] is True
        done = warm.exec(prepared.vm, ["sh", "-c", "echo kept-by-77.1 > marker && sync"])
        assert done.exit_code == 0
    finally:
        outcome = warm.teardown(prepared.vm, failed=False)
    snapshot = Path(str(outcome.snapshot_path))
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(snapshot)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    with acquire_image(warm.settings, IMAGE, job_id="t/2") as lease:
        assert info["backing-filename"] == str(lease.image.path)
    assert not (snapshot.parent / "template-layer.qcow2").exists()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GLITE_VM_STATE_DIR": str(warm.settings.state_dir),
        "GLITE_VM_CATALOGUE": warm.settings.catalogue,
        "GLITE_VM_CONFIG": "/nonexistent",
        "GLITE_VM_BOOT_TIMEOUT": "180",
    }
    cli = [sys.executable, "-m", "glite_vm", "snapshots"]
    booted = subprocess.run(
        [*cli, "boot", prepared.vm, "--", "cat", f"{GUEST_WORKDIR}/marker"],
        capture_output=True,
        env=env,
        timeout=400,
        check=False,
    )
    assert (booted.returncode, booted.stdout) == (0, b"kept-by-77.1\n"), booted.stderr
    dest = scratch / "export.qcow2"
    exported = subprocess.run(
        [*cli, "export", prepared.vm, str(dest)],
        capture_output=True,
        env=env,
        timeout=400,
        check=False,
    )
    assert exported.returncode == 0, exported.stderr
    assert "backing-filename" not in json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(dest)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )


def test_a_warm_start_on_a_network_gets_its_own_mac_address(
    warm: LocalService, svc_root: Path
) -> None:
    """The template's guest knew the template's MAC; each restored guest's interface takes the
    job's, which its DHCP lease then goes with."""
    service = LocalService.for_this_user(
        dataclasses.replace(warm.settings, network="user"), warm.host, registry=warm.registry
    )
    scratch = svc_root / "warm-network"
    cold_then_template(service, scratch)
    seen = []
    for n in (1, 2):
        prepared = prepare(service, scratch, n)
        try:
            assert prepared.ad_attributes["GliteVmWarmStart"] is True
            live = ET.fromstring(warm.host.conn.lookupByName(prepared.vm).XMLDesc(0))  # noqa: S314
            mac = live.find("devices/interface/mac").get("address")  # type: ignore[union-attr]
            out = bytearray()
            dhcp = "timeout 30 udhcpc -i eth0 -q -n -t 5 -T 1 -s /usr/share/udhcpc/default.script"
            script = (
                f"cat /sys/class/net/eth0/address; {dhcp} >/dev/null 2>&1; ip -4 addr show eth0"
            )
            outcome = service.exec(prepared.vm, ["sh", "-c", script], stdout=out.extend)
            assert outcome.exit_code == 0
            address, rest = out.decode().split("\n", 1)
            assert address == mac
            assert "inet 10.0.2.15/" in rest  # the user-mode network's lease, for this MAC
            seen.append(mac)
        finally:
            service.teardown(prepared.vm, failed=False)
    assert seen[0] != seen[1]


def test_clones_reseed_with_the_templates_program_or_install_their_own(
    warm: LocalService, svc_root: Path
) -> None:
    """The template's guest keeps the reseed program in a root-only tmpfs directory, so a
    clone's refresh just runs it; a clone that lost that directory installs one of its own,
    runs it, and leaves nothing behind."""
    scratch = svc_root / "warm-reseed"
    cold_then_template(warm, scratch)
    prepared = prepare(warm, scratch, 1)
    try:
        record = warm.registry.get(prepared.vm)
        assert isinstance(record, VmRecord)
        vm = record.vm
        assert vm.domain is not None
        kept = vm.agent.run(["/bin/sh", "-c", KEPT_RESEED])
        assert kept.exitcode == 0, kept
        place, owner, mode = kept.stdout.decode().split()
        assert place in RESEED_DIRS and (owner, mode) == ("root", "700")
        gone = vm.agent.run(["/bin/sh", "-c", f"rm -rf {' '.join(RESEED_DIRS)}"])
        assert gone.exitcode == 0
        # a guest user's directory in a reseed place (/dev/shm is world-writable) is not
        # root's: its "reseed" is never run by the root refresh
        planted = vm.agent.run(["/bin/sh", "-c", PLANT_RESEED])
        assert planted.exitcode == 0, planted
        refresh_clone(vm.domain, mac=None)  # the clone's own way; raises if it cannot reseed
        ran = vm.agent.run(["/bin/sh", "-c", "ls /glite-vm-planted-ran"])
        assert ran.exitcode != 0, "root ran a guest user's reseed program"
        left = vm.agent.run(
            [
                "/bin/sh",
                "-c",
                "ls -d /run/glite-vm-reseed.* /dev/shm/glite-vm-reseed.* /tmp/glite-vm-reseed.*",
            ]
        )
        assert left.stdout == b"", left  # the private directory went again
        seen = probe(warm, prepared.vm)
        assert seen.before - 1 <= seen.clock <= seen.after + 1
    finally:
        warm.teardown(prepared.vm, failed=False)


# a reseed place taken by the guest's uid 1000, holding a program that leaves a mark if run
PLANT_RESEED = (
    f"d={RESEED_DIRS[-1]}; mkdir $d && printf '#!/bin/sh\\ntouch /glite-vm-planted-ran\\n' "
    "> $d/reseed && chmod 755 $d/reseed && chown -R 1000 $d && rm -f /glite-vm-planted-ran"
)

# where the template's reseed program is, its directory's owner and mode
KEPT_RESEED = (
    "for d in " + " ".join(RESEED_DIRS) + "; do "
    '[ -x "$d/reseed" ] && exec stat -c "%n %U %a" "$d"; done; exit 1'
)


def test_a_clones_work_dir_made_ahead_is_roots_and_its_notes_are_out_of_the_jobs_reach(
    warm: LocalService, svc_root: Path
) -> None:
    """The template made the work dir of its clones' account ahead, with root's notes (how
    users are switched, the work dir made): a clone's job finds it root's with the job's group,
    and can write none of the notes; a root job's clone of the same template gets a work dir
    of root's group, not the template account's."""
    scratch = svc_root / "warm-ahead"
    cold_then_template(warm, scratch)
    prepared = prepare(warm, scratch, 1)
    try:
        assert prepared.ad_attributes["GliteVmWarmStart"] is True
        out = bytearray()
        script = (
            "pwd; stat -c '%u %g %a' .; id -u; id -g; "
            "for f in setpriv workdir prepare-error; do "
            "echo forged > /run/glite-vm/$f 2>/dev/null && echo WROTE-$f; done; true"
        )
        assert warm.exec(prepared.vm, ["sh", "-c", script], stdout=out.extend).exit_code == 0
        where, owner, uid, gid, *wrote = out.decode().split("\n")
        assert where == GUEST_WORKDIR
        assert owner == f"0 {gid} 770" and uid != "0" and gid != "0", out
        assert wrote == [""], wrote
    finally:
        warm.teardown(prepared.vm, failed=False)
    directory = scratch / "root-job"
    directory.mkdir()
    request = dataclasses.replace(job(warm, 2), root=True)
    root_job = warm.prepare(
        request,
        scratch_dir=str(directory),
        starter_pid=None,
        slot=SlotFacts(name="slot1_2", root_enabled=True),
    )
    try:
        assert root_job.ad_attributes["GliteVmWarmStart"] is True  # the same template
        out = bytearray()
        script = "stat -c '%u %g %a' .; id -u"
        assert warm.exec(root_job.vm, ["sh", "-c", script], stdout=out.extend).exit_code == 0
        assert out.decode().split("\n")[:2] == ["0 0 770", "0"], out
    finally:
        warm.teardown(root_job.vm, failed=False)
