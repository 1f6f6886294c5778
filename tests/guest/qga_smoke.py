#!/usr/bin/env python3
"""Boot the test guests built by tests/guest/build.sh with plain QEMU (TCG) and check them.

    python3 tests/guest/qga_smoke.py OUTDIR [--guest direct|disk|noagent|all] [-v]

For each guest: boots it on a fresh qcow2 overlay (the base files are never written), waits
for qemu-guest-agent (guest-sync-delimited), then through guest-exec checks that root is uid 0,
that `su -s /bin/sh glite -c 'id -u'` prints 1000, writes /home/glite/probe.txt as glite, shuts
the guest down through guest-shutdown and reads the file back out of the overlay with debugfs
(so it really landed on the disk).  "noagent" boots the direct guest with glite_noagent and
checks that no agent answers.  Prints boot-to-agent times.  Stdlib only; always kills QEMU.
Not a pytest module on purpose (needs a built OUTDIR and some TCG time per guest).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

AGENT_PORT = "org.qemu.guest_agent.0"
NOAGENT_FLAG = "glite_noagent"


class Agent:
    """Minimal QGA client over QEMU's unix-socket chardev."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""
        self.next_id = 1000

    def _connected(self) -> socket.socket:
        if self.sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(self.path)
            except OSError:
                s.close()
                raise
            self.sock = s
        return self.sock

    def _readline(self, deadline: float) -> bytes | None:
        sock = self._connected()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("agent socket closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.replace(b"\xff", b"").strip()

    def _messages(self, deadline: float) -> dict[str, Any] | None:
        """Next JSON object from the agent, None at the deadline."""
        while True:
            line = self._readline(deadline)
            if line is None:
                return None
            try:
                msg = json.loads(line) if line else None
            except ValueError:
                continue
            if isinstance(msg, dict):
                return msg

    def sync(self, timeout: float) -> bool:
        """One guest-sync-delimited round trip; True if the agent answered in time."""
        sock = self._connected()
        self.next_id += 1
        sent = self.next_id
        req = {"execute": "guest-sync-delimited", "arguments": {"id": sent}}
        sock.sendall(b"\xff" + json.dumps(req).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while (msg := self._messages(deadline)) is not None:
            if msg.get("return") == sent:
                return True
        return False

    def call(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        """Run one command; the reply is matched through the request "id" (echoed by QGA)."""
        sock = self._connected()
        self.next_id += 1
        req: dict[str, Any] = {"execute": cmd, "id": f"smoke-{self.next_id}"}
        if args is not None:
            req["arguments"] = args
        sock.sendall(json.dumps(req).encode() + b"\n")
        if cmd == "guest-shutdown":
            return None  # no reply on success
        deadline = time.monotonic() + timeout
        while (msg := self._messages(deadline)) is not None:
            if msg.get("id") != req["id"]:
                continue  # e.g. a late guest-sync answer
            if "error" in msg:
                raise RuntimeError(f"{cmd}: {msg['error']}")
            return msg.get("return")
        raise TimeoutError(f"no reply to {cmd}")

    def exec(self, argv: list[str], timeout: float = 60.0) -> tuple[int, str, str]:
        args = {"path": argv[0], "arg": argv[1:], "capture-output": True}
        pid = self.call("guest-exec", args)["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.call("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
                err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
                return int(st.get("exitcode", -1)), out, err
            time.sleep(0.1)
        raise TimeoutError(f"guest-exec {argv} did not finish")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Boot:
    outdir: Path
    manifest: dict[str, Any]
    kind: str  # "direct" or "disk"
    overlay: Path
    sock: Path
    log: Path
    extra_cmdline: str = ""

    def qemu_cmd(self) -> list[str]:
        cmd = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.log}",
            "-device", "virtio-serial-pci",
            "-chardev", f"socket,path={self.sock},server=on,wait=off,id=qga0",
            "-device", f"virtserialport,chardev=qga0,name={AGENT_PORT}",
            "-drive", f"file={self.overlay},if=virtio,format=qcow2",
            "-nic", "none",
        ]  # fmt: skip
        if self.kind == "direct":
            d = self.manifest["direct"]
            cmdline = f"{d['cmdline']} {self.extra_cmdline}".strip()
            cmd += [
                "-kernel", str(self.outdir / d["kernel"]),
                "-initrd", str(self.outdir / d["initrd"]),
                "-append", cmdline,
            ]  # fmt: skip
        return cmd


def read_file_from_ext4(image: Path, path: str, workdir: Path, kind: str) -> str:
    """Read PATH from the ext4 file system inside IMAGE (qcow2) without mounting anything."""
    raw = workdir / "check.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw], check=True)
    dev = str(raw)
    if kind == "disk":  # the root file system is partition 2
        dump = subprocess.run(["sfdisk", "-d", raw], check=True, capture_output=True, text=True)
        starts = [
            int(line.split("start=")[1].split(",")[0])
            for line in dump.stdout.splitlines()
            if "start=" in line
        ]
        dev = f"{raw}?offset={starts[1] * 512}"
    r = subprocess.run(
        ["debugfs", "-R", f"cat {path}", dev], capture_output=True, text=True, check=False
    )
    raw.unlink()
    return r.stdout


def wait_for_agent(agent: Agent, proc: subprocess.Popen[bytes], deadline: float) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"qemu exited: {proc.returncode}")
        try:
            if agent.sync(timeout=1.0):
                return True
        except OSError:  # socket not there yet / reset
            agent.close()
            time.sleep(0.2)
    return False


def check_guest(agent: Agent, result: dict[str, Any]) -> None:
    rc, out, err = agent.exec(["/bin/sh", "-c", "id -u"])
    assert (rc, out.strip()) == (0, "0"), (rc, out, err)
    rc, out, err = agent.exec(["/bin/su", "-s", "/bin/sh", "glite", "-c", "id -u"])
    assert (rc, out.strip()) == (0, "1000"), (rc, out, err)
    probe = "echo glite-probe > /home/glite/probe.txt && ls -ln /home/glite/probe.txt"
    rc, out, err = agent.exec(["/bin/su", "-s", "/bin/sh", "glite", "-c", probe])
    assert rc == 0, (rc, out, err)
    _rc, out, _err = agent.exec(["/bin/sh", "-c", "sync; cat /proc/mounts; free -m"])
    result["guest_info"] = out


def run_guest(outdir: Path, manifest: dict[str, Any], guest: str, timeout: float) -> dict[str, Any]:
    kind = "direct" if guest in ("direct", "noagent") else "disk"
    base = outdir / manifest[kind]["disk"]
    base_sha = sha256(base)
    work = Path(tempfile.mkdtemp(prefix=f"glite-smoke-{guest}-"))
    boot = Boot(
        outdir, manifest, kind, work / "overlay.qcow2", work / "qga.sock", work / "console.log",
        extra_cmdline=NOAGENT_FLAG if guest == "noagent" else "",
    )  # fmt: skip
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, boot.overlay],
        check=True,
    )
    result: dict[str, Any] = {"guest": guest}
    t0 = time.monotonic()
    proc = subprocess.Popen(boot.qemu_cmd(), stdin=subprocess.DEVNULL, start_new_session=True)
    agent = Agent(str(boot.sock))
    try:
        deadline = t0 + timeout
        if guest == "noagent":
            # wait for init to say it will not start the agent, then make sure nobody answers
            while not boot.log.exists() or "NOT starting the agent" not in boot.log.read_text(
                errors="replace"
            ):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("no 'NOT starting the agent' line on the console")
                time.sleep(0.5)
            result["boot_to_init_s"] = round(time.monotonic() - t0, 2)
            assert not wait_for_agent(agent, proc, time.monotonic() + 10), "an agent answered"
            result["ok"] = True
            return result

        if not wait_for_agent(agent, proc, deadline):
            raise TimeoutError(f"agent not ready after {timeout}s")
        result["boot_to_agent_s"] = round(time.monotonic() - t0, 2)
        check_guest(agent, result)
        agent.call("guest-shutdown")
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise RuntimeError("guest did not power off after guest-shutdown") from None
        result["shutdown_ok"] = True
        # direct: /home is /data/home, i.e. /home on the data disk; disk: /home on the root fs
        content = read_file_from_ext4(boot.overlay, "/home/glite/probe.txt", work, kind)
        assert content.strip() == "glite-probe", f"probe file not on the disk: {content!r}"
        result["probe_on_disk"] = True
        assert sha256(base) == base_sha, "base image changed!"
        result["ok"] = True
        return result
    finally:
        agent.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log = boot.log.read_text(errors="replace") if boot.log.exists() else ""
        result["console"] = log
        if result.get("ok"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"--- {guest}: console of the failed boot ({boot.log}) ---\n{log[-4000:]}",
                  file=sys.stderr)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--guest", default="all", choices=["direct", "disk", "noagent", "all"])
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    manifest = json.loads((a.outdir / "guests.json").read_text())
    guests = ["direct", "disk", "noagent"] if a.guest == "all" else [a.guest]
    failed = False
    for g in guests:
        try:
            r = run_guest(a.outdir, manifest, g, a.timeout)
        except Exception as e:  # report and go on with the next guest
            failed = True
            print(f"{g}: FAILED: {e!r}")
            continue
        console = r.pop("console", "")
        info = r.pop("guest_info", "")
        print(f"{g}: " + json.dumps(r))
        if a.verbose:
            print(info)
            print("\n".join(ln for ln in console.splitlines() if "glite-guest" in ln))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
