"""Apply a :class:`~glite_vm.identity.guest.GuestSetup` in a running VM, as root, before the job.

Call it between :meth:`Vm.wait_ready` and :meth:`Vm.run`::

    vm.wait_ready()
    apply_guest_setup(vm, setup)
    vm.run(argv, ...)

Everything goes through the guest agent (which runs as root), in four steps:

1. **prepare** (one ``guest-exec`` of ``/bin/sh``): make each directory (parents first), then set
   its owner and mode; for each file remove what is there and create it *empty*, under umask
   077 and noclobber, then give it its final owner and mode. A **secret** file (a host key) is
   created in :data:`SECRETS_DIR`, a RAM-only file system (ramfs, which is never swapped out;
   tmpfs where the kernel lacks ramfs) mounted for it, and its usual path becomes a symlink to
   it: the secret never touches the guest's disk, so a kept snapshot or an export of it holds
   no key;
2. **write** each file's content with ``guest-file-open`` in ``"r+"`` mode, which never
   creates: qemu-guest-agent creates *new* files with mode 0666 whatever the umask, so a key
   written straight into a new file would be world-readable until a chmod;
3. **commands** (argv, run through ``exec "$@"``: arguments are never parsed by a shell);
4. **verify** (one ``guest-exec``): type, mode, owner and size of every directory and file (of a
   secret: of its RAM copy, and where its link points), the file system type under
   :data:`SECRETS_DIR`, and the hostname the kernel reports.

Paths and commands travel as separate arguments of ``sh -c SCRIPT``, never pasted into a
script, so no name can inject shell syntax. Secret content (``GuestFile.secret``) is revealed
only at the moment it is written; error messages and log lines name paths and sizes, never
content, and anything the agent reports is scrubbed of the secret before it is quoted.

Failures in the guest are :class:`~glite_vm.errors.AgentError` (a host error: requeue); a
malformed plan is a programming error (``TypeError``/``ValueError``) raised before the guest
is touched.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import posixpath
import shlex
import stat
import time
from collections.abc import Iterable, Sequence

from glite_vm.errors import AgentError
from glite_vm.identity.guest import HOSTS_PATH, GuestDirectory, GuestFile, GuestSetup
from glite_vm.vm.agent import ExecStatus, GuestAgent
from glite_vm.vm.lifecycle import Vm

log = logging.getLogger(__name__)

SETUP_TIMEOUT = 120.0  # seconds for one step in the guest (TCG under load is slow)
HOSTS_READ_LIMIT = 1 << 20  # a guest's /etc/hosts larger than this is replaced, not merged
_ARGV0 = "glite-vm-setup"
#: Where secret files live in the guest: a RAM-only file system mounted for them.
SECRETS_DIR = "/run/glite-vm-secrets"
_RAM_FILESYSTEMS = ("ramfs", "tmpfs")

# Arguments: SECRETS_DIR, then quintuples KIND PATH UID:GID MODE RAMCOPY (KIND is "dir", "file"
# or "secret"; RAMCOPY is the path of a secret's bytes under SECRETS_DIR, "-" otherwise).
_PREPARE = r"""
set -eu
secrets=$1; shift
mounted=
ram_fs() {  # whether $1 is the mount point of a RAM-only file system
    while read -r _dev _dir _type _rest; do
        if [ "$_dir" = "$1" ]; then
            case $_type in ramfs|tmpfs) return 0 ;; esac
        fi
    done < /proc/mounts
    return 1
}
mount_secrets() {
    [ -n "$mounted" ] && return 0
    if ! ram_fs "$secrets"; then
        if [ -L "$secrets" ] || { [ -e "$secrets" ] && [ ! -d "$secrets" ]; }; then
            rm -f "$secrets"
        fi
        (umask 077 && mkdir -p "$secrets")
        mount -t ramfs -o mode=0711 glite-vm-secrets "$secrets" 2>/dev/null \
            || mount -t tmpfs -o mode=0711,size=4m glite-vm-secrets "$secrets" \
            || { echo "cannot mount a RAM file system on $secrets for secrets" >&2; exit 3; }
    fi
    chown 0:0 "$secrets"
    chmod 0711 "$secrets"
    mounted=yes
}
new_file() {  # empty, private and with its final owner and mode before any byte is written
    # (the noclobber create cannot follow a link that appears after the rm)
    rm -f "$1"
    (umask 077 && set -C && : > "$1")
    chown "$2" "$1"
    chmod "$3" "$1"
}
while [ $# -ge 5 ]; do
    kind=$1; path=$2; owner=$3; mode=$4; ramcopy=$5; shift 5
    case $kind in
    dir)
        (umask 022 && mkdir -p "$path")
        chown "$owner" "$path"
        chmod "$mode" "$path"
        ;;
    file)
        new_file "$path" "$owner" "$mode"
        ;;
    secret)
        mount_secrets
        new_file "$ramcopy" "$owner" "$mode"
        rm -f "$path"
        ln -s "$ramcopy" "$path"
        ;;
    *)
        echo "unknown kind $kind" >&2
        exit 2
        ;;
    esac
