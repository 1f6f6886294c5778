"""Moving a job's files into and out of its guest.

Mechanism: a raw, sparse **transfer disk** attached to every VM (virtio-blk, serial
``glitevm-xfer``). To copy files in, the host writes a tar stream at the start of that disk and
the guest extracts it from the block device; to copy files out, the guest writes a tar stream
onto the device and the host reads it from the file. Why not the alternatives:

* the agent's ``guest-file-write`` moves base64 in 64 KiB JSON messages (bigger ones stall
  the channel) through a serial port: fine for a certificate, slow for a build tree.
  ``bench/transfer.py`` measured, under TCG, 2.4 MB/s in and 7 MB/s out through the agent
  against 37 MB/s in and 50 MB/s out through the transfer disk;
* virtiofs needs shared memory backing and a ``virtiofsd`` per VM, and exposes a live host
  directory to the guest for the job's whole life;
* ``mkfs.ext4 -d`` images need the guest to mount a filesystem the host built, and reading one
  back on the host needs a filesystem parser; a tar stream needs only ``tar`` in the guest,
  which every image has, and Python's ``tarfile`` on the host, whose ``data`` filter refuses
  absolute paths, ``..``, links leaving the tree and device files.

The host never follows a symlink of the sandbox when packing (links travel as links), and
unpacks with the ``data`` filter, so neither direction can reach outside the job's directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
from pathlib import Path
from typing import IO, BinaryIO, cast

from glite_vm.errors import AccessDeniedError, AgentError, RequestError
from glite_vm.vm import bounded_tar

#: Members of one output stream at most (each becomes a file or directory on the host).
MAX_OUTPUT_MEMBERS = 1_000_000
#: Bytes of the output files' names together (JSON-quoted, as the pull's answer carries them;
#: a protocol line holds at most 16 MiB).
MAX_OUTPUT_NAMES = 12 << 20
#: Refused members named in the answer; the rest are counted.
MAX_REFUSED_SHOWN = 100
_ZERO_CHUNK = bytes(1 << 20)
#: Root's own directory in the guest (0700): the payload's output files and what the fixed
#: scripts note for later runs of this boot.
GUEST_STATE = "/run/glite-vm"

# Shell fragment (POSIX sh, run as root in the guest) that sets $dev to the transfer disk.
# (The shell's own `read`, not `cat`: each process costs a guest under TCG tens of milliseconds.)
FIND_XFER_DEVICE = r"""
dev=
for d in /sys/block/*; do
    s=
    [ -r "$d/serial" ] && read -r s < "$d/serial" 2>/dev/null
    [ "$s" = glitevm-xfer ] && dev=/dev/${d##*/}
