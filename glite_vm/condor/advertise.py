"""``glite-vm advertise``: host facts for the slot ads, printed for STARTD_CRON.

The startd runs it every ``STARTD_CRON_GLITE_VM_ADVERTISE_PERIOD`` as the ``condor`` user
(measured) and merges the ``Name = value`` lines into every slot ad::

    GliteVmHypervisors = "kvm,qemu"       # accelerators VMs can use here, best first
    GliteVmCachedImages = "debian-12,..." # images the local cache holds (catalogue names, URLs)
    GliteVmCacheFreeBytes = 12345         # bytes a new image may still take in the cache
    GliteVmNetworks = "none,user"         # networks a job may ask for (GliteVmNetwork)
    GliteVmServiceUp = true               # the service answered a ping just now

so a submit file can ``rank = stringListMember(GliteVmImage, GliteVmCachedImages)``. The
networks are ``GLITE_VM_NETWORK`` (the default, first) and ``GLITE_VM_JOB_NETWORKS``; the START
expression of ``glite-vm config`` already keeps jobs off hosts that do not offer theirs, from the
same knobs. ``GliteVmServiceUp = false`` keeps new jobs away while the host's service does not
answer (the START expression of ``glite-vm config`` reads it; an unknown value counts as up, so a
host is not shut out before its first report); jobs already running there end with the
launcher's error and, with ``max_retries``/``retry_until`` as the templates show, run again
elsewhere.
``GliteVmRootEnabled`` is not here: it is per slot, from the configuration (``glite-vm config``).

It must be cheap and bounded: it reads the cache's files and the *remembered* hypervisor
probe (``<state_dir>/hypervisor.json``, written whenever the service probes), and never probes
KVM itself. Without a current probe it advertises ``"qemu"`` when QEMU is installed (TCG always
works) and nothing when it is not. What cannot be read is left out, with the reason on stderr
(the StartLog).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

from glite_vm.condor.jobad import AdValue, format_ad_updates
from glite_vm.config import Settings
from glite_vm.vm import hypervisor as hv

#: Names a string list in a ClassAd can carry as one item (``stringListMember`` splits at
#: commas and blanks).
_LIST_ITEM: Final = re.compile(r'^[^\s,"\\]+$')
HYPERVISOR_CACHE: Final = hv.HYPERVISOR_CACHE


@dataclasses.dataclass(frozen=True)
class HostFacts:
    hypervisors: tuple[str, ...] | None
    cached_images: tuple[str, ...] | None
    cache_free_bytes: int | None
    problems: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    service_up: bool | None = None

    def ad_attributes(self) -> dict[str, AdValue]:
        out: dict[str, AdValue] = {}
        if self.hypervisors is not None:
            out["GliteVmHypervisors"] = ",".join(self.hypervisors)
        if self.cached_images is not None:
            out["GliteVmCachedImages"] = ",".join(self.cached_images)
        if self.cache_free_bytes is not None:
            out["GliteVmCacheFreeBytes"] = self.cache_free_bytes
        if self.networks:
            out["GliteVmNetworks"] = ",".join(self.networks)
        if self.service_up is not None:
            out["GliteVmServiceUp"] = self.service_up
        return out


def remembered_hypervisor(settings: Settings) -> str | None:
    """The accelerator of the last probe, if it still holds (same kernel, QEMU, /dev/kvm)."""
    if settings.hypervisor == "qemu":
        return "qemu"
    path = settings.state_dir / HYPERVISOR_CACHE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("preference") != settings.hypervisor:
        return None
    # the key the probe stored: it changes with the kernel, the emulator and /dev/kvm
    if data.get("key") != hv._probe_key(hv.find_emulator()):
        return None
    kind = data.get("kind")
    return kind if kind in ("kvm", "qemu") else None


def hypervisors(
    settings: Settings, emulator: Callable[[], str] = hv.find_emulator
) -> tuple[str, ...] | None:
    """Accelerators VMs can use here, best first; ``None`` when there is no QEMU at all."""
    kind = remembered_hypervisor(settings)
    if kind == "kvm":
        return ("kvm", "qemu")
    if kind == "qemu" or emulator():
        return ("qemu",)
    return None


def cache_facts(settings: Settings) -> tuple[tuple[str, ...], int]:
    """Images held (labels of disk images: catalogue names and custom URLs) and room left."""
    from glite_vm.images.cache import ImageCache  # noqa: PLC0415 - only the advertiser needs it

    status = ImageCache(settings).status()
    labels: set[str] = set()
    for entry in status.entries:
        if entry.entry.kind != "disk":
            continue  # kernels and initrds are listed under their image's name
        labels.update(s for s in entry.entry.sources if _LIST_ITEM.match(s))
    budget_left = status.budget - status.used_bytes - status.partial_bytes
    disk_left = _free_bytes_at(status.root) - settings.cache_min_free_bytes
    return tuple(sorted(labels)), max(min(budget_left, disk_left), 0)


def _free_bytes_at(path: Path) -> int:
    """Free space where ``path`` is or will be (the cache is made by the first download)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


#: Bounds of the advertiser's ping: a service this slow to answer is no use to a new job either.
PING_CONNECT_TIMEOUT: Final = 2.0
PING_IDLE_TIMEOUT: Final = 5.0


def service_answers(settings: Settings) -> tuple[bool, str]:
    """Whether the service at ``settings.socket_path`` answers a ping, and why not."""
    from glite_vm.errors import GliteVmError  # noqa: PLC0415
    from glite_vm.service.client import ServiceClient  # noqa: PLC0415 - only the advertiser

    client = ServiceClient(
        settings.socket_path,
        connect_timeout=PING_CONNECT_TIMEOUT,
        idle_timeout=PING_IDLE_TIMEOUT,
    )
    try:
        client.ping()
    except (GliteVmError, OSError) as exc:
        return False, f"the service at {settings.socket_path} does not answer: {exc}"
    return True, ""


def collect(settings: Settings) -> HostFacts:
    problems: list[str] = []
    images: tuple[str, ...] | None = None
    free: int | None = None
    try:
        images, free = cache_facts(settings)
    except (OSError, ValueError) as exc:
        problems.append(f"image cache {settings.effective_cache_dir}: {exc}")
    hvs = hypervisors(settings)
    if hvs is None:
        problems.append("no QEMU found: GliteVmHypervisors not advertised")
    up, why = service_answers(settings)
    if not up:
        problems.append(why + "; GliteVmServiceUp = false keeps new jobs away")
    return HostFacts(
        hvs, images, free, tuple(problems), networks=settings.allowed_networks, service_up=up
    )


def render(facts: HostFacts) -> str:
    """STARTD_CRON's output: ``Name = value`` lines (old-ClassAd strings)."""
    return format_ad_updates(facts.ad_attributes())