done
[ $# -eq 0 ] || { echo "stray arguments: $*" >&2; exit 2; }
"""

# Arguments: SECRETS_DIR, N, then N paths to stat, then the links of secrets. Prints one line
# per path, in order: raw mode (hex, with the file type), uid, gid, size; one line per link:
# where it points; the type of the file system on SECRETS_DIR ("-" if nothing is mounted
# there); then the kernel's hostname. The paths are not printed, so no name can break the
# parsing.
_VERIFY = r"""
set -eu
secrets=$1; n=$2; shift 2
i=0
while [ $i -lt "$n" ]; do stat -c '%f %u %g %s' "$1"; shift; i=$((i + 1)); done
for link in "$@"; do readlink "$link"; done
fs=-
while read -r _dev dir type _rest; do
    if [ "$dir" = "$secrets" ]; then fs=$type; fi
done < /proc/mounts
echo "$fs"
hostname
"""

_EXEC = 'exec "$@"'


@dataclasses.dataclass(frozen=True)
class _Observed:
    mode: int
    uid: int
    gid: int
    size: int


def apply_guest_setup(vm: Vm, setup: GuestSetup, *, keep_guest_hosts: bool = True) -> None:
    """Make the guest of ``vm`` look as ``setup`` says: directories, files, commands.

    With ``keep_guest_hosts`` the guest's own ``/etc/hosts`` is read first and merged
    (:meth:`GuestSetup.with_existing_hosts`: the image's entries stay, the old entries for
    this host's names go); when it cannot be read the planned file replaces it.

    Raises :class:`~glite_vm.errors.AgentError` when anything fails in the guest, and
    ``TypeError``/``ValueError`` for a malformed plan, before the guest is touched.
    """
    _check_plan(setup)
    start = time.monotonic()
    agent = vm.agent
    if keep_guest_hosts and any(f.path == HOSTS_PATH for f in setup.files):
        setup = _merge_guest_hosts(agent, setup)
    directories = sorted(setup.directories, key=lambda d: d.path.count("/"))
    copies = ram_copies(setup.files)
    _prepare(agent, directories, setup.files, copies)
    for guest_file in setup.files:
        _write(agent, guest_file, copies.get(guest_file.path, guest_file.path))
    for argv in setup.commands:
        _run_command(agent, argv)
    _verify(agent, directories, setup, copies)
    secret_count = sum(1 for f in setup.files if f.secret)
    log.info(
        "guest setup of %s applied in %.2f s: hostname %s, %d directories, "
        "%d files (%d secret), %d commands",
        vm.name,
        time.monotonic() - start,
        setup.kernel_hostname,
        len(directories),
        len(setup.files),
        secret_count,
        len(setup.commands),
    )


# -- the plan --------------------------------------------------------------------------------


def _check_plan(setup: GuestSetup) -> None:
    if not isinstance(setup, GuestSetup):
        raise TypeError(f"expected a GuestSetup, got {type(setup).__name__}")
    seen: set[str] = set()
    for item in (*setup.directories, *setup.files):
        if not isinstance(item, GuestDirectory | GuestFile):
            raise TypeError(f"expected GuestDirectory or GuestFile, got {type(item).__name__}")
        if item.path in seen:
            raise ValueError(f"guest setup names {item.path} more than once")
        seen.add(item.path)
    for guest_file in setup.files:
        parent = posixpath.dirname(guest_file.path)
        if parent in (f.path for f in setup.files):
            raise ValueError(f"guest setup puts {guest_file.path} inside the file {parent}")
    for argv in setup.commands:
        if not isinstance(argv, tuple) or not argv:
            raise ValueError(f"a guest setup command must be a non-empty tuple, got {argv!r}")
        if not all(isinstance(a, str) and "\0" not in a for a in argv):
            raise ValueError(f"guest setup command arguments must be strings: {argv!r}")


def _merge_guest_hosts(agent: GuestAgent, setup: GuestSetup) -> GuestSetup:
    try:
        existing = agent.read_file(HOSTS_PATH, limit=HOSTS_READ_LIMIT)
    except AgentError as exc:
        log.debug("replacing the guest's %s, which could not be read: %s", HOSTS_PATH, exc)
        return setup
    return setup.with_existing_hosts(existing)


def ram_copies(files: Sequence[GuestFile]) -> dict[str, str]:
    """Where each secret file's bytes live: its path -> a file under :data:`SECRETS_DIR`."""
    secrets = [f for f in files if f.secret]
    return {
        f.path: f"{SECRETS_DIR}/{i}-{posixpath.basename(f.path)}" for i, f in enumerate(secrets)
    }


# -- steps -----------------------------------------------------------------------------------


def _owner(item: GuestDirectory | GuestFile) -> str:
    return f"{item.uid}:{item.gid}"


def _prepare(
    agent: GuestAgent,
    directories: Sequence[GuestDirectory],
    files: Sequence[GuestFile],
    copies: dict[str, str],
) -> None:
    args: list[str] = []
    for directory in directories:
        args += ["dir", directory.path, _owner(directory), f"{directory.mode:o}", "-"]
    for f in files:
        kind, ram = ("secret", copies[f.path]) if f.path in copies else ("file", "-")
        args += [kind, f.path, _owner(f), f"{f.mode:o}", ram]
    if args:
        _run_script(agent, _PREPARE, [SECRETS_DIR, *args], "preparing directories and files")


def _write(agent: GuestAgent, guest_file: GuestFile, target: str) -> None:
    """Write into the file ``_prepare`` created at ``target`` (a secret's RAM copy, else the
    file's own path); ``"r+"`` fails rather than create one."""
    data = guest_file.data()
    if not data:
        return
    handle: int | None = None
    try:
        handle = agent.open(target, "r+")
        agent.write(handle, data)
        closing, handle = handle, None
        agent.close(closing)
    except AgentError as exc:
        if handle is not None:
            with contextlib.suppress(AgentError):
                agent.close(handle)
        if guest_file.secret:
            _remove_quietly(agent, target)
        detail = _scrub(str(exc), data) if guest_file.secret else str(exc)
        raise AgentError(
            f"writing {guest_file.path} ({len(data)} bytes) in the guest failed: {detail}"
        ) from None


def _remove_quietly(agent: GuestAgent, path: str) -> None:
    """Best effort: leave no partial secret behind (it is 0400 root meanwhile anyway)."""
    with contextlib.suppress(AgentError):
        agent.run(["/bin/sh", "-c", 'rm -f "$1"', _ARGV0, path], timeout=SETUP_TIMEOUT)


def _run_command(agent: GuestAgent, argv: tuple[str, ...]) -> None:
    _run_script(agent, _EXEC, list(argv), f"the setup command {shlex.join(argv)}")


def _verify(
    agent: GuestAgent,
    directories: Sequence[GuestDirectory],
    setup: GuestSetup,
    copies: dict[str, str],
) -> None:
    items: list[GuestDirectory | GuestFile] = [*directories, *setup.files]
    stat_paths = [copies.get(i.path, i.path) for i in items]
    links = list(copies)
    args = [SECRETS_DIR, str(len(stat_paths)), *stat_paths, *links]
    st = _run_script(agent, _VERIFY, args, "checking the guest setup")
    lines = st.stdout.decode("utf-8", "replace").splitlines()
    expected = len(items) + len(links) + 2
    if len(lines) != expected:
        raise AgentError(
            f"checking the guest setup: expected {expected} lines from the guest, got {len(lines)}"
        )
    problems = [
        problem
        for item, line in zip(items, lines, strict=False)
        if (problem := _mismatch(item, _parse_stat(line, item.path)))
    ]
    pointed = lines[len(items) : len(items) + len(links)]
    for link, target in zip(links, pointed, strict=True):
        if target != copies[link]:
            problems.append(f"{link} points to {target!r}, not to its copy in RAM")
    filesystem = lines[-2]
    if links and filesystem not in _RAM_FILESYSTEMS:
        problems.append(f"{SECRETS_DIR} is on {filesystem!r}, not on a RAM file system")
    if ("hostname", setup.kernel_hostname) in setup.commands and lines[-1] != (
        setup.kernel_hostname
    ):
        problems.append(f"hostname is {lines[-1]!r}, expected {setup.kernel_hostname!r}")
    if problems:
        raise AgentError("the guest setup did not take: " + "; ".join(problems))


def _parse_stat(line: str, path: str) -> _Observed:
    try:
        raw, uid, gid, size = line.split()
        return _Observed(int(raw, 16), int(uid), int(gid), int(size))
    except ValueError:
        raise AgentError(f"checking the guest setup: cannot read the status of {path}") from None


def _mismatch(item: GuestDirectory | GuestFile, seen: _Observed) -> str | None:
    if isinstance(item, GuestDirectory):
        kind_ok, kind = stat.S_ISDIR(seen.mode), "a directory"
    else:
        kind_ok, kind = stat.S_ISREG(seen.mode), "a regular file"
    if not kind_ok:
        return f"{item.path} is not {kind}"
    have = f"{stat.S_IMODE(seen.mode):04o} {seen.uid}:{seen.gid}"
    want = f"{item.mode:04o} {item.uid}:{item.gid}"
    if have != want:
        return f"{item.path} has mode and owner {have}, expected {want}"
    if isinstance(item, GuestFile) and seen.size != len(item.content):
        return f"{item.path} has {seen.size} bytes, expected {len(item.content)}"
    return None


# -- plumbing --------------------------------------------------------------------------------


def _run_script(agent: GuestAgent, script: str, args: list[str], what: str) -> ExecStatus:
    st = agent.run(["/bin/sh", "-c", script, _ARGV0, *args], timeout=SETUP_TIMEOUT)
    if st.exitcode != 0 or st.signal is not None:
        detail = st.stderr.decode("utf-8", "replace").strip()
        status = f"signal {st.signal}" if st.signal is not None else f"status {st.exitcode}"
        raise AgentError(f"{what} failed in the guest ({status}){': ' + detail if detail else ''}")
    return st


def _scrub(text: str, secret: bytes) -> str:
    """``text`` with any piece of ``secret`` (raw, base64 or PEM body line) blanked out."""
    pieces: Iterable[bytes] = (
        secret,
        base64.b64encode(secret),
        *(line.strip() for line in secret.splitlines() if len(line.strip()) >= 16),
    )
    for piece in sorted(set(pieces), key=len, reverse=True):
        if piece:
            text = text.replace(piece.decode("latin-1"), "<secret>")
    return text


__all__ = ["SETUP_TIMEOUT", "apply_guest_setup"]
