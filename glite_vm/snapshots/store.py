"""The VM directories teardowns leave behind: list them, find one, prune them by retention.

Every directory ``<snapshot_dir>/<domain>/`` is an entry. One with a readable ``record.json``
is *finished*: the job's boot log and record, and ``snapshot.qcow2`` when the policy kept the
disk. One without (its VM still runs, or its run was killed and the domain destroyed before
any teardown) or with a record that cannot be used is *incomplete*: listed with what is known
(owner, job and image from its ``domain.xml``, age, size) and pruned by the same retention, but
never while a domain of that name exists or a start or teardown holds it.

An entry belongs to the owner of its directory (teardown gives it to the job's owner, mode
0700/0600), who may put anything in it. Root lists and prunes everyone's, so everything here
reads by descriptor, never through a link, never blocking on a FIFO, with bounded sizes and
bounded walks (:mod:`glite_vm._dirfd`); a hostile directory is shown as what it is and stops
nobody else's listing or prune.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import stat
import time
from collections.abc import Collection, Iterator
from typing import TYPE_CHECKING

from glite_vm import _dirfd
from glite_vm.config import Settings
from glite_vm.errors import AccessDeniedError, RequestError, UserError
from glite_vm.knob_values import Retention
from glite_vm.snapshots.entry import (
    SnapshotEntry,
    incomplete_entry,
    open_entry,
    read_entry,
)
from glite_vm.vm.domain_xml import DOMAIN_PREFIX
from glite_vm.vm.record import OVERLAY

if TYPE_CHECKING:
    import libvirt

log = logging.getLogger(__name__)
EMPTY_DIR_GRACE = 3600.0  # seconds before prune removes an empty or incomplete VM directory


class SnapshotNotFoundError(UserError, LookupError):
    """No entry of the caller matches the identifier."""

    def __init__(self, ident: str, detail: str = "") -> None:
        super().__init__(
            f"no snapshot matches {ident!r}{detail}; `glite-vm snapshots list` shows yours"
        )
        self.ident = ident


@dataclasses.dataclass(frozen=True)
class PruneDecision:
    entry: SnapshotEntry
    reason: str  # "older than 7d", "over the 50GiB budget"


@dataclasses.dataclass(frozen=True)
class SnapshotPruneReport:
    retention: Retention
    dry_run: bool
    removed: tuple[PruneDecision, ...]  # (would be) removed, oldest first
    kept: tuple[SnapshotEntry, ...]
    in_use: tuple[str, ...]  # directories of VMs that still run: never touched
    freed_bytes: int
    failures: tuple[str, ...]  # entries that could not be (fully) removed, with the reason
    empty_dirs_removed: tuple[str, ...] = ()  # directories users had emptied (root's prune)


class SnapshotStore:
    """The entries under ``settings.effective_snapshot_dir`` as ``caller_uid`` may see them."""

    def __init__(self, settings: Settings, *, caller_uid: int | None = None) -> None:
        self.settings = settings
        self.root = settings.effective_snapshot_dir
        self.caller_uid = os.geteuid() if caller_uid is None else caller_uid

    @property
    def privileged(self) -> bool:
        return self.caller_uid == 0

    @contextlib.contextmanager
    def _opened_root(self) -> Iterator[int | None]:
        """The snapshot directory (the admin's path: links in it are followed), or None."""
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield None
            return
        except PermissionError as exc:
            raise AccessDeniedError(
                f"cannot list the snapshot directory {self.root}: {exc.strerror}; "
                "it must be listable (0755) for users to find their snapshots"
            ) from None
        try:
            yield fd
        finally:
            os.close(fd)

    def _dirs(self, root_fd: int) -> Iterator[tuple[str, os.stat_result]]:
        """Every VM directory (never a symlink) in the snapshot directory, with its lstat."""
        for name in sorted(os.listdir(root_fd)):
            if not name.startswith(DOMAIN_PREFIX):
                continue
            st = _dirfd.lstat_at(root_fd, name)
            if st is not None and stat.S_ISDIR(st.st_mode):
                yield name, st

    def _may_use(self, st: os.stat_result) -> bool:
        return self.privileged or st.st_uid == self.caller_uid

    def entries(self, *, all_users: bool = False) -> list[SnapshotEntry]:
        """Every VM directory, finished or not, oldest first: the caller's own, or everyone's
        (root only)."""
        if all_users and not self.privileged:
            raise AccessDeniedError("only root may list every user's snapshots (--all)")
        out = []
        with self._opened_root() as root_fd:
            if root_fd is None:
                return []
            for name, st in self._dirs(root_fd):
                if st.st_uid != self.caller_uid and not all_users:
                    continue
                out.append(self._read(root_fd, name, st))
        return sorted(out, key=lambda e: (e.finished, e.name))

    def _read(self, root_fd: int, name: str, st: os.stat_result) -> SnapshotEntry:
        path = self.root / name
        try:
            dir_fd = _dirfd.open_dir(name, dir_fd=root_fd)
        except OSError as exc:
            usage = _dirfd.Usage(st.st_blocks * 512, st.st_mtime, False)
            return incomplete_entry(path, st, usage, {}, f"cannot open it: {exc.strerror}")
        try:
            return read_entry(path, dir_fd)
        finally:
            os.close(dir_fd)

    def find(self, ident: str) -> SnapshotEntry:
        """The one entry ``ident`` names: domain name, job id (``1234.0``, or ``1234`` when
        the cluster has one such entry), or a unique prefix of a domain name.

        Root may name anyone's entry. Another user's entry is an AccessDeniedError (the names of
        VM directories are visible to everyone; their contents are not).
        """
        ident = ident.strip()
        if not ident:
            raise RequestError("ID", "is empty; give a domain name, a prefix of one or a job id")
        mine = self.entries(all_users=self.privileged)
        exact = [e for e in mine if e.name == ident]
        if exact:
            return exact[0]
        by_job = [e for e in mine if e.job_id == ident]
        if not by_job:  # "1234" for the job 1234.0 (HTCondor's cluster.proc)
            by_job = [e for e in mine if e.job_id.startswith(ident + ".")]
        if len(by_job) == 1:
            return by_job[0]
        if len(by_job) > 1:
            raise RequestError("ID", _ambiguous(ident, [e.name for e in by_job], "job id"))
        by_prefix = [e for e in mine if e.name.startswith(ident)]
        if len(by_prefix) == 1:
            return by_prefix[0]
        if len(by_prefix) > 1:
            raise RequestError("ID", _ambiguous(ident, [e.name for e in by_prefix], "prefix"))
        with self._opened_root() as root_fd:
            others = [
                name
                for name, st in (self._dirs(root_fd) if root_fd is not None else ())
                if not self._may_use(st) and (name == ident or name.startswith(ident))
            ]
        if others:
            raise AccessDeniedError(
                f"permission denied: snapshot {others[0]} belongs to another user; "
                "only its owner (or root) may list, show, boot or export it"
            )
        raise SnapshotNotFoundError(ident)

    # -- prune ---------------------------------------------------------------------------------

    def prune(
        self,
        retention: Retention | None = None,
        *,
        dry_run: bool = False,
        all_users: bool = False,
        running: Collection[str] | None = None,
        now: float | None = None,
    ) -> SnapshotPruneReport:
        """Remove entries older than ``retention.max_age``, then the oldest ones until the rest
        fit in ``retention.max_bytes``.

        ``running``: the names of the domains libvirt knows, or None when libvirt was not asked.
        An entry is never touched while a domain of its name exists or while its directory
        holds ``overlay.qcow2`` (for an incomplete entry, given libvirt's answer: while a start
        or teardown holds the directory's lock).
        An incomplete entry goes only once unchanged for :data:`EMPTY_DIR_GRACE`. Root with
        ``all_users`` prunes everyone's entries against one budget.
        """
        policy = self.settings.snapshot_retention if retention is None else retention
        now = time.time() if now is None else now
        emptied = [] if dry_run else self._remove_empty_dirs(all_users, now)
        in_use: list[str] = []
        candidates: list[SnapshotEntry] = []
        for entry in self.entries(all_users=all_users):
            if entry.name in emptied:
                continue
            if self._in_use(entry, running):
                in_use.append(entry.name)
            else:
                candidates.append(entry)
        removed: list[PruneDecision] = []
        kept: list[SnapshotEntry] = []
        for entry in candidates:
            if policy.max_age is not None and entry.age(now) > policy.max_age and _ripe(entry, now):
                removed.append(PruneDecision(entry, f"older than {_retention_age(policy)}"))
            else:
                kept.append(entry)
        if policy.max_bytes is not None:
            total = sum(e.total_bytes for e in kept)
            budget = str(Retention(None, policy.max_bytes))
            for oldest in [e for e in kept if _ripe(e, now)]:
                if total <= policy.max_bytes:
                    break
                kept.remove(oldest)
                total -= oldest.total_bytes
                removed.append(PruneDecision(oldest, f"over the {budget} budget"))
        failures: list[str] = []
        freed = 0
        for decision in removed:
            if dry_run:
                freed += decision.entry.total_bytes
                continue
            problem = self._remove(decision.entry)
            if problem:
                failures.append(f"{decision.entry.name}: {problem}")
            else:
                freed += decision.entry.total_bytes
        return SnapshotPruneReport(
            retention=policy,
            dry_run=dry_run,
            removed=tuple(removed),
            kept=tuple(kept),
            in_use=tuple(in_use),
            freed_bytes=freed,
            failures=tuple(failures),
            empty_dirs_removed=tuple(emptied),
        )

    def _in_use(self, entry: SnapshotEntry, running: Collection[str] | None) -> bool:
        if running is not None and entry.name in running:
            return True
        try:
            with open_entry(entry) as dir_fd:
                overlay = _dirfd.lstat_at(dir_fd, OVERLAY)
                if overlay is None or not stat.S_ISREG(overlay.st_mode):
                    return False
                # A run killed before its teardown leaves its overlay: with libvirt's word
                # that no such domain exists, it is in use only while a start (before its
                # domain is defined) or a teardown holds the directory's lock.
                return entry.complete or running is None or _locked(dir_fd)
        except OSError:
            return False

    def _remove(self, entry: SnapshotEntry) -> str:
        """Delete an entry's directory; an error text, or "" when it is gone (or, for a user's
        own entry in root's snapshot directory, emptied)."""
        try:
            with self._opened_root() as root_fd:
                if root_fd is None:
                    return ""
                dir_fd = _dirfd.open_dir(entry.name, dir_fd=root_fd)
                try:
                    fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # no start or teardown
                    _dirfd.empty_dir(dir_fd)
                finally:
                    os.close(dir_fd)
                try:
                    os.rmdir(entry.name, dir_fd=root_fd)
                except OSError as exc:
                    # A user may not remove their (emptied) directory from root's: harmless.
                    if exc.errno not in (errno.EACCES, errno.EPERM) or self.privileged:
                        raise
        except FileNotFoundError:
            return ""
        except BlockingIOError:
            return "a start or teardown is working on it"
        except OSError as exc:
            return exc.strerror or str(exc)
        return ""

    def _remove_empty_dirs(self, all_users: bool, now: float) -> list[str]:
        """VM directories emptied by their owner's prune (a user may empty but not remove
        their directory in root's snapshot dir). Only old ones: a VM directory is empty for a
        moment while its VM is being created."""
        out: list[str] = []
        with self._opened_root() as root_fd:
            if root_fd is None:
                return out
            for name, st in self._dirs(root_fd):
                if st.st_uid != self.caller_uid and not all_users:
                    continue
                if now - st.st_mtime < EMPTY_DIR_GRACE:
                    continue
                try:
                    os.rmdir(name, dir_fd=root_fd)  # only succeeds when empty
                except OSError:
                    continue
                out.append(name)
        return out


def running_domain_names(conn: libvirt.virConnect) -> set[str]:
    """Names of this tool's domains that libvirt knows (running or merely defined): what
    :meth:`SnapshotStore.prune` wants as ``running`` from someone who may ask libvirt."""
    return {d.name() for d in conn.listAllDomains(0) if d.name().startswith(DOMAIN_PREFIX)}


def _ripe(entry: SnapshotEntry, now: float) -> bool:
    """Whether prune may take the entry at all: a finished one always; an incomplete one once
    it has not changed for :data:`EMPTY_DIR_GRACE` (it could be a VM being made)."""
    return entry.complete or entry.age(now) > EMPTY_DIR_GRACE


def _locked(dir_fd: int) -> bool:
    """Whether someone (a start or teardown, :func:`glite_vm.vm.vm_dir.lock_vm_dir`) holds
    the directory's lock."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _ambiguous(ident: str, names: list[str], what: str) -> str:
    return f"{ident!r} matches {len(names)} snapshots as a {what}: {', '.join(names)}"


def _retention_age(policy: Retention) -> str:
    return str(Retention(policy.max_age, None))
