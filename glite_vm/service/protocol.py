"""The wire format between glite-vm clients and the service: JSON lines over a Unix socket.

One connection carries one call. The client sends one line::

    {"v": 1, "op": "<operation>", "args": {...}}

and reads lines until a final one. While the call runs the service sends a heartbeat every
:data:`HEARTBEAT_SECONDS` (``{"v": 1, "beat": true}``), so a client can tell a slow call from a
dead service; ``exec`` also streams the payload's output as it happens
(``{"v": 1, "out": "stdout" | "stderr", "data": "<base64>"}``). The final line is either
``{"v": 1, "ok": true, "result": {...}}`` or ``{"v": 1, "ok": false, "error": {...}}`` where the
error carries the exception's class name, its disposition (``hold``/``requeue``), its message
and its simple attributes, so the client raises the same :mod:`glite_vm.errors` class.

``shell`` is the one call whose client keeps talking: once the service answered
``{"v": 2, "ready": true}`` (the session started in the guest), the client sends lines of its
own, each at most :data:`MAX_SHELL_LINE` bytes: ``{"v": 2, "in": "<base64>"}`` (keys typed, at
most :data:`SHELL_INPUT_CHUNK` bytes) and ``{"v": 2, "size": [rows, cols]}`` (the window
changed); the service sends the terminal's output as ``{"v": 2, "out": "tty", "data":
"<base64>"}`` until the final line (:func:`shell_input` reads the client's lines).

This module is imported by the hooks: standard library and :mod:`glite_vm.errors` only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, TypeVar

from glite_vm import errors
from glite_vm.errors import Disposition, GliteVmError, HostError, UserError

VERSION = 2  # 2: prepare takes a validated request, never a job ad
HEARTBEAT_SECONDS = 5.0
MAX_LINE = 16 << 20  # bytes in one line the client reads (a 64 KiB output chunk, a result, ...)
MAX_REQUEST = 4 << 20  # bytes in one request line (a job ad, an argv of at most 1 MiB, ...)
#: JSON containers (objects and arrays) plus commas in one request: a bound on the memory its
#: parse takes (a job ad has hundreds; a request of four million "[]," would take gigabytes).
MAX_REQUEST_ITEMS = 200_000

OPS = (
    "ping",
    "prepare",
    "push",
    "exec",
    "pull",
    "teardown",
    "list_vms",
    "reap",
    "debug_hold",
    "debug_wait",
    "debug_release",
    "shell",
    "console",
)
#: Bytes of one line a ``shell`` client sends after its request (keys, a window size).
MAX_SHELL_LINE = 64 << 10
#: Bytes of input in one such line (base64 makes them a third longer on the wire).
SHELL_INPUT_CHUNK = 16 << 10

T = TypeVar("T")


class ProtocolError(HostError):
    """A line that is not what this protocol version says (a bug or a version mismatch)."""


def encode(message: Mapping[str, Any]) -> bytes:
    """One line: compact JSON (non-ASCII escaped, so the line is pure ASCII) and ``\\n``."""
    return json.dumps({"v": VERSION, **message}, separators=(",", ":")).encode() + b"\n"


def decode_request(line: bytes) -> dict[str, Any]:
    """:func:`decode` for the service's side: bounded in what a caller can make it parse."""
    items = line.count(b"[") + line.count(b"{") + line.count(b",")
    if items > MAX_REQUEST_ITEMS:
        raise ProtocolError(
            f"the request holds more than {MAX_REQUEST_ITEMS} values, the most it may have"
        )
    try:
        return decode(line)
    except RecursionError:
        raise ProtocolError("the request is nested too deeply to be a valid request") from None


def decode(line: bytes) -> dict[str, Any]:
    """Parse one line (without its ``\\n``); raises :class:`ProtocolError` when malformed."""
    try:
        message = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("malformed message: not a JSON object")
    if message.get("v") != VERSION:
        raise ProtocolError(
            f"protocol version {message.get('v')!r} is not supported (this side speaks "
            f"{VERSION}); are the service and its clients from the same glite-vm release?"
        )
    return message


