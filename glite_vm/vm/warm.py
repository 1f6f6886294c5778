"""Warm start, the VM side: saving a template of a booted guest, and making each VM restored from
one a guest of its own.

A *template* is a guest booted once through the ordinary start (:meth:`VmHost.start`, with a
``<genid/>``), saved at agent-ready by ``virDomainSave`` after a ``sync``: its frozen disk
layer (the overlay it booted on) and its memory state (a libvirt save image) together with its
boot log. Where templates are kept, keyed and evicted is the image cache's business
(:mod:`glite_vm.images.templates`); this module only makes and uses the files.

A VM restored from a template (:meth:`VmHost.start` with ``template=``) gets its own overlay on
the template's layer, its own copy of the save image whose header names the job's domain (libvirt
refuses any other name or UUID than the saved one, :mod:`glite_vm.vm.save_image`), and right
after the restore (:func:`refresh_clone`), before anything of the job runs:

* the clock is set to the host's (a restored guest wakes with the clock of the save);
* fresh host bytes are mixed into the guest kernel's entropy pool and its CRNG is reseeded at
  once with ``RNDRESEEDCRNG`` (a restored guest's CRNG state is every clone's: without the
  reseed two jobs would read the same "random" bytes; the VM generation ID changes too, but
  kernels without CONFIG_VMGENID ignore it);
* a network interface takes the job's MAC address and renews its DHCP lease.

Hostname, certificates and the job's account are applied afterwards as after a cold boot.

``TEMPLATE_FORMAT`` is part of every template's key: change it whenever what a template holds or
how a clone is refreshed changes, and every old template is rebuilt.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Protocol

import libvirt

from glite_vm.errors import AgentError, HypervisorError
from glite_vm.qemu_img import qemu_img
from glite_vm.vm.agent import GuestAgent
from glite_vm.vm.domain_xml import DomainSpec, renamed_domain_xml, restored_domain_xml
from glite_vm.vm.guest_run import GUEST_RUN_AHEAD
from glite_vm.vm.guest_text import guest_text
from glite_vm.vm.record import VmFiles
from glite_vm.vm.save_image import read_header, rewrite_header
from glite_vm.vm.vm_dir import copy_private, write_private

log = logging.getLogger(__name__)

#: Bump whenever what a template holds, or how a clone of one is refreshed, changes.
#: 2: the shell's serial port; 3: /run/machine-id; 4: the kept reseed program; 5: the state
#: directory and how users are switched, found out ahead (guest_run.GUEST_RUN_AHEAD); 6: the
#: reseed program sets the clock
TEMPLATE_FORMAT = 6
REFRESH_TIMEOUT = 60.0
ENTROPY_BYTES = 64

# A static x86-64 program, 480 bytes: with two arguments SECONDS NANOSECONDS (decimal), sets the
# clock with clock_settime(CLOCK_REALTIME) and exits 200 if it cannot; then
# open("/dev/urandom", O_WRONLY), ioctl(fd, RNDRESEEDCRNG), exit with the errno (0: reseeded).
# Setting the clock here spares a clone's refresh a process (`date`). Made with GNU as and
# ld -static -nostdlib -N -s from:
#   mov (%rsp),%rcx; cmp $3,%rcx; jb 1f
#   mov 16(%rsp),%rsi; call dec; mov %rax,%r8; mov 24(%rsp),%rsi; call dec
#   push %rax; push %r8; mov $227,%eax; xor %edi,%edi; mov %rsp,%rsi; syscall
#   test %eax,%eax; jz 1f; mov $200,%edi; jmp 2f
#   1: mov $2,%eax; lea path(%rip),%rdi; mov $1,%esi; xor %edx,%edx; syscall
#   mov %eax,%edi; mov $16,%eax; mov $0x5207,%esi; xor %edx,%edx; syscall
#   mov %eax,%edi; neg %edi;  2: mov $60,%eax; syscall
#   dec: xor %eax,%eax;  3: movzbl (%rsi),%edx; sub $48,%edx; cmp $9,%edx; ja 4f
#   imul $10,%rax; add %rdx,%rax; inc %rsi; jmp 3b;  4: ret;  path: .asciz "/dev/urandom"
# Guests carry no tool that makes this ioctl; writing to /dev/urandom alone only mixes bytes
# into the input pool, which the CRNG reads at its next scheduled reseed (up to a minute later).
RESEED_PROGRAM = base64.b64decode(
    "f0VMRgIBAQAAAAAAAAAAAAIAPgABAAAAeABAAAAAAABAAAAAAAAAACABAAAAAAAAAAAAAEAAOAABAEAAAwACAAEA"
    "AAAHAAAAeAAAAAAAAAB4AEAAAAAAAHgAQAAAAAAAkgAAAAAAAACSAAAAAAAAAAEAAAAAAAAASIsMJEiD+QNyMUiL"
    "dCQQ6FcAAABJicBIi3QkGOhKAAAAUEFQuOMAAAAx/0iJ5g8FhcB0B7/IAAAA6ym4AgAAAEiNPT4AAAC+AQAAADHS"
    "DwWJx7gQAAAAvgdSAAAx0g8Ficf337g8AAAADwUxwA+2FoPqMIP6CXcMSGvACkgB0Ej/xuvpwy9kZXYvdXJhbmRv"
    "bQAALnNoc3RydGFiAC50ZXh0AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAsAAAABAAAABwAAAAAAAAB4AEAAAAAAAHgAAAAAAAAAkgAAAAAAAAAAAAAA"
    "AAAAAAEAAAAAAAAAAAAAAAAAAAABAAAAAwAAAAAAAAAAAAAAAAAAAAAAAAAKAQAAAAAAABEAAAAAAAAAAAAAAAAA"
    "AAABAAAAAAAAAAAAAAAAAAAA"
)

# Where a template's guest keeps the reseed program (installed once, before the save, so every
# clone has it in its restored memory): the first of these tmpfs places that allows execution
# (Debian mounts /run noexec) gets a directory only root can write.
RESEED_DIRS = ("/run/glite-vm", "/dev/shm/glite-vm")

# $1: one of RESEED_DIRS. Makes it (never one that exists: another's), installs the reseed
# program from stdin and runs it once; removes it again and exits 1 where it cannot be run
# (126, 127: the shell's "cannot execute"; the program's own status, an errno, is fine here:
# a guest just booted may not have initialised its CRNG yet, ENODATA, and clones run it later).
_INSTALL = r"""
set -u
umask 077
d=$1
mkdir "$d" 2>/dev/null || exit 1
if cat > "$d/reseed" && chmod 0700 "$d/reseed"; then
    "$d/reseed" 2>/dev/null
    case $? in 126|127) ;; *) exit 0 ;; esac
