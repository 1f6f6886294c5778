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
import secrets
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from glite_vm.errors import AgentError, PayloadTimeoutError
from glite_vm.vm import transfer
from glite_vm.vm.agent import GUEST_PATH, GuestAgent
from glite_vm.vm.guest_text import guest_text

GUEST_WORKDIR = "/var/tmp/glite-vm-job"
GUEST_STATE = transfer.GUEST_STATE
#: Reads per stream and poll (of at most agent.FILE_CHUNK bytes each): a poll is bounded.
_READS_PER_POLL = 64

# Runs the payload in the guest (as root, through the agent, with the fixed ROOT_ENV), in one
# shell: few processes, as each one costs a guest under emulation tens of milliseconds.
# Arguments: WORKDIR USER IDS RUN CMD [ARGS...]. IDS is USER's UID:GID where the host knows them
# (it learnt them making sure the account exists), else "-" (looked up here). RUN names this
# run's output files, STATE/stdout.RUN and STATE/stderr.RUN (lower-case hex): files of its own,
# so that a process an earlier payload left behind writes only into the earlier run's, which
# go (the next run removes the files of the one before). CMD is
# `env -i NAME=VALUE... PAYLOAD...` (see payload_argv): the job's environment reaches the
# payload only, after the switch; nothing here looks anything up with it.
# First, as root: the root-only state directory, this run's output files, the working directory
# (make_workdir). A failure there exits 126 with its reason in STATE/prepare-error, a root-only
# file a payload of an ordinary job cannot write, so that the host tells it from a payload's
# own 126. Then switches to USER and *execs* CMD, so that the payload's exit code or signal is
# what the agent reports. Whether the guest's setpriv can switch users (util-linux's can,
# busybox's lacks --reuid; then su, which also execs there) is found out once per boot and kept
# in STATE/setpriv.
GUEST_RUN = (
    transfer.GUEST_WORKDIR_FUNCTIONS
    + r"""
work=$1; runas=$2; ids=$3; run=$4; shift 4
st=STATE
state_dir || { echo "cannot make $st" >&2; exit 126; }
case $run in ''|*[!0-9a-f]*) echo "bad run name $run" >&2; exit 126 ;; esac
out=$st/stdout.$run; err=$st/stderr.$run
: > "$st/prepare-error" && : > "$out" && : > "$err" || exit 126
fail() { echo "$*" > "$st/prepare-error"; exit 126; }
if [ -f "$st/last-run" ]; then  # the previous run's files go (a process of it may hold them)
    read -r last < "$st/last-run"
    case $last in ''|*[!0-9a-f]*) ;; *) rm -f "$st/stdout.$last" "$st/stderr.$last" ;; esac
fi
echo "$run" > "$st/last-run"
account_ids "$runas" "$ids" || fail "there is no account $runas"
make_workdir "$work" "$runas" "$gid" || fail "cannot make the working directory $work"
cd "$work" || fail "cannot enter the working directory $work"
if [ "$runas" = root ]; then
    exec "$@" </dev/null >"$out" 2>"$err"
fi
user_switch "$uid" "$gid"
if [ "$how" = setpriv ]; then
    exec setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@" </dev/null >"$out" 2>"$err"
fi
# "--" before the user: su must not take the payload's own options ("-l", "-c", ...) for its own
exec su -s /bin/sh -c 'exec "$0" "$@"' -- "$runas" "$@" </dev/null >"$out" 2>"$err"
""".replace("STATE", GUEST_STATE)
)
# As root in a warm-start template's guest before its save: GUEST_RUN's first steps (the state
# directory, how users are switched, and, with arguments USER GID, USER's working directory), so
# that no clone of it has to take them again.
GUEST_RUN_AHEAD = (
    transfer.GUEST_WORKDIR_FUNCTIONS
    + r"""
state_dir || exit 1
user_switch 0 0
[ $# -eq 2 ] || exit 0
make_workdir WORKDIR "$1" "$2"
""".replace("STATE", GUEST_STATE).replace("WORKDIR", GUEST_WORKDIR)
)

#: The exit status of GUEST_RUN when what comes before the payload failed (and the payload's own
#: when STATE/prepare-error is empty).
PREPARE_FAILED = 126

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
    ids: str = "-",
    env: Mapping[str, str] | None = None,
    stdout: OutputSink | None = None,
    stderr: OutputSink | None = None,
    timeout: float | None = None,
    cancel: threading.Event | None = None,
) -> ExecResult:
    """Run ``argv`` through :data:`GUEST_RUN` as ``user`` (whose ``UID:GID`` are ``ids``, or
    "-" when not known) in the working directory, streaming its output to the sinks until it
    exits. AgentError when what comes before the payload fails in the guest."""
    start = time.monotonic()
    command = payload_argv(user, argv, env)
    run = secrets.token_hex(8)
    outputs = _Outputs(agent, {f"stdout.{run}": stdout, f"stderr.{run}": stderr})
    pid = agent.spawn(
        "/bin/sh", ["-c", GUEST_RUN, "glite-vm", GUEST_WORKDIR, user, ids, run, *command]
    )
    delay = 0.02
    try:
        while True:
            got = outputs.drain()
            status = agent.status(pid)
            if status.exited:
                outputs.drain()
                break
            if cancel is not None and cancel.is_set():
                raise AgentError("the payload was cancelled")
            if timeout is not None and time.monotonic() - start > timeout:
                raise PayloadTimeoutError(timeout)
            delay = 0.02 if got else min(delay * 1.5, 0.25)
            time.sleep(delay)
    finally:
        outputs.close()
    if status.exitcode == PREPARE_FAILED and status.signal is None:
        _check_prepared(agent)
    return ExecResult(status.exitcode, status.signal, time.monotonic() - start)


class _Outputs:
    """This run's output files under :data:`GUEST_STATE` (names no other run has), read as
    GUEST_RUN and the payload write them; opened once GUEST_RUN has made them."""

    def __init__(self, agent: GuestAgent, sinks: Mapping[str, OutputSink | None]) -> None:
        self.agent = agent
        self.sinks = dict(sinks)
        self.handles: dict[str, int] = {}

    def drain(self) -> bool:
        """Read what was written since; whether anything was."""
        got = False
        for name, sink in self.sinks.items():
            handle = self.handles.get(name)
            if handle is None:
                try:
                    handle = self.handles[name] = self.agent.open(f"{GUEST_STATE}/{name}")
                except AgentError:
                    continue  # not made yet
            for _ in range(_READS_PER_POLL):
                data, _eof = self.agent.read(handle)
                if not data:
                    break
                got = True
                if sink is not None:
                    sink(data)
        return got

    def close(self) -> None:
        for handle in self.handles.values():
            with contextlib.suppress(AgentError):
                self.agent.close(handle)


def _check_prepared(agent: GuestAgent) -> None:
    """After GUEST_RUN exited :data:`PREPARE_FAILED`: AgentError if that was its own steps
    failing (their reason is in the root-only prepare-error file, or the file is missing), not
    the payload's exit status."""
    try:
        why = agent.read_file(f"{GUEST_STATE}/prepare-error", limit=4096)
    except AgentError as exc:  # its state directory could not be made, or the file is gone
        raise AgentError(f"preparing the guest failed in the guest ({exc})") from exc
    if why.strip():
        raise AgentError(f"preparing the guest failed in the guest: {guest_text(why)}")


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
