"""The root service's own directories (state, image cache, snapshots, run), claimed at its start.

The service trusts what it finds there: cached images and warm-start templates it hands to
every job, locks, leases, VM directories. So each must be the service's alone before it is
used: made if missing (0755, the umask adding nothing), owned by the service's uid and not
writable by group or others, and reached through directories that only root or the service's
uid can rename things in (owned by either, and not writable by others unless sticky, as
``/var/tmp`` is). Anything else stops the start with :class:`~glite_vm.errors.HostError` that
says which directory and what to change: a cache directory another user made first (in a
world-writable parent, before the first start) would let that user plant images, templates and
links for root.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from glite_vm.config import Settings
from glite_vm.errors import HostError


def claim_service_dirs(settings: Settings) -> None:
    """Make the service's directories where missing, and check every one (see above)."""
    uid = os.getuid()
    dirs = {
        "state directory": settings.state_dir,
        "image cache": settings.effective_cache_dir,
        "snapshot directory": settings.effective_snapshot_dir,
        "run directory": settings.effective_run_dir,
    }
    for what, path in dirs.items():
        try:
            path.mkdir(parents=True, exist_ok=True, mode=0o755)
            _check_own(what, path, uid)
            for parent in path.absolute().parents:
                _check_parent(what, path, parent, uid)
        except OSError as exc:
            raise HostError(f"cannot use the {what} {path}: {exc.strerror or exc}") from exc


def _check_own(what: str, path: Path, uid: int) -> None:
    link = os.lstat(path)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (0, uid):
        raise HostError(
            f"the {what} {path} is a symbolic link of uid {link.st_uid}; "
            f"remove it, or give it to uid {uid}"
        )
    st = os.stat(path)
    if st.st_uid != uid:
        raise HostError(
            f"the {what} {path} belongs to uid {st.st_uid}, not to the service's uid {uid}: "
            f"whoever owns it could plant files for the service; remove it, or give it to "
            f"uid {uid} (chown) after checking what it holds"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise HostError(
            f"the {what} {path} is writable by group or others (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): any such user could plant files for the "
            f"service; chmod go-w {path}"
        )


def _check_parent(what: str, path: Path, parent: Path, uid: int) -> None:
    st = os.stat(parent)
    sticky = bool(st.st_mode & stat.S_ISVTX)
    if st.st_uid not in (0, uid) or (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not sticky):
        raise HostError(
            f"the {what} {path} lies in {parent} (uid {st.st_uid}, mode "
            f"{stat.S_IMODE(st.st_mode):04o}), where other users could rename it away and put "
            f"their own in its place; move it under directories of root's"
        )


__all__ = ["claim_service_dirs"]
