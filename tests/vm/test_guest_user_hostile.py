"""An image's hostile ``/etc/passwd`` cannot make a job that is not a root job run as root, nor
with ids that are no ids: whatever the guest's account lines or its ``id`` say, the host takes
plain decimal uids and gids only, never uid 0, and says what is wrong with the account.

One real guest serves the module; each test appends the lines an image could ship (as root,
as the image's maker did) and asks for the account as a job's start does.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from glite_vm.errors import GuestUserError
from glite_vm.vm.guest_user import ID_LIMIT, GuestAccount, ensure_guest_user
from glite_vm.vm.lifecycle import Vm, VmHost
from tests.support import LocalImage
from tests.vm.guest_calls import as_root, boot

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def vm(vm_host: VmHost, direct_image: LocalImage) -> Iterator[Vm]:
    with boot(vm_host, direct_image, keep_snapshot="never") as started:
        yield started


def with_line(vm: Vm, line: str) -> str:
    """Append ``line`` to the guest's /etc/passwd; the account name it is for."""
    as_root(vm, f"printf '%s\\n' '{line}' >> /etc/passwd")
    return line.split(":", 1)[0]


def account_or_refusal(vm: Vm, name: str) -> GuestAccount | str:
    try:
        return ensure_guest_user(vm.agent, name, timeout=60)
    except GuestUserError as exc:
        return str(exc)


def sane(found: GuestAccount | str, name: str) -> None:
    """Either a refusal that names the account, or an account with real, non-root ids."""
    if isinstance(found, str):
        assert f"'{name}'" in found, found
        return
    assert 0 < found.uid < ID_LIMIT, found
    assert 0 <= found.gid < ID_LIMIT, found


@pytest.mark.parametrize(
    "line",
    [
        "evroot:x:0:0:root in disguise:/root:/bin/sh",
        "evspace:x: 0:0:a spaced zero:/root:/bin/sh",
        "evplus:x:+0:0:a signed zero:/root:/bin/sh",
        "evneg:x:1005:-1:a negative group:/home/evneg:/bin/sh",
        "evwrap:x:4294967296:4294967295:ids past 32 bits:/home/evwrap:/bin/sh",
        "evunder:x:1_005:1_005:underscored ids:/home/evunder:/bin/sh",
        "evarabic:x:\u0661\u0660\u0660\u0665:\u0660:other scripts digits:/home/x:/bin/sh",
        "evjunk:x:1005:1005 0:a gid with a space:/home/evjunk:/bin/sh",
    ],
    ids=lambda line: line.split(":", 1)[0],
)
def test_a_hostile_account_line_never_gives_root_nor_false_ids(vm: Vm, line: str) -> None:
    name = with_line(vm, line)
    found = account_or_refusal(vm, name)
    sane(found, name)
    if isinstance(found, GuestAccount):  # what the payload would run as: the guest agrees
        ids = as_root(vm, f"id -u {name}; id -g {name}").decode().split()
        assert ids == [str(found.uid), str(found.gid)], (found, ids)


def test_uid_zero_under_any_spelling_is_refused_saying_so(vm: Vm) -> None:
    name = with_line(vm, "evzeros:x:00:0:a padded zero:/root:/bin/sh")
    found = account_or_refusal(vm, name)
    assert isinstance(found, str), found
    assert "has uid 0 (root)" in found


def test_ids_the_guest_cannot_mean_are_refused_saying_what_it_printed(vm: Vm) -> None:
    # busybox reads "+0" as (uid_t) -1, which set*uid calls take as "leave it as it is": root
    name = with_line(vm, "evminus:x:+0:100:a signed zero:/root:/bin/sh")
    found = account_or_refusal(vm, name)
    assert isinstance(found, str), found
    assert "no plain uid and gid (decimal, below 4294967295): it printed" in found, found
