"""Job and machine ads from the wire; a caller's job ad read in a process of bounded means.

The ClassAd library parses, prints, frees and evaluates expressions recursively and without
limits: a job ad of a few hundred kilobytes (a sum of 100,000 terms) overflows the stack of the
process that reads it (SIGSEGV), and a few ``strcat`` or ``join`` calls that double a string
take gigabytes and minutes of CPU, with the interpreter's lock held all along. So the service
parses and evaluates the job ad of a caller it does not trust (every local user but root) only
here, in a child process: ``python -I -m glite_vm.service.ad_reader`` with the caller's rights,
at most :data:`MEMORY_LIMIT` bytes of address space and :data:`CPU_LIMIT` seconds of CPU. It
gets the ad as it came over the wire (JSON on stdin) and answers with the plain values
:func:`~glite_vm.condor.jobad.request_from_job_ad` needs
(:func:`~glite_vm.condor.jobad.request_values`: literals, the sizes evaluated, other
expressions as text). A reader that dies or runs out of its means is the job ad's fault: the
job is held, and the service carries on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import IO, Any

from glite_vm.condor.jobad import ExpressionText, FailedRead, OtherValue, request_values
from glite_vm.errors import GliteVmError, HostError, RequestError, ServiceUnavailableError
from glite_vm.service import protocol
from glite_vm.service.children import Identity, collect, start_child

log = logging.getLogger(__name__)

#: Address space of one reader: the interpreter and the ClassAd library take ~100 MiB, the
#: largest job ad the protocol carries (4 MiB) ~200 MiB more to parse.
MEMORY_LIMIT = 512 << 20
CPU_LIMIT = 10  # seconds of CPU one reader may use
WALL_TIMEOUT = 60.0  # seconds one reader may take on a busy host
#: Readers one local user may have at once (a job prepares once; the service takes up to
#: max_calls_per_user calls of one user at a time, and their readers' limits add up).
READERS_PER_USER = 2
#: Bytes of a reader's answer: at most the request (4 MiB of job ad) in JSON.
ANSWER_LIMIT = 16 << 20

_readers_lock = threading.Lock()
_readers: dict[int, threading.BoundedSemaphore] = {}

_TOO_MUCH = (
    f"cannot be read within the bounds glite-vm sets for a job ad ({MEMORY_LIMIT >> 20} MiB, "
    f"{CPU_LIMIT} s of CPU, the ClassAd library's stack): simplify its expressions"
)


# -- ads from the wire (any process) ------------------------------------------------------------


def ad_from_wire(data: object, what: str) -> Mapping[str, object] | None:
    """A ClassAd from what :func:`glite_vm.service.protocol.ad_to_wire` sent.

    Parses caller-supplied ClassAd text in this process: for trusted callers (root, this
    process's own user) and in the reader; others go through :func:`read_job_ad`."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise protocol.ProtocolError(f"{what} must be an object")
    import classad2  # noqa: PLC0415 - the service's side only

    if "classad" in data:
        text = data["classad"]
        if not isinstance(text, str):
            raise protocol.ProtocolError(f"{what}: 'classad' must be a string")
        try:
            ad: Mapping[str, object] = classad2.parseOne(text, classad2.ParserType.New)
        except Exception as exc:  # the C extension raises various types
            raise RequestError(what, f"is not a valid ClassAd: {exc}") from None
        return ad
    mapping = data.get("mapping")
    if not isinstance(mapping, dict):
        raise protocol.ProtocolError(f"{what} must hold 'classad' or 'mapping'")
    try:
        return _classad_from_mapping(classad2, mapping)
    except Exception as exc:
        raise RequestError(what, f"cannot be turned into a ClassAd: {exc}") from None


def _classad_from_mapping(classad2: Any, mapping: Mapping[str, Any]) -> Mapping[str, object]:
    ad = classad2.ClassAd()
    for key, value in mapping.items():
        if value is not None:
            ad[str(key)] = _classad_value(classad2, value)
    result: Mapping[str, object] = ad
    return result


def _classad_value(classad2: Any, value: Any) -> Any:
    if isinstance(value, dict):
        if isinstance(value.get("expr"), str):
            return classad2.ExprTree(value["expr"])
        if isinstance(value.get("ad"), dict):
            return _classad_from_mapping(classad2, value["ad"])
        raise ValueError("an object value must be {'expr': ...} or {'ad': ...}")
    if isinstance(value, list):
        return [_classad_value(classad2, v) for v in value]
    return value


# -- the service's side -------------------------------------------------------------------------


def read_job_ad(data: object, identity: Identity) -> dict[str, object]:
    """The values :func:`~glite_vm.condor.jobad.request_from_job_ad` needs of the job ad
    ``data`` (as it came over the wire), read by a child process with ``identity``'s rights and
    bounded means. Raises :class:`~glite_vm.errors.RequestError` (hold) for an ad that cannot
    be read within them."""
    if not isinstance(data, dict):
        raise protocol.ProtocolError("job_ad must be an object")
    with _reader_of(identity.uid):
        proc = start_child(identity, __name__)
        request = json.dumps({"ad": data}).encode()
        done = collect(proc, request, timeout=WALL_TIMEOUT, limit=ANSWER_LIMIT)
    if done.timed_out:
        raise HostError(
            f"reading the job ad took longer than {WALL_TIMEOUT:g} s; the host is too busy"
        )
    if done.stderr:
        log.debug(
            "job ad reader for uid %d: %s", identity.uid, done.stderr.decode(errors="replace")
        )
    try:
        answer = json.loads(done.stdout)
        ok = answer["ok"]
    except (ValueError, KeyError, TypeError):
        how = "answered too much" if done.overran else _how_it_ended(done.returncode)
        raise RequestError("job_ad", f"{_TOO_MUCH} (its reader {how})") from None
    if ok is True and isinstance(answer.get("values"), dict):
        return values_from_wire(answer["values"])
    raise protocol.error_from_wire(answer.get("error"))


@contextlib.contextmanager
def _reader_of(uid: int) -> Iterator[None]:
    """One of the :data:`READERS_PER_USER` readers of ``uid``, waited for."""
    with _readers_lock:
        slots = _readers.setdefault(uid, threading.BoundedSemaphore(READERS_PER_USER))
    if not slots.acquire(timeout=WALL_TIMEOUT):
        raise ServiceUnavailableError(
            f"uid {uid} has had {READERS_PER_USER} job ads being read for {WALL_TIMEOUT:g} s; "
            "try again later"
        )
    try:
        yield
    finally:
        slots.release()


def _how_it_ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


# -- values on the wire (between the reader and the service) ----------------------------------


def values_to_wire(values: Mapping[str, object]) -> dict[str, Any]:
    wire: dict[str, Any] = {}
    for name, value in values.items():
        if isinstance(value, ExpressionText):
            wire[name] = {"expr": value.text}
        elif isinstance(value, FailedRead):
            wire[name] = {"failed": value.problem}
        elif isinstance(value, OtherValue):
            wire[name] = {"other": value.shown}
        else:
            wire[name] = {"value": value}
    return wire


def values_from_wire(wire: Mapping[str, Any]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, item in wire.items():
        if not isinstance(item, dict) or len(item) != 1:
            raise protocol.ProtocolError(f"malformed value of {name!r} from the job ad reader")
        (kind, value), *_ = item.items()
        if kind == "value" and isinstance(value, str | bool | int | float):
            values[str(name)] = value
        elif kind in ("expr", "failed", "other") and isinstance(value, str):
            maker: type[ExpressionText | FailedRead | OtherValue] = _MARKERS[kind]
            values[str(name)] = maker(value)
        else:
            raise protocol.ProtocolError(f"malformed value of {name!r} from the job ad reader")
    return values


_MARKERS: dict[str, type[ExpressionText | FailedRead | OtherValue]] = {
    "expr": ExpressionText,
    "failed": FailedRead,
    "other": OtherValue,
}


# -- the reader (the child process) -----------------------------------------------------------


def main(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    request = json.loads(stdin.read())
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT, CPU_LIMIT + 1))
    answer: dict[str, Any]
    try:
        ad = ad_from_wire(request["ad"], "job_ad")
        assert ad is not None
        answer = {"ok": True, "values": values_to_wire(request_values(ad))}
    except GliteVmError as exc:
        answer = {"ok": False, "error": protocol.error_to_wire(exc)}
    except (MemoryError, RecursionError):
        answer = {"ok": False, "error": protocol.error_to_wire(RequestError("job_ad", _TOO_MUCH))}
    stdout.write(json.dumps(answer).encode())
    stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.stdin.buffer, sys.stdout.buffer))
