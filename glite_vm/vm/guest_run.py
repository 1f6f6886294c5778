"""Running things in a guest through its agent: the job's payload and root's fixed scripts.

Invariants. The payload runs in :data:`GUEST_WORKDIR` as the job's guest user, started by the
fixed script :data:`GUEST_RUN` (as root, with the agent's fixed environment), which *execs* it
after switching user: the exit code or signal the agent reports is the payload's own. The
job's environment reaches the payload only, through ``env -i`` after the switch
(:func:`payload_argv`); nothing before it looks anything up with it. Job data (user names,
paths, arguments) only ever travels as positional arguments of fixed scripts, never spliced
into a script's text. stdout and stderr are written by the guest to root-only files under
:data:`GUEST_STATE` and streamed to the caller's sinks kept apart and byte-exact; each poll reads
a bounded amount per stream. A payload that outlives its ``timeout`` or is cancelled raises
(PayloadTimeoutError, AgentError) rather than returning a status it did not have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from glite_vm.errors import AgentError, PayloadTimeoutError
from glite_vm.vm import transfer
from glite_vm.vm.agent import GUEST_PATH, GuestAgent
from glite_vm.vm.guest_text import guest_text

GUEST_WORKDIR = "/var/tmp/glite-vm-job"
GUEST_STATE = "/run/glite-vm"
#: Reads per stream and poll (of at most agent.FILE_CHUNK bytes each): a poll is bounded.
_READS_PER_POLL = 64

# Runs the payload in the guest (as root, through the agent, with the fixed ROOT_ENV): switches
# to the job's user and working directory and *execs* CMD, so that the payload's exit code or
# signal is what the agent reports. Arguments: WORKDIR USER CMD [ARGS...], where CMD is
# `env -i NAME=VALUE... PAYLOAD...` (see payload_argv): the job's environment reaches the
# payload only, after the switch; nothing here looks anything up with it.
GUEST_RUN = r"""
work=$1; runas=$2; shift 2
cd "$work" || exit 126
out=/run/glite-vm/stdout; err=/run/glite-vm/stderr
if [ "$runas" = root ]; then
    exec "$@" </dev/null >"$out" 2>"$err"
fi
uid=$(id -u "$runas") && gid=$(id -g "$runas") || exit 125
# util-linux setpriv execs directly (busybox's lacks --reuid; then su, which also execs there)
if setpriv --reuid="$uid" --regid="$gid" --init-groups true 2>/dev/null; then
    exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@" </dev/null >"$out" 2>"$err"
fi
# "--" before the user: su must not take the payload's own options ("-l", "-c", ...) for its own
exec su -s /bin/sh -c 'exec "$0" "$@"' -- "$runas" "$@" </dev/null >"$out" 2>"$err"
"""

# Before each payload, as root: fresh output files and the working directory $1 for user $2.
GUEST_PREPARE = (
    transfer.GUEST_WORKDIR_FUNCTIONS
    + r"""
umask 022
mkdir -p /run/glite-vm && chmod 0700 /run/glite-vm
: > /run/glite-vm/stdout && : > /run/glite-vm/stderr
make_workdir "$1" "$2"
"""
)

OutputSink = Callable[[bytes], None]


@dataclasses.dataclass(frozen=True)
class ExecResult:
    """How a command in the guest ended."""

    exit_code: int | None
    signal: int | None
    seconds: float

    @property
    def failed(self) -> bool:
        return self.exit_code != 0

    @property
    def shell_status(self) -> int:
        """The status a shell would report: the exit code, or 128 + the signal."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code if self.exit_code is not None else 255


def run_root_script(agent: GuestAgent, script: str, args: list[str], what: str) -> None:
    """Run the fixed shell ``script`` as root with positional ``args``; AgentError saying
    ``what`` failed, with the guest's complaint, unless it exits 0."""
    st = agent.run(["/bin/sh", "-c", script, "glite-vm", *args], timeout=600)
    if st.exitcode != 0 or st.signal is not None:
        detail = guest_text(st.stderr) or f"status {st.exitcode}"
        raise AgentError(f"{what} failed in the guest: {detail}")


def run_payload(
    agent: GuestAgent,
    user: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: OutputSink | None = None,
    stderr: OutputSink | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> ExecResult:
    """Run ``argv`` through :data:`GUEST_RUN` as ``user`` in the prepared working directory
    (GUEST_PREPARE ran before), streaming its output to the sinks until it exits."""
    start = time.monotonic()
    pid = agent.spawn(
        "/bin/sh",
        ["-c", GUEST_RUN, "glite-vm", GUEST_WORKDIR, user, *payload_argv(user, argv, env)],
    )
    streams = [
        (agent.open(f"{GUEST_STATE}/stdout"), stdout),
        (agent.open(f"{GUEST_STATE}/stderr"), stderr),
    ]
    delay = 0.02
    try:
        while True:
            got = _drain(agent, streams)
            status = agent.status(pid)
            if status.exited:
                _drain(agent, streams)
                break
            if cancel is not None and cancel.is_set():
                raise AgentError("the payload was cancelled")
            if timeout is not None and time.monotonic() - start > timeout:
                raise PayloadTimeoutError(timeout)
            delay = 0.02 if got else min(delay * 1.5, 0.25)
            time.sleep(delay)
    finally:
        for handle, _sink in streams:
            with contextlib.suppress(AgentError):
                agent.close(handle)
    return ExecResult(status.exitcode, status.signal, time.monotonic() - start)


def _drain(agent: GuestAgent, streams: list[tuple[int, OutputSink | None]]) -> bool:
    got = False
    for handle, sink in streams:
        for _ in range(_READS_PER_POLL):
            data, _eof = agent.read(handle)
            if not data:
                break
            got = True
            if sink is not None:
                sink(data)
    return got


def payload_argv(user: str, argv: Sequence[str], env: Mapping[str, str] | None) -> list[str]:
    """What GUEST_RUN execs as the job's user: ``env -i`` with exactly the payload's
    environment (a base of PATH, HOME, USER and LOGNAME, then the job's own), then the payload.
    ``env`` would take a first word containing ``=`` for one more variable, so such a command
    goes through ``sh -c 'exec "$0" "$@"'``."""
    home = "/root" if user == "root" else f"/home/{user}"
    base = {"PATH": GUEST_PATH, "HOME": home, "USER": user, "LOGNAME": user}
    pairs = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
    command = list(argv)
    if "=" in command[0]:
        command = ["/bin/sh", "-c", 'exec "$0" "$@"', *command]
    return ["env", "-i", *pairs, *command]


def quote_command(argv: Sequence[str]) -> str:
    """``argv`` as one shell-quoted line, for messages."""
    return " ".join(shlex.quote(a) for a in argv)
