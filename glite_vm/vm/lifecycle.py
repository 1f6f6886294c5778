"""The life of one job's VM: overlay, define, boot, agent ready, run, copy, teardown.

The libvirt connection is injected (never global). Each VM owns a directory
``<snapshot_dir>/<domain name>/``, laid out as :mod:`glite_vm.vm.record` says, whose teardown
ends with the job record (``record.json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import secrets
import shlex
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import libvirt

from glite_vm.config import Settings
from glite_vm.errors import (
    AgentError,
    HypervisorError,
    PayloadTimeoutError,
    RequestError,
)
from glite_vm.qemu_img import overlay_command, qemu_img
from glite_vm.request import VMRequest
from glite_vm.vm import transfer
from glite_vm.vm.agent import GUEST_PATH, GuestAgent
from glite_vm.vm.boot_watch import watch_boot
from glite_vm.vm.domain_xml import (
    DOMAIN_PREFIX,
    METADATA_NS,
    DomainSpec,
    JobMetadata,
    build_domain_xml,
    domain_name,
)
from glite_vm.vm.guest_user import ensure_guest_user
from glite_vm.vm.hypervisor import HypervisorInfo
from glite_vm.vm.qemu_user import let_qemu_read
from glite_vm.vm.record import JobRecord, Timings, VmFiles

log = logging.getLogger(__name__)

GUEST_WORKDIR = "/var/tmp/glite-vm-job"
GUEST_STATE = "/run/glite-vm"
BOOT_LOG_TAIL_LINES = 25

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


class BaseImage(Protocol):
    """What the VM layer needs of a resolved image (``glite_vm.images.acquire.ResolvedImage``)."""

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> Path: ...
    @property
    def format(self) -> str: ...
    @property
    def sha256(self) -> str: ...
    @property
    def virtual_size(self) -> int: ...
    @property
    def kernel(self) -> Path | None: ...
    @property
    def initrd(self) -> Path | None: ...
    @property
    def cmdline(self) -> str | None: ...
    @property
    def guest_user(self) -> str | None: ...


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


@dataclasses.dataclass(frozen=True)
class TeardownResult:
    snapshot_path: Path | None
    boot_log_path: Path
    record_path: Path
    seconds: float


OutputSink = Callable[[bytes], None]


def boot_log_tail(path: Path, lines: int = BOOT_LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.replace("\r", "").splitlines()[-lines:])


class VmHost:
    """Creates and finds this tool's VMs on one libvirt connection."""

    def __init__(
        self, conn: libvirt.virConnect, settings: Settings, hypervisor: HypervisorInfo
    ) -> None:
        self.conn = conn
        self.settings = settings
        self.hypervisor = hypervisor

    def start(
        self,
        request: VMRequest,
        image: BaseImage,
        *,
        owner_uid: int | None = None,
        starter_pid: int | None = None,
        scratch_dir: Path | None = None,
        fetch_seconds: float | None = None,
        base_chain: tuple[tuple[Path, str], ...] = (),
    ) -> Vm:
        """Create the overlay, define and start the domain. Call :meth:`Vm.wait_ready` next.

        On any failure everything created so far is removed again.
        """
        t0 = time.monotonic()
        token = secrets.token_hex(3)
        name = domain_name(request.job_id, request.owner, token)
        snapshots = self.settings.effective_snapshot_dir
        if not snapshots.is_dir():
            # Listable, so that users find their kept snapshots (glite-vm snapshots list); the
            # names it shows give nothing away: every file inside is private from birth.
            snapshots.mkdir(parents=True, exist_ok=True, mode=0o755)
        vm_dir = snapshots / name
        vm_dir.mkdir(mode=0o711)
        vm = Vm(self, name, vm_dir, request, image, owner_uid=owner_uid)
        vm.timings.fetch = fetch_seconds
        # Until the domain exists the directory is locked: a sweeper of half-made VM
        # directories (what a crash between mkdir and define leaves) must not take this one.
        held = lock_vm_dir(vm_dir, blocking=True)
        vm._dir_lock = held
        try:
            t1 = time.monotonic()
            size = max(image.virtual_size, request.disk_bytes)
            # Every file of a VM is private (0600) from its first byte, qemu-img's overlay too:
            # a chmod afterwards leaves a window in which another user can open it and keep the
            # descriptor. QEMU's own user gets these files from libvirt (it relabels them), and
            # the VM directory stays traversable (0711) for it.
            qemu_img(
                overlay_command(image.path, image.format, vm.overlay, size),
                "creating the overlay",
                umask=0o077,
            )
            vm.timings.overlay = time.monotonic() - t1
            with os.fdopen(create_private(vm.xfer), "wb") as f:
                f.truncate(request.disk_bytes)
            # libvirt hands kernel and initrd to QEMU's user while the VM runs; per-VM copies
            # keep the cached originals root-owned and unwritable by any QEMU.
            kernel = initrd = None
            if image.kernel is not None:
                kernel = copy_private(image.kernel, vm.files.kernel)
            if image.initrd is not None:
                initrd = copy_private(image.initrd, vm.files.initrd)
            bases = [image.path, *dict(base_chain)]
            cache_blobs = self.settings.effective_cache_dir / "blobs"
            let_qemu_read(self.conn, self.hypervisor.kind, bases, cache_blobs=cache_blobs)
            metadata = JobMetadata(
                job_id=request.job_id,
                owner=request.owner,
                owner_uid=os.getuid() if owner_uid is None else owner_uid,
                image=image.name,
                image_sha256=image.sha256,
                keep_snapshot=request.keep_snapshot.value,
                vm_dir=str(vm_dir),
                created=time.time(),
                starter_pid=starter_pid,
                scratch_dir=str(scratch_dir) if scratch_dir else None,
            )
            spec = DomainSpec(
                name=name,
                uuid=str(uuid.uuid4()),
                domain_type=self.hypervisor.kind,
                emulator=self.hypervisor.emulator,
                cpus=request.cpus,
                memory_mib=request.memory_mib,
                overlay=vm.overlay,
                base_image=image.path,
                base_format=image.format,
                boot_log=vm.boot_log,
                xfer_disk=vm.xfer,
                metadata=metadata,
                kernel=kernel,
                initrd=initrd,
                cmdline=image.cmdline,
                network=request.network,
                base_chain=base_chain,
            )
            xml = build_domain_xml(spec)
            with os.fdopen(create_private(vm.files.domain_xml), "w") as f:
                f.write(xml)
            try:
                vm.domain = self.conn.defineXML(xml)
                vm.domain.create()
            except libvirt.libvirtError as exc:
                raise HypervisorError(f"libvirt could not start {name}: {exc}") from exc
            vm.timings.boot = time.monotonic() - t0
        except BaseException:
            vm.teardown(failed=True, keep_override=False)
            raise
        finally:
            vm._dir_lock = None
            if held is not None:
                os.close(held)
        return vm

    def our_domains(self) -> Iterator[tuple[libvirt.virDomain, JobMetadata | None]]:
        """Every domain this tool made, with its job metadata when readable."""
        for dom in self.conn.listAllDomains(0):
            if not dom.name().startswith(DOMAIN_PREFIX):
                continue
            try:
                text = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
                meta: JobMetadata | None = JobMetadata.from_xml(text)
            except (libvirt.libvirtError, KeyError, ValueError):
                meta = None
            yield dom, meta


