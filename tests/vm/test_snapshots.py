"""`glite-vm snapshots ...` on real snapshots: what a user debugging a failed job notices.

One kept snapshot per module, made the way a host makes it for a job owner: the direct-boot test
guest from a file:// catalogue through the image cache, a job of the (real, non-root) user
``gvm-snapowner`` that writes /root/marker, torn down with the snapshot kept and the directory
given to that user. A second real user, ``gvm-snapuser``, is the one who must see nothing.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.config import Settings
from glite_vm.images.acquire import acquire_image
from glite_vm.images.build import build_catalogue, write_catalogue
from glite_vm.images.inspect import Limits
from glite_vm.knob_values import Retention
from glite_vm.request import VMRequest
from glite_vm.snapshots.boot import boots_root
from glite_vm.snapshots.boot_files import resolve_boot_files
from glite_vm.snapshots.disk import SnapshotUnusableError
from glite_vm.snapshots.export import export_snapshot
from glite_vm.snapshots.store import SnapshotStore
from glite_vm.units import GIB, MIB
from glite_vm.vm.agent import GuestAgent
from glite_vm.vm.domain_xml import DomainSpec, JobMetadata, build_domain_xml, with_serial_console
from glite_vm.vm.lifecycle import VmHost
from tests.service.svc_support import Account, as_user, ensure_account
from tests.support import LocalImage, domains_under, glite_vm_domains, local_image, sha256_of

pytestmark = pytest.mark.vm

OWNER = "gvm-snapowner"
INTRUDER = "gvm-snapuser"
HOME_NAMES = {OWNER: "o", INTRUDER: "u", "root": "r"}
JOB_ID = "4242.0"
MARKER = "kept-for-debugging-7f3a\n"
# The real `glite-vm` entry point.
CLI = [sys.executable, "-m", "glite_vm"]


@dataclasses.dataclass(frozen=True)
class Kept:
    """The module's kept snapshot and everything needed to drive the CLI at it."""

    settings: Settings
    host: VmHost
    name: str  # the domain name, also the entry's directory name
    snapshot: Path
    digest: str  # sha256 of snapshot.qcow2 right after teardown
    owner: Account
    intruder: Account
    image: LocalImage  # the direct guest, for booting an export on its own
    homes: Path  # short HOME directories: <homes>/o, <homes>/u, <homes>/r (see the fixture)

    def home(self, account: Account | None) -> Path:
        return self.homes / HOME_NAMES[account.name if account else "root"]

    def env(self, account: Account | None = None) -> dict[str, str]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            "GLITE_VM_STATE_DIR": str(self.settings.state_dir),
            "GLITE_VM_CATALOGUE": self.settings.catalogue,
            "GLITE_VM_CONFIG": "/nonexistent",
            "GLITE_VM_DEFAULT_MEMORY_MIB": "512MiB",
            "GLITE_VM_BOOT_TIMEOUT": "120",
            "HOME": str(self.home(account)),
        }
        if account is not None:
            env["XDG_RUNTIME_DIR"] = str(self.home(account) / "run")
        return env

    def cli(
        self, *args: str, account: Account | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[bytes]:
        prefix = as_user(account) if account is not None else []
        return subprocess.run(
            [*prefix, *CLI, "snapshots", *args],
            capture_output=True,
            env=self.env(account),
            cwd="/",
            timeout=timeout,
            check=False,
        )


def catalogue_of_direct_guest(guest_dir: Path, guests: dict[str, Any], repo: Path) -> Path:
    repo.mkdir(mode=0o755)
    direct = guests["direct"]
    for key in ("disk", "kernel", "initrd"):
        shutil.copyfile(guest_dir / direct[key], repo / direct[key])
    sidecar = {
        "name": "test-direct",
        "boot": "kernel",
        "kernel": direct["kernel"],
        "initrd": direct["initrd"],
        "cmdline": direct["cmdline"],
        "guest_user": guests["user"],
    }
    (repo / f"{direct['disk']}.json").write_text(json.dumps(sidecar))
    limits = Limits(max_virtual_bytes=64 * GIB, max_file_bytes=32 * GIB)
    return write_catalogue(build_catalogue(repo, limits=limits), repo / "catalogue.json")


@pytest.fixture(scope="module")
def kept(
    vm_host: VmHost,
    state_dir: Path,
    guest_dir: Path,
    guests: dict[str, Any],
    direct_image: LocalImage,
) -> Iterator[Kept]:
    owner, intruder = ensure_account(OWNER), ensure_account(INTRUDER)
    root = state_dir / "snapshots-module"
    root.mkdir(mode=0o711)
    (root / "snapshots").mkdir(mode=0o755)  # names listable by all, contents private
    # Short: a libvirt session binds the agent's socket under $HOME/.config/libvirt/qemu/
    # channel/target/domain-N-<name>/, and socket paths stop at 107 bytes.
    homes = Path(tempfile.mkdtemp(prefix="g", dir="/tmp"))
    homes.chmod(0o755)
    for account in (owner, intruder):
        home = homes / HOME_NAMES[account.name]
        (home / "run").mkdir(parents=True, mode=0o700)
        for d in (home, home / "run"):
            os.chown(d, account.uid, account.gid)
            d.chmod(0o700)
    (homes / HOME_NAMES["root"]).mkdir(mode=0o700)
    catalogue = catalogue_of_direct_guest(guest_dir, guests, root / "repo")
    settings = dataclasses.replace(
        vm_host.settings, state_dir=root, snapshot_dir=None, catalogue=str(catalogue)
    )
    host = VmHost(vm_host.conn, settings, vm_host.hypervisor)
    request = VMRequest.create(
        settings,
        image="test-direct",
        job_id=JOB_ID,
        owner=OWNER,
        root=True,
        keep_snapshot="always",
    )
    with acquire_image(settings, "test-direct", job_id=JOB_ID) as lease:
        vm = host.start(request, lease.image, owner_uid=owner.uid)
        with vm:
            vm.wait_ready()
            result = vm.run(["sh", "-c", f"printf '{MARKER}' > /root/marker; sync"])
            assert result.exit_code == 0
    assert vm.torn_down is not None and vm.torn_down.snapshot_path is not None
    snapshot = vm.torn_down.snapshot_path
    digest = sha256_of(snapshot)
    yield Kept(
        settings=settings,
        host=host,
        name=vm.name,
        snapshot=snapshot,
        digest=digest,
        owner=owner,
        intruder=intruder,
        image=direct_image,
        homes=homes,
    )
    assert sha256_of(snapshot) == digest  # every boot and export left it as it was
    shutil.rmtree(homes, ignore_errors=True)
    leftovers = [n for n in domains_under(root) if ".debug-" in n]
    assert not leftovers, f"snapshot VMs left behind: {leftovers}"


def debug_boots(settings: Settings) -> list[str]:
    """This run's snapshot boots (other runs sharing the libvirtd boot the same job id)."""
    return [n for n in domains_under(settings.state_dir) if ".debug-" in n]


def lines(proc: subprocess.CompletedProcess[bytes]) -> str:
    return proc.stdout.decode() + proc.stderr.decode()


# --- list / show ------------------------------------------------------------------------------


def test_list_shows_job_image_age_size_exit_and_what_was_kept(kept: Kept) -> None:
    mine = kept.cli("list", "--json", account=kept.owner)
    assert mine.returncode == 0, lines(mine)
    rows = json.loads(mine.stdout)
    assert [r["name"] for r in rows] == [kept.name]
    row = rows[0]
    assert row["job_id"] == JOB_ID
    assert row["image"] == "test-direct"
    assert row["owner"] == OWNER and row["owner_uid"] == kept.owner.uid
    assert 0 <= row["age_seconds"] < 3600
    assert row["snapshot_bytes"] > 0 and row["total_bytes"] >= row["snapshot_bytes"]
    assert row["exit_status"] == "0" and row["failed"] is False
    assert row["kept"] == "snapshot" and row["snapshot_path"] == str(kept.snapshot)

    table = kept.cli("list", account=kept.owner)
    assert table.returncode == 0
    text = table.stdout.decode()
    assert kept.name in text and JOB_ID in text and "snapshot" in text

    # root sees its own by default and everyone's with --all
    assert kept.name not in kept.cli("list").stdout.decode()
    everyone = json.loads(kept.cli("list", "--all", "--json").stdout)
    assert kept.name in [r["name"] for r in everyone]


def test_show_by_job_id_or_prefix_gives_paths_ad_attributes_and_boot_log(kept: Kept) -> None:
    shown = kept.cli("show", JOB_ID, "--json", account=kept.owner)
    assert shown.returncode == 0, lines(shown)
    doc = json.loads(shown.stdout)
    ad = doc["ad_attributes"]
    assert ad["GliteVmSnapshotPath"] == str(kept.snapshot)
    assert Path(ad["GliteVmBootLogPath"]).name == "boot.log"
    assert ad["GliteVmDomain"] == kept.name
    assert ad["GliteVmTimeBoot"] > 0 and ad["GliteVmTimeReady"] > 0
    assert "glite-guest: init done" in doc["boot_log_tail"]

    prefix = kept.name[: len(kept.name) - 3]
    text = kept.cli("show", prefix, account=kept.owner)
    assert text.returncode == 0, lines(text)
    out = text.stdout.decode()
    assert f'GliteVmSnapshotPath = "{kept.snapshot}"' in out
    assert "last 25 lines of" in out and "glite-guest" in out


# --- boot ------------------------------------------------------------------------------------


def read_until(fd: int, needle: bytes, buf: bytearray, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:  # EIO: the child closed the terminal
                if exc.errno == errno.EIO:
                    return needle in buf
                raise
            if not chunk:
                return needle in buf
            buf += chunk
    return True


def reap(pid: int, fd: int, buf: bytearray, grace: float = 60.0) -> int:
    """The child's wait status (reading what it still writes); a child still running after
    ``grace`` gets SIGTERM (the CLI then tears its VM down), so a failed assertion never leaves
    a VM behind."""
    deadline = time.monotonic() + grace
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
        read_until(fd, b"\0never\0", buf, 0.2)


def debug_domain(kept: Kept) -> str:
    names = [
        n for n in debug_boots(kept.settings) if n.startswith(f"glite-vm-root-{JOB_ID}.debug-")
    ]
    assert len(names) == 1, names
    return names[0]


def test_boot_attaches_an_interactive_console_and_leaves_the_snapshot_unchanged(
    kept: Kept,
) -> None:
    """Driven through a pseudo-terminal, as a user's terminal would: the boot shows live from
    its first lines, keys reach the guest's console (its tty echoes them), the agent answers
    inside the very same VM, and Ctrl-] ends it all."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the pty's terminal side
        os.chdir("/")
        os.execve(CLI[0], [*CLI, "snapshots", "boot", JOB_ID], kept.env())  # noqa: S606
    buf = bytearray()
    try:
        assert read_until(fd, b"Linux version", buf, 180), buf.decode(errors="replace")
        assert read_until(fd, b"glite-guest: agent started", buf, 180), bytes(buf[-2000:])
        os.write(fd, b"typed-into-the-console-42\r")
        assert read_until(fd, b"typed-into-the-console-42", buf, 30), bytes(buf[-2000:])

        agent = GuestAgent(kept.host.conn.lookupByName(debug_domain(kept)))
        deadline = time.monotonic() + 120
        while not agent.ping(timeout=1):  # libvirt connects the channel a moment later
            assert time.monotonic() < deadline, "the agent of the booted snapshot never answered"
            time.sleep(0.2)
        status = agent.run(["cat", "/root/marker"])
        assert status.stdout.decode() == MARKER
        domain_xml = ET.fromstring(agent.domain.XMLDesc(0))  # noqa: S314 - libvirt's
        disk = domain_xml.find("devices/disk/source")
        assert disk is not None  # the throw-away overlay, beside the snapshot's private copy
        assert boots_root(kept.settings) in Path(disk.get("file", "")).parents
        serial = domain_xml.find("devices/serial")
        assert serial is not None and serial.get("type") == "pty"
        leases = [  # the cache keeps the base image while the VM reads it
            json.loads(p.read_text())["job_id"]
            for p in (kept.settings.effective_cache_dir / "leases").glob("*/*.json")
        ]
        assert f"snapshot:{kept.name}" in leases
        assert sha256_of(kept.snapshot) == kept.digest

        os.write(fd, b"\x1d")  # Ctrl-]
        read_until(fd, b"unchanged", buf, 60)
    finally:
        wait_status = reap(pid, fd, buf)
        os.close(fd)
    text = buf.decode(errors="replace")
    assert os.waitstatus_to_exitcode(wait_status) == 0, text[-3000:]
    assert "console closed (Ctrl-] typed)" in text
    assert "stopped and removed" in text
    assert not debug_boots(kept.settings)
    assert not any(boots_root(kept.settings).iterdir())  # workspace gone
    assert sha256_of(kept.snapshot) == kept.digest


def test_boot_with_a_command_runs_it_through_the_agent(kept: Kept) -> None:
    proc = kept.cli("boot", kept.name[:20], "--", "sh", "-c", "cat /root/marker; exit 3")
    assert proc.returncode == 3, lines(proc)
    assert proc.stdout.decode() == MARKER
    assert b"stopped and removed" in proc.stderr
    assert sha256_of(kept.snapshot) == kept.digest
    assert not debug_boots(kept.settings)


def test_a_killed_boot_is_cleaned_up_by_prune(kept: Kept) -> None:
    """SIGTERM tears the VM down at once; after SIGKILL nothing can, and root's prune does."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(
            [*CLI, "snapshots", "boot", JOB_ID, "--", "sleep", "600"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=kept.env(),
            cwd="/",
        )
        assert proc.stderr is not None
        err = bytearray()
        try:
            assert read_until(proc.stderr.fileno(), b"running sleep 600", err, 180), bytes(err)
            name = debug_domain(kept)
        except BaseException:
            proc.terminate()  # it tears its VM down; the test fails anyway
            proc.wait(timeout=120)
            raise
        proc.send_signal(sig)
        code = proc.wait(timeout=120)
        err += proc.stderr.read()
        assert code == (143 if sig == signal.SIGTERM else -signal.SIGKILL), bytes(err)
        proc.stderr.close()
        if sig == signal.SIGTERM:
            assert b"stopped by SIGTERM" in err and b"stopped and removed" in err, bytes(err)
            assert name not in glite_vm_domains()
    assert name in glite_vm_domains()  # the SIGKILLed one

    dry = kept.cli("prune", "--dry-run")
    assert dry.returncode == 0, lines(dry)
    assert f"would destroy {name}".encode() in dry.stderr
    assert name in glite_vm_domains()
    done = kept.cli("prune")
    assert done.returncode == 0, lines(done)
    assert f"destroyed {name}".encode() in done.stderr
    assert name not in glite_vm_domains()
    assert not any(boots_root(kept.settings).iterdir())
    assert sha256_of(kept.snapshot) == kept.digest


def test_owner_boots_own_snapshot_without_root(kept: Kept) -> None:
    """On a multi-user host the job's owner debugs their own snapshot with their own libvirt
    session (qemu:///session): no root, no access to anyone else's."""
    proc = kept.cli("boot", JOB_ID, "--", "cat", "/root/marker", account=kept.owner)
    assert proc.returncode == 0, lines(proc)
    assert proc.stdout.decode() == MARKER
    assert sha256_of(kept.snapshot) == kept.digest
    session = subprocess.run(
        [*as_user(kept.owner), "virsh", "-c", "qemu:///session", "list", "--all", "--name"],
        capture_output=True,
        text=True,
        env=kept.env(kept.owner),
        cwd="/",
        timeout=60,
        check=True,
    )
    assert not session.stdout.split(), session.stdout


# --- export ------------------------------------------------------------------------------------


def test_export_is_self_contained_checked_and_boots_on_its_own(kept: Kept, vm_host: VmHost) -> None:
    exports = kept.settings.state_dir / "exports"  # QEMU's user reads the export below
    exports.mkdir(mode=0o755)
    dest = exports / "debug.qcow2"
    proc = kept.cli("export", JOB_ID, str(dest))
    assert proc.returncode == 0, lines(proc)
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(dest)],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info and "full-backing-filename" not in info
    check = subprocess.run(["qemu-img", "check", str(dest)], capture_output=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert dest.stat().st_mode & 0o777 == 0o600
    assert sha256_of(kept.snapshot) == kept.digest

    exported = sha256_of(dest)
    again = kept.cli("export", JOB_ID, str(dest))
    assert again.returncode != 0
    assert b"--force" in again.stderr
    assert sha256_of(dest) == exported
    forced = kept.cli("export", JOB_ID, str(dest), "--force")
    assert forced.returncode == 0, lines(forced)

    dest.chmod(0o644)
    alone = dataclasses.replace(local_image(dest), **_kernel_of(kept.image))
    request = VMRequest.create(
        vm_host.settings, image="export", job_id="export.1", owner="tester", root=True
    )
    vm = vm_host.start(request, alone)
    with vm:
        vm.wait_ready()
        status = GuestAgent(vm.domain).run(["cat", "/root/marker"])
    assert status.stdout.decode() == MARKER


def _kernel_of(image: LocalImage) -> dict[str, Any]:
    return {"kernel": image.kernel, "initrd": image.initrd, "cmdline": image.cmdline}


def test_owner_exports_own_snapshot_without_root(kept: Kept) -> None:
    out_dir = kept.home(kept.owner)
    dest = out_dir / "mine.qcow2"
    proc = kept.cli("export", JOB_ID, str(dest), "--compress", account=kept.owner)
    assert proc.returncode == 0, lines(proc)
    st = dest.stat()
    assert st.st_uid == kept.owner.uid and st.st_mode & 0o777 == 0o600
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(dest)], capture_output=True, check=True
    )
    assert "backing-filename" not in json.loads(info.stdout)
    dest.unlink()


