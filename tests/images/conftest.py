"""Fixtures for the image catalogue and cache tests: a loopback repository and settings."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from glite_vm.config import Settings
from tests.images.images_helpers import Repo, make_settings
from tests.images.images_http import LoopbackServer


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def repo(server: LoopbackServer) -> Repo:
    r = Repo(server)
    r.write()
    return r


@pytest.fixture
def settings_for(tmp_path: Path, repo: Repo) -> Callable[..., Settings]:
    base: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "catalogue": repo.catalogue_url,
        "cache_min_free_bytes": 0,
        "download_timeout": 5.0,
        "lock_timeout": 30.0,
    }

    def make(**overrides: Any) -> Settings:
        return make_settings(base, **overrides)

    return make


@pytest.fixture
def settings(settings_for: Callable[..., Settings]) -> Settings:
    return settings_for()
