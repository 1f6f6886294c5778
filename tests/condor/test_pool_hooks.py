"""The hook contract, proven in a real HTCondor pool (docs/condor.md records the facts).

Stand-in hooks written here take the place of glite-vm's: PREPARE_JOB rewrites the job to run a
"launcher", holds, or fails like a broken host (that one runs the real failure path of
:mod:`glite_vm.condor.jobad` in Python). All jobs are submitted at once and run side by side.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import classad2
import pytest

from glite_vm.condor.config import ExecuteHostConfig
from glite_vm.condor.jobad import (
    HOST_FAILURES_ATTR,
    HOST_FAILURES_HOLD_CODE,
    ad_safe_text,
    chirp_literal,
    format_ad_updates,
    hook_status_lines,
    status_code,
    v2_quote,
)
from glite_vm.errors import ImageRefusedError
from tests.condor.pool import PersonalPool, wait_until

pytestmark = pytest.mark.condor

#: Arguments the rewritten job gets: the starter must pass every character on.
LAUNCHER_ARGS = ["first", 'q"uote back\\slash', 'in\\"side', "tab\there", "é", "tail\\"]
#: A value the launcher pushes into the schedd's ad with condor_chirp.
CHIRPED = 'paths "quoted" C:\\odd\nsecond line é'
HOLD_ERROR = ImageRefusedError(
    "https://repo.example/x.qcow2", 'backing file "/etc/shadow" \\ refused\nsee docs/images.md'
)
JOB_TIMEOUT = 120.0
FAILURE_TIMEOUT = 200.0  # two PREPARE_JOB failures, each ~20 s to land, plus matchmaking


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)  # root-owned, not world-writable: the starter refuses anything else


def install_hooks(hooks: Path, records: Path, libexec: Path) -> None:
    chirp = libexec / "condor_chirp"
    run_updates = format_ad_updates(
        {
            "Cmd": hooks / "launcher",
            "Arguments": v2_quote(LAUNCHER_ARGS),
            # the executable was transferred under its own name; run ours from where it is
            "TransferExecutable": False,
        }
    )
    hold_lines = "\n".join(hook_status_lines(HOLD_ERROR, 0, 2))
    _script(
        hooks / "prepare_job",
        f"""#!/bin/sh
ad=$(cat)
cluster=$(printf '%s\\n' "$ad" | sed -n 's/^ClusterId = //p')
attempt=$(ls {records} | grep -c "^prepare\\.$cluster\\.")
printf '%s\\n' "$ad" > {records}/prepare.$cluster.$attempt
mode=$(printf '%s\\n' "$ad" | sed -n 's/^GliteVmTestMode = "\\(.*\\)"$/\\1/p')
case "$mode" in
run)
    {chirp} set_job_attr GliteVmFromPrepare true
    cat <<'EOF'
{run_updates}EOF
    ;;
hold)
    cat <<'EOF'
{hold_lines}
EOF
    exit 1 ;;
requeue)
    printf '%s\\n' "$ad" | exec {sys.executable} {hooks / "requeue_hook.py"} ;;
esac
""",
    )
    _script(
        hooks / "requeue_hook.py",
        f"""#!{sys.executable}
import socket
import sys

import classad2
from htcondor2.htchirp import HTChirp

from glite_vm.condor.jobad import (
    HOST_FAILURES_ATTR, append_host_failure, chirp_literal, hook_status_lines,
    host_failure_count, host_failure_history,
)
from glite_vm.config import Settings
from glite_vm.errors import BootError

ad = classad2.parseOne(sys.stdin.read(), classad2.ParserType.Old)
previous = host_failure_count(ad)
earlier = host_failure_history(ad)
error = BootError(f"simulated boot failure {{previous + 1}}")
with HTChirp() as chirp:
    history = append_host_failure(earlier, f"{{socket.gethostname()}}: {{error}}")
    chirp.set_job_attr({HOST_FAILURES_ATTR!r}, chirp_literal(history))
limit = Settings.load(use_condor=True).max_host_failures
print("\\n".join(hook_status_lines(error, previous, limit, earlier)))
sys.exit(1)
""",
    )
    _script(
        hooks / "launcher",
        f"""#!/bin/sh
