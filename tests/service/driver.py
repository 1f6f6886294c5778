"""A client of the glite-vm service, run by the tests as a real local user (setpriv).

Usage: ``python driver.py '<json request>'``; prints one JSON object on stdout:
``{"ok": true, "result": ...}`` or ``{"ok": false, "type": ..., "disposition": ...,
"message": ...}`` for a glite-vm error, or ``{"ok": false, "type": "OSError", "errno": ...}``
for a file the user could not open. Output chunks of ``exec`` are recorded with the time each
one arrived (``time.monotonic()``, comparable with the test process on the same host).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glite_vm.condor.jobad import AdValue, request_from_job_ad
from glite_vm.condor.launcher import LauncherArgs, LauncherContext
from glite_vm.condor.launcher import run as run_launcher
from glite_vm.condor.under_starter import raise_on_stop_signals
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError
from glite_vm.request import JobRequest
from glite_vm.service.client import ServiceClient
from glite_vm.slots import SlotFacts


def main(request: dict[str, Any]) -> dict[str, Any]:
    op = request["op"]
    if op == "read":
        try:
            with open(request["path"], "rb") as f:
                data = f.read()
        except OSError as exc:
            return {"ok": False, "type": "OSError", "errno": exc.errno, "message": str(exc)}
        return {"ok": True, "result": base64.b64encode(data).decode()}
    if op == "raw":
        return raw(request["socket"], Path(request["line_file"]).read_bytes())
    if op == "launch":
        return {"ok": True, "result": launch(request)}
    client = ServiceClient(
        request.get("socket") or None,
        connect_timeout=float(request.get("connect_timeout", 5.0)),
        idle_timeout=float(request.get("idle_timeout", 30.0)),
    )
    try:
        return {"ok": True, "result": call(client, op, request)}
    except GliteVmError as exc:
        return {
            "ok": False,
            "type": type(exc).__name__,
            "disposition": exc.disposition.value,
            "message": str(exc),
        }


def raw(path: str, line: bytes) -> dict[str, Any]:
    """Send one request line as it is (no client-side checks: what a hostile caller sends) and
    return the service's final answer, or how the connection ended without one."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(path)
        s.sendall(line)
        buffer = b""
        while True:
            try:
                chunk = s.recv(1 << 16)
            except OSError as exc:
                return {"ok": False, "type": "closed", "message": str(exc)}
            if not chunk:
                return {"ok": False, "type": "closed", "message": "no answer"}
            buffer += chunk
            while b"\n" in buffer:
                answer, buffer = buffer.split(b"\n", 1)
                message = json.loads(answer)
                if "ok" not in message:
                    continue  # a heartbeat
                if message["ok"]:
                    return {"ok": True, "result": message["result"]}
                error = message["error"]
                return {
                    "ok": False,
                    "type": error["type"],
                    "disposition": error["disposition"],
                    "message": error["message"],
                }


