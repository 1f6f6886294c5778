"""The image cache against a real loopback HTTP server, real processes and real files."""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from glite_vm.config import Settings
from glite_vm.errors import (
    CacheFullError,
    ChecksumMismatchError,
    Disposition,
    DownloadError,
    ImageNotFoundError,
    ImageRefusedError,
    LockTimeoutError,
)
from glite_vm.images.acquire import ImageLease, acquire_image, release_job_leases
from glite_vm.images.cache import ImageCache
from glite_vm.units import MIB
from tests.images.images_helpers import (
    Repo,
    random_bytes,
    read_first_line,
    sha256_of,
    spawn_worker,
    wait_until,
    worker_result,
)
from tests.images.images_http import Fault, LoopbackServer


def blobs(settings: Settings) -> list[str]:
    d = settings.effective_cache_dir / "blobs"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def partials(settings: Settings) -> list[str]:
    d = settings.effective_cache_dir / "partial"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def part_size(settings: Settings, sha: str) -> int:
    try:
        return (settings.effective_cache_dir / "partial" / f"{sha}.part").stat().st_size
    except FileNotFoundError:
        return 0


def acquire(settings: Settings, ref: str, **kw: object) -> ImageLease:
    return acquire_image(settings, ref, job_id=str(kw.pop("job_id", "1.0")), **kw)  # type: ignore[arg-type]


# --- the basic path ----------------------------------------------------------------------------