done
if [ -z "$dev" ]; then echo "glite-vm: no transfer disk in the guest" >&2; exit 90; fi
"""

# Shell functions (POSIX sh, run as root in the guest) for every step that touches the job's
# working directory. The payload must not be able to make these root steps act elsewhere, and
# the guest kernel's link protections (fs.protected_symlinks/_hardlinks) are not there on every
# image, so:
# * the directory belongs to root and the job user's group (0770): the payload writes in it but
#   cannot swap it for a link (it lies in the sticky /var/tmp and is not the payload's);
# * what is *inside* is the payload's, so root never reads or writes it: tar runs as the job's
#   user, and a link left there leads only where that user could go anyway.
# * user_switch UID GID sets $how: "setpriv" where the guest's setpriv switches to UID:GID with
#   their groups (util-linux's; busybox's lacks --reuid), else "su"; found out once per boot and
#   noted in root's own STATE/setpriv.
GUEST_WORKDIR_FUNCTIONS = r"""
state_ok() {  # is STATE root's own directory (not a link)?
    [ -d STATE ] && [ ! -L STATE ] && [ -O STATE ]
}
state_dir() {  # root's own STATE directory (0700), made where missing (/run is root's alone)
    if ! state_ok; then
        if [ -e STATE ] || [ -L STATE ]; then rm -f STATE 2>/dev/null; fi
        mkdir -m 0700 STATE || return 1
    fi
}
account_ids() {  # account_ids USER IDS: sets uid and gid from IDS (UID:GID), else looks up USER
    case $2 in
        *:*) uid=${2%%:*}; gid=${2#*:} ;;
        *) uid=$(id -u "$1") && gid=$(id -g "$1") ;;
    esac
}
user_switch() {
    how=
    if [ -f STATE/setpriv ]; then read -r how < STATE/setpriv; fi
    [ -n "$how" ] && return 0
    how=su
    setpriv --reuid="$1" --regid="$2" --init-groups true 2>/dev/null && how=setpriv
    if state_ok; then echo "$how" > STATE/setpriv; fi
}
as_user() {  # as_user USER IDS CMD [ARG...]: run CMD as USER, whose UID:GID are IDS (or "-":
    # looked up here); root runs it directly
    if [ "$1" = root ]; then shift 2; "$@"; return; fi
    _user=$1
    account_ids "$1" "$2" || return 125
    shift 2
    user_switch "$uid" "$gid"
    if [ "$how" = setpriv ]; then
        setpriv --reuid="$uid" --regid="$gid" --init-groups -- "$@"
    else
        su -s /bin/sh -c '"$0" "$@"' -- "$_user" "$@"  # "--": CMD's options are not su's
    fi
}
make_workdir() {  # make_workdir DIR USER [GID]: DIR is a real directory, root:USER's group, 0770
    # Made so in this boot already (root's note in its own directory names DIR and USER) and
    # still a directory of root's: only root changes its owner or mode, and no other user can
    # rename or remove root's entry in a sticky directory such as /var/tmp.
    if [ -f STATE/workdir ] && [ -d "$1" ] && [ ! -L "$1" ] && [ -O "$1" ]; then
        read -r _made < STATE/workdir
        [ "$_made" = "$1 $2" ] && return 0
    fi
    if [ -n "${3-}" ]; then _gid=$3; else _gid=$(id -g "$2") || return 125; fi
    if [ -L "$1" ] || { [ -e "$1" ] && [ ! -d "$1" ]; }; then rm -f "$1" || return 1; fi
    [ -d "$1" ] || mkdir -m 0770 "$1" || return 1
    [ ! -L "$1" ] && chown -h "0:$_gid" "$1" && chmod 0770 "$1" || return 1
    if state_ok; then echo "$1 $2" > STATE/workdir; fi
    return 0
}
""".replace("STATE", GUEST_STATE)

# Extract the tar the host wrote onto the transfer disk into $1 as user $2 (UID:GID $4, or "-").
# $3 is the archive's length: some tars (busybox) read on past the end-of-archive marker,
# through the whole sparse disk, unless the stream ends there.
GUEST_UNPACK = (
    FIND_XFER_DEVICE
    + GUEST_WORKDIR_FUNCTIONS
    + r"""
sync
echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || blockdev --flushbufs "$dev"
state_dir 2>/dev/null  # where the steps below note what later runs need not do again
account_ids "$2" "$4" || exit 91
make_workdir "$1" "$2" "$gid" || exit 91
umask 022
dd if="$dev" bs=1M count=$(( ($3 + 1048575) / 1048576 )) 2>/dev/null \
    | as_user "$2" "$uid:$gid" tar -xf - -C "$1" || exit 91
"""
)

# Write everything under $1 as a tar stream onto the transfer disk, read with user $2's rights
# (UID:GID $3, or "-").
GUEST_PACK = (
    FIND_XFER_DEVICE
    + GUEST_WORKDIR_FUNCTIONS
    + r"""
sync
if [ -L "$1" ] || [ ! -d "$1" ]; then echo "glite-vm: $1 is not a directory" >&2; exit 92; fi
as_user "$2" "$3" tar -cf - -C "$1" . > "$dev" || exit 93
sync
"""
)


def pack_tree(src: Path, xfer_disk: Path) -> int:
    """Write ``src``'s contents as a tar stream at the start of ``xfer_disk`` (at most its
    size); bytes written. As :func:`pack_into`, with this process's rights."""
    with xfer_disk.open("r+b") as raw:
        written = pack_into(raw.fileno(), src, os.fstat(raw.fileno()).st_size)
        os.fsync(raw.fileno())
    return written


def too_big(limit: int) -> RequestError:
    return RequestError(
        "sandbox",
        f"the input files need more than the VM's transfer disk holds ({limit} bytes); "
        "ask for a larger RequestDisk",
    )


