"""Helpers shared by the image tests (fixtures live in conftest.py)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from glite_vm.config import Settings
from tests.images.images_http import LoopbackServer

WORKER = Path(__file__).with_name("images_worker.py")


def random_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)  # noqa: S311 - test data, not a secret


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_img(*args: str) -> None:
    done = subprocess.run(["qemu-img", *args], capture_output=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(args)} failed: {done.stderr.decode().strip()}")


@dataclasses.dataclass
class Repo:
    """A central repository on the loopback server: catalogue.json plus image files."""

    server: LoopbackServer
    images: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def catalogue_url(self) -> str:
        return self.server.url("catalogue.json")

    def publish(
        self,
        name: str,
        data: bytes,
        *,
        fmt: str = "raw",
        file: str | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        file = file or f"images/{name}.img"
        digest = self.server.put(file, data)
        entry: dict[str, Any] = {
            "name": name,
            "url": file,  # relative to the catalogue's URL
            "sha256": digest,
            "size": len(data),
            "format": fmt,
            "os": "Test Linux",
            "arch": "x86_64",
            "boot": "disk",
            "guest_user": "glite",
        }
        entry.update(extra)
        self.images = [e for e in self.images if e["name"] != name] + [entry]
        self.write()
        return entry

    def write(self) -> None:
        doc = {"version": 1, "images": self.images}
        self.server.put("catalogue.json", json.dumps(doc).encode())


def make_settings(base: dict[str, Any], **overrides: Any) -> Settings:
    merged = {**base, **overrides}
    return Settings.load(
        environ={}, config_file=Path("/nonexistent/glite-vm.toml"), overrides=merged
    )


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLITE_VM_")}
    env.update(
        {
            "GLITE_VM_STATE_DIR": str(settings.state_dir),
            "GLITE_VM_CACHE_DIR": str(settings.effective_cache_dir),
            "GLITE_VM_CATALOGUE": settings.catalogue,
            "GLITE_VM_CACHE_MAX_BYTES": f"{settings.cache_max_bytes}B",
            "GLITE_VM_CACHE_MIN_FREE_BYTES": f"{settings.cache_min_free_bytes}B",
            "GLITE_VM_DOWNLOAD_TIMEOUT": str(settings.download_timeout),
            "GLITE_VM_LOCK_TIMEOUT": str(settings.lock_timeout),
            "GLITE_VM_CATALOGUE_MAX_AGE": str(settings.catalogue_max_age),
            "GLITE_VM_CUSTOM_IMAGE_SOURCES": " ".join(settings.custom_image_sources),
        }
    )
    return env


def spawn_worker(settings: Settings, ref: str, job_id: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), ref, job_id, *extra],
        env=worker_env(settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def worker_result(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"worker printed no result; stderr:\n{err}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def read_first_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> dict[str, Any]:
    """The worker's next JSON line, without waiting for it to exit (it may hold a lease)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"the worker printed nothing within {timeout}s"
    line = proc.stdout.readline()  # the worker prints whole lines and flushes
    assert line.startswith("{"), f"unexpected worker output {line!r}"
    result: dict[str, Any] = json.loads(line)
    return result


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
