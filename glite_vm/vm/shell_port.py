"""The host's end of a VM's shell port: a Unix socket per VM in one directory of the service's.

Every job's VM has a second serial port (:data:`~glite_vm.vm.domain_xml.SHELL_PORT`, a real
terminal in the guest: :mod:`glite_vm.vm.guest_shell`). On the host it is a Unix socket that
libvirtd binds itself (``<serial type='unix'><source mode='bind'/>``) and hands to QEMU as a
descriptor; the service connects to it and relays bytes (:mod:`glite_vm.service.shell`). No
libvirt console stream is involved: destroying a domain under an open stream deadlocked
libvirtd 9.0 here, while a socket connection simply ends (the peer reads end-of-file).

Invariants. The sockets live in :func:`shell_dir` (``<run dir>/shells``, or a directory in
``/run`` when that path is too deep for a socket's name), a directory of the service's own
user, mode 0700, checked (not a link, owned by us, no access for others) before a socket is put
in it: no other local user can reach a socket in it, whatever the socket's own mode. A socket
is named after its domain's UUID, so its path is short (at most
:data:`~glite_vm.vm.domain_xml.MAX_SOCKET_PATH` bytes) and never reused. A
path is believed only when it lies directly in that directory (:func:`socket_of_domain`).
Sockets whose domain is gone (libvirtd removes a socket when its domain stops; a libvirtd
that died could not) are swept by :func:`sweep_sockets`, which removes only sockets.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import stat
from pathlib import Path

import libvirt

from glite_vm.config import Settings
from glite_vm.errors import HostError, HypervisorError
from glite_vm.vm.domain_xml import DOMAIN_PREFIX, MAX_SOCKET_PATH, shell_socket_of

log = logging.getLogger(__name__)

SHELLS = "shells"
CONNECT_TIMEOUT = 10.0  # seconds to connect to a VM's shell socket


NAME_LENGTH = 32  # a socket's name: its domain's UUID in hex


def shell_dir(settings: Settings) -> Path:
    """``<run dir>/shells``, or when that leaves no room for a socket's name (a deep run
    directory), a directory named after it in the runtime directory: ``/run`` for root (only
    root may make names there), ``$XDG_RUNTIME_DIR`` (the user's own, 0700) for anyone else."""
    preferred = settings.effective_run_dir / SHELLS
    if len(os.fsencode(preferred)) + 1 + NAME_LENGTH <= MAX_SOCKET_PATH:
        return preferred
    runtime = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "")
    if not os.path.isabs(runtime):
        return preferred  # nowhere shorter: prepare_socket says what to change
    tag = hashlib.sha256(os.fsencode(preferred)).hexdigest()[:12]
    return Path(runtime) / f"glite-vm-shells-{tag}"


def socket_name(uuid: str) -> str:
    return uuid.replace("-", "")


def prepare_socket(settings: Settings, uuid: str) -> Path:
    """The shell socket's path for the domain ``uuid``, its directory made (or checked) private
    to this process's user; HypervisorError when it cannot be (the host is at fault)."""
    directory = shell_dir(settings)
    path = directory / socket_name(uuid)
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise HypervisorError(
            f"the shell socket {path} is longer than a Unix socket's {MAX_SOCKET_PATH} bytes; "
            "set GLITE_VM_RUN_DIR to a shorter directory"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(directory)
    except OSError as exc:
        raise HypervisorError(f"cannot make the shell socket directory {directory}: {exc}") from exc
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise HypervisorError(
            f"{directory} is not a directory of uid {os.geteuid()}; remove it (glite-vm makes it)"
        )
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(directory, 0o700)  # made by an older glite-vm or by hand: nobody else's
    return path


def socket_of_domain(settings: Settings, dom: libvirt.virDomain) -> Path | None:
    """The running domain's shell socket, when it has one in :func:`shell_dir`."""
    try:
        path = shell_socket_of(dom.XMLDesc(0))
    except libvirt.libvirtError:
        return None
    if path is None or path.parent != shell_dir(settings):
        return None
    return path


def connect(path: Path, vm: str) -> socket.socket:
    """A connection to the shell port ``path`` of ``vm``; HostError when it cannot be made."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise HostError(f"cannot reach the shell port of {vm}: {exc}") from exc
    sock.settimeout(None)
    return sock


def remove_socket(path: Path | None) -> None:
    """Remove a torn-down VM's socket (libvirtd usually did already); only ever a socket."""
    if path is None:
        return
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove the shell socket %s: %s", path, exc)


def sweep_sockets(settings: Settings, conn: libvirt.virConnect) -> list[Path]:
    """Remove the sockets in :func:`shell_dir` whose domain is gone; what was removed.

    The directory is listed before the domains: a socket made after the listing is not seen,
    and one seen belongs to a domain that was defined before the domains are asked for (an
    inactive one included: it may be starting)."""
    directory = shell_dir(settings)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    try:
        alive = {
            socket_name(dom.UUIDString())
            for dom in conn.listAllDomains(0)
            if dom.name().startswith(DOMAIN_PREFIX)
        }
    except libvirt.libvirtError as exc:
        log.warning("cannot list domains to sweep shell sockets: %s", exc)
        return []
    removed: list[Path] = []
    for name in names:
        path = directory / name
        if name in alive:
            continue
        try:
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                continue
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


__all__ = [
    "CONNECT_TIMEOUT",
    "connect",
    "prepare_socket",
    "remove_socket",
    "shell_dir",
    "socket_of_domain",
    "sweep_sockets",
]
