"""Attack on the directories the root service trusts as its own: bob makes the image cache
the admin configured before the service's first start (in a world-writable, sticky directory
such as ``/var/tmp``), or the admin's cache is writable by others, or the state directory lies
in a directory of bob's. The service must not start on any of them, and say which directory
and what to change; it must create nothing in bob's. A real service process, a real user."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.conftest import new_state_dir, service_env
from tests.service.svc_support import Account, ServiceProcess, as_user

pytestmark = pytest.mark.vm


def as_bob(bob: Account, code: str, *args: str) -> None:
    subprocess.run(
        [*as_user(bob), sys.executable, "-c", code, *args],
        check=True,
        capture_output=True,
        timeout=60,
        cwd="/",
    )


@pytest.mark.parametrize("case", ["bobs-cache", "open-cache", "state-in-bobs-dir"])
def test_the_service_will_not_start_on_directories_others_can_change(
    case: str, svc_root: Path, catalogue: Path, hypervisor_probe: Path, bob: Account
) -> None:
    root = svc_root / f"dirs-{case}"
    root.mkdir(mode=0o711)
    shared = root / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /var/tmp is
    extra: dict[str, str] = {}
    if case == "bobs-cache":  # bob is first, and makes the cache a place of his
        cache = shared / "cache"
        make = "import os, sys; os.mkdir(sys.argv[1], 0o777); os.mkdir(sys.argv[1] + '/templates')"
        as_bob(bob, make, str(cache))
        extra["GLITE_VM_CACHE_DIR"] = str(cache)
        says = f"the image cache {cache} belongs to uid {bob.uid}"
    elif case == "open-cache":  # the admin's own, made with mkdir -m 777
        cache = root / "open-cache"
        cache.mkdir()
        cache.chmod(0o777)
        extra["GLITE_VM_CACHE_DIR"] = str(cache)
        says = f"the image cache {cache} is writable by group or others (mode 0777)"
    else:  # root's state directory inside a directory bob owns: he can swap it for his
        bobs = shared / "bobs"
        as_bob(bob, "import os, sys; os.mkdir(sys.argv[1], 0o755)", str(bobs))
        state_dir = bobs / "state"
        state_dir.mkdir(mode=0o711)
        extra["GLITE_VM_STATE_DIR"] = str(state_dir)
        says = f"the state directory {state_dir} lies in {bobs} (uid {bob.uid}"
    new_state_dir(root / "state", hypervisor_probe)
    env = service_env(root, catalogue, extra)
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    try:
        with pytest.raises(AssertionError, match="the service exited"):
            svc.start(timeout=60)
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.stop()
    assert says in svc.log(), svc.log()[-2000:]
    assert "Traceback" not in svc.log()
    if case == "bobs-cache":
        assert os.listdir(shared / "cache") == ["templates"]  # root made nothing in it
