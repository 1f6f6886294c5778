"""`glite-vm shell` (a terminal in one's own running job VM) and `glite-vm console` (its
serial console, read-only), both through the glite-vm service."""

from __future__ import annotations

import argparse
import os
import sys

from glite_vm.config import Settings
from glite_vm.errors import GliteVmError, RequestError
from glite_vm.service.client import ServiceClient
from glite_vm.service.terminal import (
    choose_vm,
    follow_console,
    join,
    open_session,
    scratch_dir_of_job,
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    shell = sub.add_parser(
        "shell",
        help="a terminal in your running job's VM (or one command: -- CMD ...)",
        description="Open a terminal in your own running job VM, through the glite-vm "
        "service, as the job's user in the guest (root only for a root job): your login "
        "shell in the job's working directory, or with `-- CMD ARGS` that one command. "
        "Without VM, inside a job's sandbox (where condor_ssh_to_job leaves you), the job's "
        "own VM. Keys go to the guest, Ctrl-C included; Ctrl-] hangs up. The guest needs "
        "nothing but its agent and base tools (docs/users.md, Debugging a running job).",
        epilog="Exit status: the command's or shell's own; 130 after Ctrl-]; 125 when "
        "glite-vm failed (no such VM of yours, no service, ...).",
    )
    shell.add_argument(
        "words",
        nargs=argparse.REMAINDER,
        metavar="[VM|JOB] [-- CMD ...]",
        help="the VM (its name or its job's id, e.g. 12.0), then -- and a command to run",
    )
    shell.add_argument("--socket", metavar="PATH", help="the service's socket")
    shell.set_defaults(handler=cmd_shell)

    console = sub.add_parser(
        "console",
        help="follow your running job VM's serial console (read-only)",
        description="Show your running job VM's serial console as it is written (recorded "
        "from its first byte in the VM's boot log; the last MiB of it first), until the VM "
        "stops or Ctrl-C. Read-only: nothing typed reaches the guest (for that: glite-vm "
        "shell). Without VM, inside a job's sandbox, the job's own VM.",
    )
    console.add_argument("vm", nargs="?", metavar="VM|JOB", help="the VM, or its job's id")
    console.add_argument("--socket", metavar="PATH", help="the service's socket")
    console.set_defaults(handler=cmd_console)


def split_words(words: list[str]) -> tuple[str | None, list[str] | None]:
    """``[VM] [-- CMD ...]`` -> (VM or None, CMD or None)."""
    if "--" in words:
        at = words.index("--")
        head, command = words[:at], words[at + 1 :]
        if not command:
            raise RequestError("command", "`--` must be followed by a command")
    else:
        head, command = words, None
    if len(head) > 1:
        raise RequestError("vm", f"expected one VM, got {' '.join(head)} (a command goes after --)")
    return (head[0] if head else None), command


def _client(args: argparse.Namespace, settings: Settings) -> ServiceClient:
    client = ServiceClient.from_settings(settings)
    if args.socket:
        client.socket_path = args.socket
    return client


def _vm(client: ServiceClient, target: str | None) -> str:
    return choose_vm(client.list_vms(), target, os.getcwd(), scratch_dir_of_job())


def cmd_shell(args: argparse.Namespace, settings: Settings) -> int:
    target, command = split_words(list(args.words))
    client = _client(args, settings)
    vm = _vm(client, target)
    in_fd, out_fd = sys.stdin.fileno(), sys.stdout.fileno()
    sys.stdout.flush()
    with open_session(client, vm, command, in_fd, out_fd) as session:
        code = join(session, in_fd, out_fd)
    if code == 130 and session.outcome is None:
        print("\r\nglite-vm: shell hung up (Ctrl-])", file=sys.stderr)
    return code


def cmd_console(args: argparse.Namespace, settings: Settings) -> int:
    client = _client(args, settings)
    vm = _vm(client, args.vm)
    info = client.console(vm)
    sys.stdout.flush()

    def running() -> bool:
        try:
            return client.console(vm).running
        except GliteVmError:
            return False  # torn down meanwhile

    follow_console(info.boot_log_path, sys.stdout.fileno(), running)
    return 0
