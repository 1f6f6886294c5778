"""`LocalService` in-process (what a single user, or root, runs without the socket)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import classad2
import pytest

from glite_vm.condor.jobad import request_from_job_ad
from glite_vm.config import Settings
from glite_vm.errors import AccessDeniedError
from glite_vm.service.local import LocalService
from glite_vm.vm.connect import open_host
from glite_vm.vm.lifecycle import VmHost
from tests.service.conftest import new_state_dir
from tests.service.svc_support import our_domains

pytestmark = pytest.mark.vm


@pytest.fixture
def inproc_host(svc_root: Path, catalogue: Path, hypervisor_probe: Path) -> Iterator[VmHost]:
    state = new_state_dir(svc_root / "inproc", hypervisor_probe)
    settings = Settings(
        state_dir=state,
        catalogue=str(catalogue),
        boot_timeout=120.0,
        default_memory_mib=512,
        default_disk_bytes=1 << 30,
        cache_min_free_bytes=0,
    )
    host = open_host(settings)
    try:
        yield host
    finally:
        host.conn.close()
    assert not list((state / "snapshots").glob("*/overlay.qcow2"))
    assert not list((state / "cache" / "leases").rglob("*.json"))


def test_in_process_service_runs_a_job_for_its_own_user(
    inproc_host: VmHost, svc_root: Path
) -> None:
    service = LocalService.for_this_user(inproc_host.settings, inproc_host)
    scratch = svc_root / "inproc-job"
    scratch.mkdir()
    (scratch / "in.txt").write_text("in\n")
    ad = classad2.parseOne(
        'ClusterId = 7\nProcId = 1\nOwner = "someone"\nGliteVmImage = "test-direct"\n'
        'DiskUsage = 1048576\nRequestDisk = DiskUsage\nGliteVmKeepSnapshot = "never"\n',
        classad2.ParserType.Old,
    )
    request = request_from_job_ad(ad, inproc_host.settings)
    prepared = service.prepare(request, scratch_dir=str(scratch), starter_pid=None)
    try:
        assert prepared.vm in our_domains(("someone",))  # root's own ad is taken as it is
        assert service.push(prepared.vm, str(scratch)) > 0
        out = bytearray()
        outcome = service.exec(
            prepared.vm, ["sh", "-c", "cat in.txt; echo new > new.txt"], stdout=out.extend
        )
        assert (outcome.exit_code, bytes(out)) == (0, b"in\n")
        files = service.pull(prepared.vm, str(scratch / "out"), unchanged_from=str(scratch))
        assert files == ["new.txt"]
        assert [v.vm for v in service.list_vms()] == [prepared.vm]
        stranger = LocalService(
            inproc_host.settings,
            inproc_host,
            caller_uid=65534,
            caller_name="nobody",
            registry=service.registry,
        )
        assert stranger.list_vms() == []
        with pytest.raises(AccessDeniedError):
            stranger.teardown(prepared.vm, failed=False)
    finally:
        done = service.teardown(prepared.vm, failed=False)
    assert done.snapshot_path is None
    assert prepared.vm not in our_domains(("someone",))
