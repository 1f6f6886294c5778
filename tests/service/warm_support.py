"""What the in-process warm-start tests share: a LocalService (as root) whose settings make
templates, and the checks that nothing of its VMs is left when it is done."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from glite_vm.config import Settings
from glite_vm.service.local import LocalService
from glite_vm.vm.connect import open_host
from tests.service.conftest import new_state_dir
from tests.support import domains_under

BUILD_WAIT = 240.0  # seconds a background template build may take on a loaded host


def wait_for_builds() -> None:
    """Background template builds of this test must end before its checks."""
    deadline = time.monotonic() + BUILD_WAIT
    while any(t.name.startswith("warm-template") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "a template build did not end"
        time.sleep(0.5)


@contextlib.contextmanager
def warm_local_service(
    state_root: Path, catalogue: Path, hypervisor_probe: Path, **knobs: Any
) -> Iterator[LocalService]:
    """A service with a new state directory at ``state_root`` and VMs of 512 MiB / 1 GiB
    (``knobs`` add or override settings); afterwards no domain, overlay, saved-state copy or
    cache lease of it is left."""
    state = new_state_dir(state_root, hypervisor_probe)
    settings = Settings(
        **{
            "state_dir": state,
            "catalogue": str(catalogue),
            "boot_timeout": 180.0,
            "default_memory_mib": 512,
            "default_disk_bytes": 1 << 30,
            "cache_min_free_bytes": 0,
            **knobs,
        }
    )
    host = open_host(settings)
    try:
        yield LocalService.for_this_user(settings, host)
    finally:
        wait_for_builds()
        host.conn.close()
    assert domains_under(state) == []
    assert not list((state / "snapshots").glob("*/overlay.qcow2"))
    assert not list((state / "snapshots").glob("*/state.sav"))
    assert not list((state / "cache" / "leases").rglob("*.json"))
