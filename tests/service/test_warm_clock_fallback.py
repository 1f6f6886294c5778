"""A restored guest whose reseed program cannot set its clock (clock_settime refused) still
gets the host's time: the refresh says so (exit 5), the host sets the clock through the agent
(``guest-set-time``) and refreshes again without it. Real libvirtd/QEMU and the test guest with a
``/bin/sh`` that hands the refresh an impossible time (nanoseconds beyond a second), as a guest
whose kernel refuses the clock would."""

from __future__ import annotations

import gzip
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.test_warm_refresh_attacks import _cpio_newc, prepare
from tests.service.warm_support import wait_for_builds, warm_local_service
from tests.support import GuestVariant, guest_catalogue

pytestmark = pytest.mark.vm
IMAGE = "test-badclock"

# /bin/sh of the guest: busybox's shell, except that the host's refresh gets the time it sent
# with nanoseconds of 1999999999 (clock_settime refuses them: EINVAL).
BAD_CLOCK_SH = r"""#!/bin/busybox sh
if [ "${3-}" = glite-vm-refresh ] && [ "${5-}" != - ]; then
    exec /bin/busybox sh "$1" "$2" "$3" "$4" "${5%% *} 1999999999" "$6" "$7"
fi
exec /bin/busybox sh "$@"
"""


@pytest.fixture(scope="module")
def bad_clock_catalogue(guest_dir: Path, guests: dict[str, Any]) -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="glite-vm-badclock-", dir="/var/tmp"))
    root.chmod(0o755)
    try:
        initrd = root / "badclock.img"
        extra = _cpio_newc("bin/sh", BAD_CLOCK_SH.encode(), 0o100755)
        original = (guest_dir / guests["direct"]["initrd"]).read_bytes()
        initrd.write_bytes(original + gzip.compress(extra))
        variants = {IMAGE: GuestVariant(initrd=initrd)}
        yield guest_catalogue(guest_dir, root / "repo", variants=variants)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_clock_the_program_cannot_set_is_set_through_the_agent(
    svc_root: Path, bad_clock_catalogue: Path, hypervisor_probe: Path
) -> None:
    with warm_local_service(
        svc_root / "badclock", bad_clock_catalogue, hypervisor_probe, warm_images=(IMAGE,)
    ) as service:
        scratch = svc_root / "badclock-jobs"
        first = prepare(service, scratch, IMAGE, 0)
        service.teardown(first.vm, failed=False)
        wait_for_builds()
        time.sleep(2.5)  # the template's clock falls behind the host's by this much
        prepared = prepare(service, scratch, IMAGE, 1)
        try:
            assert prepared.ad_attributes["GliteVmWarmStart"] is True
            before = time.time()
            out = bytearray()
            result = service.exec(prepared.vm, ["date", "+%s"], stdout=out.extend)
            after = time.time()
            assert result.exit_code == 0
            assert before - 1 <= int(out.decode()) <= after + 1, (before, out, after)
        finally:
            service.teardown(prepared.vm, failed=False)
