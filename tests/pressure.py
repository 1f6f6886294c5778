"""Hard times for guests, made on purpose: a starved vCPU, a killed QEMU, busy neighbours.

* :class:`Meddler` watches libvirt for new glite-vm domains whose VM directory lies under a
  root (one test's own) and does something to the first ``count`` of them once they boot:
  ``"kill"`` SIGKILLs their QEMU (a QEMU crash, as libvirt sees it) and ``"starve"`` holds their
  vCPU to 3 % of a core (a CFS quota through ``virsh schedinfo``) until the kernel is past its
  timer setup. Starved like that, a guest kernel without ``no_timer_check`` fails its timer check
  (``IO-APIC + timer doesn't work!``) the way it does on a host crowded with TCG guests.
* :class:`BusyGuests` boots guests whose only work is to burn their CPU: two of them load both
  cores of this machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import libvirt

from glite_vm.config import Settings
from glite_vm.request import VMRequest
from glite_vm.session import open_host
from glite_vm.vm.domain_xml import DOMAIN_PREFIX, METADATA_NS, JobMetadata
from glite_vm.vm.lifecycle import Vm, qemu_pid
from tests.support import LocalImage

STARVED_QUOTA_US = 3000  # of every 100 ms: measured to fail the timer check every time
#: Console lines after which the timer check is over (or the kernel panicked in it).
PAST_TIMER_CHECK = ("Freeing initrd memory", "Kernel panic", "Run /")


class Meddler:
    """Do ``action`` to the first ``count`` domains that appear under ``root`` (and whose
    name contains ``match``) while the ``with`` block runs; :attr:`done` names them."""

    def __init__(self, root: Path, action: str, count: int = 1, match: str = "") -> None:
        if action not in ("kill", "starve"):
            raise ValueError(f"unknown action {action!r}")
        self.root = root
        self.action = action
        self.count = count
        self.match = match
        self.done: list[str] = []
        self.errors: list[str] = []
        self._conn = libvirt.open("qemu:///system")
        self._seen = set(_domains_under(self._conn, root))
        self._starved: dict[str, Path] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meddler", daemon=True)

    def __enter__(self) -> Meddler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(30)
        for name in list(self._starved):
            self._release(name)
        self._conn.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._pass()
            except Exception as exc:  # a test helper: report, keep watching
                self.errors.append(repr(exc))
            time.sleep(0.05)

    def _pass(self) -> None:
        for name, log in list(self._starved.items()):
            text = _read(log)
            if any(marker in text for marker in PAST_TIMER_CHECK) or qemu_pid(name) is None:
                self._release(name)
        if len(self.done) >= self.count:
            return
        for name, vm_dir in _domains_under(self._conn, self.root).items():
            if name in self._seen or self.match not in name or len(self.done) >= self.count:
                continue
            pid = qemu_pid(name)
            log = vm_dir / "boot.log"
            if pid is None or not log.exists():
                continue  # not running yet: look again next pass
            self._seen.add(name)
            if self.action == "kill":
                while not _read(log) and qemu_pid(name) is not None:
                    time.sleep(0.01)  # the firmware runs: the guest is booting
                os.kill(pid, signal.SIGKILL)
            else:
                _schedinfo(name, STARVED_QUOTA_US)
                self._starved[name] = log
            self.done.append(name)

    def _release(self, name: str) -> None:
        self._starved.pop(name, None)
        _schedinfo(name, -1)


def _domains_under(conn: libvirt.virConnect, root: Path) -> dict[str, Path]:
    """glite-vm domains whose VM directory lies under ``root``, with that directory."""
    found = {}
    for dom in conn.listAllDomains(0):
        try:
            if not dom.name().startswith(DOMAIN_PREFIX):
                continue
            meta = JobMetadata.from_xml(
                dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            )
        except (libvirt.libvirtError, KeyError, ValueError):
            continue  # gone meanwhile, or not one of ours
        if Path(meta.vm_dir).is_relative_to(root):
            found[dom.name()] = Path(meta.vm_dir)
    return found


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _schedinfo(name: str, quota_us: int) -> None:
    subprocess.run(
        [
            "virsh",
            "-c",
            "qemu:///system",
            "schedinfo",
            name,
            "--live",
            "vcpu_period=100000",
            f"vcpu_quota={quota_us}",
        ],
        capture_output=True,
        timeout=30,
        check=False,
    )


class BusyGuests:
    """``count`` guests of ``image`` that loop on their CPU until the block ends."""

    def __init__(self, settings: Settings, image: LocalImage, count: int = 2) -> None:
        self.settings = settings
        self.image = image
        self.count = count
        self.vms: list[Vm] = []

    @contextlib.contextmanager
    def running(self) -> Iterator[list[Vm]]:
        host = open_host(self.settings)
        try:
            for n in range(self.count):
                request = VMRequest.create(
                    self.settings,
                    image=self.image.name,
                    job_id=f"busy.{os.getpid()}.{n}",
                    owner="busy",
                    root=True,
                    memory_mib=256,
                    keep_snapshot="never",
                )
                vm = host.start(request, self.image)
                self.vms.append(vm)
                vm.wait_ready()
                vm.agent.spawn("/bin/sh", ["-c", "while :; do :; done"])
            yield self.vms
        finally:
            for vm in self.vms:
                vm.teardown(failed=False, keep_override=False)
            host.conn.close()
