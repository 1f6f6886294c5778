"""One call's operation: a request's arguments checked and handed to the caller's
:class:`~glite_vm.service.local.LocalService`, its result put in wire form.

Invariants. Every argument is checked for its type before it is used (a wrong one is a
:class:`~glite_vm.service.protocol.ProtocolError` naming it); a job's request is re-validated
against this service's settings (:meth:`~glite_vm.request.JobRequest.from_wire`); a slot is read
from the request only for a trusted caller (root, or the service's own process): anyone else's
is the one its claim names. Output of ``exec`` streams to the caller as it comes; a ``shell``
talks both ways over the call's connection (:class:`~glite_vm.service.connection.ShellLink`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from glite_vm.request import JobRequest
from glite_vm.service import protocol
from glite_vm.service.connection import Call, ShellLink
from glite_vm.service.local import LocalService
from glite_vm.slots import SlotFacts

T = TypeVar("T")


def dispatch(service: LocalService, op: str, args: dict[str, Any], call: Call) -> dict[str, Any]:
    """Run ``op`` with ``args`` for ``service``'s caller; its result in wire form."""
    if op == "ping":
        return protocol.result_to_wire(service.ping())
    if op == "prepare":
        job = JobRequest.from_wire(_arg(args, "request", dict), service.settings)
        prepared = service.prepare(
            job,
            scratch_dir=_arg(args, "scratch_dir", str),
            starter_pid=_optional(args, "starter_pid", int),
            slot=_slot(args.get("slot")) if service.trusted else None,  # no one else's word
            cancel=call.cancel,
        )
        return protocol.result_to_wire(prepared)
    if op == "push":
        return {"bytes": service.push(_arg(args, "vm", str), _arg(args, "src_dir", str))}
    if op == "exec":
        argv = _arg(args, "argv", list)
        env = _optional(args, "env", dict)
        outcome = service.exec(
            _arg(args, "vm", str),
            argv,
            env=env,
            stdout=call.sink("stdout"),
            stderr=call.sink("stderr"),
            cancel=call.cancel,
        )
        return protocol.result_to_wire(outcome)
    if op == "pull":
        files = service.pull(
            _arg(args, "vm", str),
            _arg(args, "dest_dir", str),
            unchanged_from=_optional(args, "unchanged_from", str),
        )
        return {"files": files}
    if op == "teardown":
        done = service.teardown(_arg(args, "vm", str), failed=bool(args.get("failed", True)))
        return protocol.result_to_wire(done)
    if op == "debug_hold":
        return protocol.result_to_wire(service.debug_hold(_arg(args, "vm", str)))
    if op == "debug_wait":
        return protocol.result_to_wire(
            service.debug_wait(_arg(args, "vm", str), cancel=call.cancel)
        )
    if op == "debug_release":
        return protocol.result_to_wire(service.debug_release(_arg(args, "vm", str)))
    if op == "shell":
        shell = service.shell(
            _arg(args, "vm", str),
            ShellLink(call),
            argv=_optional(args, "argv", list),
            term=_arg(args, "term", str),
            rows=_arg(args, "rows", int),
            cols=_arg(args, "cols", int),
            interactive=bool(args.get("interactive", True)),
            cancel=call.cancel,
        )
        return protocol.result_to_wire(shell)
    if op == "console":
        return protocol.result_to_wire(service.console(_arg(args, "vm", str)))
    if op == "list_vms":
        return {"vms": [protocol.result_to_wire(v) for v in service.list_vms()]}
    if op == "reap":
        return {"reaped": [protocol.result_to_wire(r) for r in service.reap()]}
    raise protocol.ProtocolError(f"unknown operation {op!r}")


def _slot(data: object) -> SlotFacts | None:
    if data is None:
        return None
    try:
        return SlotFacts.from_wire(data)
    except ValueError as exc:
        raise protocol.ProtocolError(f"argument 'slot': {exc}") from None


def _arg(args: Mapping[str, Any], name: str, kind: type[T]) -> T:
    value = args.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise protocol.ProtocolError(f"argument {name!r} must be a {kind.__name__}")
    return value


def _optional(args: Mapping[str, Any], name: str, kind: type[T]) -> T | None:
    return None if args.get(name) is None else _arg(args, name, kind)


__all__ = ["dispatch"]
