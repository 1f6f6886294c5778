"""The job's unprivileged account in the guest: used when the image has it, made when not.

Images made outside this project rarely have an account called ``glite`` (the default
``GLITE_VM_GUEST_USER``). Rather than fail, :func:`ensure_guest_user` creates it before anything
runs as that user: uid and gid :data:`PREFERRED_UID` (1000) when both are free, else the first
number above it that is free in ``/etc/passwd`` and ``/etc/group``; home ``/home/<user>``, shell
``/bin/sh``, no password (nobody logs in; the job is started through the agent). The tool is
the image's ``useradd`` and ``groupadd`` (shadow-utils: every mainstream distribution), which
follow the image's own conventions (``/etc/login.defs``, ``/etc/skel``). An image without them
(busybox-based ones often have no account tool at all) gets the lines those tools would write
appended to ``/etc/passwd``, ``/etc/group`` and, where they exist, ``/etc/shadow`` and
``/etc/gshadow``.

The script runs as root through the agent with a fixed ``PATH`` and the tools by absolute path;
nothing of the job's reaches it. An account the image already has is used as it is, unless it is
root's uid: a job that is not a root job must not run as root.

Every failure here is the image's (:class:`~glite_vm.errors.GuestUserError`, hold) except the
agent failing to run the script at all (:class:`~glite_vm.errors.AgentError`, requeue).
"""

from __future__ import annotations

import dataclasses
import re

from glite_vm.errors import AgentError, GuestUserError
from glite_vm.vm.agent import GuestAgent
from glite_vm.vm.guest_text import guest_text

PREFERRED_UID = 1000
PASSWD_LIMIT = 1 << 20  # bytes of the guest's /etc/passwd read at most
ID_LIMIT = (1 << 32) - 1  # uids and gids are below this ((uid_t) -1 means "no change")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: POSIX-portable account names, as useradd and busybox accept them (no leading "-").
_NAME = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")

# As root: make sure account $1 exists (uid $2 preferred) and is not root. Prints its uid and
# its group's id.
# Exit codes: 0 ok; 64 the account has uid 0; 65 the account files cannot be written; 66 no
# free uid; 67 still missing; anything else: useradd's own failure (its message is on stderr).
GUEST_ENSURE_USER = r"""
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
user=$1; want=$2
check() {
    uid=$(id -u "$user" 2>/dev/null) || return 1
    if [ "$uid" = 0 ]; then echo "the account $user has uid 0 (root)" >&2; exit 64; fi
    gid=$(id -g "$user" 2>/dev/null) || return 1
    echo "$uid $gid"
    return 0
}
taken() {  # taken FILE NUMBER: does a line of FILE have NUMBER as its third field?
    [ -r "$1" ] || return 1
    while IFS=: read -r _name _pw _id _rest; do
        [ "$_id" = "$2" ] && return 0
    done < "$1"
    return 1
}
find_tool() {  # find_tool NAME DIR...: the first executable DIR/NAME
    _tool=$1; shift
    for _dir in "$@"; do
        if [ -x "$_dir/$_tool" ]; then echo "$_dir/$_tool"; return 0; fi
    done
    return 1
}
check && exit 0
[ -d /home ] || mkdir -p /home || exit 1
uid=$want
while taken /etc/passwd "$uid" || taken /etc/group "$uid"; do
    uid=$((uid + 1))
    if [ "$uid" -gt 59999 ]; then echo "no free uid from $want to 59999" >&2; exit 66; fi
done
gecos="glite-vm job user"
home=/home/$user
if useradd=$(find_tool useradd /usr/sbin /sbin /usr/bin /bin); then
    groupadd=$(find_tool groupadd /usr/sbin /sbin /usr/bin /bin) || groupadd=
    if [ -n "$groupadd" ]; then
        "$groupadd" -g "$uid" "$user" >&2 || exit $?
        "$useradd" -m -u "$uid" -g "$uid" -d "$home" -s /bin/sh -c "$gecos" "$user" >&2 || exit $?
    else
        "$useradd" -m -U -u "$uid" -d "$home" -s /bin/sh -c "$gecos" "$user" >&2 || exit $?
    fi
else
    # No account tools (busybox images often have none): write the entries the tools would.
    [ -w /etc/passwd ] && [ -w /etc/group ] || {
        echo "cannot write /etc/passwd and /etc/group (read-only?), and there is no useradd" >&2
        exit 65
    }
    echo "$user:x:$uid:" >> /etc/group || exit 65
    echo "$user:x:$uid:$uid:$gecos:$home:/bin/sh" >> /etc/passwd || exit 65
    if [ -e /etc/shadow ]; then echo "$user:!:19000:0:99999:7:::" >> /etc/shadow || exit 65; fi
    if [ -e /etc/gshadow ]; then echo "$user:!::" >> /etc/gshadow || exit 65; fi
    if [ ! -d "$home" ]; then mkdir -m 0755 "$home" || exit 65; fi
    [ -L "$home" ] || chown "$uid:$uid" "$home" || exit 65
fi
check || { echo "the account $user is still missing after creating it" >&2; exit 67; }
"""


