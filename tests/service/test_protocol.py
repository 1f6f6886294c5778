"""The wire format (no VM): errors come back as themselves, ads keep their expressions, and the
client stays cheap to import."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import classad2
import pytest

from glite_vm import errors
from glite_vm.condor.jobad import request_from_job_ad
from glite_vm.config import Settings
from glite_vm.errors import (
    BootError,
    Disposition,
    GliteVmError,
    HostError,
    RequestError,
    ServiceUnavailableError,
    UnknownImageError,
    UserError,
)
from glite_vm.identity.errors import IdentityConfigError
from glite_vm.request import JobRequest, vm_request
from glite_vm.service import protocol
from glite_vm.service.api import ExecOutcome, TeardownOutcome
from glite_vm.slots import SlotFacts

ERROR_CLASSES = [
    cls
    for _name, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, GliteVmError)
]


def _instance(cls: type[GliteVmError]) -> GliteVmError:
    if cls is RequestError:
        return RequestError("RequestMemory", "must be at least 64 MiB")
    if cls is UnknownImageError:
        return UnknownImageError("nope", ["debian-12", "sl6"])
    if cls is BootError:
        return BootError("the agent did not answer", Path("/var/log/boot.log"), "tail line")
    params = list(inspect.signature(cls).parameters)
    if params == ["message"]:
        return cls("something went wrong: 'x' \"y\" \u00e9")
    return cls(*(f"arg-{p}" for p in params))


def _round_trip(exc: BaseException) -> GliteVmError:
    line = protocol.encode({"ok": False, "error": protocol.error_to_wire(exc)})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return protocol.error_from_wire(protocol.decode(line[:-1])["error"])


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_comes_back_as_its_own_class(cls: type[GliteVmError]) -> None:
    original = _instance(cls)
    back = _round_trip(original)
    assert type(back) is cls
    assert back.disposition is original.disposition
    assert str(back) == str(original)


def test_error_attributes_travel_and_builtin_bases_still_catch() -> None:
    back = _round_trip(RequestError("RequestDisk", "too large"))
    assert isinstance(back, ValueError)
    assert (back.field, back.problem) == ("RequestDisk", "too large")  # type: ignore[attr-defined]
    boot = _round_trip(BootError("dead", Path("/x/boot.log"), "oops"))
    assert boot.boot_log == "/x/boot.log"  # type: ignore[attr-defined]
    unknown = _round_trip(UnknownImageError("x", ["a", "b"]))
    assert unknown.known == ["a", "b"]  # type: ignore[attr-defined]
    assert isinstance(_round_trip(ServiceUnavailableError("down")), ConnectionError)


def test_errors_of_other_modules_keep_their_disposition() -> None:
    config = _round_trip(IdentityConfigError("HOSTNAME_PATTERN", "bad"))
    assert type(config) is HostError and config.disposition is Disposition.REQUEUE
    held = protocol.error_from_wire(
        {"type": "SomeFutureUserError", "disposition": "hold", "message": "fix it"}
    )
    assert type(held) is UserError and str(held) == "fix it"


def test_a_bug_in_the_service_is_a_host_error_naming_it() -> None:
    back = _round_trip(ZeroDivisionError("division by zero"))
    assert type(back) is HostError
    assert "ZeroDivisionError: division by zero" in str(back)


def test_a_different_protocol_version_is_refused_clearly() -> None:
    for other in (protocol.VERSION - 1, protocol.VERSION + 1):
        with pytest.raises(protocol.ProtocolError, match=f"version {other} is not supported"):
            protocol.decode(json.dumps({"v": other, "ok": True}).encode())
    with pytest.raises(protocol.ProtocolError, match="malformed"):
        protocol.decode(b"{not json")


def test_results_ignore_fields_a_newer_service_adds() -> None:
    data = {"exit_code": 7, "signal": None, "seconds": 1.5, "cpu_seconds": 1.0}
    assert protocol.result_from_wire(ExecOutcome, data) == ExecOutcome(7, None, 1.5)
    with pytest.raises(protocol.ProtocolError):
        protocol.result_from_wire(TeardownOutcome, {"snapshot_path": None})


def test_a_request_travels_with_its_sizes_and_is_checked_again_on_arrival() -> None:
    """The hook makes the request of a ClassAd with expressions (RequestDisk = DiskUsage); the
    service takes it back from JSON against its own settings, and refuses what they refuse."""
    ad = classad2.parseOne(
        'ClusterId = 12\nProcId = 3\nOwner = "alice"\nGliteVmImage = "debian-12"\n'
        "DiskUsage = 2000000\nRequestDisk = DiskUsage\nRequestMemory = 1024 * 2\n",
        classad2.ParserType.Old,
    )
    request = request_from_job_ad(ad, Settings())
    wire = json.loads(json.dumps(request.to_wire()))
    back = JobRequest.from_wire(wire, Settings())
    assert back == request
    assert (back.job_id, back.owner) == ("12.3", "alice")
    assert (back.disk_bytes, back.memory_mib) == (2000000 * 1024, 2048)
    # The service's own bounds, not the sender's, when it sizes the VM.
    small = Settings(max_cpus=8)
    with pytest.raises(RequestError, match=r"RequestCpus: 64 is outside 1 \.\. 8"):
        vm_request(JobRequest.from_wire({**wire, "cpus": 64}, small), SlotFacts(), small)
    for field, bad in (("root", "yes"), ("cpus", "2"), ("disk_bytes", 1.5), ("image", 7)):
        with pytest.raises(RequestError):
            JobRequest.from_wire({**wire, field: bad}, Settings())
    with pytest.raises(RequestError, match="unknown fields job_ad"):
        JobRequest.from_wire({**wire, "job_ad": {"classad": "[]"}}, Settings())


def test_the_client_imports_cheaply() -> None:
    """Hooks import the client for every job: no libvirt, no ClassAd bindings, no requests."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import glite_vm.service.client"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    modules = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    heavy = {
        m for m in modules if m.split(".")[0] in ("libvirt", "classad2", "requests", "htcondor2")
    }
    assert not heavy, f"the client pulls in {sorted(heavy)}"
    total_us = max(
        int(line.split("|")[1])
        for line in proc.stderr.splitlines()
        if "glite_vm.service.client" in line
    )
    assert total_us < 200_000, f"importing the client took {total_us / 1000:.0f} ms"
