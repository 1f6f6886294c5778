"""Pre-staging (glite_vm.service.prefetch) against a real loopback repository and cache: what
it fetches, what it leaves alone, the cap on its bandwidth, and the use counts of top:N."""

from __future__ import annotations

from collections.abc import Callable

from glite_vm.config import Settings
from glite_vm.images.acquire import acquire_image
from glite_vm.images.cache import ImageCache
from glite_vm.images.usage import most_used, read_counts
from glite_vm.knob_values import Prefetch
from glite_vm.service.prefetch import prefetch_once, warm_set
from glite_vm.units import KIB, MIB
from tests.images.images_helpers import Repo, random_bytes


def _leases(settings: Settings) -> list[object]:
    return list((settings.effective_cache_dir / "leases").rglob("*.json"))


def test_the_warm_set_is_fetched_once_and_left_unleased(
    repo: Repo, settings_for: Callable[..., Settings]
) -> None:
    repo.publish("alpha", random_bytes(300 * KIB, 1))
    repo.publish("beta", random_bytes(200 * KIB, 2))
    settings = settings_for(prefetch=Prefetch(("alpha", "beta", "gamma")))
    first = {r.name: r.outcome for r in prefetch_once(settings)}
    assert first == {"alpha": "fetched", "beta": "fetched", "gamma": "skipped"}
    assert {r.name: r.outcome for r in prefetch_once(settings)} == {
        "alpha": "cached",
        "beta": "cached",
        "gamma": "skipped",
    }
    assert len(repo.server.requests("images/alpha.img")) == 1
    assert _leases(settings) == []  # evictable like any other image
    # a job's first use finds it cached and downloads nothing
    with acquire_image(settings, "alpha", job_id="job-1") as lease:
        assert lease.image.cache_hit
    assert len(repo.server.requests("images/alpha.img")) == 1


def test_pre_staging_never_evicts_to_make_room(
    repo: Repo, settings_for: Callable[..., Settings]
) -> None:
    repo.publish("used", random_bytes(600 * KIB, 3))
    repo.publish("big", random_bytes(600 * KIB, 4))
    settings = settings_for(cache_max_bytes=1 * MIB, prefetch=Prefetch(("big",)))
    with acquire_image(settings, "used", job_id="job-1"):
        pass  # cached and unleased: a download for a job could evict it, pre-staging may not
    (result,) = prefetch_once(settings)
    assert result.outcome == "skipped"
    assert "without evicting" in result.detail
    assert repo.server.requests("images/big.img") == []
    assert [e.entry.sources for e in ImageCache(settings).status().entries] == [("used",)]


def test_the_bandwidth_cap_holds_the_download_back(
    repo: Repo, settings_for: Callable[..., Settings]
) -> None:
    # 3 MiB at 1 MiB/s: the chunks after the first wait for the rate (no timing is asserted:
    # the limiter's count of what it held back is)
    repo.publish("slow", random_bytes(3 * MIB, 5))
    settings = settings_for(prefetch=Prefetch(("slow",)), prefetch_rate=1 * MIB)
    (result,) = prefetch_once(settings)
    assert result.outcome == "fetched"
    assert "3.0 MiB at most 1.0 MiB/s" in result.detail
    held = float(result.detail.rpartition("held back ")[2].removesuffix(" s"))
    assert held > 0.0


def test_top_n_follows_what_jobs_used(repo: Repo, settings_for: Callable[..., Settings]) -> None:
    for n, name in enumerate(("one", "two", "three")):
        repo.publish(name, random_bytes(100 * KIB, 10 + n))
    settings = settings_for(prefetch=Prefetch(top=2))
    for name, uses in (("one", 1), ("two", 3), ("three", 2)):
        for i in range(uses):
            with acquire_image(settings, name, job_id=f"{name}-{i}"):
                pass
    cache = ImageCache(settings)
    assert read_counts(cache) == {"one": 1, "two": 3, "three": 2}
    assert most_used(cache, 2) == ["two", "three"]
    assert warm_set(settings, cache) == ["two", "three"]
    # pre-staging's own fetches are not uses
    ImageCache(settings).prune(0)
    prefetch_once(settings)
    assert read_counts(cache) == {"one": 1, "two": 3, "three": 2}
    assert {e.entry.sources for e in cache.status().entries} == {("two",), ("three",)}