# --- nobody else ---------------------------------------------------------------------------------


def test_another_user_cannot_list_show_boot_or_export_it(kept: Kept) -> None:
    user = kept.intruder
    own = kept.cli("list", "--json", account=user)
    assert own.returncode == 0, lines(own)
    assert json.loads(own.stdout) == []
    everyone = kept.cli("list", "--all", account=user)
    assert everyone.returncode != 0
    assert b"only root" in everyone.stderr and not everyone.stdout

    dest = kept.home(user) / "stolen.qcow2"
    for args in (
        ("show", kept.name),
        ("show", kept.name[:24]),
        ("boot", kept.name, "--", "cat", "/root/marker"),
        ("export", kept.name, str(dest)),
    ):
        proc = kept.cli(*args, account=user)
        assert proc.returncode == 125, (args, lines(proc))
        assert not proc.stdout, (args, proc.stdout)
        err = proc.stderr.decode()
        assert "permission denied" in err and "belongs to another user" in err, err
        assert MARKER.strip() not in err
    by_job = kept.cli("show", JOB_ID, account=user)
    assert by_job.returncode == 125 and not by_job.stdout
    assert not dest.exists()
    # Nor can the files be read behind the tool's back.
    for path in (kept.snapshot, kept.snapshot.parent / "record.json"):
        cat = subprocess.run(
            [*as_user(user), "cat", str(path)],
            capture_output=True,
            check=False,
        )
        assert cat.returncode != 0 and not cat.stdout
    assert not debug_boots(kept.settings)