def valid_user_name(name: str) -> bool:
    return bool(_NAME.match(name))


@dataclasses.dataclass(frozen=True)
class GuestAccount:
    """An account in the guest: its uid and its primary group's id."""

    uid: int
    gid: int

    @property
    def ids(self) -> str:
        """``UID:GID``, the form the guest's fixed scripts take (:mod:`glite_vm.vm.guest_run`)."""
        return f"{self.uid}:{self.gid}"


ROOT_ACCOUNT = GuestAccount(0, 0)


def ensure_guest_user(agent: GuestAgent, user: str, timeout: float = 120.0) -> GuestAccount:
    """Make sure ``user`` exists in the guest and is not root; its uid and gid.

    The common case, an account in the guest's ``/etc/passwd``, costs one bounded file read
    through the agent (~30 ms under TCG, a third of running the script); anything else (an
    account from NSS, none at all) runs :data:`GUEST_ENSURE_USER`.
    """
    if not valid_user_name(user):
        raise GuestUserError(
            user, "it is not a valid account name (lower-case letters, digits, '_' and '-')"
        )
    found = _account_in_passwd(agent, user)
    if found is None:
        found = _account_made(agent, user, timeout)
    if found.uid == 0:  # whatever printed it: a job that is not a root job never runs as root
        raise GuestUserError(user, f"the account {user} has uid 0 (root)")
    return found


def _account_made(agent: GuestAgent, user: str, timeout: float) -> GuestAccount:
    """Run :data:`GUEST_ENSURE_USER` for ``user``; the ids it printed."""
    status = agent.run(
        ["/bin/sh", "-c", GUEST_ENSURE_USER, "glite-vm", user, str(PREFERRED_UID)],
        timeout=timeout,
        env=[f"PATH={GUEST_PATH}"],
    )
    if status.exitcode == 0 and status.signal is None:
        printed = status.stdout.decode(errors="replace").strip().splitlines()
        words = printed[-1].split() if printed else []
        made = _ids(*words) if len(words) == 2 else None
        if made is None:
            said = guest_text(status.stdout[-200:]) or "nothing"
            raise GuestUserError(
                user,
                f"the guest's ids for it are no plain uid and gid (decimal, below {ID_LIMIT}): "
                f"it printed {said}",
            )
        return made
    lines = [line for line in status.stderr.splitlines() if line.strip()][-3:]
    why = guest_text(b"\n".join(lines)) or f"exit status {status.exitcode}"
    raise GuestUserError(user, why)


def _account_in_passwd(agent: GuestAgent, user: str) -> GuestAccount | None:
    """``user``'s uid and gid from the guest's ``/etc/passwd``, or ``None`` when it is not
    there, or its line is malformed, or the file cannot be read: the script decides then."""
    try:
        text = agent.read_file("/etc/passwd", limit=PASSWD_LIMIT)
    except AgentError:
        return None
    for line in text.decode(errors="replace").splitlines():
        fields = line.split(":")
        if len(fields) >= 4 and fields[0] == user:
            return _ids(fields[2], fields[3])
    return None


def _ids(uid: str, gid: str) -> GuestAccount | None:
    """The account of ``uid`` and ``gid`` as the guest wrote them, or ``None`` unless both are
    plain decimal ids below 2**32 - 1 (``int`` alone would take "-1", " 0", "+0", "1_000" and
    other scripts' digits)."""
    for text in (uid, gid):
        if not (0 < len(text) <= 10 and text.isascii() and text.isdigit()):
            return None
        if int(text) >= ID_LIMIT:
            return None
    return GuestAccount(int(uid), int(gid))