class _Bounded:
    """A write-only file object over a descriptor (a pipe, or a file at offset 0) that refuses
    to take more than ``limit`` bytes."""

    def __init__(self, fd: int, limit: int) -> None:
        self._fd = fd
        self._limit = limit
        self._pos = 0

    def write(self, data: bytes) -> int:
        if self._pos + len(data) > self._limit:
            raise too_big(self._limit)
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            self._pos += n
            view = view[n:]
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        return None


def pack_into(out_fd: int, src: Path, limit: int) -> int:
    """Write ``src``'s tree as a tar stream of at most ``limit`` bytes into ``out_fd`` (a pipe,
    or the transfer disk opened at its start); bytes written. Symlinks are stored as links,
    special files skipped, unreadable files refused."""
    if not src.is_absolute():
        raise RequestError("src_dir", f"{src} is not an absolute path")
    try:
        st = os.lstat(src)
    except OSError as exc:
        raise AccessDeniedError(f"cannot read the input directory {src}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise RequestError("src_dir", f"{src} is not a directory (symlinks are not followed)")
    out = _Bounded(out_fd, limit)
    with tarfile.open(fileobj=cast(IO[bytes], out), mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _walk(src):
            rel = path.relative_to(src).as_posix()
            try:
                info = tar.gettarinfo(str(path), arcname=rel)
            except OSError as exc:
                raise _unreadable(rel, exc) from None
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                except OSError as exc:
                    raise _unreadable(rel, exc) from None
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        continue  # replaced by something else since the walk
                    info.size = os.fstat(f.fileno()).st_size
                    tar.addfile(info, f)
            elif info.isdir() or info.issym():
                tar.addfile(info)
    return out.tell()


def _walk(src: Path) -> list[Path]:
    def fail(exc: OSError) -> None:
        rel = os.path.relpath(exc.filename, src) if exc.filename else str(src)
        raise _unreadable(rel, exc)

    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(src, onerror=fail, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            mode = p.lstat().st_mode
            if stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode):
                out.append(p)
    return sorted(out)


def _unreadable(rel: str, exc: OSError) -> AccessDeniedError:
    return AccessDeniedError(
        f"cannot read {rel!r} of the job's input files as the job's owner "
        f"({exc.strerror or exc}); a job can only send files its owner may read"
    )


def unpack_tree(xfer_disk: Path, dest: Path, refused: list[str] | None = None) -> list[str]:
    """Extract the guest's tar stream from ``xfer_disk`` into ``dest`` (see
    :func:`extract_stream`); the files' names. Bounded by the transfer disk's size, which is
    the job's disk request."""
    with xfer_disk.open("rb") as raw:
        return extract_stream(raw, dest, refused, limit=os.fstat(raw.fileno()).st_size)


def extract_stream(
    raw: BinaryIO, dest: Path, refused: list[str] | None = None, *, limit: int
) -> list[str]:
    """Extract a tar stream from the guest into ``dest`` safely; relative names of the regular
    files.

    Every byte that comes back from a guest is bounded: the files' sizes together (as the
    archive states them, holes included) may not pass ``limit`` (the job's disk request), nor
    the members :data:`MAX_OUTPUT_MEMBERS`, nor the files' names together
    :data:`MAX_OUTPUT_NAMES` (they travel back in one protocol line), nor any tar header the
    bounds of :mod:`glite_vm.vm.bounded_tar`: each ends the copy with a hold-class
    :class:`~glite_vm.errors.RequestError` before anything past the bound is written or held
    in memory. Files are written sparse (runs of zeros become holes), so a sparse member of a
    few hundred bytes in the archive takes no more room on the host than in the guest.
    ``raw`` is read once, front to back (a pipe will do).

    Members the ``data`` filter refuses (absolute or escaping links, devices) are skipped and
    their names appended to ``refused`` (the first :data:`MAX_REFUSED_SHOWN`, then a count): a
    job that leaves such a link behind still succeeds.
    """
    names: list[str] = []
    budget = _Budget(limit)
    problems: list[str] = []
    skipped = 0
    try:
        for tar, member in bounded_tar.members(raw):
            if member.name in (".", "./"):
                continue
            budget.take(member)
            problem = _extract_member(tar, member, dest)
            if problem is not None:
                if len(problems) < MAX_REFUSED_SHOWN:
                    problems.append(f"{member.name[:200]}: {problem}")
                else:
                    skipped += 1
                continue
            if member.isreg():
                name = os.path.normpath(member.name)
                budget.name(name)
                names.append(name)
    except (tarfile.ReadError, tarfile.StreamError) as exc:
        raise AgentError(f"the guest's output stream is not a tar archive: {exc}") from exc
    if refused is not None:
        refused.extend(problems)
        if skipped:
            refused.append(f"... and {skipped} more")
    return names


class _Budget:
    """What the output of one job may still take: bytes (as the archive states them), members
    and names."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.members = 0
        self.names = 0

    def name(self, name: str) -> None:
        self.names += len(json.dumps(name))  # as the service's answer carries it
        if self.names > MAX_OUTPUT_NAMES:
            raise RequestError(
                "output",
                f"the names of the job's output files add up to more than {MAX_OUTPUT_NAMES} "
                "bytes; pack them into an archive in the guest",
            )

    def take(self, member: tarfile.TarInfo) -> None:
        self.members += 1
        if self.members > MAX_OUTPUT_MEMBERS:
            raise RequestError(
                "output",
                f"the job left more than {MAX_OUTPUT_MEMBERS} files and directories to copy "
                "back; pack them into an archive in the guest",
            )
        if member.isreg():
            self.used += member.size
            if self.used > self.limit:
                raise RequestError(
                    "RequestDisk",
                    f"the job's output files add up to more than its disk request "
                    f"({self.limit} bytes; {member.name!r} alone states {member.size}); "
                    "ask for more disk (RequestDisk) or leave less in the working directory",
                )


def _inside(name: str) -> bool:
    norm = os.path.normpath(name)
    return not (os.path.isabs(name) or norm == ".." or norm.startswith("../") or "\0" in name)


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> str | None:
    """Extract one member under ``dest``; the reason when it is refused.

    The rules of tarfile's ``data`` filter (which this Python may lack), written out: no
    absolute names or ``..``; symlinks only when relative and staying inside; no hard links,
    devices or fifos; never write through a symlink; no setuid/setgid bits.
    """
    name = os.path.normpath(member.name)
    if not _inside(member.name):
        return "path leaves the working directory"
    target = dest / name
    for parent in reversed(target.relative_to(dest).parents[:-1]):
        p = dest / parent
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            return f"parent {parent} is not a directory"
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        target.chmod((member.mode & 0o755) | 0o700)
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        if target.is_dir() and not target.is_symlink():
            return "a directory of that name exists"
        target.unlink()
    if member.issym():
        link = member.linkname
        if os.path.isabs(link) or not _inside(os.path.join(os.path.dirname(name), link)):
            return f"symlink to {link} points outside the working directory"
        target.symlink_to(link)
        return None
    if not member.isreg():
        return "only regular files, directories and relative symlinks are copied"
    src = tar.extractfile(member)
    if src is None:
        return "unreadable member"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as out:
        _copy_sparse(src, out, member.size)
    target.chmod(member.mode & 0o755)
    os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)
    return None


def _copy_sparse(src: IO[bytes], out: BinaryIO, size: int) -> None:
    """Copy ``size`` bytes, seeking over whole chunks of zeros so that they become holes."""
    left = size
    while left > 0:
        chunk = src.read(min(len(_ZERO_CHUNK), left))
        if not chunk:
            break
        left -= len(chunk)
        if chunk == _ZERO_CHUNK[: len(chunk)]:
            out.seek(len(chunk), os.SEEK_CUR)
        else:
            out.write(chunk)
    out.truncate(size - left)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def copy_changed(staging: Path, names: list[str], dest: Path, original: Path | None) -> list[str]:
    """Move files from ``staging`` to ``dest`` unless ``original`` holds identical bytes."""
    changed: list[str] = []
    for name in names:
        src = staging / name
        if original is not None:
            before = original / name
            if (
                before.is_file()
                and not before.is_symlink()
                and before.stat().st_size == src.stat().st_size
                and file_digest(before) == file_digest(src)
            ):
                continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        shutil.move(str(src), str(target))
        changed.append(name)
    return changed


def new_staging_dir(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="out-", dir=parent))
