"""The contract between the bootstrapper service and its clients (hooks, launcher, CLI, API).

The service (``glite-vm serve``, root) owns libvirt, the image cache, VMs and snapshots; clients
run as job owners and talk to it over a Unix socket. This module holds only the shapes both
sides agree on, so hooks can import it without libvirt. ``glite_vm.service.client.ServiceClient``
implements :class:`VmService` over the socket; ``glite_vm.service.server`` serves it, and an
in-process implementation may serve the same calls for a single user (``glite-vm run``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from glite_vm.request import JobRequest
    from glite_vm.slots import SlotFacts


OutputSink = Callable[[bytes], None]


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """A booted VM with its agent ready, and what the job ad should learn about it."""

    vm: str  # domain name; the handle for every later call
    ad_attributes: dict[str, object]  # GliteVmDomain, GliteVmHypervisor, ..., timings so far
    guest_user: str
    boot_log_path: str


@dataclasses.dataclass(frozen=True)
class ExecOutcome:
    exit_code: int | None
    signal: int | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class TeardownOutcome:
    snapshot_path: str | None
    boot_log_path: str
    record_path: str
    ad_attributes: dict[str, object]  # GliteVmSnapshotPath, GliteVmTimeTeardown, ...


@dataclasses.dataclass(frozen=True)
class DebugHold:
    """The answer to ``debug_hold``: the VM is kept running until ``until`` (seconds since the
    epoch; ``None``: it is not held) for its owner to look inside; ``note`` says why not, or
    what the site changed of what the job asked (empty when there is nothing to say)."""

    vm: str
    until: float | None
    note: str


@dataclasses.dataclass(frozen=True)
class DebugHoldEnd:
    """How a debug hold ended: ``reason`` is one of :data:`DEBUG_HOLD_ENDS`."""

    vm: str
    reason: str


#: Why a debug hold ends: its time ran out, its owner released it (``glite-vm vms release``),
#: the VM was torn down (``condor_rm``, the reaper), or the service stopped waiting (its caller
#: hung up, or it shuts down); ``not_held`` answers a wait for a VM that was never held.
DEBUG_HOLD_ENDS = ("expired", "released", "torn_down", "stopped", "not_held")


@dataclasses.dataclass(frozen=True)
class VmSummary:
    vm: str
    owner: str
    owner_uid: int
    job_id: str
    image: str
    age_seconds: float
    running: bool
    #: the job's scratch directory (where ``condor_ssh_to_job`` lands), when it has one; a
    #: service older than ``glite-vm shell`` does not say
    scratch_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class ShellOutcome:
    """How a ``shell`` session ended: its exit status (128 + N after signal N, as a shell
    reports it), and how long it lasted."""

    exit_code: int | None
    seconds: float


@dataclasses.dataclass(frozen=True)
class ConsoleInfo:
    """Where a running VM's serial console is recorded (from its first byte): the boot log,
    which belongs to the VM's owner, who reads and follows it with their own rights."""

    vm: str
    boot_log_path: str
    running: bool


@dataclasses.dataclass(frozen=True)
class ReapedVm:
    """A VM the reaper tore down because its job was gone, and why."""

    vm: str
    owner_uid: int
    reason: str


@dataclasses.dataclass(frozen=True)
class ServiceInfo:
    """What ``ping`` answers: who serves, since when, and what it sees of the caller."""

    protocol: int
    version: str
    pid: int
    uptime_seconds: float
    caller_uid: int
    vms: int  # the caller's VMs (all of them for root)


class ShellTerminal(Protocol):
    """The user's end of a ``shell`` session, as the engine sees it (the server's is the
    caller's connection)."""

    def ready(self) -> None:
        """The session started in the guest: from now on keys are read."""

    def output(self, data: bytes) -> bool:
        """Show what the guest's terminal wrote; ``False`` once the user is gone."""

    def events(self, timeout: float) -> list[tuple[str, bytes | tuple[int, int]]] | None:
        """What the user did within ``timeout`` seconds: ``("in", keys)`` and
        ``("size", (rows, cols))``, in order (``[]``: nothing); ``None`` once the user is gone."""


class VmService(Protocol):
    """What a client may ask. Every call acts only on the caller's own jobs and VMs.

    Errors arrive as :class:`glite_vm.errors.GliteVmError` subclasses with their hold/requeue
    disposition and message intact.
    """

    def prepare(
        self,
        job: JobRequest,
        *,
        scratch_dir: str,
        starter_pid: int | None,
        slot: SlotFacts | None = None,
    ) -> PrepareResult: ...

    def push(self, vm: str, src_dir: str) -> int: ...

    def exec(
        self,
        vm: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        stdout: OutputSink | None = None,
        stderr: OutputSink | None = None,
    ) -> ExecOutcome: ...

    def pull(self, vm: str, dest_dir: str, *, unchanged_from: str | None = None) -> list[str]: ...

    def teardown(self, vm: str, *, failed: bool) -> TeardownOutcome: ...

    def debug_hold(self, vm: str) -> DebugHold:
        """Keep the VM running after its payload failed, for as long as the site granted the
        job's ``GliteVmDebugHold`` (nothing after a payload that succeeded)."""
        ...

    def debug_wait(self, vm: str) -> DebugHoldEnd:
        """Wait until the VM's debug hold ends (at once when it is not held)."""
        ...

    def debug_release(self, vm: str) -> DebugHoldEnd:
        """End the VM's debug hold now (its owner's, or root's, word)."""
        ...

    def list_vms(self) -> list[VmSummary]: ...