class FileChirp:
    """Chirp into a JSON file (``condor_chirp set_job_attr`` without a starter): what the
    launcher puts into the job ad, readable by the test while the launcher still runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set_attributes(self, attributes: Mapping[str, AdValue]) -> None:
        data = json.loads(self.path.read_text()) if self.path.exists() else {}
        data.update(attributes)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.path)


def launch(r: dict[str, Any]) -> dict[str, Any]:
    """The real launcher for the VM ``r["vm"]``, as the starter runs it in the job's scratch
    directory (``$_CONDOR_JOB_AD`` in it); its chirps go to ``r["chirp_file"]``. A stop signal
    tears the VM down and kills this process by it, as it does the launcher."""
    scratch = Path(r["scratch_dir"])
    raise_on_stop_signals()
    out, err = bytearray(), bytearray()
    ctx = LauncherContext(
        settings=Settings(socket_path=Path(r["socket"])),
        environ={"_CONDOR_SCRATCH_DIR": str(scratch), "_CONDOR_JOB_AD": str(scratch / ".job.ad")},
        chirp=FileChirp(Path(r["chirp_file"])),
        stdout=out.extend,
        stderr=err.extend,
    )
    started = time.monotonic()
    status = run_launcher(
        ctx, LauncherArgs(vm=r["vm"], inputs=tuple(r["inputs"]), socket_path=None)
    )
    return {
        "status": status,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
        "seconds": time.monotonic() - started,
    }


def request_of(r: dict[str, Any]) -> JobRequest:
    """What the PREPARE_JOB hook sends for ``r["job_ad"]`` (the service never sees the ad):
    its form checked with the site's settings (``r["site"]``), the site's rules left to the
    service."""
    return request_from_job_ad(r["job_ad"], Settings.load(r.get("site", {})), site_policy=False)


def call(client: ServiceClient, op: str, r: dict[str, Any]) -> Any:
    if op == "ping":
        return dataclasses.asdict(client.ping())
    if op == "prepare":
        if "request" in r:  # as sent, bypassing this side's checks (the service checks again)
            args = {k: r.get(k) for k in ("request", "scratch_dir", "starter_pid", "slot")}
            return client._call("prepare", args)
        slot = SlotFacts.from_wire(r["slot"]) if r.get("slot") is not None else None
        result = client.prepare(
            request_of(r),
            scratch_dir=r["scratch_dir"],
            starter_pid=r.get("starter_pid"),
            slot=slot,
        )
        return dataclasses.asdict(result)
    if op == "push":
        return client.push(r["vm"], r["src_dir"])
    if op == "exec":
        chunks: list[dict[str, Any]] = []

        def sink(stream: str) -> Any:
            def record(data: bytes) -> None:
                chunks.append(
                    {"t": time.monotonic(), "stream": stream, "data": data.decode(errors="replace")}
                )

            return record

        outcome = client.exec(
            r["vm"], r["argv"], env=r.get("env"), stdout=sink("stdout"), stderr=sink("stderr")
        )
        return {"outcome": dataclasses.asdict(outcome), "chunks": chunks, "end": time.monotonic()}
    if op == "pull":
        return client.pull(r["vm"], r["dest_dir"], unchanged_from=r.get("unchanged_from"))
    if op == "teardown":
        return dataclasses.asdict(client.teardown(r["vm"], failed=bool(r["failed"])))
    if op == "job":  # a whole job, as hooks and launcher make it: prepare, exec, teardown
        t0 = time.monotonic()
        prepared = client.prepare(
            request_of(r), scratch_dir=r["scratch_dir"], starter_pid=r.get("starter_pid")
        )
        t1 = time.monotonic()
        out: list[bytes] = []
        outcome = client.exec(prepared.vm, r["argv"], stdout=out.append)
        t2 = time.monotonic()
        failed = outcome.exit_code != 0
        done = client.teardown(prepared.vm, failed=failed)
        return {
            "vm": prepared.vm,
            "exit_code": outcome.exit_code,
            "stdout": b"".join(out).decode(errors="replace"),
            "snapshot_path": done.snapshot_path,
            "seconds": {"prepare": t1 - t0, "exec": t2 - t1, "teardown": time.monotonic() - t2},
        }
    if op == "debug_hold":
        return dataclasses.asdict(client.debug_hold(r["vm"]))
    if op == "debug_release":
        return dataclasses.asdict(client.debug_release(r["vm"]))
    if op == "list_vms":
        return [dataclasses.asdict(v) for v in client.list_vms()]
    if op == "reap":
        return [dataclasses.asdict(v) for v in client.reap()]
    raise ValueError(f"unknown op {op}")


if __name__ == "__main__":
    started = time.monotonic()
    answer = main(json.loads(sys.argv[1]))
    answer["seconds"] = time.monotonic() - started
    answer["uid"] = os.getuid()
    print(json.dumps(answer))