fi
rm -rf "$d"
exit 1
"""

# $1: the job's MAC address (or "-"), $2: the host's time as "SECONDS NANOSECONDS" (or "-"),
# $3: a new machine id, $4: fresh host bytes for the guest's entropy pool, written as printf's
# octal escapes. Few processes, as each one costs a just-woken guest tens of milliseconds: mixes
# the bytes in; runs the template's reseed program, which sets the clock and reseeds (or, where
# the template has none, installs it from stdin in a private directory that allows execution,
# runs it and removes it; exit 5 where the clock cannot be set: the host sets it through the
# agent and runs this again with "-"); gives the guest the
# machine id $3 where it has one (the template's is every clone's); then gives the first
# network interface the job's MAC and renews its lease with whichever DHCP client the image has.
_REFRESH = r"""
set -u
printf "$4" > /dev/urandom  # mixed into the input pool; the reseed below makes the CRNG use it
clock=  # the program's two arguments, split from $2 (digits only, the host's)
[ "$2" = - ] || clock=$2
for r in @RESEED_DIRS@; do  # root's own directory, made for the template
    if [ -d "$r" ] && [ ! -L "$r" ] && [ -O "$r" ] && [ -x "$r/reseed" ]; then
        "$r/reseed" $clock; rc=$?
        break
    fi
done
if [ "${rc:-1}" -ne 0 ] && [ "${rc:-1}" -ne 200 ]; then
    for dir in /run /dev/shm /tmp; do
        d=$(umask 077 && mktemp -d "$dir/glite-vm-reseed.XXXXXX" 2>/dev/null) || continue
        cat > "$d/reseed" && chmod 0700 "$d/reseed"
        "$d/reseed" $clock; rc=$?
        rm -rf "$d"
        [ "$rc" -eq 0 ] || [ "$rc" -eq 200 ] && break
    done
fi
[ "${rc:-1}" -eq 200 ] && exit 5
[ "${rc:-1}" -eq 0 ] || { echo "cannot reseed the guest kernel's RNG" >&2; exit 3; }
if [ -s /etc/machine-id ] && [ ! -L /etc/machine-id ]; then  # the template's: one of its own
    # written in place (no temporary file, no rename): also where systemd mounted the id it
    # could not commit to /etc (/run/machine-id) over it; where that mount is read-only, the
    # id is renewed in /run/machine-id itself
    printf '%s\n' "$3" 2>/dev/null > /etc/machine-id \
        || { [ -f /run/machine-id ] && printf '%s\n' "$3" > /run/machine-id; } \
        || echo "cannot renew /etc/machine-id" >&2
