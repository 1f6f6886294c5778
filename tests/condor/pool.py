"""A real HTCondor personal pool for tests, from the HTCondor tarball the project tests against.

The tarball and its ``personal-pool.sh`` are found in ``$GLITE_VM_HTCONDOR_TARBALL``'s
directory, else in ``../shared/htcondor/`` beside the repository. :func:`unpack_release`
extracts a release tree (tools only); :class:`PersonalPool` starts master, collector,
negotiator, schedd and startd on a free loopback port with an extra configuration, submits as an
unprivileged user, polls with bounded waits and stops every daemon it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from glite_vm.cli.main import main as glite_vm_cli
from glite_vm.condor.config import ExecuteHostConfig, render_execute_config
from glite_vm.slots import SlotLayout
from tests.service.svc_support import ServiceProcess, running_service
from tests.support import GuestVariant, guest_catalogue, local_account

REPO = Path(__file__).resolve().parents[2]
TARBALL_ENV = "GLITE_VM_HTCONDOR_TARBALL"
TEST_USER = "glitevm-test"

JobAd = dict[str, Any]


class PoolError(RuntimeError):
    """The pool did not do what the test needs, within the bound."""


def find_tarball() -> Path:
    """The HTCondor build to test against; ``FileNotFoundError`` names where it looked."""
    given = os.environ.get(TARBALL_ENV)
    if given:
        path = Path(given)
        if not path.is_file():
            raise FileNotFoundError(f"{TARBALL_ENV}={given} is not a file")
        return path
    shared = REPO.parent / "shared" / "htcondor"
    found = sorted(shared.glob("htcondor-*.tar.gz"))
    if not found:
        raise FileNotFoundError(
            f"no htcondor-*.tar.gz in {shared}; set {TARBALL_ENV} to an HTCondor tarball"
        )
    return found[-1]


def unpack_release(tarball: Path, prefix: Path) -> Path:
    """Extract ``tarball`` into ``prefix`` (which must exist); return ``prefix``."""
    subprocess.run(["tar", "xzf", str(tarball), "-C", str(prefix)], check=True, timeout=120)
    if not (prefix / "sbin" / "condor_master").is_file():
        raise PoolError(f"{tarball} has no sbin/condor_master")
    return prefix


def glite_vm_execute_host(
    prefix: Path, *, state_dir: Path, socket_path: Path, **config: Any
) -> tuple[Path, str]:
    """An HTCondor release unpacked into ``prefix`` (created) with glite-vm's hooks installed
    in ``prefix/glite-vm-hooks`` (what ``glite-vm hook install`` writes), and the execute-host
    configuration ``glite-vm config`` renders for them: ``(hooks dir, configuration)``.
    ``config`` are further :class:`ExecuteHostConfig` fields (``layout``, periods, ...)."""
    prefix.mkdir(mode=0o755, exist_ok=True)
    unpack_release(find_tarball(), prefix)
    hooks = prefix / "glite-vm-hooks"
    if glite_vm_cli(["hook", "install", str(hooks), "--python", sys.executable]) != 0:
        raise PoolError("glite-vm hook install failed")
    host = ExecuteHostConfig(
        hooks_dir=hooks,
        glite_vm=Path(sys.executable).parent / "glite-vm",
        state_dir=state_dir,
        socket_path=socket_path,
        **config,
    )
    return hooks, render_execute_config(host)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def ensure_user(name: str = TEST_USER) -> pwd.struct_passwd:
    """A normal local account to submit jobs as (created once, kept)."""
    return local_account(name, home=True)


def wait_until(what: str, probe: Callable[[], Any], timeout: float, interval: float = 1.0) -> Any:
    """``probe()``'s first truthy result; :class:`PoolError` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise PoolError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


#: Before every pool's extra configuration. A starter whose PREPARE_JOB just failed ignores a
#: fast shutdown until the startd kills it after KILLING_TIMEOUT (default 30 s); tests need not
#: wait that long. HTCondor 25 gives each job private /tmp and /var/tmp (MOUNT_UNDER_SCRATCH):
#: a checkout, and with it the launcher's Python, under /tmp would vanish for the job.
_BASE_CONFIG = "KILLING_TIMEOUT = 5\nMOUNT_UNDER_SCRATCH =\n"


