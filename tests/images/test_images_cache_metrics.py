"""What the image cache tells its observer, as the service's metrics count it: the cache
against a real loopback repository, with :class:`~glite_vm.service.metrics.ServiceMetrics` as
the observer (what the service passes), read back from its exposition."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from glite_vm.config import Settings
from glite_vm.errors import ChecksumMismatchError, DownloadError
from glite_vm.images.acquire import acquire_image
from glite_vm.service.metrics import ServiceMetrics
from glite_vm.units import MIB
from tests.images.images_helpers import Repo, random_bytes
from tests.images.images_http import LoopbackServer


def counted(metrics: ServiceMetrics) -> dict[str, float]:
    """The cache's samples, ``name{label}`` -> value."""
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for s in family.samples:
            if s.name.startswith("glite_vm_cache_") and not s.name.endswith("_created"):
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{label}}}" if label else s.name] = s.value
    return out


def test_downloads_bytes_and_evictions_reach_the_observer(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(cache_max_bytes=2 * MIB + MIB // 2)
    metrics = ServiceMetrics(process=False)
    for i, name in enumerate("abc"):
        repo.publish(name, random_bytes(MIB, i))

    def acquire(name: str) -> None:
        acquire_image(settings, name, job_id="1.0", observer=metrics).release()

    acquire("a")
    acquire("a")  # a hit: nothing downloaded
    acquire("b")
    acquire("c")  # no room for three: a, the least recently used, goes
    assert counted(metrics) == {
        "glite_vm_cache_downloads_total{outcome=ok}": 3,
        "glite_vm_cache_downloaded_bytes_total": 3 * MIB,
        "glite_vm_cache_evictions_total": 1,
        "glite_vm_cache_evicted_bytes_total": MIB,
        # lookups are the engine's to count (it knows a boot attempt from an admin's fetch)
        "glite_vm_cache_hits_total": 0,
        "glite_vm_cache_misses_total": 0,
    }
    assert len(server.requests("images/a.img")) == 1


def test_failed_downloads_are_counted_by_error_class(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    metrics = ServiceMetrics(process=False)
    repo.publish("forged", random_bytes(MIB, 7), sha256="0" * 64)
    repo.publish("gone", random_bytes(MIB, 8))
    with server.guard:
        del server.files["/images/gone.img"]  # the catalogue names a file the server lacks
    with pytest.raises(ChecksumMismatchError):
        acquire_image(settings, "forged", job_id="1.0", observer=metrics)
    with pytest.raises(DownloadError):
        acquire_image(settings, "gone", job_id="2.0", observer=metrics)
    got = counted(metrics)
    assert got["glite_vm_cache_downloads_total{outcome=ChecksumMismatchError}"] == 1
    assert got["glite_vm_cache_downloads_total{outcome=DownloadError}"] == 1
    assert got["glite_vm_cache_downloads_total{outcome=ok}"] == 0
    assert got["glite_vm_cache_downloaded_bytes_total"] == MIB  # the forged file did arrive
