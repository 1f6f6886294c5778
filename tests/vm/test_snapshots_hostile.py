"""Root's snapshot tools over VM directories a user owns, and fills with traps.

After teardown a VM directory belongs to the job's owner, who can put anything in it. Here the
real user ``gvm-alice`` does, with her own processes, what such a user could: nest directories
thousands deep, put a FIFO where root reads, delete the record while root lists, swap the
export's temporary file for a link to a root-only canary, write records no printer should
print. Root runs ``glite-vm snapshots`` (and the library) as an admin would: every command
finishes, lists every directory (``gvm-bob``'s normal entry included), writes nothing through
a link, and leaves the canaries as they were.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.config import Settings
from glite_vm.snapshots.store import SnapshotStore
from tests.service.svc_support import Account, as_user, ensure_account

pytestmark = pytest.mark.vm

CLI_TIMEOUT = 60  # a command that has not finished by then is hanging
DEEP = 3000  # directory levels: beyond Python's recursion limit
RACE_SECONDS = 20.0
RACE_ROUNDS = 3000
LIBRARY = r"""
import json, sys
from pathlib import Path
from glite_vm.config import Settings
from glite_vm.knob_values import Retention
from glite_vm.snapshots.boot_files import resolve_boot_files
from glite_vm.snapshots.disk import SnapshotUnusableError
from glite_vm.snapshots.store import SnapshotStore
store = SnapshotStore(Settings(state_dir=Path(sys.argv[1])))
op = sys.argv[2]
if op == "prune":
    report = store.prune(Retention.parse(sys.argv[3]), all_users=True, running=[])
    print(json.dumps({
        "removed": [d.entry.name for d in report.removed],
        "failures": list(report.failures),
        "kept": [e.name for e in report.kept],
    }))
elif op == "boot-files":
    (entry,) = [e for e in store.entries(all_users=True) if e.name == sys.argv[3]]
    try:
        print(json.dumps(str(resolve_boot_files(store.settings, entry))))
    except SnapshotUnusableError as exc:
        print(json.dumps(f"unusable: {exc}"))
"""
WATCHER = r"""
import os, sys, time
directory, target, stop = sys.argv[1:4]
deadline = time.monotonic() + float(sys.argv[4])
swapped = 0
while time.monotonic() < deadline and not os.path.exists(stop):
    for name in os.listdir(directory):
        if not name.startswith(".") or name.startswith(".moved-"):
            continue
        path = os.path.join(directory, name)
        if os.path.islink(path):
            continue
        try:
            os.rename(path, os.path.join(directory, f".moved-{swapped}"))
            os.symlink(target, path)
            swapped += 1
        except OSError:
            pass