def test_cold_then_warm_acquire_downloads_once_and_warm_costs_milliseconds(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    data = random_bytes(4 * MIB, 1)
    entry = repo.publish("alpha", data)
    with acquire(settings, "alpha") as lease:
        image = lease.image
        assert not image.cache_hit
        assert image.path.read_bytes() == data
        assert image.sha256 == entry["sha256"]
        assert image.format == "raw"
        assert image.virtual_size == len(data)
        assert image.guest_user == "glite"
        assert image.path.stat().st_mode & 0o222 == 0  # read-only
    assert len(server.requests("images/alpha.img")) == 1
    server.clear_log()

    timings = []
    for _ in range(30):
        t0 = time.perf_counter()
        with acquire(settings, "alpha") as lease:
            assert lease.image.cache_hit
        timings.append(time.perf_counter() - t0)
    assert server.log == [], "a warm acquire must not talk to the repository"
    assert statistics.median(timings) < 0.020, f"warm acquire median {statistics.median(timings)}"


def test_release_is_idempotent_and_context_manager_releases(repo: Repo, settings: Settings) -> None:
    repo.publish("alpha", random_bytes(MIB, 2))
    lease = acquire(settings, "alpha", job_id="7.0")
    cache = ImageCache(settings)
    assert cache.status().live_leases == 1
    lease.release()
    lease.release()
    assert lease.released
    assert cache.status().live_leases == 0
    with acquire(settings, "alpha", job_id="7.1"):
        assert cache.status().live_leases == 1
    assert cache.status().live_leases == 0


def test_threads_in_one_process_share_one_download(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    data = random_bytes(2 * MIB, 3)
    repo.publish("alpha", data)
    server.fault("images/alpha.img", Fault(delay=0.01))
    results: list[Path] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with acquire(settings, "alpha", job_id=f"{i}.0") as lease:
                results.append(lease.image.path)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(set(results)) == 1 and len(results) == 4
    assert len(server.requests("images/alpha.img")) == 1


def test_eight_processes_on_a_cold_image_cause_exactly_one_download(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    data = random_bytes(6 * MIB, 4)
    entry = repo.publish("alpha", data)
    # The first response stalls until every process is provably started and asking.
    server.fault("images/alpha.img", Fault(stall_after=MIB, then_continue=True, times=1))
    workers = [spawn_worker(settings, "alpha", f"{i}.0", "--announce") for i in range(8)]
    try:
        for w in workers:
            assert read_first_line(w) == {"started": True}
        assert server.stalled.wait(20)
        time.sleep(1.0)  # the announced processes have looked at the cache and wait on the lock
        assert len(server.requests("images/alpha.img")) == 1  # eight waiting, one GET
        server.unstall.set()
        results = [worker_result(w) for w in workers]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    gets = server.requests("images/alpha.img")
    assert [g.status for g in gets] == [200]  # one full GET
    assert server.bytes_served("images/alpha.img") == len(data)
    assert {r["path"] for r in results} == {
        str(settings.effective_cache_dir / "blobs" / entry["sha256"])
    }
    assert all(r["sha256"] == entry["sha256"] for r in results)
    assert sum(1 for r in results if not r["cache_hit"]) == 8  # all eight started cold
    assert sha256_of(Path(results[0]["path"])) == entry["sha256"]


# --- interrupted downloads -----------------------------------------------------------------------


def _kill_mid_download(
    settings: Settings, server: LoopbackServer, name: str, sha: str, at: int
) -> None:
    """Start a worker process, let it write ``at`` bytes, SIGKILL it."""
    worker = spawn_worker(settings, name, "9.0")
    try:
        assert server.stalled.wait(20)
        wait_until(lambda: part_size(settings, sha) == at, 20, "the partial download")
        # Never visible as an entry while incomplete.
        assert sha not in blobs(settings)
        assert ImageCache(settings).entry(sha) is None
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=10)
    server.unstall.set()


def test_sigkill_mid_download_then_next_acquire_resumes_with_range(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    data = random_bytes(6 * MIB, 5)
    entry = repo.publish("alpha", data)
    server.fault("images/alpha.img", Fault(stall_after=2 * MIB, times=1))
    _kill_mid_download(settings, server, "alpha", entry["sha256"], 2 * MIB)

    with acquire(settings, "alpha") as lease:
        assert lease.image.sha256 == entry["sha256"]
        assert sha256_of(lease.image.path) == entry["sha256"]
    gets = server.requests("images/alpha.img")
    assert [g.status for g in gets] == [200, 206]
    assert gets[1].headers["Range"] == f"bytes={2 * MIB}-"
    assert gets[1].headers["If-Range"] == server.files["/images/alpha.img"].etag
    assert server.bytes_served("images/alpha.img") == len(data)  # nothing fetched twice
    assert partials(settings) == []


def test_resume_restarts_from_zero_when_the_server_ignores_range(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    data = random_bytes(4 * MIB, 6)
    entry = repo.publish("alpha", data)
    server.fault("images/alpha.img", Fault(stall_after=MIB, times=1))
    _kill_mid_download(settings, server, "alpha", entry["sha256"], MIB)
    server.fault("images/alpha.img", Fault(ranges=False))

    with acquire(settings, "alpha") as lease:
        assert sha256_of(lease.image.path) == entry["sha256"]
    gets = server.requests("images/alpha.img")
    assert gets[1].headers.get("Range") == f"bytes={MIB}-"
    assert gets[1].status == 200  # whole file; the client started over
    assert server.bytes_served("images/alpha.img") == MIB + len(data)


def test_resume_restarts_when_the_image_changed_meanwhile(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(catalogue_max_age=0)
    old = repo.publish("alpha", random_bytes(4 * MIB, 7))
    server.fault("images/alpha.img", Fault(stall_after=MIB, times=1))
    _kill_mid_download(settings, server, "alpha", old["sha256"], MIB)
    new = repo.publish("alpha", random_bytes(4 * MIB, 8))  # new bytes, new ETag, new digest

    with acquire(settings, "alpha") as lease:
        assert lease.image.sha256 == new["sha256"] == sha256_of(lease.image.path)
    last = server.requests("images/alpha.img")[-1]
    assert last.status == 200 and "Range" not in last.headers


def test_connection_cut_mid_stream_is_resumed_within_the_same_acquire(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    data = random_bytes(4 * MIB, 9)
    entry = repo.publish("alpha", data)
    server.fault("images/alpha.img", Fault(cut_after=3 * MIB, times=1))
    with acquire(settings, "alpha") as lease:
        assert sha256_of(lease.image.path) == entry["sha256"]
    gets = server.requests("images/alpha.img")
    assert [g.status for g in gets] == [200, 206]
    assert gets[1].headers["Range"] == f"bytes={3 * MIB}-"
    assert server.bytes_served("images/alpha.img") == len(data)


def test_stalled_server_fails_requeue_class_and_keeps_the_part_for_later(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(download_timeout=0.5)
    data = random_bytes(4 * MIB, 10)
    entry = repo.publish("alpha", data)
    server.fault("images/alpha.img", Fault(stall_after=MIB))
    t0 = time.monotonic()
    with pytest.raises(DownloadError) as info:
        acquire(settings, "alpha")
    assert info.value.disposition is Disposition.REQUEUE
    assert time.monotonic() - t0 < 10
    # Up to three attempts, each resuming where the previous one stalled (a loaded machine may
    # time an attempt out before its first byte, which ends the retries early).
    kept = part_size(settings, entry["sha256"])
    assert 0 < kept <= 3 * MIB
    gets = server.requests("images/alpha.img")
    starts = [int(g.headers["Range"][len("bytes=") : -1]) for g in gets[1:]]
    assert "Range" not in gets[0].headers and len(gets) <= 3
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    assert all(0 < n <= kept for n in starts)
    assert entry["sha256"] not in blobs(settings)
    server.fault("images/alpha.img", None)
    server.unstall.set()
    with acquire(settings, "alpha") as lease:
        assert sha256_of(lease.image.path) == entry["sha256"]
    assert server.requests("images/alpha.img")[-1].headers["Range"] == f"bytes={kept}-"


def test_wrong_bytes_are_a_hold_class_error_and_nothing_is_cached(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    repo.publish("alpha", random_bytes(2 * MIB, 11))
    server.fault("images/alpha.img", Fault(corrupt=True))
    with pytest.raises(ChecksumMismatchError) as info:
        acquire(settings, "alpha")
    assert info.value.disposition is Disposition.HOLD
    assert "alpha" in str(info.value)
    assert blobs(settings) == []
    assert partials(settings) == []


def test_wrong_bytes_after_a_resume_get_one_clean_retry(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    data = random_bytes(4 * MIB, 12)
    entry = repo.publish("alpha", data)
    server.fault("images/alpha.img", Fault(stall_after=MIB, times=1))
    _kill_mid_download(settings, server, "alpha", entry["sha256"], MIB)
    # Damage the kept bytes, as a power cut might.
    part = settings.effective_cache_dir / "partial" / f"{entry['sha256']}.part"
    with part.open("r+b") as f:
        f.write(b"\0" * 100)
    with acquire(settings, "alpha") as lease:
        assert sha256_of(lease.image.path) == entry["sha256"]
    statuses = [(g.status, g.headers.get("Range")) for g in server.requests("images/alpha.img")]
    assert statuses == [(200, None), (206, f"bytes={MIB}-"), (200, None)]


# --- space: budget, eviction, full disks ---------------------------------------------------------


def test_image_larger_than_the_budget_fails_requeue_class_before_any_download(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(cache_max_bytes=MIB)
    repo.publish("alpha", random_bytes(2 * MIB, 13))
    with pytest.raises(CacheFullError) as info:
        acquire(settings, "alpha")
    assert info.value.disposition is Disposition.REQUEUE
    assert server.requests("images/alpha.img") == []


def test_eviction_is_lru_and_never_touches_leased_images(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(cache_max_bytes=2 * MIB + MIB // 2)
    sha = {n: repo.publish(n, random_bytes(MIB, i))["sha256"] for i, n in enumerate("abc")}
    acquire(settings, "a").release()
    acquire(settings, "b").release()
    acquire(settings, "a").release()  # now b is the least recently used
    acquire(settings, "c").release()
    assert sha["b"] not in blobs(settings)
    assert {sha["a"], sha["c"]} <= set(blobs(settings))

    held = acquire(settings, "a")  # a is now older than c, but leased
    time.sleep(0.01)
    acquire(settings, "c").release()
    acquire(settings, "b").release()  # must evict c, not the older but leased a
    assert sha["a"] in blobs(settings)
    assert sha["c"] not in blobs(settings)

    held_b = acquire(settings, "b")
    server.clear_log()
    with pytest.raises(CacheFullError, match="in use"):
        acquire(settings, "c")  # a and b leased: nothing may go
    assert server.requests("images/c.img") == []
    assert {sha["a"], sha["b"]} <= set(blobs(settings))
    held.release()
    held_b.release()
    acquire(settings, "c").release()
    assert sha["c"] in blobs(settings)


def test_leases_of_killed_processes_are_reclaimed(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(cache_max_bytes=MIB + MIB // 2)
    a = repo.publish("a", random_bytes(MIB, 20))["sha256"]
    repo.publish("b", random_bytes(MIB, 21))
    worker = spawn_worker(settings, "a", "31.0", "--hold", "60")
    try:
        assert read_first_line(worker)["sha256"] == a
        cache = ImageCache(settings)
        assert cache.status().live_leases == 1
        with pytest.raises(CacheFullError):
            acquire(settings, "b")  # a is leased by a live process
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.communicate(timeout=10)
    status = cache.status()
    assert (status.live_leases, status.dead_leases) == (0, 1)
    with acquire(settings, "b"):
        pass  # the dead lease no longer protects a
    assert a not in blobs(settings)
    assert not (settings.effective_cache_dir / "leases" / a).exists()


def test_prune_removes_dead_leases_and_interrupted_downloads(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    a = repo.publish("a", random_bytes(MIB, 22))["sha256"]
    b = repo.publish("b", random_bytes(2 * MIB, 23))["sha256"]
    worker = spawn_worker(settings, "a", "32.0", "--hold", "60")
    assert read_first_line(worker)["sha256"] == a
    worker.send_signal(signal.SIGKILL)
    worker.communicate(timeout=10)
    server.fault("images/b.img", Fault(stall_after=MIB, times=1))
    _kill_mid_download(settings, server, "b", b, MIB)
    held = acquire(settings, "a", job_id="33.0")

    report = ImageCache(settings).prune(0)
    assert report.dead_leases_removed == 1
    assert report.partials_removed == 1
    assert report.removed == ()  # a is leased by us
    assert report.kept_in_use == 1
    assert partials(settings) == []
    held.release()
    report = ImageCache(settings).prune(0)
    assert [e.sha256 for e in report.removed] == [a]
    assert blobs(settings) == []


def test_rebound_lease_lives_and_dies_with_the_new_holder(repo: Repo, settings: Settings) -> None:
    repo.publish("a", random_bytes(MIB, 24))
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lease = acquire(settings, "a")
        lease.rebind(holder.pid)
        (record,) = ImageCache(settings).status().entries[0].leases
        assert record.pid == holder.pid
    finally:
        holder.kill()
        holder.wait()
    assert ImageCache(settings).status().dead_leases == 1
    lease.release()
    assert ImageCache(settings).status().dead_leases == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs with a size limit)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited tmpfs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


def _used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_full_disk_known_size_fails_before_download_with_nothing_left(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings], small_fs: Path
) -> None:
    settings = settings_for(cache_dir=small_fs / "cache")
    repo.publish("big", random_bytes(6 * MIB, 30))
    with pytest.raises(CacheFullError, match="free disk space") as info:
        acquire(settings, "big")
    assert info.value.disposition is Disposition.REQUEUE
    assert server.requests("images/big.img") == []
    assert blobs(settings) == [] and partials(settings) == []


def test_disk_filling_up_mid_download_fails_requeue_class_and_leaves_no_partial(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings], small_fs: Path
) -> None:
    settings = settings_for(
        cache_dir=small_fs / "cache", custom_image_sources=(server.url("custom/"),)
    )
    # No Content-Length and no digest: nothing tells the size before the disk fills up.
    server.put("custom/big.img", random_bytes(6 * MIB, 31))
    server.fault("custom/big.img", Fault(chunked=True))
    before = _used(small_fs)
    with pytest.raises(CacheFullError, match="filled up") as info:
        acquire(settings, server.url("custom/big.img"))
    assert info.value.disposition is Disposition.REQUEUE
    assert server.bytes_served("custom/big.img") > 3 * MIB  # it really got to the limit
    assert blobs(settings) == [] and partials(settings) == []
    assert _used(small_fs) - before < 256 * 1024  # the space is given back
    # ...so a small image still fits afterwards.
    small = repo.publish("small", random_bytes(MIB, 32))
    with acquire(settings, "small") as lease:
        assert lease.image.sha256 == small["sha256"]


# --- sources, errors, catalogue fallbacks ----------------------------------------------------


def test_missing_file_is_requeue_for_catalogue_images_and_hold_for_custom_ones(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(custom_image_sources=(server.url("custom/"),))
    repo.publish("alpha", random_bytes(MIB, 40))
    del server.files["/images/alpha.img"]
    with pytest.raises(DownloadError, match="out of date") as info:
        acquire(settings, "alpha")
    assert info.value.disposition is Disposition.REQUEUE
    with pytest.raises(ImageNotFoundError) as nf:
        acquire(settings, server.url("custom/nope.qcow2"))
    assert nf.value.disposition is Disposition.HOLD


def test_server_error_is_requeue_class(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    repo.publish("alpha", random_bytes(MIB, 41))
    server.fault("images/alpha.img", Fault(status=503))
    with pytest.raises(DownloadError, match="503") as info:
        acquire(settings, "alpha")
    assert info.value.disposition is Disposition.REQUEUE


def test_custom_url_without_digest_is_cached_and_revalidated(
    server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(custom_image_sources=(server.url("custom/"),))
    url = server.url("custom/mine.img")
    first = server.put("custom/mine.img", random_bytes(2 * MIB, 42))
    with acquire(settings, url) as lease:
        assert (lease.image.sha256, lease.image.cache_hit, lease.image.name) == (first, False, url)
    with acquire(settings, url) as lease:
        assert lease.image.cache_hit and lease.image.sha256 == first
    gets = server.requests("custom/mine.img")
    assert [g.status for g in gets] == [200, 304]
    assert gets[1].headers["If-None-Match"] == server.files["/custom/mine.img"].etag
    second = server.put("custom/mine.img", random_bytes(2 * MIB, 43))
    with acquire(settings, url) as lease:
        assert (lease.image.sha256, lease.image.cache_hit) == (second, False)
        assert sha256_of(lease.image.path) == second


def test_custom_url_with_digest_is_keyed_by_digest_and_checked(
    server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(custom_image_sources=(server.url("custom/"),))
    url = server.url("custom/mine.img")
    digest = server.put("custom/mine.img", random_bytes(MIB, 44))
    with acquire(settings, url, sha256=digest.upper()) as lease:
        assert lease.image.sha256 == digest
    server.clear_log()
    with acquire(settings, url, sha256=digest) as lease:
        assert lease.image.cache_hit
    assert server.log == []  # a pinned digest already in the cache needs no network at all
    server.put("custom/other.img", random_bytes(MIB, 45))
    with pytest.raises(ChecksumMismatchError) as info:
        acquire(settings, server.url("custom/other.img"), sha256="0" * 64)
    assert info.value.disposition is Disposition.HOLD


def test_kernel_boot_entry_caches_and_leases_kernel_and_initrd(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    kernel, initrd = random_bytes(300_000, 50), random_bytes(200_000, 51)
    k = server.put("images/vmlinuz", kernel)
    i = server.put("images/initrd.img", initrd)
    repo.publish(
        "tiny",
        random_bytes(MIB, 52),
        boot="kernel",
        kernel={"url": "images/vmlinuz", "sha256": k, "size": len(kernel)},
        initrd={"url": "images/initrd.img", "sha256": i},
        cmdline="console=ttyS0 quiet",
    )
    with acquire(settings, "tiny") as lease:
        image = lease.image
        assert image.kernel is not None and image.kernel.read_bytes() == kernel
        assert image.initrd is not None and image.initrd.read_bytes() == initrd
        assert image.cmdline == "console=ttyS0 quiet"
        assert len(lease.lease_ids) == 3
        assert ImageCache(settings).status().live_leases == 3
    assert ImageCache(settings).status().live_leases == 0


def test_a_job_waiting_too_long_for_another_download_gets_a_lock_timeout(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    repo.publish("alpha", random_bytes(2 * MIB, 60))
    server.fault("images/alpha.img", Fault(stall_after=MIB, then_continue=True, times=1))
    outcome: list[object] = []

    def first() -> None:
        with acquire(settings_for(), "alpha") as lease:
            outcome.append(lease.image.sha256)

    t = threading.Thread(target=first)
    t.start()
    try:
        assert server.stalled.wait(20)
        with pytest.raises(LockTimeoutError) as info:
            acquire(settings_for(lock_timeout=0.3), "alpha")
        assert info.value.disposition is Disposition.REQUEUE
    finally:
        server.unstall.set()
        t.join(timeout=30)
    assert len(outcome) == 1


def test_unreachable_repository_with_cached_catalogue_still_serves_cached_images(
    repo: Repo,
    server: LoopbackServer,
    settings_for: Callable[..., Settings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = settings_for(catalogue_max_age=0)
    entry = repo.publish("alpha", random_bytes(MIB, 70))
    repo.publish("beta", random_bytes(MIB, 71))
    acquire(settings, "alpha").release()
    server.stop()
    with caplog.at_level(logging.WARNING), acquire(settings, "alpha") as lease:
        assert lease.image.cache_hit and lease.image.sha256 == entry["sha256"]
    assert "using the local copy last confirmed" in caplog.text
    assert " ago" in caplog.text
    with pytest.raises(DownloadError) as info:
        acquire(settings, "beta")  # listed, but not cached: this host cannot run it now
    assert info.value.disposition is Disposition.REQUEUE


def test_verify_rehashes_and_removes_corrupt_files(
    repo: Repo, server: LoopbackServer, settings: Settings
) -> None:
    entry = repo.publish("alpha", random_bytes(MIB, 80))
    acquire(settings, "alpha").release()
    cache = ImageCache(settings)
    assert [r.ok for r in cache.verify()] == [True]
    blob = cache.blob_path(entry["sha256"])
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.write(b"rot")
    with acquire(settings, "alpha") as lease:
        assert lease.image.cache_hit  # acquire does not re-hash: that is verify's job
    (result,) = cache.verify()
    assert not result.ok and "removed" in result.detail
    assert entry["sha256"] not in blobs(settings)
    with acquire(settings, "alpha") as lease:
        assert not lease.image.cache_hit
        assert sha256_of(lease.image.path) == entry["sha256"]


def test_redirects_are_refused_for_a_jobs_url_and_followed_otherwise(
    repo: Repo, server: LoopbackServer, settings_for: Callable[..., Settings]
) -> None:
    settings = settings_for(custom_image_sources=(server.url("custom/"),))
    digest = server.put("elsewhere/real.img", random_bytes(MIB, 90))
    server.fault("custom/jump.img", Fault(redirect_to=server.url("elsewhere/real.img")))
    with pytest.raises(ImageRefusedError, match=r"redirects to .*elsewhere/real\.img") as info:
        acquire(settings, server.url("custom/jump.img"))
    assert info.value.disposition is Disposition.HOLD
    assert server.requests("elsewhere/real.img") == []  # never followed
    # The person at the keyboard, and the admin's catalogue, may use redirects (mirrors, CDNs).
    with acquire(settings, server.url("custom/jump.img"), allow_local=True) as lease:
        assert lease.image.sha256 == digest
    entry = repo.publish("alpha", random_bytes(MIB, 91))
    server.put("mirror/alpha.img", server.files["/images/alpha.img"].data)
    server.fault("images/alpha.img", Fault(redirect_to=server.url("mirror/alpha.img")))
    with acquire(settings, "alpha") as lease:
        assert lease.image.sha256 == entry["sha256"]


def test_release_job_leases_from_another_process_view(repo: Repo, settings: Settings) -> None:
    repo.publish("a", random_bytes(MIB, 92))
    repo.publish("b", random_bytes(MIB, 93))
    acquire(settings, "a", job_id="55.0")
    acquire(settings, "b", job_id="55.0")
    other = acquire(settings, "b", job_id="56.0")
    assert release_job_leases(settings, "55.0") == 2
    assert release_job_leases(settings, "55.0") == 0
    assert ImageCache(settings).status().live_leases == 1
    other.release()


def test_verify_drops_a_file_that_has_no_metadata(settings: Settings) -> None:
    cache = ImageCache(settings)
    cache.blobs.mkdir(parents=True)
    stray = cache.blob_path("c" * 64)
    stray.write_bytes(b"who put this here")
    (result,) = cache.verify()
    assert not result.ok and result.detail == "no metadata; removed"
    assert not stray.exists()
