"""A test VM booted in-process (:func:`boot`), and running things in it the two ways the tests
look at a guest: as the job's payload (the guest user of a non-root job) and as root through
the agent (the host's view)."""

from __future__ import annotations

import dataclasses
import itertools
import os

from glite_vm.config import Settings
from glite_vm.request import VMRequest
from glite_vm.vm.guest_run import ExecResult
from glite_vm.vm.lifecycle import Vm, VmHost
from tests.support import LocalImage

_ids = itertools.count(1)


def vm_request(settings: Settings, **kw: object) -> VMRequest:
    """A request of the test user's for the test image, a job id of its own; ``kw`` are more
    :meth:`VMRequest.create` fields (``root``, ``keep_snapshot``, ...)."""
    args: dict[str, object] = {
        "image": "test",
        "job_id": f"{os.getpid()}.{next(_ids)}",
        "owner": "tester",
    }
    args.update(kw)
    return VMRequest.create(settings, **args)  # type: ignore[arg-type]


def boot(host: VmHost, image: LocalImage, **kw: object) -> Vm:
    """A VM of :func:`vm_request` ``(**kw)``, ready (torn down again when it does not come up);
    the caller tears it down (``with boot(...) as vm:``)."""
    vm = host.start(vm_request(host.settings, **kw), image)
    try:
        vm.wait_ready()
    except BaseException:
        vm.teardown(failed=True)
        raise
    return vm


@dataclasses.dataclass
class Output:
    result: ExecResult
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")


def payload(vm: Vm, script: str) -> Output:
    """Run ``script`` as the job's payload: the guest user of a non-root job."""
    out, err = bytearray(), bytearray()
    result = vm.run(["sh", "-c", script], stdout=out.extend, stderr=err.extend, timeout=120)
    return Output(result, bytes(out), bytes(err))


def as_root(vm: Vm, script: str) -> bytes:
    """Run ``script`` as root through the agent: the host's view, not the job's."""
    st = vm.agent.run(["/bin/sh", "-c", script], timeout=120)
    assert st.exitcode == 0, st.stderr
    return bytes(st.stdout)