fi
[ "$1" = - ] && exit 0
for path in /sys/class/net/*; do
    nic=${path##*/}
    [ "$nic" = lo ] && continue
    { ip link set dev "$nic" down && ip link set dev "$nic" address "$1" \
        && ip link set dev "$nic" up; } || { echo "cannot give $nic the MAC $1" >&2; exit 4; }
    if command -v networkctl >/dev/null && networkctl renew "$nic" 2>/dev/null; then :
    elif command -v dhclient >/dev/null; then dhclient -r "$nic" 2>/dev/null; dhclient "$nic"
    elif command -v udhcpc >/dev/null; then udhcpc -n -q -i "$nic" >/dev/null 2>&1
    fi
    break
done
exit 0
""".replace("@RESEED_DIRS@", " ".join(RESEED_DIRS))


# Loads what a clone's refresh, account check and first payload steps execute into the page
# cache of the template's guest (a program missing from an image is skipped).
_WARM_UP = (
    "for p in id setpriv env mkdir chown chmod rm cat; do $p --version >/dev/null 2>&1; done; true"
)


class TemplateFiles(Protocol):
    """A template as the VM layer needs it (``glite_vm.images.templates.Template``)."""

    @property
    def key(self) -> str: ...
    @property
    def layer(self) -> Path: ...
    @property
    def state(self) -> Path: ...
    @property
    def boot_log(self) -> Path: ...


class RestoreQueue:
    """Warm starts take turns: at most ``size`` VMs go from their restore to a refreshed guest
    at once. A restore loads a whole memory state and the woken guest then runs its refresh;
    sixteen of them sharing two cores all finish late, while in turns half are ready in half
    the time (bench/warm.py). A turn is given up by :meth:`RestoreTurn.end` (idempotent) when
    the clone is refreshed or has failed; nobody waits longer than ``patience`` seconds for one
    (then it goes ahead anyway), so a guest that hangs delays the others by that at most."""

    def __init__(self, size: int, patience: float) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._patience = patience

    def turn(self) -> RestoreTurn:
        return RestoreTurn(self._slots if self._slots.acquire(timeout=self._patience) else None)


class RestoreTurn:
    def __init__(self, slot: threading.BoundedSemaphore | None) -> None:
        self._slot = slot
        self._lock = threading.Lock()

    def end(self) -> None:
        with self._lock:
            slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()


def restore_clone(
    conn: libvirt.virConnect,
    template: TemplateFiles,
    spec: DomainSpec,
    files: VmFiles,
    mac: str | None,
) -> libvirt.virDomain:
    """Restore the job's domain ``spec`` from ``template`` (see the module docstring); the
    running domain, persistent like a booted one. Raises HypervisorError when libvirt refuses
    (the caller falls back to a cold boot) and ``ValueError`` for a save image it cannot use."""
    copy_private(template.state, files.saved_state)
    try:
        header = read_header(files.saved_state)
        genid = str(uuid.uuid4())
        xml = restored_domain_xml(
            header.xml, spec, files.template_layer, genid=genid, mac=mac or new_mac()
        )
        # The header gets the job's identity only; libvirt checks the job's whole XML against
        # it (the saved machine's ABI) as it restores.
        rewrite_header(files.saved_state, header, renamed_domain_xml(header.xml, xml))
        write_private(files.domain_xml, xml)
        try:
            conn.restoreFlags(str(files.saved_state), xml, libvirt.VIR_DOMAIN_SAVE_RUNNING)
            domain = conn.lookupByName(spec.name)
            conn.defineXML(xml)  # persistent, as a booted VM's domain is
        except libvirt.libvirtError as exc:
            raise HypervisorError(f"libvirt could not restore {spec.name}: {exc}") from exc
    finally:
        files.saved_state.unlink(missing_ok=True)
    return domain


def merge_template_layer(overlay: Path, layer: Path, base: Path, base_format: str) -> None:
    """A warm start's kept disk ``overlay`` gets what its template's ``layer`` holds and backs
    onto the ``base`` image alone, as any kept snapshot does (``glite-vm snapshots boot`` and
    export know that chain); the link to the layer goes. If that fails the chain stays as it is
    (base <- template layer <- snapshot) and the record names the layer."""
    argv = ["rebase", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(overlay)]
    try:
        qemu_img(argv, "merging the template layer", umask=0o077)
    except HypervisorError as exc:
        log.warning("%s keeps its template layer: %s", overlay.parent.name, exc)
        return
    layer.unlink(missing_ok=True)


def refresh_clone(
    domain: libvirt.virDomain, *, mac: str | None, timeout: float = REFRESH_TIMEOUT
) -> None:
    """Make a just-restored guest its own (see the module docstring) within ``timeout``
    seconds (at most :data:`REFRESH_TIMEOUT`); AgentError on failure, whose message quotes
    what the guest said as one printable line (:func:`guest_text`): the guest is the image's,
    and its words go to logs, the event log and admins' terminals."""
    deadline = time.monotonic() + min(timeout, REFRESH_TIMEOUT)
    agent = GuestAgent(domain)
    machine_id = secrets.token_hex(16)
    # fresh host bytes as printf's octal escapes (no % to read as a directive, no NUL argument)
    entropy = "".join(f"\\{b:03o}" for b in secrets.token_bytes(ENTROPY_BYTES))
    argv = ["/bin/sh", "-c", _REFRESH, "glite-vm-refresh", mac or "-"]
    seconds, nanoseconds = divmod(time.time_ns(), 1_000_000_000)
    st = agent.run(
        [*argv, f"{seconds} {nanoseconds}", machine_id, entropy],
        timeout=_left(deadline),
        input_data=RESEED_PROGRAM,
        max_poll=0.02,
    )
    if st.exitcode == 5 and st.signal is None:  # the clock could not be set: the agent's way
        _set_clock(agent)
        st = agent.run(
            [*argv, "-", machine_id, entropy],
            timeout=_left(deadline),
            input_data=RESEED_PROGRAM,
        )
    if st.exitcode != 0 or st.signal is not None:
        detail = guest_text(st.stderr)
        raise AgentError(f"refreshing the restored guest failed (status {st.exitcode}): {detail}")