def shell_input(line: bytes) -> tuple[str, bytes | tuple[int, int]]:
    """One line a ``shell`` client sent after its request: ``("in", keys)`` or
    ``("size", (rows, cols))``; :class:`ProtocolError` for anything else (the numbers are
    checked for their range where they are used)."""
    if len(line) > MAX_SHELL_LINE:
        raise ProtocolError(f"a shell input line is longer than {MAX_SHELL_LINE} bytes")
    message = decode(line)
    if "in" in message:
        data = message["in"]
        if not isinstance(data, str):
            raise ProtocolError("malformed shell input: 'in' must be base64 text")
        try:
            keys = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("malformed shell input: 'in' is not base64") from None
        if len(keys) > SHELL_INPUT_CHUNK:
            raise ProtocolError(f"more than {SHELL_INPUT_CHUNK} bytes of shell input in a line")
        return "in", keys
    size = message.get("size")
    if (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) for n in size)
    ):
        return "size", (size[0], size[1])
    raise ProtocolError("malformed shell input: expected 'in' or 'size'")


# -- errors ----------------------------------------------------------------------------------


def error_to_wire(exc: BaseException) -> dict[str, Any]:
    """What the client needs to raise the same error again."""
    if isinstance(exc, GliteVmError):
        attrs = {
            key: _simple(value)
            for key, value in vars(exc).items()
            if key != "message" and not key.startswith("_") and _is_simple(value)
        }
        return {
            "type": type(exc).__name__,
            "disposition": exc.disposition.value,
            "message": exc.message,
            "attrs": attrs,
        }
    # Anything else is a bug in the service: the host is at fault until shown otherwise.
    return {
        "type": "HostError",
        "disposition": Disposition.REQUEUE.value,
        "message": f"internal error in the glite-vm service: {type(exc).__name__}: {exc}",
        "attrs": {},
    }


def error_from_wire(data: object) -> GliteVmError:
    """The exception the service reported, as the same class when this side knows it."""
    if not isinstance(data, dict):
        return ProtocolError("malformed error report from the glite-vm service")
    name = str(data.get("type", ""))
    message = str(data.get("message", "unknown error"))
    cls = getattr(errors, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, GliteVmError)):
        # A class this side does not know (another module's, a newer release's): keep the
        # disposition, which is what decides the job's fate.
        hold = data.get("disposition") == Disposition.HOLD.value
        cls = UserError if hold else HostError
    exc = cls.__new__(cls)
    GliteVmError.__init__(exc, message)
    attrs = data.get("attrs")
    if isinstance(attrs, dict):
        for key, value in attrs.items():
            if isinstance(key, str) and key.isidentifier() and key not in ("message", "args"):
                setattr(exc, key, value)
    exc.remote_type = name  # type: ignore[attr-defined]
    return exc


def _is_simple(value: object) -> bool:
    if value is None or isinstance(value, str | int | bool | PurePath):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple):
        return all(isinstance(v, str | int) for v in value)
    return False


def _simple(value: object) -> object:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


# -- job and machine ads ---------------------------------------------------------------------


# -- results ---------------------------------------------------------------------------------


def result_to_wire(result: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    raise TypeError(f"not a result dataclass: {type(result).__name__}")


def result_from_wire(cls: type[T], data: object) -> T:
    """Build ``cls`` from the fields it knows (a newer service may send more)."""
    if not isinstance(data, dict) or not dataclasses.is_dataclass(cls):
        raise ProtocolError(f"malformed {cls.__name__} from the glite-vm service")
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ProtocolError(f"malformed {cls.__name__} from the glite-vm service: {exc}") from None


def default_socket_path() -> str:
    """``GLITE_VM_SOCKET_PATH`` if set, else the service's default path."""
    return os.environ.get("GLITE_VM_SOCKET_PATH") or "/run/glite-vm/glite-vm.sock"
