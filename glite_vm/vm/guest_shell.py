"""An interactive terminal in a running guest: the guest's side of ``glite-vm shell``.

The byte path is the VM's second serial port (a Unix socket on the host,
:mod:`glite_vm.vm.shell_port`; :data:`SHELL_TTY` in the guest): a real terminal
device in the guest, so line editing, Ctrl-C, job control, the window size and full-screen
programs work with nothing in the guest but what every base system has (``sh``, ``setsid``,
``stty``, ``su``, ``kill``, ``stat``, ``ls``, ``sort``): no sshd, no python, no ``script``.
The guest agent's ``guest-exec`` cannot carry a terminal's input (it takes stdin once, at the
start), so the agent only starts the session (:data:`GUEST_SHELL`), changes its window size
(:data:`GUEST_RESIZE`) and ends it (:data:`GUEST_HANGUP`); the keys and the screen travel
through the serial port.

Invariants. Every script here is fixed text run as root with the agent's fixed environment
(:data:`~glite_vm.vm.agent.ROOT_ENV`); job and caller data (the guest user, the terminal type,
the size, a command) travel only as positional arguments, and are checked here first
(:func:`check_terminal`): a terminal type is a short name, a size two small numbers. The
session runs as the job's guest user (root only for a root job), in a new session whose
controlling terminal is :data:`SHELL_TTY`, started as a login shell in the job's working
directory. Before a session starts and after it ends, every process whose controlling
terminal is :data:`SHELL_TTY` is hung up (then killed), so one session never reads another's
keys; a process that left the terminal's session (``setsid``, a daemon) is not touched, as
after an ssh logout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from glite_vm.errors import RequestError
from glite_vm.vm.agent import GuestAgent
from glite_vm.vm.guest_run import GUEST_WORKDIR, run_root_script

#: The guest's end of the shell's serial port (the second 16550 UART: COM2 on x86).
SHELL_TTY = "/dev/ttyS1"
MAX_ROWS = 1000
MAX_COLS = 1000
DEFAULT_TERM = "vt100"
_TERM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")

# Shared by the scripts below: hang up every process on the terminal $1 (whose controlling
# terminal it is, or that holds it open: once a session's leader is gone, the kernel takes the
# terminal from the rest of the session, who may still hold it open and read keys meant for
# the next session), wait up to two seconds for them to go, then kill what is left; never
# PID 1 or this script. /proc/PID/stat's seventh field is the controlling terminal's device
# number (the second field, the command name, may hold spaces and parentheses: the fields are
# read after the last ")"); zombies are gone already. Holders are found by the kernel's
# descriptors themselves (`-ef`: the same device node), never by parsing `ls -l`, whose output
# a guest user shapes with file names (a line break and a fake "/proc/PID/fd:" would make root
# kill any process).
_HANGUP_FUNCTION = r"""
tty_pids() {
    for p in /proc/[0-9]*; do
        s=$(cat "$p/stat" 2>/dev/null) || continue
        s=${s##*) }
        set -- $s
        [ "$5" = "$nr" ] && [ "$1" != Z ] && echo "${p#/proc/}"
    done
    for p in /proc/[0-9]*; do
        for f in "$p"/fd/*; do
            [ "$f" -ef "$tty" ] && { echo "${p#/proc/}"; break; }
        done
    done
}
signal_tty() {
    found=
    for pid in $(tty_pids | sort -u); do
        [ "$pid" -gt 1 ] && [ "$pid" != "$$" ] || continue
        found=1
        [ -n "$1" ] || continue
        kill -s "$1" "$pid" 2>/dev/null
        [ "$1" = KILL ] || kill -s CONT "$pid" 2>/dev/null
    done
    [ -n "$found" ]
}
hangup_tty() {
    tty=$1
    major=$((0x$(stat -c %t "$tty"))) && minor=$((0x$(stat -c %T "$tty"))) || return 1
    nr=$(( (minor & 255) | (major << 8) | ((minor >> 8) << 20) ))
    signal_tty HUP || return 0
    i=0
    while [ $i -lt 20 ]; do
        sleep 0.1
        signal_tty "" || return 0
        i=$((i + 1))
    done
    signal_tty KILL
    return 0
}
"""

# Starts a session (as root, through the agent). Arguments: TTY USER TERM ROWS COLS MODE
# [CMD ARGS...], MODE "tty" (a terminal at the other end: echo, CR before LF) or "pipe"
# (input from a pipe or a file: no echo, output bytes as the command writes them). Without CMD
# the user's login shell starts in the job's working directory; with one, CMD runs there.
# The session runs in a subshell of this script, which waits for it and exits with its
# status: so `setsid` never has to fork (this script's children lead no process group), and
# the agent's guest-exec status is the session's own.
GUEST_SHELL = (
    _HANGUP_FUNCTION
    + r"""
tty=$1; user=$2; term=$3; rows=$4; cols=$5; mode=$6; shift 6
if [ ! -c "$tty" ]; then
    echo "this guest has no terminal device $tty (a second serial port)" >&2
    exit 125
fi
id -u "$user" >/dev/null 2>&1 || { echo "no account $user in this guest" >&2; exit 125; }
hangup_tty "$tty"
# Held open from here on: a terminal that nothing holds forgets its window size.
exec 3<>"$tty" || exit 125
if [ "$mode" = pipe ]; then echo=-echo; nl=-onlcr; else echo=echo; nl=onlcr; fi
stty sane clocal 115200 $echo $nl rows "$rows" cols "$cols" <&3 || exit 125
if [ "$user" != root ]; then
    # as login(1) does: the session's terminal is its user's, and only theirs
    chown "$user" "$tty" && chmod 0600 "$tty" || exit 125
fi
TERM=$term
export TERM
# A subshell in the foreground, not "&": an asynchronous command of a script starts with
# SIGINT and SIGQUIT ignored, and the session would inherit that (Ctrl-C would do nothing).
if [ $# -eq 0 ]; then
    (exec setsid -c su -l -c 'cd WORKDIR 2>/dev/null; exec "$SHELL" -l' -- "$user" \
        <&3 >&3 2>&3 3>&-)
else
    (exec setsid -c su -l -c 'cd WORKDIR 2>/dev/null; exec "$0" "$@"' -- "$user" "$@" \
        <&3 >&3 2>&3 3>&-)
fi
""".replace("WORKDIR", GUEST_WORKDIR)
)

# Ends whatever session is on the terminal $1 (as root, through the agent).
GUEST_HANGUP = _HANGUP_FUNCTION + '\nhangup_tty "$1"\n'

# Sets the window size of the terminal $1 to $2 rows and $3 columns; the kernel tells the
# session's foreground programs (SIGWINCH).
GUEST_RESIZE = 'stty -F "$1" rows "$2" cols "$3"\n'


def check_terminal(term: str, rows: int, cols: int) -> None:
    """Refuse a terminal type or window size that is not plainly one (RequestError)."""
    if not isinstance(term, str) or not _TERM_NAME.fullmatch(term):
        raise RequestError("term", "must be a terminal type name such as xterm-256color")
    check_size(rows, cols)


def check_size(rows: int, cols: int) -> None:
    for name, value, most in (("rows", rows, MAX_ROWS), ("cols", cols, MAX_COLS)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise RequestError(name, f"must be a whole number from 1 to {most}")


def start_session(
    agent: GuestAgent,
    user: str,
    argv: Sequence[str] | None,
    *,
    term: str,
    rows: int,
    cols: int,
    interactive: bool,
) -> int:
    """Start a session as ``user`` on :data:`SHELL_TTY` (``argv``: one command, else the login
    shell); the agent's pid of it, whose exit status is the session's."""
    check_terminal(term, rows, cols)
    mode = "tty" if interactive else "pipe"
    args = [SHELL_TTY, user, term, str(rows), str(cols), mode, *(argv or ())]
    return agent.spawn("/bin/sh", ["-c", GUEST_SHELL, "glite-vm-shell", *args], capture=True)


def resize(agent: GuestAgent, rows: int, cols: int) -> None:
    check_size(rows, cols)
    run_root_script(agent, GUEST_RESIZE, [SHELL_TTY, str(rows), str(cols)], "resizing the shell")


def hang_up(agent: GuestAgent) -> None:
    """End every process of a session on :data:`SHELL_TTY` (at most about two seconds)."""
    run_root_script(agent, GUEST_HANGUP, [SHELL_TTY], "ending the shell")


__all__ = [
    "DEFAULT_TERM",
    "GUEST_HANGUP",
    "GUEST_RESIZE",
    "GUEST_SHELL",
    "SHELL_TTY",
    "check_size",
    "check_terminal",
    "hang_up",
    "resize",
    "start_session",
]
