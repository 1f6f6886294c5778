"""Image cache benchmark, one run, against a loopback HTTP server using sendfile(2).

(a) 8 processes acquire the same cold image at once: bytes the server sent for the image
    divided by its size (target <= 1.01: one download, shared);
(b) cold download throughput of one acquire (stream + sha256 + write + fsync + inspection +
    install) divided by ``curl -o`` of the same file from the same server (target >= 0.9);
    runs alternate, each after ``sync`` so none pays for another's writeback, and the medians
    are compared (the ratio of the best runs is shown too: other load only slows runs down).
    The download step alone (stream + hash + write + fsync) is timed as well;
(c) warm acquire latency, median over many acquire+release pairs (target <= 20 ms).

Usage: python bench/cache.py [--size-mib 512] [--runs 3] [--warm 200]. The last line is JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import requests  # noqa: E402

from glite_vm.config import Settings  # noqa: E402
from glite_vm.images.acquire import acquire_image  # noqa: E402
from glite_vm.images.download import Fetch, download  # noqa: E402
from glite_vm.units import MIB  # noqa: E402

IMAGE = "bench.img"
WORKERS = 8


class Repository:
    """Serves catalogue.json from memory and files from a directory with sendfile."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.catalogue = b""
        self.sent: dict[str, int] = {}
        self.gets: dict[str, int] = {}
        self.guard = threading.Lock()
        repo = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                return None

            def do_GET(self) -> None:
                repo.serve(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def reset_counts(self) -> None:
        with self.guard:
            self.sent.clear()
            self.gets.clear()

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        name = h.path.lstrip("/")
        with self.guard:
            self.gets[name] = self.gets.get(name, 0) + 1
        if name == "catalogue.json":
            body = self.catalogue
            etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
            if h.headers.get("If-None-Match") == etag:
                h.send_response(304)
                h.send_header("ETag", etag)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(200)
            h.send_header("ETag", etag)
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
            return
        path = self.directory / name
        if "/" in name or not path.is_file():
            h.send_response(404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        size = path.stat().st_size
        start = 0
        rng = h.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        h.send_header("ETag", f'"{size}"')
        h.send_header("Content-Length", str(size - start))
        h.end_headers()
        h.wfile.flush()
        sent = 0
        with path.open("rb") as f:
            while start + sent < size:
                n = os.sendfile(
                    h.connection.fileno(), f.fileno(), start + sent, size - start - sent
                )
                if n == 0:
                    break
                sent += n
        with self.guard:
            self.sent[name] = self.sent.get(name, 0) + sent


def make_settings(state: Path, catalogue: str) -> Settings:
    return Settings.load(
        environ={},
        config_file=Path("/nonexistent/glite-vm.toml"),
        overrides={
            "state_dir": state,
            "catalogue": catalogue,
            "cache_min_free_bytes": 0,
            "catalogue_max_age": 3600.0,
        },
    )


def worker() -> int:
    """One of the concurrent acquirers (run as a separate process)."""
    settings = Settings.load(config_file=Path("/nonexistent/glite-vm.toml"))
    with acquire_image(settings, "bench", job_id=f"bench-{os.getpid()}") as lease:
        print(json.dumps({"sha256": lease.image.sha256, "hit": lease.image.cache_hit}))
    return 0


def concurrent_cold(repo: Repository, work: Path, size: int) -> dict[str, Any]:
    state = work / "state-concurrent"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLITE_VM_")}
    env.update(
        {
            "GLITE_VM_STATE_DIR": str(state),
            "GLITE_VM_CATALOGUE": repo.url("catalogue.json"),
            "GLITE_VM_CACHE_MIN_FREE_BYTES": "0B",
        }
    )
    repo.reset_counts()
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker"], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(WORKERS)
    ]
    outs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    shutil.rmtree(state)
    assert len({o["sha256"] for o in outs}) == 1
    return {
        "bytes_served_ratio": round(repo.sent.get(IMAGE, 0) / size, 4),
        "image_gets": repo.gets.get(IMAGE, 0),
        "acquirers_that_waited": sum(1 for o in outs if not o["hit"]),
        "wall_seconds": round(wall, 2),
    }


def time_curl(repo: Repository, work: Path) -> float:
    dest = work / "curl.out"
    t0 = time.perf_counter()
    subprocess.run(["curl", "-s", "-f", "-o", str(dest), repo.url(IMAGE)], check=True)
    elapsed = time.perf_counter() - t0
    dest.unlink()
    return elapsed


def time_acquire(repo: Repository, work: Path, n: int) -> float:
    state = work / f"state-cold-{n}"
    settings = make_settings(state, repo.url("catalogue.json"))
    t0 = time.perf_counter()
    with acquire_image(settings, "bench", job_id="bench-cold") as lease:
        assert not lease.image.cache_hit
    elapsed = time.perf_counter() - t0
    shutil.rmtree(state)
    return elapsed


def time_download_step(repo: Repository, work: Path, size: int, sha: str) -> float:
    part = work / "step.part"
    fetch = Fetch(
        url=repo.url(IMAGE),
        part=part,
        label="bench",
        expected_sha256=sha,
        expected_size=size,
        max_bytes=1 << 50,
        timeout=60.0,
    )
    with requests.Session() as session:
        t0 = time.perf_counter()
        got = download(session, fetch, reserve=lambda total: None)
        elapsed = time.perf_counter() - t0
    assert got.sha256 == sha
    part.unlink()
    part.with_name(part.name + ".json").unlink()
    return elapsed


def warm_latency(repo: Repository, work: Path, count: int) -> list[float]:
    settings = make_settings(work / "state-warm", repo.url("catalogue.json"))
    with acquire_image(settings, "bench", job_id="bench-warm"):
        pass
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        with acquire_image(settings, "bench", job_id="bench-warm") as lease:
            assert lease.image.cache_hit
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warm", type=int, default=200)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    if shutil.which("curl") is None or shutil.which("qemu-img") is None:
        print("bench/cache.py needs curl and qemu-img", file=sys.stderr)
        return 2
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="glite-vm-bench-cache-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        files = work / "repo"
        files.mkdir()
        rng = random.Random(512)  # noqa: S311 - image content, not a secret
        h = hashlib.sha256()
        with (files / IMAGE).open("wb") as f:
            for _ in range(args.size_mib):
                block = rng.randbytes(MIB)
                h.update(block)
                f.write(block)
        sha = h.hexdigest()
        repo = Repository(files)
        repo.catalogue = json.dumps(
            {
                "version": 1,
                "images": [
                    {"name": "bench", "url": IMAGE, "sha256": sha, "size": size, "format": "raw"}
                ],
            }
        ).encode()
        try:
            print(f"image: {args.size_mib} MiB raw, served from 127.0.0.1:{repo.port}")
            conc = concurrent_cold(repo, work, size)
            print(
                f"(a) {WORKERS} cold concurrent acquires: {conc['image_gets']} GET(s), "
                f"bytes served / size = {conc['bytes_served_ratio']}, "
                f"{conc['acquirers_that_waited']} of {WORKERS} started cold, "
                f"{conc['wall_seconds']}s"
            )
            curl, ours, step = [], [], []
            for n in range(args.runs):
                # Each run starts with no dirty pages, so none pays for another's writeback.
                os.sync()
                curl.append(time_curl(repo, work))
                os.sync()
                ours.append(time_acquire(repo, work, n))
                os.sync()
                step.append(time_download_step(repo, work, size, sha))
            mib = args.size_mib
            curl_rate = mib / statistics.median(curl)
            ours_rate = mib / statistics.median(ours)
            step_rate = mib / statistics.median(step)
            # Other load on the host only ever slows a run down: the best runs compare the
            # two programs with the least noise.
            best_ratio = min(curl) / min(ours)
            print(
                f"(b) curl -o {curl_rate:.0f} MiB/s; cold acquire {ours_rate:.0f} MiB/s "
                f"(ratio {ours_rate / curl_rate:.2f}); download step alone {step_rate:.0f} MiB/s "
                f"(ratio {step_rate / curl_rate:.2f}); best runs: ratio {best_ratio:.2f}"
            )
            warm = warm_latency(repo, work, args.warm)
            warm_ms = statistics.median(warm) * 1000
            p95 = sorted(warm)[int(0.95 * (len(warm) - 1))] * 1000
            print(f"(c) warm acquire: median {warm_ms:.2f} ms, p95 {p95:.2f} ms")
        finally:
            repo.stop()
    figures = {
        "image_mib": args.size_mib,
        "concurrent_acquirers": WORKERS,
        "concurrent_image_gets": conc["image_gets"],
        "bytes_served_ratio": conc["bytes_served_ratio"],
        "curl_mib_s": round(curl_rate, 1),
        "acquire_mib_s": round(ours_rate, 1),
        "throughput_ratio": round(ours_rate / curl_rate, 3),
        "throughput_ratio_best_runs": round(best_ratio, 3),
        "curl_runs_mib_s": [round(args.size_mib / t) for t in curl],
        "acquire_runs_mib_s": [round(args.size_mib / t) for t in ours],
        "download_step_mib_s": round(step_rate, 1),
        "download_step_ratio": round(step_rate / curl_rate, 3),
        "warm_acquire_median_ms": round(warm_ms, 2),
        "warm_acquire_p95_ms": round(p95, 2),
        "targets_met": {
            "bytes_served_ratio<=1.01": conc["bytes_served_ratio"] <= 1.01,
            "throughput_ratio>=0.9": ours_rate / curl_rate >= 0.9,
            "warm_acquire_median_ms<=20": warm_ms <= 20,
        },
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
