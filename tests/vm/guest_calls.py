"""Running things in a test VM the two ways the tests look at a guest: as the job's payload
(the guest user of a non-root job) and as root through the agent (the host's view)."""

from __future__ import annotations

import dataclasses

from glite_vm.vm.guest_run import ExecResult
from glite_vm.vm.lifecycle import Vm


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