# --- prune ---------------------------------------------------------------------------------------


def fake_entry(
    snapdir: Path, name: str, *, age_days: float, mib: int, running: bool = False
) -> Path:
    """A finished VM directory as teardown leaves it, with a snapshot of ``mib`` MiB data."""
    d = snapdir / f"glite-vm-root-{name}"
    d.mkdir(parents=True)
    snap = d / "snapshot.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(snap), "1G"], check=True, timeout=60
    )
    if mib:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {mib}M", str(snap)],
            check=True,
            capture_output=True,
            timeout=60,
        )
    (d / "boot.log").write_text("Linux version test\n")
    finished = time.time() - age_days * 86400
    record = {
        "domain": d.name,
        "job_id": name,
        "owner": "root",
        "image": "test",
        "image_sha256": "0" * 64,
        "base_image": "/nonexistent",
        "base_format": "qcow2",
        "failed": True,
        "exit_code": 1,
        "signal": None,
        "snapshot": str(snap),
        "boot_log": str(d / "boot.log"),
        "timings": {"boot": 1.0},
        "finished": finished,
    }
    (d / "record.json").write_text(json.dumps(record))
    if running:
        (d / "overlay.qcow2").write_bytes(b"")
    return d


@pytest.fixture
def prune_settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path, snapshot_retention=Retention.parse("7d"))