class Vm:
    """One running (or torn down) VM of one job. Use as a context manager for teardown."""

    def __init__(
        self,
        host: VmHost,
        name: str,
        vm_dir: Path,
        request: VMRequest,
        image: BaseImage,
        *,
        owner_uid: int | None,
    ) -> None:
        self.host = host
        self.name = name
        self.dir = vm_dir
        self.request = request
        self.image = image
        self.owner_uid = owner_uid
        self.files = VmFiles(vm_dir)
        self.overlay = self.files.overlay
        self.boot_log = self.files.boot_log
        self.xfer = self.files.xfer
        self.snapshot = self.files.snapshot
        self.record = self.files.record
        self.domain: libvirt.virDomain | None = None
        self.timings = Timings()
        self.exec_result: ExecResult | None = None
        self.torn_down: TeardownResult | None = None
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._dir_lock: int | None = None  # the VM directory's flock while start holds it

    # -- readiness ---------------------------------------------------------------------------

    @property
    def agent(self) -> GuestAgent:
        if self.domain is None:
            raise AgentError(f"{self.name} has no domain")
        return GuestAgent(self.domain)

    @property
    def guest_user(self) -> str:
        return (
            "root"
            if self.request.root
            else (self.image.guest_user or self.host.settings.guest_user)
        )

    def wait_ready(
        self, timeout: float | None = None, *, cancel: threading.Event | None = None
    ) -> float:
        """Wait until the guest agent answers and the job's guest account exists; seconds from
        domain start. Fails fast with the cause (:mod:`glite_vm.vm.boot_watch`): ImageBootError
        or GuestUserError when the image is at fault, TransientBootError, BootError, or
        AgentError once ``cancel`` is set (whoever wanted the VM is gone)."""
        if self.domain is None:
            raise AgentError(f"{self.name} has no domain")
        settings = self.host.settings
        start = time.monotonic()
        watch_boot(
            self.domain,
            self.boot_log,
            name=self.name,
            timeout=settings.boot_timeout if timeout is None else timeout,
            agent_timeout=settings.agent_timeout,
            cancel=cancel,
        )
        if not self.request.root:  # an ordinary job's account: made if missing, never root
            ensure_guest_user(self.agent, self.guest_user)
        self.timings.ready = time.monotonic() - start
        return self.timings.ready

    # -- running things ----------------------------------------------------------------------

    def prepare_workdir(self) -> None:
        self._root_script(GUEST_PREPARE, [GUEST_WORKDIR, self.guest_user], "preparing the guest")

    def push(self, src: Path) -> int:
        """Copy the contents of host directory ``src`` into the guest's working directory."""
        written = transfer.pack_tree(src, self.xfer)
        self.unpack_pushed(written)
        return written

    def unpack_pushed(self, written: int) -> None:
        """Extract the tar stream of ``written`` bytes at the start of the transfer disk into
        the guest's working directory (for callers that packed it themselves)."""
        self._root_script(
            transfer.GUEST_UNPACK,
            [GUEST_WORKDIR, self.guest_user, str(written)],
            "copying files in",
        )

    def pack_for_pull(self) -> None:
        """Have the guest write its working directory as a tar stream onto the transfer disk
        (for callers that unpack it themselves)."""
        self._root_script(
            transfer.GUEST_PACK, [GUEST_WORKDIR, self.guest_user], "copying files out"
        )

    def pull(
        self, dest: Path, *, unchanged_from: Path | None = None, refused: list[str] | None = None
    ) -> list[str]:
        """Copy the guest's working directory back into ``dest``; names of files copied.

        With ``unchanged_from``, files byte-identical to the same name there are skipped, so
        only new and changed files land in ``dest``.
        """
        self.pack_for_pull()
        staging = transfer.new_staging_dir(self.dir)
        try:
            names = transfer.unpack_tree(self.xfer, staging, refused)
            return transfer.copy_changed(staging, names, dest, unchanged_from)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _root_script(self, script: str, args: list[str], what: str) -> None:
        st = self.agent.run(["/bin/sh", "-c", script, "glite-vm", *args], timeout=600)
        if st.exitcode != 0 or st.signal is not None:
            detail = st.stderr.decode(errors="replace").strip() or f"status {st.exitcode}"
            raise AgentError(f"{what} failed in the guest: {detail}")

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
        timeout: float | None = None,
        cancel: threading.Event | None = None,
    ) -> ExecResult:
        """Run the payload in the guest's working directory as the job's guest user.

        stdout and stderr are streamed to the sinks as the payload writes them (polled through
        the agent), kept apart and byte-exact. Returns the exit code or the signal.
        """
        if not argv:
            raise RequestError("command", "is empty")
        self.prepare_workdir()
        user = self.guest_user
        agent = self.agent
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
                got = self._drain(streams)
                status = agent.status(pid)
                if status.exited:
                    self._drain(streams)
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
        result = ExecResult(status.exitcode, status.signal, time.monotonic() - start)
        self.timings.payload = result.seconds
        self.exec_result = result
        return result

    def _drain(self, streams: list[tuple[int, OutputSink | None]]) -> bool:
        got = False
        for handle, sink in streams:
            for _ in range(64):  # bounded: at most 64 MiB per stream per poll
                data, _eof = self.agent.read(handle)
                if not data:
                    break
                got = True
                if sink is not None:
                    sink(data)
        return got

    # -- teardown ----------------------------------------------------------------------------

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        failed = exc is not None or (self.exec_result is not None and self.exec_result.failed)
        self.teardown(failed=failed)

    def teardown(self, *, failed: bool, keep_override: bool | None = None) -> TeardownResult:
        """Destroy and undefine the domain; keep the overlay as the snapshot by policy.

        Idempotent and never raises for a domain that is already gone.
        """
        with self._lock:
            if self.torn_down is not None:
                return self.torn_down
            held = None if self._dir_lock is not None else lock_vm_dir(self.dir, blocking=True)
            try:
                return self._teardown_locked(failed, keep_override)
            finally:
                if held is not None:
                    os.close(held)

    def _teardown_locked(self, failed: bool, keep_override: bool | None) -> TeardownResult:
        t0 = time.monotonic()
        if self.record.exists():
            # Another process tore this VM down already (its record is the last thing a
            # teardown writes): say what it left, and change nothing.
            kept = self.snapshot if self.snapshot.exists() else None
            return TeardownResult(kept, self.boot_log, self.record, 0.0)
        dom = self.domain
        if dom is None:
            try:
                dom = self.host.conn.lookupByName(self.name)
            except libvirt.libvirtError:
                dom = None
        if dom is not None:
            destroy_domain(dom)
        keep = self.request.keep_snapshot.keeps(failed) if keep_override is None else keep_override
        for scratch in (self.xfer, self.files.kernel, self.files.initrd):
            scratch.unlink(missing_ok=True)
        snapshot: Path | None = None
        if keep and self.overlay.exists():
            self.overlay.rename(self.snapshot)
            snapshot = self.snapshot
        else:
            self.overlay.unlink(missing_ok=True)
        self.timings.teardown = time.monotonic() - t0
        self._write_record(failed, snapshot)
        self._give_to_owner([p for p in (snapshot, self.boot_log, self.record) if p])
        self.torn_down = TeardownResult(snapshot, self.boot_log, self.record, self.timings.teardown)
        return self.torn_down

    def _write_record(self, failed: bool, snapshot: Path | None) -> None:
        r = self.exec_result
        image = self.image
        JobRecord(
            domain=self.name,
            job_id=self.request.job_id,
            owner=self.request.owner,
            image=image.name,
            image_sha256=image.sha256,
            # what booting the snapshot again needs (glite-vm snapshots boot)
            base_image=str(image.path),
            base_format=image.format,
            kernel=str(image.kernel) if image.kernel else None,
            initrd=str(image.initrd) if image.initrd else None,
            cmdline=image.cmdline,
            guest_user=image.guest_user or self.host.settings.guest_user,
            hypervisor=self.host.hypervisor.kind,
            root=self.request.root,
            failed=failed,
            exit_code=r.exit_code if r else None,
            signal=r.signal if r else None,
            snapshot=str(snapshot) if snapshot else None,
            boot_log=str(self.boot_log),
            timings=self.timings.as_dict(),
            finished=time.time(),
        ).write(self.record)

    def _give_to_owner(self, paths: list[Path]) -> None:
        """Kept files belong to the job's owner alone (when running as root for others); a
        VM of this process's own keeps them private to its user (no QEMU needs them now)."""
        if self.owner_uid is None or os.geteuid() != 0:
            for p in [*paths, self.dir]:
                with contextlib.suppress(OSError):
                    if not p.is_symlink():
                        p.chmod(0o700 if p == self.dir else 0o600)
            return
        # The directory goes last: once it is the owner's, the owner could swap a name inside
        # for a symlink to a file of root's, and a chown by name would follow it.
        for p in [*paths, self.dir]:
            try:
                os.chown(p, self.owner_uid, -1, follow_symlinks=False)
                if not p.is_symlink():
                    os.chmod(p, 0o700 if p == self.dir else 0o600)
            except OSError as exc:
                log.warning("cannot give %s to uid %s: %s", p, self.owner_uid, exc)


