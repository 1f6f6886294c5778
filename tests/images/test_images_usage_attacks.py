"""Attacks on the use counts pre-staging's ``top:N`` reads (``<cache>/usage.json``): a file of
any shape, written by whoever could write there, costs a job nothing, makes pre-staging fetch
nothing but catalogue images, and is replaced whole by the next use. Real files, a real
loopback repository, real downloads."""

from __future__ import annotations

import json
import logging
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from glite_vm.config import Settings
from glite_vm.images.acquire import acquire_image
from glite_vm.images.cache import ImageCache
from glite_vm.images.usage import MAX_NAMES, USAGE_FILE, most_used, read_counts
from glite_vm.knob_values import Prefetch
from glite_vm.service.prefetch import prefetch_once
from glite_vm.units import KIB, MIB
from tests.images.images_helpers import Repo, random_bytes

#: usage.json as an attacker (or a crash, or a disk error) could leave it.
HOSTILE: dict[str, bytes] = {
    "deep nesting": b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "deep nesting, not closed": b"[" * 200_000,
    "a list": b'["alpha", "alpha", "alpha"]',
    "wrong types": b'{"alpha": "9", "beta": 2.5, "gamma": true, "delta": null, "eps": [1]}',
    "NaN and infinities": b'{"alpha": NaN, "beta": Infinity, "gamma": -Infinity}',
    "a number of 5000 digits": b'{"alpha": ' + b"9" * 5000 + b"}",
    "invalid UTF-8": b'{"\xff\xfe": 5}',
    "a lone surrogate": b'{"\\ud800": 5}',
    "binary junk": bytes(range(256)) * 64,
    "empty": b"",
}


def _leases(settings: Settings) -> list[Path]:
    return list((settings.effective_cache_dir / "leases").rglob("*.json"))


def _plant(settings: Settings, data: bytes) -> Path:
    cache = ImageCache(settings)
    cache.make_dirs()
    path = settings.effective_cache_dir / USAGE_FILE
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("shape", list(HOSTILE))
def test_a_hostile_usage_file_costs_a_job_nothing_and_is_replaced(
    shape: str, repo: Repo, settings_for: Callable[..., Settings]
) -> None:
    repo.publish("alpha", random_bytes(64 * KIB, 1))
    settings = settings_for(prefetch=Prefetch(("alpha",), top=3))
    _plant(settings, HOSTILE[shape])
    cache = ImageCache(settings)
    # pre-staging still fetches what the admin listed, and nothing else
    results = prefetch_once(settings)
    assert [(r.name, r.outcome) for r in results if r.name == "alpha"] == [("alpha", "fetched")]
    # a job's acquire works, leaves no lease behind, and its use is counted afresh
    with acquire_image(settings, "alpha", job_id="job-1") as lease:
        assert lease.image.cache_hit
    assert _leases(settings) == []
    assert read_counts(cache) == {"alpha": 1}
    assert json.loads((settings.effective_cache_dir / USAGE_FILE).read_bytes()) == {"alpha": 1}


def test_a_huge_usage_file_is_not_read_into_memory(
    repo: Repo, settings_for: Callable[..., Settings]
) -> None:
    repo.publish("alpha", random_bytes(64 * KIB, 2))
    settings = settings_for(prefetch=Prefetch(top=5))
    # 64 MiB: one name of 64 MiB with a count, valid JSON all the way
    _plant(settings, b'{"' + b"a" * (64 * MIB) + b'": 1000000}')
    cache = ImageCache(settings)
    tracemalloc.start()
    try:
        names = most_used(cache, 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert names == []
    assert peak < 8 * MIB, f"reading the usage file took {peak / MIB:.0f} MiB"
    with acquire_image(settings, "alpha", job_id="job-1"):
        pass
    assert read_counts(cache) == {"alpha": 1}


def test_names_that_are_no_catalogue_name_are_never_fetched_nor_logged_raw(
    repo: Repo, settings_for: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    repo.publish("alpha", random_bytes(64 * KIB, 3))
    repo.publish("beta", random_bytes(64 * KIB, 4))
    settings = settings_for(prefetch=Prefetch(top=4))
    hostile = {
        "../../../../etc/passwd": 10**18,
        "http://127.0.0.1:1/x.img": 10**18,
        "/etc/shadow": 10**18,
        "alpha\n2026-12-05 glite_vm: forged log line": 10**18,
        "\x1b]0;owned\x07\x1b[2J": 10**18,
        "images/beta.img": 10**18,
        "beta\n": 10**18,  # a regular expression's $ lets one trailing line break through
        "x" * 10_000: 10**18,
        "beta": 3,
        "alpha": 2,
    }
    # thousands of names besides, each used once
    hostile.update({f"junk-{i}": 1 for i in range(5000)})
    _plant(settings, json.dumps(hostile).encode())
    cache = ImageCache(settings)
    with caplog.at_level(logging.INFO, logger="glite_vm"):
        results = prefetch_once(settings)
    fetched = {r.name for r in results if r.outcome == "fetched"}
    assert fetched == {"alpha", "beta"}  # the names that are images, and nothing else
    served = [r.path for r in repo.server.requests()]
    assert all(p.endswith(("catalogue.json", "alpha.img", "beta.img")) for p in served), served
    logged = caplog.text
    assert "\x1b" not in logged and "\x07" not in logged
    assert "\n2026-12-05 glite_vm: forged log line" not in logged
    assert "x" * 1000 not in logged
    # the next use rewrites the file whole and bounded
    with acquire_image(settings, "alpha", job_id="job-1"):
        pass
    counts = read_counts(cache)
    assert len(counts) <= MAX_NAMES
    assert counts["alpha"] == 3 and counts["beta"] == 3
    assert "beta\n" not in counts
    assert not any("/" in n or "\n" in n or "\x1b" in n or len(n) > 1000 for n in counts)


def test_what_a_writer_killed_mid_write_left_goes_with_the_next_count(
    repo: Repo, settings_for: Callable[..., Settings]
) -> None:
    """A job's count is written to a temporary file and renamed; a process killed in between
    leaves that file in the cache's root. The next count (under the same lock) removes it."""
    repo.publish("alpha", random_bytes(64 * KIB, 3))
    settings = settings_for()
    cache = ImageCache(settings)
    cache.make_dirs()
    root = settings.effective_cache_dir
    left = [root / f".{USAGE_FILE}.{pid}.deadbeef.tmp" for pid in (4242, 4243)]
    for path in left:
        path.write_bytes(b'{"alpha": 1')  # cut short
    with acquire_image(settings, "alpha", job_id="job-1"):
        pass
    assert not any(p.exists() for p in left)
    assert sorted(p.name for p in root.glob(f".{USAGE_FILE}*")) == []
    assert read_counts(cache) == {"alpha": 1}