def prune_cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "GLITE_VM_STATE_DIR": str(settings.state_dir),
        "GLITE_VM_CONFIG": "/nonexistent",
        "GLITE_VM_SNAPSHOT_RETENTION": str(settings.snapshot_retention),
    }
    return subprocess.run(
        [*CLI, "snapshots", "prune", *args], capture_output=True, env=env, timeout=120, check=False
    )


def test_prune_by_age_keeps_recent_ones_and_running_vms(prune_settings: Settings) -> None:
    snapdir = prune_settings.effective_snapshot_dir
    old = fake_entry(snapdir, "old.0", age_days=10, mib=1)
    recent = fake_entry(snapdir, "recent.0", age_days=1, mib=1)
    busy = fake_entry(snapdir, "busy.0", age_days=30, mib=1, running=True)

    dry = prune_cli(prune_settings, "--dry-run")
    assert dry.returncode == 0, lines(dry)
    out = dry.stdout.decode()
    assert f"would remove {old.name}" in out and "older than 7d" in out
    assert f"kept {busy.name}: its VM still runs" in out
    assert old.is_dir() and recent.is_dir() and busy.is_dir()

    unconfirmed = prune_cli(prune_settings)  # a script without --yes: nothing goes
    assert unconfirmed.returncode == 125, lines(unconfirmed)
    assert b"confirm with --yes" in unconfirmed.stderr
    assert f"will remove {old.name}".encode() in unconfirmed.stdout
    assert old.is_dir()
    for bare in (["--max-age", "7"], ["--max-bytes", "20"]):
        refused = prune_cli(prune_settings, *bare, "--yes")
        assert refused.returncode == 125 and b"has no unit" in refused.stderr, lines(refused)
    assert old.is_dir()

    done = prune_cli(prune_settings, "--json", "--yes")
    assert done.returncode == 0, lines(done)
    report = json.loads(done.stdout)
    assert [r["name"] for r in report["removed"]] == [old.name]
    assert report["in_use"] == [busy.name]
    assert report["freed_bytes"] >= 1 * MIB
    assert not old.exists() and recent.is_dir() and busy.is_dir()

    # The flag overrides the setting: two days removes nothing more (busy still runs).
    again = prune_cli(prune_settings, "--max-age", "12h", "--json", "--yes")
    assert [r["name"] for r in json.loads(again.stdout)["removed"]] == [recent.name]
    assert busy.is_dir()


