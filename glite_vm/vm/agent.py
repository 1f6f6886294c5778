"""A client for the standard qemu-guest-agent, spoken through libvirt.

libvirt owns the agent's channel and synchronises it (``guest-sync``) before each command, so
the client only sends JSON commands and maps failures to :class:`~glite_vm.errors.AgentError`.
Binary data travels base64-encoded, as the agent protocol defines.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

import libvirt
import libvirt_qemu

from glite_vm.errors import AgentError

FILE_CHUNK = 64 << 10  # bytes per guest-file-read/write; 256 KiB writes stalled the channel (TCG)
#: The search path of every process the agent starts (it runs as root in the guest).
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The whole environment of every process the agent starts, unless a caller gives another one.
#: qemu-guest-agent passes no environment of its own when asked for one, so nothing a job sent
#: (PATH, LD_PRELOAD, ENV, IFS, ...) reaches a root process: the job's environment is applied
#: only to its payload, by ``env -i`` after the switch to the job's user (guest_run.GUEST_RUN).
ROOT_ENV = (f"PATH={GUEST_PATH}", "LC_ALL=C")


@dataclasses.dataclass(frozen=True)
class ExecStatus:
    """``guest-exec-status`` of one process."""

    exited: bool
    exitcode: int | None = None
    signal: int | None = None
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False


class GuestAgent:
    """Commands to the agent of one running domain."""

    def __init__(self, domain: libvirt.virDomain) -> None:
        self.domain = domain

    def command(
        self, execute: str, arguments: dict[str, Any] | None = None, *, timeout: int = 30
    ) -> Any:
        msg: dict[str, Any] = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        try:
            reply = libvirt_qemu.qemuAgentCommand(self.domain, json.dumps(msg), timeout, 0)
        except libvirt.libvirtError as exc:
            if not _connection_alive(self.domain):
                raise AgentError(
                    f"lost the connection to libvirtd (stopped or restarted?) during guest agent "
                    f"command {execute}: {exc}"
                ) from exc
            raise AgentError(f"guest agent command {execute} failed: {exc}") from exc
        try:
            decoded = json.loads(reply)
        except ValueError as exc:
            raise AgentError(f"guest agent sent malformed JSON for {execute}") from exc
        if "error" in decoded:
            err = decoded["error"]
            raise AgentError(f"guest agent refused {execute}: {err.get('desc', err)}")
        return decoded.get("return")

    def ping(self, timeout: int = 1) -> bool:
        """True when the agent answers within ``timeout`` seconds."""
        try:
            self.command("guest-ping", timeout=timeout)
        except AgentError:
            return False
        return True

    # -- processes ---------------------------------------------------------------------------

    def spawn(
        self,
        path: str,
        args: list[str],
        *,
        env: list[str] | None = None,
        capture: bool = False,
        input_data: bytes | None = None,
    ) -> int:
        arguments: dict[str, Any] = {
            "path": path,
            "arg": args,
            "capture-output": capture,
            "env": list(ROOT_ENV) if env is None else env,
        }
        if input_data is not None:
            arguments["input-data"] = base64.b64encode(input_data).decode()
        result = self.command("guest-exec", arguments)
        return int(result["pid"])

    def status(self, pid: int) -> ExecStatus:
        r = self.command("guest-exec-status", {"pid": pid})
        return ExecStatus(
            exited=bool(r.get("exited")),
            exitcode=r.get("exitcode"),
            signal=r.get("signal"),
            stdout=base64.b64decode(r.get("out-data", "")),
            stderr=base64.b64decode(r.get("err-data", "")),
            truncated=bool(r.get("out-truncated") or r.get("err-truncated")),
        )

    def run(
        self,
        argv: list[str],
        *,
        timeout: float = 60.0,
        env: list[str] | None = None,
        input_data: bytes | None = None,
        max_poll: float = 0.1,
    ) -> ExecStatus:
        """Run a short command to completion and return its captured output; its status is
        asked for at growing intervals of up to ``max_poll`` seconds."""
        pid = self.spawn(argv[0], argv[1:], env=env, capture=True, input_data=input_data)
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            st = self.status(pid)
            if st.exited:
                return st
            if time.monotonic() > deadline:
                raise AgentError(f"guest command {argv[0]} did not finish within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, max_poll)

    # -- files (small ones: configuration, certificates, the payload's output streams) ------

    def open(self, path: str, mode: str = "r") -> int:
        return int(self.command("guest-file-open", {"path": path, "mode": mode}))

    def read(self, handle: int, count: int = FILE_CHUNK) -> tuple[bytes, bool]:
        r = self.command("guest-file-read", {"handle": handle, "count": count})
        return base64.b64decode(r.get("buf-b64", "")), bool(r.get("eof"))

    def write(self, handle: int, data: bytes) -> None:
        for start in range(0, len(data), FILE_CHUNK):
            chunk = data[start : start + FILE_CHUNK]
            self.command(
                "guest-file-write",
                {"handle": handle, "buf-b64": base64.b64encode(chunk).decode()},
            )

    def close(self, handle: int) -> None:
        self.command("guest-file-close", {"handle": handle})

    def read_file(self, path: str, limit: int = 64 << 20) -> bytes:
        handle = self.open(path, "r")
        try:
            out = bytearray()
            while len(out) <= limit:
                data, eof = self.read(handle)
                out += data
                if eof or not data:
                    return bytes(out)
            raise AgentError(f"guest file {path} is larger than {limit} bytes")
        finally:
            self.close(handle)

    def write_file(self, path: str, data: bytes) -> None:
        handle = self.open(path, "w")
        try:
            self.write(handle, data)
        finally:
            self.close(handle)


def _connection_alive(domain: libvirt.virDomain) -> bool:
    try:
        return bool(domain.connect().isAlive())
    except libvirt.libvirtError:
        return False