for arg in "$@"; do printf '[%s]\\n' "$arg"; done
grep -E '^(Cmd|Args) = ' "$_CONDOR_JOB_AD"
echo "uid=$(id -u)"
{chirp} set_job_attr GliteVmChirped {shlex.quote(chirp_literal(CHIRPED))}
exit 7
""",
    )
    _script(
        hooks / "job_exit",
        f"""#!/bin/sh
ad=$(cat)
cluster=$(printf '%s\\n' "$ad" | sed -n 's/^ClusterId = //p')
printf 'reason=%s\\n%s\\n' "$1" "$ad" > {records}/exit.$cluster.$$
# on eviction the starter's chirp server is already gone: a chirp would only time out
if [ "$1" = exit ]; then {chirp} set_job_attr GliteVmFromJobExit true; fi
""",
    )
    _script(hooks / "update_job_info", "#!/bin/sh\ncat > /dev/null\n")
    _script(
        hooks / "other_prepare_job",
        f"#!/bin/sh\ncat > /dev/null\ntouch {records}/other-keyword-ran\n"
        "echo 'Cmd = \"/bin/false\"'\n",
    )


def description(mode: str, *extra: str) -> str:
    return "\n".join(
        [
            "universe = vanilla",
            "executable = /bin/echo",
            "arguments = original",
            "output = out",
            "error = err",
            "log = log",
            "should_transfer_files = YES",
            "request_memory = 128",
            "+WantIOProxy = true",
            '+GliteVmImage = "test-image"',
            f'+GliteVmTestMode = "{mode}"',
            *extra,
            "queue",
            "",
        ]
    )


@dataclasses.dataclass(frozen=True)
class Jobs:
    run: int
    other_keyword: int
    root: int
    hold: int
    requeue: int


@pytest.fixture(scope="module")
def jobs(
    condor_pool: PersonalPool,
    pool_config: ExecuteHostConfig,
    pool_records_dir: Path,
) -> Iterator[Jobs]:
    install_hooks(pool_config.hooks_dir, pool_records_dir, condor_pool.libexec)
    submitted = Jobs(
        run=condor_pool.submit("run", description("run")),
        other_keyword=condor_pool.submit("other", description("run", '+HookKeyword = "OTHER"')),
        root=condor_pool.submit("root", description("run", "+GliteVmRoot = true")),
        hold=condor_pool.submit("hold", description("hold")),
        requeue=condor_pool.submit("requeue", description("requeue")),
    )
    yield submitted
    condor_pool.run(["condor_rm", "-all"], check=False)


def records(directory: Path, prefix: str) -> list[str]:
    return [p.read_text() for p in sorted(directory.glob(prefix + "*"))]


def slot_number(host: str) -> int:
    return int(host.partition("@")[0].removeprefix("slot"))


def test_slots_follow_the_generated_layout(
    condor_pool: PersonalPool, pool_config: ExecuteHostConfig
) -> None:
    layout = pool_config.layout

    def slots_with_cron_facts() -> list[object] | None:
        text = condor_pool.run(["condor_status", "-long"]).stdout
        ads = list(classad2.parseAds(text, classad2.ParserType.Old))
        done = all(ad.get("GliteVmCron_advertise") and ad.get("GliteVmCron_reap") for ad in ads)
        return ads if len(ads) == layout.slots and done else None

    ads: list[classad2.ClassAd] = wait_until(
        "slot ads with STARTD_CRON facts", slots_with_cron_facts, 60
    )
    by_slot = {int(ad["SlotID"]): ad for ad in ads}
    root_slots = {n for n, ad in by_slot.items() if ad.get("GliteVmRootEnabled") is True}
    assert root_slots == {layout.slots}  # the last slot, as many as asked for
    for ad in ads:
        assert ad["Cpus"] == layout.cpus
        assert ad["TotalSlotMemory"] == layout.memory_mib
        assert round(ad["TotalSlotDisk"]) == layout.disk_bytes // 1024

    user = classad2.ClassAd({"Owner": "alice", "GliteVmImage": "x"})
    root = classad2.ClassAd({"Owner": "alice", "GliteVmImage": "x", "GliteVmRoot": True})
    no_image = classad2.ClassAd({"Owner": "alice"})
    for n, ad in by_slot.items():
        start = ad.lookup("Start")
        assert start.eval(ad, user) is True
        assert start.eval(ad, root) is (n in root_slots)
        assert start.eval(ad, no_image) is False


def test_prepare_job_runs_our_launcher_which_updates_the_job_ad(
    condor_pool: PersonalPool, jobs: Jobs, pool_records_dir: Path, pool_config: ExecuteHostConfig
) -> None:
    ad = condor_pool.wait_for_history(jobs.run, JOB_TIMEOUT)
    assert ad["ExitCode"] == 7
    out = (condor_pool.job_dir("run") / "out").read_text()
    printed = "".join(f"[{a}]\n" for a in LAUNCHER_ARGS)
    assert out.startswith(printed)  # every character of Arguments reached the launcher
    # $_CONDOR_JOB_AD still shows what the user submitted: the launcher finds the payload there
    assert 'Cmd = "/bin/echo"\n' in out
    assert 'Args = "original"\n' in out
    assert f"uid={condor_pool.user.pw_uid}\n" in out
    # chirp reaches the schedd: from PREPARE_JOB, from the job, and from JOB_EXIT on exit
    assert ad["GliteVmFromPrepare"] is True
    assert ad["GliteVmChirped"] == ad_safe_text(CHIRPED)
    assert ad["GliteVmFromJobExit"] is True
    assert slot_number(ad["LastRemoteHost"]) < pool_config.layout.slots  # a user slot
    (exit_record,) = records(pool_records_dir, f"exit.{jobs.run}.")
    assert exit_record.startswith("reason=exit\n")
    # JOB_EXIT sees the starter's copy, with PREPARE_JOB's updates merged in
    assert f'Cmd = "{pool_config.hooks_dir / "launcher"}"' in exit_record
    assert "TransferExecutable = false" in exit_record


def test_a_jobs_own_hook_keyword_does_not_bypass_the_hooks(
    condor_pool: PersonalPool, jobs: Jobs, pool_records_dir: Path
) -> None:
    ad = condor_pool.wait_for_history(jobs.other_keyword, JOB_TIMEOUT)
    assert ad["HookKeyword"] == "OTHER"
    assert ad["ExitCode"] == 7  # our launcher ran
    assert not (pool_records_dir / "other-keyword-ran").exists()


def test_root_jobs_run_on_the_root_slot(
    condor_pool: PersonalPool, jobs: Jobs, pool_config: ExecuteHostConfig
) -> None:
    ad = condor_pool.wait_for_history(jobs.root, JOB_TIMEOUT)
    assert ad["ExitCode"] == 7
    assert slot_number(ad["LastRemoteHost"]) == pool_config.layout.slots


def test_a_user_error_holds_with_our_message(condor_pool: PersonalPool, jobs: Jobs) -> None:
    ad = condor_pool.wait_for_status(jobs.hold, 5, FAILURE_TIMEOUT)
    assert ad["HoldReasonCode"] == 19  # HookPrepareJobFailure
    assert ad["HoldReasonSubCode"] == status_code(HOLD_ERROR)
    assert ad["HoldReason"].endswith(": " + ad_safe_text(str(HOLD_ERROR)))
    assert ad["NumJobStarts"] == 0


def test_host_errors_requeue_then_hold_with_the_accumulated_reasons(
    condor_pool: PersonalPool, jobs: Jobs, pool_records_dir: Path
) -> None:
    ad = condor_pool.wait_for_status(jobs.requeue, 5, FAILURE_TIMEOUT)
    attempts = records(pool_records_dir, f"prepare.{jobs.requeue}.")
    assert len(attempts) == 2  # requeued once, held on the second failure (limit 2)
    first, second = (classad2.parseOne(a, classad2.ParserType.Old) for a in attempts)
    assert first.get("NumVacatesByReason", {}).get("StarterError") is None
    assert second["NumVacatesByReason"]["StarterError"] == 1
    assert first["NumJobStarts"] == second["NumJobStarts"] == 0
    assert ad["HoldReasonCode"] == 19
    assert ad["HoldReasonSubCode"] == HOST_FAILURES_HOLD_CODE
    reason = ad["HoldReason"]
    assert "held after 2 host failures" in reason
    assert "last: simulated boot failure 2" in reason
    assert "earlier: " in reason and "simulated boot failure 1" in reason
    history = ad[HOST_FAILURES_ATTR]
    assert "simulated boot failure 1 || " in history
    assert history.endswith("simulated boot failure 2")