def test_prune_by_total_bytes_removes_oldest_first(prune_settings: Settings) -> None:
    snapdir = prune_settings.effective_snapshot_dir
    a = fake_entry(snapdir, "a.0", age_days=3, mib=8)
    b = fake_entry(snapdir, "b.0", age_days=2, mib=8)
    c = fake_entry(snapdir, "c.0", age_days=1, mib=8)
    d = fake_entry(snapdir, "d.0", age_days=6, mib=8, running=True)
    store = SnapshotStore(prune_settings)
    sizes = {e.name: e.total_bytes for e in store.entries()}
    budget = sizes[b.name] + sizes[c.name] + 4096

    proc = prune_cli(
        prune_settings, "--max-bytes", f"{budget}B", "--max-age", "none", "--json", "--yes"
    )
    assert proc.returncode == 0, lines(proc)
    report = json.loads(proc.stdout)
    assert [r["name"] for r in report["removed"]] == [a.name]
    assert "budget" in report["removed"][0]["reason"]
    assert not a.exists() and b.is_dir() and c.is_dir() and d.is_dir()

    # A VM libvirt still knows is never pruned, even without an overlay file.
    (d / "overlay.qcow2").unlink()
    report2 = store.prune(Retention(None, 1), running={d.name}, dry_run=True)
    assert d.name in report2.in_use
    assert {x.entry.name for x in report2.removed} == {b.name, c.name}