print(swapped)
"""


@dataclasses.dataclass(frozen=True)
class Store:
    """A host's state directory with a cached base image and VM directories of several users."""

    state: Path
    base: Path  # the cache's copy of the image the snapshots were made on
    alice: Account
    bob: Account

    @property
    def snapdir(self) -> Path:
        return self.state / "snapshots"

    @property
    def settings(self) -> Settings:
        return Settings(state_dir=self.state)

    def entry(self, owner: Account | None, job: str, *, age_days: float) -> Path:
        """A finished VM directory as teardown leaves it: kept snapshot (1 MiB of data on the
        cached base), boot log, record, domain XML; the owner's (0700/0600) when given."""
        who = owner.name if owner else "root"
        d = self.snapdir / f"glite-vm-{who}-{job}-{secrets.token_hex(3)}"
        d.mkdir(mode=0o700)
        snap = d / "snapshot.qcow2"
        qemu_img(
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            str(self.base),
            "-F",
            "qcow2",
            str(snap),
            "64M",
        )
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x6b 1M 1M", str(snap)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        (d / "boot.log").write_text(f"Linux version test\nboot of {job}\n")
        (d / "domain.xml").write_text("<domain type='qemu'><name>x</name></domain>")
        record = {
            "domain": d.name,
            "job_id": job,
            "owner": who,
            "image": "test-image",
            "image_sha256": self.base.name,
            "base_image": str(self.base),
            "base_format": "qcow2",
            "failed": True,
            "exit_code": 1,
            "signal": None,
            "snapshot": str(snap),
            "boot_log": str(d / "boot.log"),
            "timings": {"boot": 1.0},
            "finished": time.time() - age_days * 86400,
        }
        (d / "record.json").write_text(json.dumps(record))
        if owner is not None:
            for p in [d, *d.iterdir()]:
                os.chown(p, owner.uid, owner.gid)
                p.chmod(0o700 if p == d else 0o600)
        return d

    def env(self) -> dict[str, str]:
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            "GLITE_VM_STATE_DIR": str(self.state),
            "GLITE_VM_CONFIG": "/nonexistent",
        }

    def cli(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """``glite-vm snapshots ARGS`` as root; a command that hangs fails the test."""
        try:
            return subprocess.run(
                [sys.executable, "-m", "glite_vm", "snapshots", *args],
                capture_output=True,
                env=self.env(),
                cwd="/",
                timeout=CLI_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`glite-vm snapshots {' '.join(args)}` hung") from None

    def library(self, *args: str) -> Any:
        """A call of the library as root, in its own process; its JSON answer."""
        try:
            proc = subprocess.run(
                [sys.executable, "-c", LIBRARY, str(self.state), *args],
                capture_output=True,
                text=True,
                env=self.env(),
                cwd="/",
                timeout=CLI_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the library call {args} hung") from None
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout)

    def as_alice(self, script: str, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            [*as_user(self.alice), sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            cwd="/",
            timeout=timeout,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store() -> Iterator[Store]:
    state = Path(tempfile.mkdtemp(prefix="gvm-hostile-", dir="/var/tmp"))
    try:
        state.chmod(0o711)
        (state / "snapshots").mkdir(mode=0o755)
        blobs = state / "cache" / "blobs"
        blobs.mkdir(parents=True)
        made = state / "base.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", str(made), "64M")
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", str(made)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        base = blobs / sha256_of(made)
        made.rename(base)
        base.chmod(0o444)
        yield Store(state, base, ensure_account("gvm-alice"), ensure_account("gvm-bob"))
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(state)], check=False, timeout=300)


def root_canary(store: Store, name: str) -> tuple[Path, str]:
    """A root-only file (0600 in a 0711 directory) holding a secret; and its digest."""
    directory = store.state / "canary"
    directory.mkdir(mode=0o711, exist_ok=True)
    path = directory / name
    path.write_bytes(f"CANARY-{secrets.token_hex(16)}\n".encode() * 64)
    path.chmod(0o600)
    return path, sha256_of(path)


def listed(store: Store) -> dict[str, dict[str, Any]]:
    proc = store.cli("list", "--all", "--json")
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return {e["name"]: e for e in json.loads(proc.stdout)}


# --- the attacks ----------------------------------------------------------------------------


def test_a_tree_thousands_deep_is_listed_counted_and_pruned(store: Store) -> None:
    alices = store.entry(store.alice, "deep.0", age_days=10)
    bobs = store.entry(store.bob, "normal.0", age_days=10)
    recent = store.entry(None, "recent.0", age_days=1)
    store.as_alice(
        f"import os\nos.chdir({str(alices)!r})\nfor _ in range({DEEP}):\n"
        "    os.mkdir('d')\n    os.chdir('d')\nopen('bottom', 'w').write('x' * 4096)\n"
    )
    entries = listed(store)
    assert set(entries) == {alices.name, bobs.name, recent.name}
    assert entries[alices.name]["state"] == "finished"
    assert entries[alices.name]["size_complete"] is False  # counted only to a bounded depth
    assert entries[bobs.name]["size_complete"] is True
    table = store.cli("list", "--all")
    assert table.returncode == 0 and alices.name.encode() in table.stdout, table.stderr

    report = store.library("prune", "7d")
    assert sorted(report["removed"]) == sorted([alices.name, bobs.name]), report
    assert report["failures"] == []
    assert not alices.exists() and not bobs.exists() and recent.is_dir()


def test_a_fifo_named_record_json_stops_nobodys_list_or_prune(store: Store) -> None:
    alices = store.entry(store.alice, "fifo.0", age_days=10)
    bobs = store.entry(store.bob, "normal.0", age_days=10)
    store.as_alice(
        f"import os\nos.unlink({str(alices / 'record.json')!r})\n"
        f"os.mkfifo({str(alices / 'record.json')!r}, 0o600)\n"
    )
    entries = listed(store)
    assert entries[alices.name]["state"] == "incomplete"
    assert "record.json" in entries[alices.name]["detail"]
    assert entries[bobs.name]["state"] == "finished"
    dry = store.cli("prune", "--all", "--dry-run", "--max-age", "7d")
    assert dry.returncode == 0, dry.stderr
    assert f"would remove {bobs.name}".encode() in dry.stdout


def test_fifos_for_the_boot_log_and_domain_xml_do_not_hang_show_or_boot(store: Store) -> None:
    alices = store.entry(store.alice, "fifos.0", age_days=1)
    store.as_alice(
        "import os, sys\nfor name in ('boot.log', 'domain.xml'):\n"
        f"    path = os.path.join({str(alices)!r}, name)\n"
        "    os.unlink(path)\n    os.mkfifo(path, 0o600)\n"
    )
    shown = store.cli("show", alices.name)
    assert shown.returncode == 0, shown.stderr
    assert b"(empty)" in shown.stdout  # no boot log to show
    # What `snapshots boot` reads before it starts anything: the original VM's domain XML.
    assert "BootFiles(" in store.library("boot-files", alices.name)


def test_a_record_deleted_while_root_lists_never_breaks_the_listing(store: Store) -> None:
    alices = store.entry(store.alice, "vanishing.0", age_days=1)
    record = json.loads((alices / "record.json").read_text())
    del record["finished"]  # so the listing looks at the file again for its time
    (alices / "record.json").write_text(json.dumps(record))
    stop = store.state / "stop"
    flipper = subprocess.Popen(
        [
            *as_user(store.alice),
            sys.executable,
            "-c",
            "import os, sys, time\n"
            "path, stop, data = sys.argv[1], sys.argv[2], sys.argv[3].encode()\n"
            "deadline = time.monotonic() + 60\n"
            "while time.monotonic() < deadline and not os.path.exists(stop):\n"
            "    os.unlink(path)\n"
            "    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)\n"
            "    os.write(fd, data)\n"
            "    os.close(fd)\n",
            str(alices / "record.json"),
            str(stop),
            json.dumps(record),
        ],
        cwd="/",
    )
    seen: dict[str, int] = {}
    snapshots = SnapshotStore(store.settings)
    try:
        deadline = time.monotonic() + RACE_SECONDS
        for _ in range(RACE_ROUNDS):
            if time.monotonic() > deadline:
                break
            found = {e.name: e for e in snapshots.entries(all_users=True)}
            state = (
                getattr(found[alices.name], "state", "finished")
                if alices.name in found
                else "missing"
            )
            seen[state] = seen.get(state, 0) + 1
    finally:
        stop.touch()
        flipper.wait(timeout=60)
    assert seen.get("finished") and seen.get("incomplete"), seen  # the race was real
    assert "missing" not in seen, seen  # every directory is listed, whatever its record does


def test_export_into_a_users_directory_never_writes_through_their_links(store: Store) -> None:
    """Alice swaps every temporary name that appears in her directory for a link to a
    root-only canary while root exports her snapshot there."""
    alices = store.entry(store.alice, "export.0", age_days=1)
    out = store.state / "alice-out"
    out.mkdir(mode=0o755)
    os.chown(out, store.alice.uid, store.alice.gid)
    canary, digest = root_canary(store, "root-only.qcow2")
    stop = store.state / "stop-watching"
    watcher = subprocess.Popen(
        [
            *as_user(store.alice),
            sys.executable,
            "-c",
            WATCHER,
            str(out),
            str(canary),
            str(stop),
            "240",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    results = []
    try:
        for attempt in range(3):
            dest = out / f"debug-{attempt}.qcow2"
            proc = store.cli("export", alices.name, str(dest))
            results.append((proc.returncode, proc.stderr.decode(errors="replace")))
            assert sha256_of(canary) == digest, f"root wrote through alice's link: {results}"
            assert "Traceback" not in results[-1][1], results[-1][1]
            if proc.returncode == 0:
                st = dest.lstat()
                assert dest.is_file() and not dest.is_symlink()
                assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
                check = subprocess.run(
                    ["qemu-img", "check", "-q", str(dest)],
                    check=False,
                    capture_output=True,
                    timeout=60,
                )
                assert check.returncode == 0, check.stderr
    finally:
        stop.touch()
        swapped, _ = watcher.communicate(timeout=60)
    assert int(swapped) >= 1, "alice's watcher never got to swap a name"
    assert any(code == 0 for code, _err in results), results
    assert sha256_of(canary) == digest


def test_links_for_the_snapshot_and_boot_log_lead_root_nowhere(store: Store) -> None:
    alices = store.entry(store.alice, "links.0", age_days=1)
    disk, disk_digest = root_canary(store, "root-only.qcow2")
    text, _ = root_canary(store, "root-only.log")
    secret = text.read_bytes()[:40]
    store.as_alice(
        "import os, sys\nd = sys.argv[1]\n"
        "for name, target in (('snapshot.qcow2', sys.argv[2]), ('boot.log', sys.argv[3])):\n"
        "    os.unlink(os.path.join(d, name))\n    os.symlink(target, os.path.join(d, name))\n",
        str(alices),
        str(disk),
        str(text),
    )
    shown = store.cli("show", alices.name, "--json")
    assert shown.returncode == 0, shown.stderr
    assert secret not in shown.stdout and secret not in shown.stderr
    assert json.loads(shown.stdout)["snapshot_path"] is None  # a link is not a kept disk
    dest = store.state / "stolen.qcow2"
    export = store.cli("export", alices.name, str(dest))
    assert export.returncode == 125 and not dest.exists(), export.stderr
    assert sha256_of(disk) == disk_digest


def test_records_no_printer_should_print_are_listed_safely(store: Store) -> None:
    """Infinite times, lone surrogates, terminal escapes, a 2 GiB sparse record, JSON nested
    100 000 deep, file names that are not UTF-8: shown as what they are, nobody's list stops."""
    bobs = store.entry(store.bob, "normal.0", age_days=1)
    weird = store.entry(store.alice, "weird.0", age_days=1)
    nested = store.entry(store.alice, "nested.0", age_days=1)
    huge = store.entry(store.alice, "huge.0", age_days=1)
    escape = "\x1b]0;owned\x07\x1b[2J"
    weird_record = (
        '{"finished": -Infinity, "owner": "\\ud800' + json.dumps(escape)[1:-1] + '", '
        '"image": ' + json.dumps(escape) + ', "job_id": "' + "x" * 10000 + '", '
        '"exit_code": ' + "9" * 4000 + ', "timings": {"boot": Infinity}}'
    )
    store.as_alice(
        "import os, sys\n"
        "weird, text, nested, huge, escape = sys.argv[1:6]\n"
        "open(os.path.join(weird, 'record.json'), 'w').write(text)\n"
        "open(os.path.join(weird, 'boot.log'), 'w').write('booted ' + escape + '\\n')\n"
        "open(os.path.join(nested, 'record.json'), 'w').write('[' * 100000)\n"
        "os.truncate(os.path.join(huge, 'record.json'), 2 << 30)\n"
        "open(os.path.join(os.fsencode(weird), b'\\xff\\xfe-not-utf8'), 'w').close()\n",
        str(weird),
        weird_record,
        str(nested),
        str(huge),
        escape,
    )
    entries = listed(store)
    assert set(entries) == {bobs.name, weird.name, nested.name, huge.name}
    assert entries[weird.name]["state"] == "finished"
    assert entries[nested.name]["state"] == "incomplete"
    assert entries[huge.name]["state"] == "incomplete"
    assert "larger than" in entries[huge.name]["detail"]
    for args in (("list", "--all"), ("show", weird.name), ("prune", "--all", "--dry-run")):
        proc = store.cli(*args)
        assert proc.returncode == 0, (args, proc.stderr.decode(errors="replace")[-2000:])
        assert b"\x1b" not in proc.stdout, args  # no terminal escapes reach root's terminal


def test_roots_boot_of_a_users_snapshot_takes_no_kernel_path_from_the_record(
    store: Store,
) -> None:
    """A VM's start copies its kernel and initrd as root (readable by QEMU): for someone else's
    snapshot the record's paths are not used, only the catalogue's."""
    alices = store.entry(store.alice, "kernel.0", age_days=1)
    canary, _ = root_canary(store, "root-only-kernel")
    store.as_alice(
        "import json, os, sys\nd, canary = sys.argv[1:3]\n"
        "path = os.path.join(d, 'record.json')\n"
        "record = json.load(open(path))\n"
        "record.update(kernel=canary, initrd=canary, cmdline='console=ttyS0')\n"
        "os.unlink(path)\njson.dump(record, open(path, 'w'))\n"
        "xml = os.path.join(d, 'domain.xml')\nos.unlink(xml)\n"
        "open(xml, 'w').write('<domain><os><kernel>/k</kernel></os></domain>')\n",
        str(alices),
        str(canary),
    )
    answer = store.library("boot-files", alices.name)
    assert str(canary) not in answer, answer
    assert answer.startswith("unusable:") and "boots a kernel of its own" in answer, answer


def test_qemus_group_is_given_cached_custom_images_only(store: Store) -> None:
    """A snapshot's record names its base, and root's boot of it starts a VM on that base:
    only a private file of the image cache gets QEMU's group, never another root file."""
    import libvirt  # noqa: PLC0415

    from glite_vm.vm.qemu_user import let_qemu_read, qemu_ids  # noqa: PLC0415

    blobs = store.base.parent
    cached = blobs / ("c" * 64)
    cached.write_bytes(b"custom image")
    cached.chmod(0o440)
    elsewhere, _ = root_canary(store, "root-and-group-only")  # like /etc/shadow: 0640
    elsewhere.chmod(0o640)
    conn = libvirt.open("qemu:///system")
    try:
        ids = qemu_ids(conn, "qemu")
        assert ids is not None
        let_qemu_read(conn, "qemu", [elsewhere, cached, store.base], cache_blobs=blobs)
    finally:
        conn.close()
    assert cached.stat().st_gid == ids[1]
    assert elsewhere.stat().st_gid == 0  # untouched
    assert store.base.stat().st_gid == 0  # world-readable already: untouched