def _left(deadline: float) -> float:
    return max(1.0, round(deadline - time.monotonic(), 1))


def _set_clock(agent: GuestAgent) -> None:
    """The host's time in the guest through the agent (``guest-set-time``, which also writes
    the hardware clock with ``hwclock``: slower than the reseed program's clock_settime)."""
    agent.command("guest-set-time", {"time": time.time_ns()}, timeout=10)


def save_template(
    domain: libvirt.virDomain,
    overlay: Path,
    boot_log: Path,
    dest: Path,
    *,
    qemu_gid: int | None,
    account: tuple[str, int] | None = None,
) -> None:
    """Save the running, agent-ready ``domain`` into the new directory ``dest``: its disk
    ``overlay`` becomes ``dest/layer.qcow2`` (read-only; readable by QEMU's group
    ``qemu_gid`` where QEMU runs as a user of its own), its memory ``dest/state.sav``, its boot
    log ``dest/boot.log``. The domain is stopped afterwards (libvirt's save stops it).
    ``account``: the name and gid of the guest account its clones' jobs run as, whose working
    directory is made ahead."""
    agent = GuestAgent(domain)
    # the reseed program every clone runs first (where no place allows it, clones install it)
    for place in RESEED_DIRS:
        argv = ["/bin/sh", "-c", _INSTALL, "glite-vm-install", place]
        if agent.run(argv, timeout=REFRESH_TIMEOUT, input_data=RESEED_PROGRAM).exitcode == 0:
            break
    # what every job's first run finds out (best effort: without it, each clone finds out)
    ahead = [] if account is None else [account[0], str(account[1])]
    agent.run(["/bin/sh", "-c", GUEST_RUN_AHEAD, "glite-vm", *ahead], timeout=REFRESH_TIMEOUT)
    # sync: the layer holds all the boot wrote; dropping clean caches shrinks the saved state
    # (every restore reads it) by what the boot read from disk; then the few programs every
    # job's first steps run are read back in, so that a clone does not wait for its disk
    quiesce = "sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; " + _WARM_UP
    st = agent.run(["/bin/sh", "-c", quiesce], timeout=REFRESH_TIMEOUT)
    if st.exitcode != 0:
        raise AgentError("sync in the template's guest failed")
    state = dest / "state.sav"
    try:
        domain.save(str(state))
    except libvirt.libvirtError as exc:
        raise HypervisorError(f"libvirt could not save the template: {exc}") from exc
    os.chmod(state, 0o600)
    layer = dest / "layer.qcow2"
    shutil.move(overlay, layer)
    if qemu_gid is not None:
        os.chown(layer, 0, qemu_gid, follow_symlinks=False)
    os.chmod(layer, 0o440 if qemu_gid is not None else 0o400)
    shutil.copyfile(boot_log, dest / "boot.log")
    os.chmod(dest / "boot.log", 0o600)


def warm_boot_log(template: TemplateFiles, boot_log: Path) -> None:
    """A warm-started VM's boot log starts by saying so, with the template's boot log; the
    restored console appends to it."""
    fd = os.open(
        boot_log, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    with os.fdopen(fd, "wb") as out:
        out.write(f"glite-vm: warm start from template {template.key}; its boot log:\n".encode())
        with open(template.boot_log, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        out.write(f"\nglite-vm: restored from the template at {stamp}\n".encode())


def new_mac() -> str:
    """A random locally administered MAC address in QEMU's range."""
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))


__all__ = [
    "TEMPLATE_FORMAT",
    "RestoreQueue",
    "RestoreTurn",
    "TemplateFiles",
    "new_mac",
    "refresh_clone",
    "restore_clone",
    "save_template",
    "warm_boot_log",
]