class PersonalPool:
    """One personal pool under ``prefix`` (an unpacked release); see the module docstring."""

    def __init__(
        self, prefix: Path, user: pwd.struct_passwd, *, standard_devpts: bool = False
    ) -> None:
        self.prefix = prefix
        self.standard_devpts = standard_devpts
        self.local_dir = prefix / "local"
        self.user = user
        self.port = 0
        # The daemons inherit this environment, and with it the hooks: keep the developer's
        # _CONDOR_* overrides and GLITE_VM_* settings out of the pool.
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("_CONDOR_", "GLITE_VM_"))
        }
        self.env.update(
            CONDOR_CONFIG=str(prefix / "etc" / "condor_config"),
            PATH=f"{prefix / 'bin'}:{prefix / 'sbin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        )

    @property
    def libexec(self) -> Path:
        return self.prefix / "libexec"

    def start(
        self,
        extra_config: str,
        timeout: float = 90.0,
        *,
        collector_port: int | None = None,
        ready: Callable[[PersonalPool], object] | None = None,
    ) -> None:
        """Write the configuration with ``personal-pool.sh`` and start ``condor_master``.

        By default this machine is a whole pool and is up once a slot shows. A machine of a
        larger pool (tests/condor/site.py) names the ``collector_port`` of its central manager
        and says with ``ready(pool)`` when it is up (its own daemons are in ``extra_config``'s
        ``DAEMON_LIST``)."""
        script = find_tarball().parent / "personal-pool.sh"
        extra = self.prefix / "extra.conf"
        extra.write_text(_BASE_CONFIG + extra_config)
        self.port = collector_port or free_port()
        env = dict(self.env, CONDOR_PORT=str(self.port), CONDOR_EXTRA_CONFIG=str(extra))
        if ready is not None:
            env["CONDOR_NO_START"] = "1"
        command = ["bash", str(script), str(self.prefix), str(self.local_dir)]
        if self.standard_devpts:
            command = [*STANDARD_DEVPTS, *command]
        try:
            subprocess.run(
                command,
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if ready is not None:
                master = [str(self.prefix / "sbin" / "condor_master")]
                if self.standard_devpts:
                    master = [*STANDARD_DEVPTS, *master]
                subprocess.run(
                    master,
                    env=self.env,
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                wait_until(f"the daemons of {self.prefix}", lambda: ready(self), timeout)
        except subprocess.CalledProcessError as exc:
            self.stop()
            raise PoolError(f"personal-pool.sh failed: {exc.stdout}{exc.stderr}") from None
        except subprocess.TimeoutExpired:
            self.stop()
            raise PoolError(f"personal-pool.sh did not finish within {timeout:.0f} s") from None
        except PoolError:
            self.stop()
            raise

    def reconfigure(self, extra_config: str) -> None:
        """Replace the extra configuration :meth:`start` installed with ``extra_config`` and
        ``condor_reconfig`` the running daemons (what an admin does after editing a file)."""
        installed = self.local_dir / "config.d" / "50-extra.conf"
        installed.write_text(_BASE_CONFIG + extra_config)
        self.run(["condor_reconfig"])

    # -- running tools ----------------------------------------------------------------------

    def run(
        self,
        argv: Sequence[str],
        *,
        as_user: bool = False,
        cwd: Path | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        command = list(argv)
        if as_user:
            keep = {k: self.env[k] for k in ("CONDOR_CONFIG", "PATH")}
            command = [
                "runuser",
                "-u",
                self.user.pw_name,
                "--",
                "env",
                *(f"{k}={v}" for k, v in keep.items()),
                *command,
            ]
        result = subprocess.run(
            command,
            check=False,
            env=self.env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise PoolError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr}")
        return result

    def job_dir(self, name: str) -> Path:
        """A directory owned by the test user to submit from."""
        path = self.prefix / "jobs" / name
        path.mkdir(parents=True, exist_ok=True)
        for p in (path.parent, path):
            os.chown(p, self.user.pw_uid, self.user.pw_gid)
        return path

    def submit(self, name: str, description: str) -> int:
        """Submit ``description`` as the test user from ``job_dir(name)``; the cluster id."""
        directory = self.job_dir(name)
        sub = directory / f"{name}.sub"
        sub.write_text(description)
        os.chown(sub, self.user.pw_uid, self.user.pw_gid)
        out = self.run(["condor_submit", "-terse", str(sub)], as_user=True, cwd=directory).stdout
        return int(out.split(".")[0])

    def _json(self, argv: Sequence[str]) -> list[JobAd]:
        text = self.run(argv).stdout.strip()
        ads: list[JobAd] = json.loads(text) if text else []
        return ads

    def queue_ad(self, cluster: int) -> JobAd | None:
        ads = self._json(["condor_q", "-json", f"{cluster}.0"])
        return ads[0] if ads else None

    def history_ad(self, cluster: int) -> JobAd | None:
        ads = self._json(["condor_history", "-json", "-limit", "1", f"{cluster}.0"])
        return ads[0] if ads else None

    def wait_for_history(self, cluster: int, timeout: float) -> JobAd:
        ad: JobAd = wait_until(
            f"job {cluster} to leave the queue", lambda: self.history_ad(cluster), timeout
        )
        return ad

    def wait_for_status(self, cluster: int, status: int, timeout: float) -> JobAd:
        """The queue ad once ``JobStatus == status`` (1 idle, 2 running, 5 held)."""

        def probe() -> JobAd | None:
            ad = self.queue_ad(cluster)
            return ad if ad is not None and ad.get("JobStatus") == status else None

        ad: JobAd = wait_until(f"job {cluster} to reach JobStatus {status}", probe, timeout)
        return ad

    def slot_ads(self) -> list[JobAd]:
        return self._json(["condor_status", "-json"])

    # -- stopping ---------------------------------------------------------------------------

    def _our_pids(self) -> list[int]:
        """Processes running a program of this release (exact path, not a name match)."""
        pids = []
        sbin = str(self.prefix) + os.sep
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.readlink(entry / "exe").startswith(sbin):
                    pids.append(int(entry.name))
        return pids

    def stop(self, timeout: float = 30.0) -> None:
        """``condor_off -fast -master``, wait for the daemons to go, then kill what is left."""
        if self.port:
            self.run(["condor_off", "-fast", "-master"], check=False, timeout=20)
        deadline = time.monotonic() + timeout
        while self._our_pids() and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in self._our_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.port = 0


#: Runs a command (the pool's daemons) in a mount namespace of its own with a terminal
#: filesystem mounted as a standard host mounts it (new terminals belong to group tty, mode
#: 0620). The test machine's /dev/pts gives a new terminal its user's group, and the sshd that
#: condor_starter runs as the job's owner for condor_ssh_to_job must then hand the terminal to
#: group tty, which only root may (measured: OpenSSH's pty_setowner fails, the connection
#: closes as soon as the client asks for a terminal).
STANDARD_DEVPTS = [
    "unshare",
    "--mount",
    "--propagation",
    "private",
    "sh",
    "-c",
    "mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=0666 devpts /dev/pts"
    ' && mount --bind /dev/pts/ptmx /dev/ptmx && exec "$@"',
    "standard-devpts",
]


@contextlib.contextmanager
def running_pool(
    prefix: Path, extra_config: str, user: pwd.struct_passwd, *, standard_devpts: bool = False
) -> Iterator[PersonalPool]:
    pool = PersonalPool(prefix, user, standard_devpts=standard_devpts)
    pool.start(extra_config)
    try:
        yield pool
    finally:
        pool.stop()


@contextlib.contextmanager
def pool_service(
    root: Path,
    guest_dir: Path,
    layout: SlotLayout,
    extra: Mapping[str, str] | None = None,
    *,
    variants: Mapping[str, GuestVariant] | None = None,
) -> Iterator[ServiceProcess]:
    """The glite-vm service of a one-host pool under ``root``: a repository in ``root/repo``
    of the direct test guest (``test-direct``) and ``variants``, the pool's slots as
    ``glite-vm config`` writes them for ``layout``, and the ``extra`` settings."""
    catalogue = guest_catalogue(
        guest_dir, root / "repo", direct={"test-direct": ""}, variants=variants
    )
    with running_service(root, catalogue, {**(extra or {}), **layout.knobs()}) as svc:
        yield svc


@contextlib.contextmanager
def glite_vm_pool(
    root: Path,
    service: ServiceProcess,
    user: pwd.struct_passwd,
    *,
    extra_config: Callable[[Path], str] | None = None,
    standard_devpts: bool = False,
    **host: Any,
) -> Iterator[PersonalPool]:
    """The pool of glite-vm's end-to-end tests: a personal pool under ``root/htcondor`` whose
    execute host runs glite-vm's hooks (as ``glite-vm hook install`` and ``glite-vm config``
    make them) against ``service``. ``host`` are further :class:`ExecuteHostConfig` fields
    (``layout``, periods, ...); ``extra_config(hooks_dir)`` adds lines to the configuration.
    ``standard_devpts``: the daemons see terminals as a standard host makes them
    (:data:`STANDARD_DEVPTS`; interactive ``condor_ssh_to_job`` needs it here). Every job is
    removed before the daemons stop."""
    prefix = root / "htcondor"
    hooks, config = glite_vm_execute_host(
        prefix,
        state_dir=Path(service.env["GLITE_VM_STATE_DIR"]),
        socket_path=service.socket_path,
        **host,
    )
    if extra_config is not None:
        config += extra_config(hooks)
    with running_pool(prefix, config, user, standard_devpts=standard_devpts) as pool:
        try:
            yield pool
        finally:
            pool.run(["condor_rm", "-all"], check=False)


def vm_job_description(*extra: str, image: str = "test-direct") -> str:
    """A submit description of a glite-vm job running ``payload.sh`` (the shape
    submit_templates/ give users: files transferred, chirp on, 256 MiB); ``extra`` lines go
    before ``queue``."""
    return "\n".join(
        [
            "universe = vanilla",
            "executable = payload.sh",
            "should_transfer_files = YES",
            "when_to_transfer_output = ON_EXIT",
            "output = out",
            "error = err",
            "log = log",
            "request_memory = 256",
            "+WantIOProxy = true",
            f'+GliteVmImage = "{image}"',
            *extra,
            "queue",
            "",
        ]
    )


def submit_with_files(
    pool: PersonalPool, name: str, description: str, files: Mapping[str, str]
) -> int:
    """Write ``files`` (name -> text, owned by the pool's user) into job ``name``'s directory,
    then submit ``description`` there; the cluster id."""
    directory = pool.job_dir(name)
    for file, text in files.items():
        (directory / file).write_text(text)
        os.chown(directory / file, pool.user.pw_uid, pool.user.pw_gid)
    return pool.submit(name, description)
