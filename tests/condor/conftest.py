"""Fixtures of the HTCondor tests: an unpacked release (tools) and a real personal pool.

The pool runs the execute-host configuration that ``glite-vm config`` generates, with the hook
directory pointing at ``pool_hooks_dir``, an empty directory the tests fill with their own hook
scripts (root-owned, not world-writable, as the starter demands), and ``STARTD_CRON`` running a
stand-in for the ``glite-vm`` executable.
"""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from glite_vm.condor.config import ExecuteHostConfig, render_execute_config
from glite_vm.slots import SlotLayout
from glite_vm.units import MIB
from tests.condor.pool import PersonalPool, ensure_user, find_tarball, running_pool, unpack_release
from tests.support import scratch_root

#: The pool's slots: 4 user slots and the last one root-enabled, small enough for any host.
POOL_LAYOUT = SlotLayout(slots=5, root_slots=1, cpus=1, memory_mib=256, disk_bytes=1024 * MIB)
#: How the stand-in STARTD_CRON executable marks the slot ads: GliteVmCron_<sub-command>.
FAKE_GLITE_VM = '#!/bin/sh\necho "GliteVmCron_$1 = true"\n'


def _traversable_tmpdir(prefix: str) -> Path:
    """Daemons (user condor) and the test user must reach into it; nobody else may write."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def htcondor_release() -> Iterator[Path]:
    """An unpacked HTCondor release tree (bin/, sbin/, libexec/); no daemon runs from it."""
    try:
        tarball = find_tarball()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    prefix = _traversable_tmpdir("glite-vm-htcondor-")
    try:
        yield unpack_release(tarball, prefix)
    finally:
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture(scope="module")
def root(request: pytest.FixtureRequest) -> Iterator[Path]:
    """The scratch directory of a module's own pool, service and jobs (``glite-vm-<module>-``).
    QEMU's user, the condor user and the test user traverse it; nobody lists it.
    ``GLITE_VM_KEEP_E2E`` keeps it for a post-mortem: logs, ads, snapshots."""
    name = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    with scratch_root(f"glite-vm-{name}-", "GLITE_VM_KEEP_E2E") as path:
        yield path


@pytest.fixture(scope="session")
def test_user() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.fail("the HTCondor pool tests run as root (daemons switch to the job's user)")
    user: pwd.struct_passwd = ensure_user()
    return user


@pytest.fixture(scope="session")
def pool_hooks_dir(htcondor_release: Path) -> Path:
    path = htcondor_release / "glite-vm-hooks"
    path.mkdir(mode=0o755)
    fake = path / "glite-vm"
    fake.write_text(FAKE_GLITE_VM)
    fake.chmod(0o755)
    return path


@pytest.fixture(scope="session")
def pool_records_dir(htcondor_release: Path, test_user: pwd.struct_passwd) -> Path:
    """Where hooks (running as the test user) leave evidence for the tests."""
    path = htcondor_release / "records"
    path.mkdir(mode=0o755)
    os.chown(path, test_user.pw_uid, test_user.pw_gid)
    return path


@pytest.fixture(scope="session")
def pool_config(pool_hooks_dir: Path) -> ExecuteHostConfig:
    return ExecuteHostConfig(
        hooks_dir=pool_hooks_dir,
        glite_vm=pool_hooks_dir / "glite-vm",
        layout=POOL_LAYOUT,
        max_host_failures=2,
        advertise_period=60,
        reap_period=60,
    )


@pytest.fixture(scope="session")
def condor_pool(
    htcondor_release: Path,
    test_user: pwd.struct_passwd,
    pool_config: ExecuteHostConfig,
    pool_hooks_dir: Path,
) -> Iterator[PersonalPool]:
    extra = render_execute_config(pool_config) + (
        "\n# tests: the hooks of another keyword, which a job's +HookKeyword must not reach\n"
        f"OTHER_HOOK_PREPARE_JOB = {pool_hooks_dir / 'other_prepare_job'}\n"
    )
    with running_pool(htcondor_release, extra, test_user) as pool:
        yield pool