def test_a_users_prune_empties_their_entry_and_roots_prune_removes_it_later() -> None:
    user = ensure_account(INTRUDER)
    state = Path(tempfile.mkdtemp(prefix="gvm-prune-", dir="/var/tmp"))
    try:
        state.chmod(0o711)
        settings = Settings(state_dir=state)
        snapdir = settings.effective_snapshot_dir
        snapdir.mkdir(mode=0o755)
        mine = fake_entry(snapdir, "users.0", age_days=9, mib=1)
        theirs = fake_entry(snapdir, "roots.0", age_days=9, mib=1)
        for p in [mine, *mine.iterdir()]:
            os.chown(p, user.uid, user.gid)
        mine.chmod(0o700)
        proc = subprocess.run(
            [*as_user(user), *CLI, "snapshots", "prune", "--json", "--yes"],
            capture_output=True,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GLITE_VM_STATE_DIR": str(state)},
            cwd="/",
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, lines(proc)
        assert [r["name"] for r in json.loads(proc.stdout)["removed"]] == [mine.name]
        assert mine.is_dir() and not any(mine.iterdir())  # emptied; the directory is root's
        assert (theirs / "snapshot.qcow2").is_file()  # not the user's to prune

        store = SnapshotStore(settings)
        soon = store.prune(Retention(None, None), all_users=True)
        assert soon.empty_dirs_removed == () and mine.is_dir()  # could be a VM being made
        later = store.prune(Retention(None, None), all_users=True, now=time.time() + 7200)
        assert later.empty_dirs_removed == (mine.name,) and not mine.exists()
        assert theirs.is_dir()
    finally:
        shutil.rmtree(state)


# --- the pieces underneath ------------------------------------------------------------------------


def test_retention_setting_and_its_errors() -> None:
    assert Settings.load(
        {"GLITE_VM_SNAPSHOT_RETENTION": "14d,50GB"}, config_file=Path("/nonexistent")
    ).snapshot_retention == Retention(14 * 86400.0, 50 * GIB)
    assert Retention.parse("none") == Retention(None, None)
    assert Retention.parse("30m") == Retention(1800.0, None)  # minutes, not mebibytes
    assert str(Retention.parse("7d,500MB")) == "7d,500MiB"
    for bad in ("7d,8d", "50", "5GB 6GB", "soon"):
        with pytest.raises(ValueError, match="GLITE_VM_SNAPSHOT_RETENTION"):
            Settings.load({"GLITE_VM_SNAPSHOT_RETENTION": bad}, config_file=Path("/nonexistent"))


def test_pty_console_variant_is_valid_libvirt_xml_and_still_logs(tmp_path: Path) -> None:
    meta = JobMetadata("1.0", "alice", 1001, "img", "ab" * 32, "never", "/v", 1.0)
    spec = DomainSpec(
        name="glite-vm-alice-1.0-abcdef",
        uuid="0f2e9a55-3c1b-4d6e-8f00-123456789abc",
        domain_type="qemu",
        emulator="/usr/bin/qemu-system-x86_64",
        cpus=1,
        memory_mib=512,
        overlay=Path("/v/overlay.qcow2"),
        base_image=Path("/c/base"),
        base_format="qcow2",
        boot_log=Path("/v/boot.log"),
        xfer_disk=None,
        metadata=meta,
        serial_console="pty",
    )
    xml = build_domain_xml(spec)
    root = ET.fromstring(xml)  # noqa: S314 - our own output
    for tag in ("serial", "console"):
        el = root.find(f"devices/{tag}")
        assert el is not None and el.get("type") == "pty"
        log = el.find("log")
        assert log is not None and log.get("file") == "/v/boot.log"
    assert with_serial_console(xml, Path("/v/boot.log"), "pty") == xml
    as_file = build_domain_xml(dataclasses.replace(spec, serial_console="file"))
    assert with_serial_console(as_file, Path("/v/boot.log"), "pty") == xml
    (tmp_path / "d.xml").write_text(xml)
    check = subprocess.run(
        ["virt-xml-validate", str(tmp_path / "d.xml"), "domain"], capture_output=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    with pytest.raises(ValueError, match="serial console"):
        build_domain_xml(dataclasses.replace(spec, serial_console="tcp"))


def test_snapshots_that_cannot_boot_say_why(prune_settings: Settings) -> None:
    snapdir = prune_settings.effective_snapshot_dir
    d = fake_entry(snapdir, "logonly.0", age_days=0, mib=0)
    (d / "snapshot.qcow2").unlink()
    store = SnapshotStore(prune_settings)
    entry = store.find("logonly.0")
    assert not entry.kept
    with pytest.raises(SnapshotUnusableError, match="only the boot log was kept"):
        export_snapshot(entry, prune_settings.state_dir / "x.qcow2")

    k = fake_entry(snapdir, "kernel.0", age_days=0, mib=0)
    (k / "domain.xml").write_text("<domain><os><kernel>/gone/vmlinuz</kernel></os></domain>")
    with pytest.raises(SnapshotUnusableError, match="boots a kernel of its own"):
        resolve_boot_files(prune_settings, store.find("kernel.0"))
    with pytest.raises(SnapshotUnusableError, match="base image /nonexistent is gone"):
        export_snapshot(store.find("kernel.0"), prune_settings.state_dir / "x.qcow2")

    # A record that names the kernel (and what it booted with) needs no catalogue.
    record = json.loads((k / "record.json").read_text())
    kernel = prune_settings.state_dir / "vmlinuz"
    kernel.write_bytes(b"kernel")
    record.update(kernel=str(kernel), cmdline="console=ttyS0 quiet", guest_user="builder")
    (k / "record.json").write_text(json.dumps(record))
    files = resolve_boot_files(prune_settings, store.find("kernel.0"))
    assert (files.kernel, files.initrd, files.cmdline) == (kernel, None, "console=ttyS0 quiet")
    assert files.guest_user == "builder"
    kernel.unlink()
    with pytest.raises(SnapshotUnusableError, match=r"kernel .* is gone from this host"):
        resolve_boot_files(prune_settings, store.find("kernel.0"))
