"""Helpers of the service tests: local users, the service process, clients run as users."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from glite_vm.errors import GliteVmError
from glite_vm.service.client import ServiceClient
from glite_vm.service.events import Event, event_log_path, read_events
from glite_vm.slots import SlotLayout
from glite_vm.units import MIB as MIB_BYTES
from tests.support import (
    domain_names,
    domains_under,
    local_account,
    service_env,
    traversable,
    virsh,
)

DRIVER = Path(__file__).resolve().parent / "driver.py"
CALL_TIMEOUT = 120.0  # bound on any one client run (a boot under TCG takes ~5 s)
_clusters = itertools.count(100)


#: The slots the trust-boundary tests' services know: slot1 and slot2 for ordinary jobs,
#: slot3 root-enabled; one CPU, 512 MiB and 1 GiB of disk each. Starters name (slot, type).
THREE_SLOTS = SlotLayout(slots=3, root_slots=1, cpus=1, memory_mib=512, disk_bytes=1024 * MIB_BYTES)
USER_SLOT, ROOT_SLOT = ("slot1", 1), ("slot3", 2)


@dataclasses.dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def ensure_account(name: str) -> Account:
    """A real local user (created once; idempotent)."""
    entry = local_account(name)
    return Account(name, entry.pw_uid, entry.pw_gid)


def as_user(account: Account) -> list[str]:
    return [
        "setpriv",
        f"--reuid={account.uid}",
        f"--regid={account.gid}",
        "--init-groups",
        "--",
    ]


def run_as(
    account: Account, request: Mapping[str, Any], *, timeout: float = CALL_TIMEOUT
) -> dict[str, Any]:
    """Run one client call as ``account`` in its own process; the driver's JSON answer."""
    proc = subprocess.run(
        [*as_user(account), sys.executable, str(DRIVER), json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
        env=_client_env(),
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssertionError(f"driver failed ({proc.returncode}): {proc.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert answer["uid"] == account.uid
    return answer


def ok(answer: Mapping[str, Any]) -> Any:
    assert answer["ok"], f"expected success, got {answer}"
    return answer["result"]


def denied(answer: Mapping[str, Any]) -> str:
    """The message of an AccessDeniedError answer (asserting that is what it was)."""
    assert not answer["ok"], f"expected AccessDeniedError, got success: {answer}"
    assert answer["type"] == "AccessDeniedError", answer
    assert answer["disposition"] == "hold", answer
    return str(answer["message"])


def _client_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    return env


def wait_for(what: str, check: Callable[[], bool], timeout: float, step: float = 0.2) -> float:
    """Seconds until ``check()`` held; AssertionError after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(step)
    return time.monotonic() - start


class ServiceProcess:
    """``glite-vm serve`` as a real root process, started and stopped by the tests."""

    def __init__(self, socket_path: Path, env: Mapping[str, str], log_path: Path) -> None:
        self.socket_path = socket_path
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def site_settings(self) -> dict[str, str]:
        """The ``GLITE_VM_*`` settings of this service, which the hooks of its execute host
        read too (from the same condor_config): the driver makes its requests with them."""
        return {k: v for k, v in self.env.items() if k.startswith("GLITE_VM_")}

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 90.0) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "glite_vm.cli.service", "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self.env,
                cwd="/",
            )
        self.starts += 1
        client = self.client(connect_timeout=1.0, idle_timeout=5.0)

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited: {self.log()[-3000:]}")
            try:
                client.ping()
            except GliteVmError:
                return False
            return True

        wait_for("the service answers", answers, timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError("the service did not stop within 30 s of SIGTERM") from None

    def restart(self) -> None:
        assert self.stop() == 0
        self.start()

    def client(self, **kw: Any) -> ServiceClient:
        return ServiceClient(self.socket_path, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


#: Where this run's services keep their VM directories (set by the ``svc_root`` fixture):
#: domains of the same test users made by another run sharing this libvirtd are not ours.
RUN_ROOT: list[Path] = []


def our_domains(owner_names: tuple[str, ...]) -> list[str]:
    """libvirt domains of the test users (other suites' domains are none of our business)."""
    names = domains_under(RUN_ROOT[0]) if RUN_ROOT else domain_names()
    return [n for n in names if any(f"-{o}-" in n for o in owner_names)]


def domain_running(name: str) -> bool:
    out = virsh("domstate", name, check=False, timeout=30)
    return out.returncode == 0 and out.stdout.strip() == "running"


# -- client calls as a user ------------------------------------------------------------------


def job_ad(image: str = "test-direct", **extra: object) -> dict[str, object]:
    """A job ad as a hook would pass it; ``Owner`` is deliberately someone else's name."""
    return {
        "ClusterId": next(_clusters),
        "ProcId": 0,
        "Owner": "mallory",
        "GliteVmImage": image,
        **extra,
    }


def make_scratch(
    root: Path, owner: Account, name: str, files: dict[str, str] | None = None
) -> Path:
    path = root / name
    path.mkdir(mode=0o700)
    for rel, text in (files or {}).items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    for p in [path, *path.rglob("*")]:
        os.chown(p, owner.uid, owner.gid, follow_symlinks=False)
    return path


def driver_request(service: ServiceProcess, op: str, **args: Any) -> dict[str, Any]:
    """What the driver takes for one call of ``op`` to ``service`` (with the site's settings,
    with which it turns a job ad into a request as the hook does)."""
    return {"op": op, "socket": str(service.socket_path), "site": service.site_settings, **args}


def call(service: ServiceProcess, who: Account, op: str, **args: Any) -> dict[str, Any]:
    return run_as(who, driver_request(service, op, **args))


def prepare(service: ServiceProcess, who: Account, scratch: Path, **kw: Any) -> dict[str, Any]:
    ad = kw.pop("job_ad", None) or job_ad()
    result: dict[str, Any] = ok(
        call(service, who, "prepare", job_ad=ad, scratch_dir=str(scratch), **kw)
    )
    return result


def read_as(who: Account, path: str | Path) -> dict[str, Any]:
    return run_as(who, {"op": "read", "path": str(path)})


def stdout_of(result: dict[str, Any], stream: str = "stdout") -> str:
    return "".join(c["data"] for c in result["chunks"] if c["stream"] == stream)


def background(
    service: ServiceProcess, who: Account, op: str, **args: Any
) -> subprocess.Popen[str]:
    """A client call running as ``who`` while the test does something else."""
    request = driver_request(service, op, **args)
    return subprocess.Popen(
        [*as_user(who), sys.executable, str(DRIVER), json.dumps(request)],
        stdout=subprocess.PIPE,
        text=True,
        cwd="/",
    )


def background_exec(
    service: ServiceProcess, who: Account, vm: str, script: str
) -> subprocess.Popen[str]:
    return background(service, who, "exec", vm=vm, argv=["sh", "-c", script])


def answer_of(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, _err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    answer: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return answer


def leases_in(state: Path) -> list[Path]:
    return list((state / "cache" / "leases").rglob("*.json"))


def domains_of(who: Account) -> list[str]:
    return our_domains((who.name,))


def events_of(state: Path, vm: str) -> list[Event]:
    """What the service's event log says about ``vm``, oldest first."""
    return [e for e in read_events(event_log_path(state)) if e.vm == vm]


_CLI = "import sys; from glite_vm.cli.main import main; sys.exit(main())"


def admin_cli(svc: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """``glite-vm ARGS`` as root against ``svc``'s state and socket (what an admin types)."""
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from glite_vm.cli.main import main; sys.exit(main())",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=svc.env,
        cwd="/",
        check=False,
    )


@contextlib.contextmanager
def running_service(
    root: Path, catalogue: Path, extra: Mapping[str, str] | None = None
) -> Iterator[ServiceProcess]:
    """A ``glite-vm serve`` whose state and socket live under ``root`` (see
    :func:`tests.support.service_env`), logging to ``root/service.log``; stopped afterwards."""
    env = service_env(root, catalogue, extra)
    traversable(Path(env["GLITE_VM_STATE_DIR"]))
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


# -- a stand-in for condor_starter ------------------------------------------------------------

#: A stand-in for condor_starter: its name and arguments look like the real one's
#: (``condor_starter -f -local-name slot_type_N -a slotN ADDRESS``, measured on HTCondor 25.0).
#: It runs each line of its stdin with ``/bin/sh -c`` as its child, answers ``done STATUS`` and
#: exits when stdin closes, so a test's client calls have it as their parent, as a hook's do.
FAKE_STARTER_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/wait.h>
int main(void) {
    static char line[1 << 20];
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        pid_t pid = fork();
        if (pid == 0) { execl("/bin/sh", "sh", "-c", line, (char *)0); _exit(127); }
        int st = 0;
        waitpid(pid, &st, 0);
        printf("done %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
    }
    return 0;
}
"""


def build_fake_starter(directory: Path) -> Path:
    """Compile :data:`FAKE_STARTER_C` into ``directory/condor_starter`` (root-owned, 0755)."""
    directory.mkdir(mode=0o755, exist_ok=True)
    source = directory / "fake_starter.c"
    source.write_text(FAKE_STARTER_C)
    binary = directory / "condor_starter"
    subprocess.run(["gcc", "-O", "-o", str(binary), str(source)], check=True, timeout=120)
    binary.chmod(0o755)
    return binary


class FakeStarter:
    """A running :data:`FAKE_STARTER_C` for slot ``slot`` (``slot3``), started by root or,
    as an attacker would, by ``started_by``; client calls run as its children."""

    def __init__(
        self,
        binary: Path,
        service: ServiceProcess,
        slot: str,
        *,
        slot_type: int,
        started_by: Account | None = None,
    ) -> None:
        self.service = service
        self.started_by = started_by
        argv = [str(binary), "-f", "-local-name", f"slot_type_{slot_type}", "-a", slot, "127.0.0.1"]
        prefix = as_user(started_by) if started_by is not None else []
        self.proc = subprocess.Popen(
            [*prefix, *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        self._calls = itertools.count()
        self._out = Path(f"/var/tmp/glite-vm-fake-starter-{self.proc.pid}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, who: Account, op: str, **args: Any) -> dict[str, Any]:
        """``op`` as ``who``, run by this starter; the driver's answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = driver_request(self.service, op, **args)
        out = self._out.with_suffix(f".{next(self._calls)}.json")
        if self.started_by is not None:  # the starter already runs as its user
            assert who == self.started_by, "a user's own starter runs only that user's calls"
            prefix: list[str] = []
        else:
            prefix = as_user(who)
        command = [*prefix, sys.executable, str(DRIVER), json.dumps(request)]
        line = "exec " + " ".join(shlex.quote(a) for a in command) + f" > {shlex.quote(str(out))}"
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        done = self.proc.stdout.readline()
        assert done.startswith("done "), f"the fake starter said {done!r}"
        try:
            answer: dict[str, Any] = json.loads(out.read_text().strip().splitlines()[-1])
        finally:
            out.unlink(missing_ok=True)
        return answer

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
