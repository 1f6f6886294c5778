"""`glite-vm shell` without a VM: the protocol's pieces, choosing the VM, the command line,
the domain's shell port, and the guest's root scripts run for real on this host's terminals
(with this host's tools and with busybox's, which the test guests have)."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from glite_vm.cli.shell import split_words
from glite_vm.config import Settings
from glite_vm.errors import HypervisorError, RequestError
from glite_vm.service import protocol
from glite_vm.service.api import VmSummary
from glite_vm.service.connection import Call, ShellLink, read_request
from glite_vm.service.terminal import choose_vm, follow_console, terminal_type
from glite_vm.vm import guest_shell, shell_port
from glite_vm.vm.domain_xml import build_domain_xml, shell_socket_of, with_serial_console
from tests.support import local_account
from tests.unit.test_domain_xml import spec

GUESTS = Path(__file__).resolve().parents[1] / "guest" / "build"

# -- the protocol -------------------------------------------------------------------------


def line(message: Mapping[str, object]) -> bytes:
    return protocol.encode(message).rstrip(b"\n")


def test_keys_and_window_sizes_are_the_only_shell_input() -> None:
    assert protocol.shell_input(line({"in": base64.b64encode(b"ls\r").decode()})) == (
        "in",
        b"ls\r",
    )
    assert protocol.shell_input(line({"size": [50, 132]})) == ("size", (50, 132))
    for bad in (
        {"in": "not base64!"},
        {"in": 7},
        {"size": [50]},
        {"size": ["50", "132"]},
        {"size": [True, 80]},
        {"exec": ["rm", "-rf", "/"]},
    ):
        with pytest.raises(protocol.ProtocolError):
            protocol.shell_input(line(bad))
    too_many = base64.b64encode(b"x" * (protocol.SHELL_INPUT_CHUNK + 1)).decode()
    with pytest.raises(protocol.ProtocolError, match="more than"):
        protocol.shell_input(line({"in": too_many}))
    with pytest.raises(protocol.ProtocolError, match="longer than"):
        protocol.shell_input(b"x" * (protocol.MAX_SHELL_LINE + 1))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_what_follows_the_request_line_is_kept_for_the_shell(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    service, client = pair
    keys = line({"in": base64.b64encode(b"id\r").decode()}) + b"\n"
    client.sendall(protocol.encode({"op": "shell", "args": {"vm": "x"}}) + keys)
    op, args, rest = read_request(service)
    assert (op, args, rest) == ("shell", {"vm": "x"}, keys)
    link = ShellLink(Call(service, rest))
    assert link.events(0.1) == [("in", b"id\r")]


def test_the_shell_link_reads_lines_however_they_are_cut(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    service, client = pair
    link = ShellLink(Call(service))
    assert link.events(0.05) == []
    data = line({"size": [30, 100]}) + b"\n" + line({"in": "YQ=="}) + b"\n"
    client.sendall(data[:7])
    assert link.events(0.1) == []
    client.sendall(data[7:])
    assert link.events(0.1) == [("size", (30, 100)), ("in", b"a")]
    link.ready()
    assert link.output(b"\x1b[2J$ ")
    received = service_lines(client)
    assert received[0] == {"v": protocol.VERSION, "ready": True}
    assert base64.b64decode(received[1]["data"]) == b"\x1b[2J$ "
    client.shutdown(socket.SHUT_WR)
    assert link.events(0.5) is None  # the user hung up


def test_a_shell_client_cannot_make_the_service_buffer_without_end(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    service, client = pair
    link = ShellLink(Call(service))
    sender = threading.Thread(
        target=lambda: client.sendall(b"x" * (protocol.MAX_SHELL_LINE + 10)), daemon=True
    )
    sender.start()
    with pytest.raises(protocol.ProtocolError, match="longer than"):
        for _ in range(100):
            link.events(0.1)
    client.close()
    sender.join(timeout=5)


def service_lines(sock: socket.socket) -> list[dict[str, Any]]:
    sock.settimeout(2)
    data = b""
    while data.count(b"\n") < 2:
        data += sock.recv(65536)
    return [json.loads(x) for x in data.splitlines()]


# -- which VM -------------------------------------------------------------------------------


def summary(vm: str, job: str, scratch: str | None) -> VmSummary:
    return VmSummary(vm, "alice", 1001, job, "debian-12", 5.0, True, scratch)


VMS = [
    summary("glite-vm-alice-12.0-aaaaaa", "12.0", "/var/lib/condor/execute/dir_100"),
    summary("glite-vm-alice-13.0-bbbbbb", "13.0", "/var/lib/condor/execute/dir_200"),
    summary("glite-vm-alice-local-cccccc", "local", None),
]


def test_inside_a_jobs_sandbox_the_shell_finds_that_jobs_vm() -> None:
    assert choose_vm(VMS, None, "/var/lib/condor/execute/dir_200") == VMS[1].vm
    assert choose_vm(VMS, None, "/var/lib/condor/execute/dir_100/sub/dir") == VMS[0].vm
    # condor_ssh_to_job's shell may have moved; the job's own variable still says
    assert choose_vm(VMS, None, "/home/alice", "/var/lib/condor/execute/dir_100") == VMS[0].vm
    with pytest.raises(RequestError, match="no VM of yours serves /var/lib/condor/execute/dir_1"):
        choose_vm(VMS, None, "/var/lib/condor/execute/dir_1")  # a prefix is not a parent
    with pytest.raises(RequestError, match="no VM of yours"):
        choose_vm(VMS[2:], None, "/")


def test_a_vm_is_named_by_its_name_or_its_jobs_id() -> None:
    assert choose_vm(VMS, VMS[1].vm, "/") == VMS[1].vm
    assert choose_vm(VMS, "12.0", "/") == VMS[0].vm
    twice = [*VMS, summary("glite-vm-alice-12.0-dddddd", "12.0", "/x")]
    with pytest.raises(RequestError, match="several VMs"):
        choose_vm(twice, "12.0", "/")
    # not one of the caller's: left to the service, which refuses it as it refuses any
    assert choose_vm(VMS, "glite-vm-bob-14.0-eeeeee", "/") == "glite-vm-bob-14.0-eeeeee"


def test_the_command_line_splits_at_the_double_dash() -> None:
    assert split_words([]) == (None, None)
    assert split_words(["12.0"]) == ("12.0", None)
    assert split_words(["--", "id", "-u"]) == (None, ["id", "-u"])
    assert split_words(["vm", "--", "sh", "-c", "a -- b"]) == ("vm", ["sh", "-c", "a -- b"])
    with pytest.raises(RequestError, match="after --"):
        split_words(["vm", "id"])
    with pytest.raises(RequestError, match="followed by a command"):
        split_words(["vm", "--"])


def test_terminal_types_and_sizes_are_checked() -> None:
    assert terminal_type({"TERM": "xterm-256color"}) == "xterm-256color"
    assert terminal_type({"TERM": "x; rm -rf /"}) == "vt100"
    assert terminal_type({}) == "vt100"
    guest_shell.check_terminal("screen.xterm-256color", 24, 80)
    for term, rows, cols in (("", 24, 80), ("a b", 24, 80), ("x" * 65, 24, 80), ("vt100", 0, 80)):
        with pytest.raises(RequestError):
            guest_shell.check_terminal(term, rows, cols)
    with pytest.raises(RequestError, match="cols"):
        guest_shell.check_size(24, 100_000)


def test_the_console_follows_the_boot_log_until_the_vm_stops(tmp_path: Path) -> None:
    log = tmp_path / "boot.log"
    log.write_bytes(b"x" * 2_000_000 + b"[    0.1] booted\n")
    shown = tmp_path / "shown"
    w = os.open(shown, os.O_WRONLY | os.O_CREAT, 0o600)
    checks = iter([True, False])

    def running() -> bool:
        alive = next(checks)
        if not alive:
            with log.open("ab") as f:
                f.write(b"reboot: Power down\n")
        return alive

    follow_console(str(log), w, running, poll=0.01, check=0.05)
    os.close(w)
    out = shown.read_bytes()
    assert len(out) < 1_100_000  # only the last MiB of a chatty boot first
    assert out.endswith(b"booted\nreboot: Power down\n")
    (tmp_path / "link").symlink_to(log)
    with pytest.raises(OSError):
        follow_console(str(tmp_path / "link"), 1, lambda: False)


# -- the domain -----------------------------------------------------------------------------


def test_a_jobs_domain_has_a_shell_port_on_a_socket_libvirt_binds() -> None:
    sock = Path("/var/lib/glite-vm/run/shells/0f2e9a553c1b4d6e8f00123456789abc")
    root = parsed(build_domain_xml(spec(shell_socket=sock)))
    serials = root.findall("./devices/serial")
    assert [port_of(s) for s in serials] == ["0", "1"]
    shell = serials[1]
    # a Unix socket libvirtd binds (mode='bind') and the service connects to; no pty, no stream
    assert shell.get("type") == "unix"
    assert shell.find("source").attrib == {"mode": "bind", "path": str(sock)}  # type: ignore[union-attr]
    assert shell_socket_of(build_domain_xml(spec(shell_socket=sock))) == sock
    assert len(parsed(build_domain_xml(spec())).findall("./devices/serial")) == 1
    assert shell_socket_of(build_domain_xml(spec())) is None
    # a socket's name has 108 bytes with its NUL; a relative path is no socket of ours
    for bad in (Path("/" + "d" * 100 + "/shells/x"), Path("run/shells/x")):
        with pytest.raises(ValueError, match="at most 107 bytes"):
            build_domain_xml(spec(shell_socket=bad))
    # the throw-away VM of a kept snapshot gets its interactive console instead
    xml = build_domain_xml(spec(shell_socket=sock))
    again = parsed(with_serial_console(xml, Path("/x/boot.log"), "pty"))
    assert [port_of(s) for s in again.findall("./devices/serial")] == ["0"]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (pytest's own can be too long for a socket's name)."""
    path = Path(tempfile.mkdtemp(prefix="gvm-sh-"))
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_the_shell_socket_directory_is_private_and_sockets_of_gone_domains_are_swept(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(state_dir=short_dir / "state")
    path = shell_port.prepare_socket(settings, "0f2e9a55-3c1b-4d6e-8f00-123456789abc")
    assert path == short_dir / "state/run/shells/0f2e9a553c1b4d6e8f00123456789abc"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    path.parent.chmod(0o755)  # loosened by hand: made private again before use
    shell_port.prepare_socket(settings, "0f2e9a55-3c1b-4d6e-8f00-123456789abc")
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # a run directory too deep for a socket's name: a private directory in the runtime one
    deep = Settings(state_dir=short_dir / ("d" * 120))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_dir / "xdg"))
    (short_dir / "xdg").mkdir(mode=0o700)
    elsewhere = shell_port.prepare_socket(deep, "0f2e9a55-3c1b-4d6e-8f00-123456789abc")
    runtime = Path("/run") if os.geteuid() == 0 else short_dir / "xdg"
    try:
        assert elsewhere.parent.parent == runtime
        assert elsewhere.parent.name.startswith("glite-vm-shells-")
        assert stat.S_IMODE(elsewhere.parent.stat().st_mode) == 0o700
        assert shell_port.shell_dir(deep) == elsewhere.parent  # found again, the same
    finally:
        if os.geteuid() == 0:
            elsewhere.parent.rmdir()
    if os.geteuid() != 0:  # no runtime directory either: say what to change
        monkeypatch.delenv("XDG_RUNTIME_DIR")
        with pytest.raises(HypervisorError, match="GLITE_VM_RUN_DIR"):
            shell_port.prepare_socket(deep, "0f2e9a55-3c1b-4d6e-8f00-123456789abc")
    # the sweep takes sockets of domains that are gone, and nothing else
    live, stale = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"
    for uuid in (live, stale):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(shell_port.prepare_socket(settings, uuid)))
        listener.close()
    (path.parent / "notes.txt").write_text("not a socket")
    conn = _Domains({"glite-vm-a-1.0-abc": live})
    removed = shell_port.sweep_sockets(settings, conn)
    assert removed == [path.parent / stale.replace("-", "")]
    assert sorted(os.listdir(path.parent)) == [live.replace("-", ""), "notes.txt"]


