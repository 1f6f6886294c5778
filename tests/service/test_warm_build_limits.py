"""Attack on what warm start makes the root service hold: template builds are VMs that no
slot, no per-user cap and no job counts. Jobs of three different VM shapes (with ``*``: any
image a job names, custom ones included, gets a template after its cold boot) end their cold
boots together; the service must not boot three more VMs behind them. Real libvirtd/QEMU."""

from __future__ import annotations

import concurrent.futures
import threading
from pathlib import Path

import pytest

from glite_vm.request import JobRequest
from glite_vm.service.local import LocalService
from glite_vm.service.warm_start import TEMPLATE_JOB
from glite_vm.slots import SlotFacts
from tests.service.test_warm_start import ca, template_keys, warm  # noqa: F401
from tests.service.warm_support import wait_for_builds
from tests.support import domains_under

pytestmark = pytest.mark.vm
SHAPES = (512, 576, 640)  # MiB: three template keys of one image
BUILD_WAIT = 240.0


def test_template_builds_are_one_at_a_time(warm: LocalService, svc_root: Path) -> None:  # noqa: F811
    scratch = svc_root / "warm-builds"
    state = warm.settings.state_dir
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            names = domains_under(state)
            seen.append(sum(TEMPLATE_JOB in n for n in names))
            stop.wait(0.2)

    def cold(n: int) -> str:
        directory = scratch / f"job{n}"
        directory.mkdir(parents=True)
        request = JobRequest.create(
            warm.settings,
            image="test-direct",
            job_id=f"78.{n}",
            owner="root",
            keep_snapshot="never",
            memory_mib=SHAPES[n],
        )
        prepared = warm.prepare(
            request, scratch_dir=str(directory), starter_pid=None, slot=SlotFacts(name=f"s{n}")
        )
        assert prepared.ad_attributes["GliteVmWarmStart"] is False
        return prepared.vm

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(len(SHAPES)) as pool:
            futures = [pool.submit(cold, n) for n in range(len(SHAPES))]
        vms = [f.result() for f in futures if f.exception() is None]
        for vm in vms:
            warm.teardown(vm, failed=False)
        assert len(vms) == len(SHAPES), [f.exception() for f in futures]
        wait_for_builds()
    finally:
        stop.set()
        watcher.join(10)
    assert max(seen) == 1, f"template VMs at once: {max(seen)}"
    assert 1 <= len(template_keys(warm)) <= len(SHAPES)
