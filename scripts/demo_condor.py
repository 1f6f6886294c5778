"""The main job end to end through HTCondor (called by ``scripts/dev demo`` after set-up).

Starts the glite-vm service (root) with a catalogue holding the disk-boot test guest as
``test-guest``, starts a personal HTCondor pool (an installed HTCondor when ``condor_master`` is
on PATH, else the release tarball in ``../shared/htcondor/`` or GLITE_VM_HTCONDOR_TARBALL)
configured by ``glite-vm config`` with the hooks ``glite-vm hook install`` writes, submits
``submit_templates/build-as-user.sub`` as an ordinary user, and shows the job's output, exit
code, and the snapshot and boot-log paths from ``condor_history``. Everything it starts is
stopped at the end and its directory removed (GLITE_VM_DEMO_KEEP=1 keeps it, with the boot
logs and the job's files); it is safe to run again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from glite_vm.slots import SlotLayout  # noqa: E402
from glite_vm.units import GIB  # noqa: E402
from tests.condor.pool import ensure_user, glite_vm_execute_host, running_pool  # noqa: E402
from tests.service.svc_support import ServiceProcess, running_service  # noqa: E402
from tests.support import disk_guest_catalogue  # noqa: E402

LAYOUT = SlotLayout(slots=3, root_slots=1, cpus=1, memory_mib=2048, disk_bytes=30 * GIB)
GUESTS = Path(os.environ.get("GLITE_VM_TEST_GUESTS", REPO / "tests" / "guest" / "build"))
DEMO_USER = "glitevm-demo"
JOB_TIMEOUT = 300.0

DEMO_BUILD = """#!/bin/sh
# The demo's build: unpack the sources, "compile" them, pack the artifacts.
set -eu
echo "building as $(id -un) (uid $(id -u)) on $(uname -srm) in $(pwd)"
mkdir -p src && tar -xzf "$1" -C src
tr a-z A-Z < src/hello.txt > hello.OUT
echo "build report: $(wc -c < hello.OUT) bytes built" > build-report.txt
tar -czf artifacts.tar.gz hello.OUT build-report.txt
echo "a warning on stderr" >&2
"""


def say(text: str) -> None:
    print(f"\n\033[1m### {text}\033[0m", flush=True)


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="glite-vm-demo-", dir="/var/tmp"))
    root.chmod(0o711)
    try:
        return run_demo(root)
    finally:
        if os.environ.get("GLITE_VM_DEMO_KEEP"):
            print(f"kept {root} (logs, boot logs, job directory)")
        else:
            shutil.rmtree(root, ignore_errors=True)


def run_demo(root: Path) -> int:
    repo = root / "repo"
    repo.mkdir(mode=0o755)
    say("starting the glite-vm service (root; owns libvirt, the image cache and the VMs)")
    catalogue = disk_guest_catalogue(GUESTS, repo, "test-guest")
    # The service knows the pool's slots as `glite-vm config` writes them.
    with running_service(root, catalogue, LAYOUT.knobs()) as service:
        return run_pool(root, service, Path(service.env["GLITE_VM_STATE_DIR"]))


def run_pool(root: Path, service: ServiceProcess, state: Path) -> int:
    prefix = root / "htcondor"
    say("starting a personal HTCondor pool with glite-vm's execute-host configuration")
    _hooks, config = glite_vm_execute_host(
        prefix,
        state_dir=state,
        socket_path=service.socket_path,
        layout=LAYOUT,
        advertise_period=10,
    )
    user = ensure_user(DEMO_USER)
    with running_pool(prefix, config, user) as pool:
        jobdir = pool.job_dir("build")
        template = (REPO / "submit_templates" / "build-as-user.sub").read_text()
        (jobdir / "build.sh").write_text(DEMO_BUILD)
        (jobdir / "build.sh").chmod(0o755)
        src = jobdir / "hello.txt"
        src.write_text("hello from the sources\n")
        with tarfile.open(jobdir / "src.tar.gz", "w:gz") as tar:
            tar.add(src, arcname="hello.txt")
        src.unlink()
        for p in jobdir.iterdir():
            os.chown(p, user.pw_uid, user.pw_gid)
        say(f"condor_submit submit_templates/build-as-user.sub as the ordinary user {user.pw_name}")
        cluster = pool.submit("build", template.replace('"debian-12"', '"test-guest"'))
        print(f"submitted job {cluster}.0 (image test-guest)")
        start = time.monotonic()
        ad = pool.wait_for_history(cluster, JOB_TIMEOUT)
        say(f"job {cluster} finished in {time.monotonic() - start:.0f} s; condor_history says")
        for name in (
            "ExitCode",
            "GliteVmDomain",
            "GliteVmHypervisor",
            "GliteVmImageDigest",
            "GliteVmCacheHit",
            "GliteVmBootLogPath",
            "GliteVmSnapshotPath",
            "GliteVmTimeFetch",
            "GliteVmTimeBoot",
            "GliteVmTimeReady",
            "GliteVmTimePayload",
            "GliteVmTimeTeardown",
        ):
            print(f"  {name} = {ad.get(name, '(not set)')}")
        if "GliteVmSnapshotPath" not in ad:
            print("  (no snapshot: the job succeeded and the template keeps one on_failure)")
        say("the job's stdout, stderr and output files")
        print((jobdir / "build.out").read_text(), end="")
        print("stderr: " + (jobdir / "build.err").read_text(), end="")
        with tarfile.open(jobdir / "artifacts.tar.gz") as tar:
            print("artifacts.tar.gz holds:", ", ".join(tar.getnames()))
        boot_log = Path(str(ad.get("GliteVmBootLogPath", "")))
        if boot_log.is_file():
            lines = boot_log.read_bytes().decode(errors="replace").splitlines()
            kernel = next((line for line in lines if "Linux version" in line), "(none)")
            kernel = kernel[kernel.find("Linux version") :][:70]
            print(f"boot log: {len(lines)} lines from the first byte; the kernel's: {kernel}")
        say("VMs left on this host (none expected)")
        subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all"], check=False)
        if ad.get("ExitCode") != 0 or not (jobdir / "artifacts.tar.gz").exists():
            print("demo: the job did not succeed", file=sys.stderr)
            return 1
    print("\ndemo: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
