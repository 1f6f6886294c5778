"""Hard times for guests, made on purpose: a starved vCPU, a killed QEMU, busy neighbours.

* :class:`Meddler` watches libvirt for new glite-vm domains whose VM directory lies under a
  root (one test's own) and does something to the first ``count`` of them once they boot:
  ``"kill"`` SIGKILLs their QEMU (a QEMU crash, as libvirt sees it) and ``"starve"`` holds their
  vCPU to 3 % of a core (a CFS quota: libvirt's ``vcpu_quota``) until the kernel is past its
  timer setup. Starved like that, a guest kernel without ``no_timer_check`` fails its timer check
  (``IO-APIC + timer doesn't work!``) the way it does on a host crowded with TCG guests.
* :class:`BusyGuests` boots guests whose only work is to burn their CPU: two of them load both
  cores of this machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import libvirt

from glite_vm.config import Settings
from glite_vm.request import VMRequest
from glite_vm.vm.connect import open_host
from glite_vm.vm.domain_xml import DOMAIN_PREFIX, METADATA_NS, JobMetadata
from glite_vm.vm.domains import qemu_pid
from glite_vm.vm.lifecycle import Vm
from tests.support import LocalImage

STARVED_QUOTA_US = 3000  # of every 100 ms: measured to fail the timer check every time
PID_DIR = Path("/run/libvirt/qemu")
#: Console lines after which the timer check is over (or the kernel panicked in it).
PAST_TIMER_CHECK = ("Freeing initrd memory", "Kernel panic", "Run /")


class Meddler:
    """Do ``action`` to the first ``count`` domains that appear under ``root`` (and whose
    name contains ``match``) while the ``with`` block runs; :attr:`done` names them.

    New domains are spotted by their QEMU pid files (a directory listing every 10 ms, no
    libvirt call for domains already judged) and dealt with as soon as libvirt has resumed
    them (a quota set while libvirt still starts a domain is reset by it), so a guest is
    starved while its firmware runs, before its kernel's timer check.
    """

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
        self._known = set(_running_names())
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
            time.sleep(0.01)

    def _pass(self) -> None:
        for name, log in list(self._starved.items()):
            text = _read(log)
            if any(marker in text for marker in PAST_TIMER_CHECK) or qemu_pid(name) is None:
                self._release(name)
        if len(self.done) >= self.count:
            return
        for name in _running_names():
            if name in self._known or self.match not in name or len(self.done) >= self.count:
                continue
            vm_dir = self._vm_dir(name)
            pid = qemu_pid(name)
            if vm_dir is None or pid is None:
                self._known.add(name)  # not ours, or gone already
                continue
            if not self._running(name):
                continue  # libvirt is still starting it (and would reset a quota set now)
            self._known.add(name)
            if self.action == "kill":
                log = vm_dir / "boot.log"
                while not _read(log) and qemu_pid(name) is not None:
                    time.sleep(0.01)  # the firmware runs: the guest is booting
                os.kill(pid, signal.SIGKILL)
            else:
                self._quota(name, STARVED_QUOTA_US)
                self._starved[name] = vm_dir / "boot.log"
            self.done.append(name)

    def _vm_dir(self, name: str) -> Path | None:
        """The VM directory of domain ``name`` if it lies under :attr:`root`."""
        try:
            dom = self._conn.lookupByName(name)
            meta = JobMetadata.from_xml(
                dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
            )
        except (libvirt.libvirtError, KeyError, ValueError):
            return None
        vm_dir = Path(meta.vm_dir)
        return vm_dir if vm_dir.is_relative_to(self.root) else None

    def _running(self, name: str) -> bool:
        try:
            state, _reason = self._conn.lookupByName(name).state()
        except libvirt.libvirtError:
            return False
        return bool(state == libvirt.VIR_DOMAIN_RUNNING)

    def _quota(self, name: str, quota_us: int) -> None:
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.lookupByName(name).setSchedulerParametersFlags(
                {"vcpu_period": 100000, "vcpu_quota": quota_us}, libvirt.VIR_DOMAIN_AFFECT_LIVE
            )

    def _release(self, name: str) -> None:
        self._starved.pop(name, None)
        self._quota(name, -1)


def _running_names() -> list[str]:
    """glite-vm domains whose QEMU runs (libvirt's pid files under qemu:///system)."""
    try:
        files = os.listdir(PID_DIR)
    except OSError:
        return []
    return [f[:-4] for f in files if f.endswith(".pid") and f.startswith(DOMAIN_PREFIX)]


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


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
