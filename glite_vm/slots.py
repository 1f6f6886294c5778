"""The execute host's VM slots, and what one slot gives a VM. Pure: no I/O.

One contract, two readers: ``glite-vm config`` renders the slots into HTCondor's configuration
(static slots, the last ``root_slots`` of them root-enabled), and the service decides from the
same :class:`SlotLayout` (``GLITE_VM_SLOTS``, ``GLITE_VM_ROOT_SLOTS``, ``GLITE_VM_SLOT_*``) what
a job's VM may be. The service never takes a slot's facts from a caller: it learns which slot a
call comes from by the condor_starter it descends from (:mod:`glite_vm.service.claims`), and a
call from no starter gets :meth:`SlotLayout.unmanaged`: no root, at most one slot's size.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

from glite_vm.config import Settings
from glite_vm.units import GIB, KIB, MIB, format_size

USER_SLOT_TYPE: Final = 1
ROOT_SLOT_TYPE: Final = 2
#: The slot name of a VM started outside HTCondor (in hostnames and messages).
UNMANAGED_SLOT: Final = "local"
_SLOT_NAME = re.compile(r"^slot(\d{1,4})(?:_(\d{1,6}))?$")


@dataclasses.dataclass(frozen=True)
class SlotFacts:
    """What a job's slot gives its VM. ``None`` where nothing is known.

    ``exact``: the slot's size *is* the VM's size (a HTCondor claim: the job was given exactly
    that); otherwise the sizes only bound the request (a VM started outside HTCondor).
    ``own``: a VM of the caller's own, in its own process (``glite-vm run``): no site policy
    applies to it (:meth:`own_vm`).
    """

    root_enabled: bool = False
    cpus: int | None = None
    memory_mib: int | None = None
    disk_kib: int | None = None
    exact: bool = True
    name: str = ""
    own: bool = False

    @classmethod
    def from_wire(cls, data: object) -> SlotFacts:
        """Slot facts a trusted caller (root) sent as plain values (``dataclasses.asdict``);
        malformed ones are refused with a ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError("a slot must be an object")
        unknown = sorted(str(k) for k in data if k not in {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"a slot has no fields {', '.join(unknown)}")

        def flag(key: str, default: bool) -> bool:
            value = data.get(key, default)
            if not isinstance(value, bool):
                raise ValueError(f"the slot's {key} must be true or false, got {value!r}")
            return value

        def size(key: str) -> int | None:
            value = data.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"the slot's {key} must be a positive number, got {value!r}")
            return value

        name = data.get("name", "")
        if not isinstance(name, str):
            raise ValueError(f"the slot's name must be a string, got {name!r}")
        return cls(
            root_enabled=flag("root_enabled", False),
            cpus=size("cpus"),
            memory_mib=size("memory_mib"),
            disk_kib=size("disk_kib"),
            exact=flag("exact", True),
            name=name,
            own=flag("own", False),
        )

    @classmethod
    def own_vm(cls) -> SlotFacts:
        """A VM that a user runs for themselves in their own process (``glite-vm run``, the
        API's ``run_local``): root in it is theirs to ask for, its size is theirs to choose
        (within the settings' bounds)."""
        return cls(root_enabled=True, exact=False, name=UNMANAGED_SLOT, own=True)


@dataclasses.dataclass(frozen=True)
class SlotLayout:
    """Static VM slots of one execute host; the last ``root_slots`` of them are root-enabled."""

    slots: int = 3
    root_slots: int = 1
    cpus: int = 1
    memory_mib: int = 2048
    disk_bytes: int = 30 * GIB

    def __post_init__(self) -> None:
        if self.slots < 1:
            raise ValueError(f"a host needs at least 1 slot, got {self.slots}")
        if not 0 <= self.root_slots <= self.slots:
            raise ValueError(f"root slots must be within 0 .. {self.slots}, got {self.root_slots}")
        if self.cpus < 1:
            raise ValueError(f"a slot needs at least 1 CPU, got {self.cpus}")
        if self.memory_mib < 64:
            raise ValueError(f"a slot needs at least 64 MiB of memory, got {self.memory_mib} MiB")
        if self.disk_bytes < 64 * MIB:
            raise ValueError(
                f"a slot needs at least 64 MiB of disk, got {format_size(self.disk_bytes)}"
            )

    @classmethod
    def from_settings(cls, settings: Settings) -> SlotLayout:
        return cls(
            slots=settings.slots,
            root_slots=settings.root_slots,
            cpus=settings.slot_cpus,
            memory_mib=settings.slot_memory_bytes // MIB,
            disk_bytes=settings.slot_disk_bytes,
        )

    @property
    def user_slots(self) -> int:
        return self.slots - self.root_slots

    def knobs(self) -> dict[str, str]:
        """The ``GLITE_VM_*`` settings that describe this layout (condor_config or environment)."""
        return {
            "GLITE_VM_SLOTS": str(self.slots),
            "GLITE_VM_ROOT_SLOTS": str(self.root_slots),
            "GLITE_VM_SLOT_CPUS": str(self.cpus),
            "GLITE_VM_SLOT_MEMORY_BYTES": f"{self.memory_mib}MiB",
            "GLITE_VM_SLOT_DISK_BYTES": f"{self.disk_bytes // KIB}KiB",
        }

    def slot_type(self, number: int) -> int:
        """The slot type of slot ``number`` (user slots are numbered before root slots)."""
        return ROOT_SLOT_TYPE if number > self.user_slots else USER_SLOT_TYPE

    def facts(self, slot_name: str) -> SlotFacts | None:
        """What slot ``slot_name`` (``slot3``, or ``slot1_2`` for a dynamic slot of slot 1)
        gives a VM; ``None`` for a name that is not one of this layout's slots."""
        match = _SLOT_NAME.match(slot_name)
        if match is None:
            return None
        number = int(match.group(1))
        if not 1 <= number <= self.slots:
            return None
        return SlotFacts(
            root_enabled=self.slot_type(number) == ROOT_SLOT_TYPE,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            disk_kib=self.disk_bytes // KIB,
            exact=True,
            name=slot_name,
        )

    def unmanaged(self) -> SlotFacts:
        """A VM started outside HTCondor: never root, and no larger than one slot."""
        return SlotFacts(
            root_enabled=False,
            cpus=self.cpus,
            memory_mib=self.memory_mib,
            disk_kib=self.disk_bytes // KIB,
            exact=False,
            name=UNMANAGED_SLOT,
        )
