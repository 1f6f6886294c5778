"""The reaper and a prepare that still waits for its VM to boot, on a real domain.

A QEMU that dies while its guest boots is the prepare's to judge: a crash is booted again
(``boot attempt 1 failed: QEMU stopped unexpectedly`` in the event log), a panic is the image's
fault. The reaper passes every few seconds; had it taken such a VM first, the event log said
``reaped: its domain stopped``, the retry was counted as a reap, and which of the two won
depended on timing (a boot-failure test failed that way on a busy host).
"""

from __future__ import annotations

import os
import time

import pytest

from glite_vm.request import VMRequest
from glite_vm.service.reaper import reap_reason
from glite_vm.service.vm_state import VmRecord
from glite_vm.vm.lifecycle import Vm, VmHost
from tests.support import LocalImage

pytestmark = pytest.mark.vm


def test_a_vm_still_booting_is_left_to_its_prepare_and_a_ready_one_is_reaped(
    vm_host: VmHost, direct_image: LocalImage
) -> None:
    request = VMRequest.create(
        vm_host.settings, image="test", job_id=f"{os.getpid()}.reap", owner="tester"
    )
    vm = vm_host.start(request, direct_image)
    try:
        assert vm.domain is not None
        vm.domain.destroy()  # QEMU gone while the guest boots: its domain stops
        booting = _record(vm)
        assert booting.booting
        assert reap_reason(vm_host.settings, vm_host.conn, booting) is None

        booting.ad_attributes = {"GliteVmDomain": vm.name}  # what a finished prepare writes
        assert not booting.booting
        ready = reap_reason(vm_host.settings, vm_host.conn, booting)
        assert ready is not None and ready.kind == "domain_stopped", ready

        # found at a restart, its prepare gone with the old service
        adopted = _record(vm, adopted=True, state_lost=True)
        found = reap_reason(vm_host.settings, vm_host.conn, adopted)
        assert found is not None and found.kind == "domain_stopped", found
    finally:
        vm.teardown(failed=False, keep_override=False)


def _record(vm: Vm, *, adopted: bool = False, state_lost: bool = False) -> VmRecord:
    """The service's record of ``vm``, a VM of no HTCondor job."""
    return VmRecord(
        vm,
        owner_uid=os.getuid(),
        scratch_dir=None,
        starter_pid=None,
        starter_start=None,
        lease_job_id=None,
        created=time.time(),
        adopted=adopted,
        state_lost=state_lost,
    )
