"""Who a call of the service is for: its account, the rights its files are moved with, and how
far its word is taken.

Invariants. A :class:`Caller` is made by the service, never from what a client sends: over the
socket its uid, gid and groups are the kernel's view of the peer, and its :class:`Claim` (the
root-run condor_starter it descends from) is found by the server. Only a :attr:`Caller.trusted`
caller (root, or code in the service's own process) may state its slot; anyone else's slot is the
one its claim names. A caller other than root acts on its own VMs only, and a job's owner is the
caller's account name (:func:`account_name`), whatever the job says.
"""

from __future__ import annotations

import dataclasses
import pwd

from glite_vm.service.children import Identity
from glite_vm.service.claims import Claim


@dataclasses.dataclass(frozen=True)
class Caller:
    """The user a call is for (``uid``, account ``name``), the rights its files are moved with
    (``identity``), whether it called over the socket and, when it did, the HTCondor claim it
    acts for."""

    uid: int
    name: str
    identity: Identity
    over_socket: bool = False
    claim: Claim | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def trusted(self) -> bool:
        """May this caller state its slot (root, or a caller in this process)?"""
        return not self.over_socket or self.is_root

    def sees(self, owner_uid: int) -> bool:
        """May this caller see and use a VM of ``owner_uid``?"""
        return self.is_root or owner_uid == self.uid


def account_name(uid: int) -> str:
    """The account's name (``uid<N>`` for a uid the user database does not know)."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


__all__ = ["Caller", "account_name"]