def create_private(path: Path) -> int:
    """A new file at ``path``, mode 0600 from its first byte (never through a link); its
    descriptor, open for writing."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def copy_private(src: Path, dest: Path) -> Path:
    """Copy ``src`` to a new private file ``dest``; ``dest``."""
    with src.open("rb") as fin, os.fdopen(create_private(dest), "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return dest


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


def qemu_pid(name: str) -> int | None:
    """The pid of the QEMU process of domain ``name`` (from libvirt's pid file), if running."""
    runtime = os.environ.get("XDG_RUNTIME_DIR", f"/run/user/{os.getuid()}")
    for directory in (Path("/run/libvirt/qemu"), Path(runtime) / "libvirt/qemu/run"):
        try:
            return int((directory / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def lock_vm_dir(vm_dir: Path, *, blocking: bool) -> int | None:
    """An exclusive flock on a VM directory (start and teardown hold it while they change
    it); the descriptor to close, or ``None`` when the directory is gone or, not
    ``blocking``, someone else holds the lock."""
    try:
        fd = os.open(vm_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        os.close(fd)
        return None
    return fd


def destroy_domain(dom: libvirt.virDomain) -> None:
    """Stop and undefine a domain, tolerating one that is already gone."""
    try:
        if dom.isActive():
            dom.destroy()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            log.warning("destroying %s: %s", _safe_name(dom), exc)
    try:
        dom.undefine()
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            log.warning("undefining %s: %s", _safe_name(dom), exc)


def _safe_name(dom: libvirt.virDomain) -> str:
    try:
        return str(dom.name())
    except libvirt.libvirtError:
        return "?"


def quote_command(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(a) for a in argv)


__all__ = [
    "BaseImage",
    "ExecResult",
    "TeardownResult",
    "Vm",
    "VmHost",
    "destroy_domain",
    "lock_vm_dir",
    "qemu_pid",
]