class _Domains:
    """A libvirt connection's domain list (what the sweep asks of libvirt)."""

    def __init__(self, domains: dict[str, str]) -> None:
        self.domains = domains

    def listAllDomains(self, _flags: int) -> list[_Domain]:
        return [_Domain(name, uuid) for name, uuid in self.domains.items()]


class _Domain:
    def __init__(self, name: str, uuid: str) -> None:
        self._name, self._uuid = name, uuid

    def name(self) -> str:
        return self._name

    def UUIDString(self) -> str:
        return self._uuid


def parsed(xml: str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314 - our own output


def port_of(serial: ET.Element) -> str | None:
    target = serial.find("target")
    return None if target is None else target.get("port")


# -- the guest's scripts, on this host's terminals ----------------------------------------

TOOLS = (
    *("sh", "setsid", "stty", "su", "stat", "cat", "kill", "sleep", "id", "chown", "chmod"),
    *("ls", "sort"),
)


def busybox_path(tmp_path: Path) -> str | None:
    """A PATH of nothing but busybox's applets (the test guests' tools)."""
    deb = sorted((GUESTS / "debs").glob("busybox-static_*.deb"))
    if not deb:
        return None
    root = tmp_path / "busybox"
    subprocess.run(["dpkg-deb", "-x", str(deb[-1]), str(root)], check=True, timeout=60)
    bindir = tmp_path / "bb-bin"
    bindir.mkdir()
    for tool in TOOLS:
        (bindir / tool).symlink_to(root / "bin" / "busybox")
    return str(bindir)


@pytest.fixture(params=["host", "busybox"])
def tools(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(shell, PATH) the scripts run with: this host's, or busybox's only."""
    if request.param == "host":
        return "/bin/sh", "/usr/sbin:/usr/bin:/sbin:/bin"
    path = busybox_path(tmp_path)
    if path is None:
        pytest.fail("no busybox-static .deb next to the test guests: run tests/guest/build.sh")
    return f"{path}/sh", path


def on_terminal(command: list[str], slave: int) -> subprocess.Popen[bytes]:
    """``command`` in a new session whose controlling terminal is ``slave``."""
    return subprocess.Popen(["setsid", "-c", *command], stdin=slave, stdout=slave, stderr=slave)


def test_hanging_up_ends_every_process_of_that_terminal_and_no_other(
    tools: tuple[str, str], tmp_path: Path
) -> None:
    sh, path = tools
    master, slave = os.openpty()
    other_master, other_slave = os.openpty()
    pids = tmp_path / "pids"
    # a session on the terminal: its leader, a child, and a child that ignores SIGHUP
    script = (
        f"sleep 300 & echo $! >> {pids}; (trap '' HUP; exec sleep 300) & echo $! >> {pids}; wait"
    )
    leader = on_terminal(["sh", "-c", script], slave)
    bystander = on_terminal(["sleep", "300"], other_slave)
    tty_path = os.ttyname(slave)
    for fd in (slave, other_slave):
        os.close(fd)  # as in a guest: nothing but the session holds its terminal
    try:
        wait_until(lambda: pids.exists() and len(pids.read_text().split()) == 2)
        children = [int(p) for p in pids.read_text().split()]
        subprocess.run(
            [sh, "-c", guest_shell.GUEST_HANGUP, "glite-vm", tty_path],
            env={"PATH": path, "LC_ALL": "C"},
            check=True,
            timeout=120,  # a bound for a stuck script, not a speed target
        )
        assert leader.wait(timeout=5) in (-signal.SIGHUP, -signal.SIGKILL)
        for pid in children:
            wait_until(lambda pid=pid: not alive(pid))  # type: ignore[misc]
        assert bystander.poll() is None  # another terminal's process is none of its business
    finally:
        for proc in (leader, bystander):
            proc.kill()
            proc.wait()
        for fd in (master, other_master):
            os.close(fd)


def test_file_names_shaped_by_a_guest_user_never_choose_whom_the_hangup_kills(
    tools: tuple[str, str], tmp_path: Path
) -> None:
    """A guest user opens a file named "b<LF>/proc/PID/fd:<LF>x -> /dev/ttyS1" (directories
    make the slashes) and keeps it open in a process of its own: GNU ls prints names as they
    are, so a holder list parsed from `ls -l` names PID, and root (the hangup runs as root)
    kills a process that never touched the terminal: the guest agent, sshd, anything."""
    sh, path = tools
    master, slave = os.openpty()
    tty_path = os.ttyname(slave)
    os.close(slave)
    victim = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL)
    bait_dir = tmp_path / f"b\n/proc/{victim.pid}/fd:\nx -> {os.path.dirname(tty_path)}"
    bait_dir.mkdir(parents=True)
    bait_file = bait_dir / os.path.basename(tty_path)
    bait_file.touch()
    with open(bait_file, "rb") as held:
        holder = subprocess.Popen(["sleep", "300"], stdin=held)
    try:
        subprocess.run(
            [sh, "-c", guest_shell.GUEST_HANGUP, "glite-vm", tty_path],
            env={"PATH": path, "LC_ALL": "C"},
            check=True,
            timeout=120,  # a bound for a stuck script, not a speed target
        )
        assert victim.poll() is None, "the hangup killed a process named by a file name"
        assert holder.poll() is None
    finally:
        for proc in (victim, holder):
            proc.kill()
            proc.wait()
        os.close(master)


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def wait_until(check: Callable[[], bool], limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, "not within the time limit"
        time.sleep(0.05)


def test_a_session_starts_as_the_user_on_the_terminal_and_reports_its_status(
    tools: tuple[str, str], tmp_path: Path
) -> None:
    sh, path = tools
    user = "gvm-alice"
    entry = local_account(user)
    master, slave = os.openpty()
    tty_path = os.ttyname(slave)
    os.close(slave)  # the script opens the terminal itself, as in a guest
    try:
        script = guest_shell.GUEST_SHELL
        command = "id -u; tty; stty size; echo TERM=$TERM; grep SigIgn /proc/$$/status; exit 7"
        args = [tty_path, user, "xterm", "33", "101", "tty", "/bin/sh", "-c", command]
        proc = subprocess.Popen(
            [sh, "-c", script, "glite-vm-shell", *args],
            env={"PATH": path, "LC_ALL": "C"},
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        out = read_until_exit(master, proc)
        assert proc.returncode == 7, proc.stderr.read() if proc.stderr else ""
        text = out.decode(errors="replace")
        assert f"{entry.pw_uid}\r\n" in text
        assert f"{tty_path}\r\n" in text
        assert "33 101\r\n" in text
        assert "TERM=xterm\r\n" in text
        # Ctrl-C and Ctrl-\ work: the session does not start with SIGINT or SIGQUIT ignored
        ignored = int(text.split("SigIgn:")[1].split()[0], 16)
        assert not ignored & (1 << (signal.SIGINT - 1) | 1 << (signal.SIGQUIT - 1)), hex(ignored)
        st = os.stat(tty_path)
        assert (st.st_uid, st.st_mode & 0o777) == (entry.pw_uid, 0o600)  # as login(1) makes it
    finally:
        os.close(master)
    shutil.rmtree(tmp_path, ignore_errors=True)


def read_until_exit(master: int, proc: subprocess.Popen[bytes], limit: float = 30.0) -> bytes:
    """What the session wrote on the terminal, once its process ended (reading the master
    fails with EIO while nothing holds the terminal: before the session opens it, after)."""
    out = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        ready, _, _ = select.select([master], [], [], 0.05)
        got = b""
        if ready:
            try:
                got = os.read(master, 65536)
            except OSError:
                time.sleep(0.02)
        out += got
        if exited and not got:
            return out
    proc.kill()
    raise AssertionError(f"the session did not end within {limit:g} s: {out!r}")
