"""`glite-vm config`: the snippet as HTCondor's own condor_config_val reads it, and its policy."""

from __future__ import annotations

import subprocess
from pathlib import Path

import classad2
import pytest

from glite_vm.cli.main import main
from glite_vm.condor.config import (
    CACHED_IMAGE_WEIGHT,
    CRON_JOBS,
    DEFAULT_PRE_JOB_RANK,
    HOOK_FILES,
    ExecuteHostConfig,
    render_execute_config,
    render_negotiator_config,
)
from glite_vm.config import Settings
from glite_vm.slots import SlotLayout
from glite_vm.units import GIB, MIB

HOOKS = Path("/opt/glite-vm/hooks")
GLITE_VM = Path("/usr/bin/glite-vm")


def read_config(release: Path, tmp_path: Path, *files: str) -> dict[str, str]:
    """Every variable of interest, as condor_config_val of the real build expands it."""
    config_d = tmp_path / "config.d"
    config_d.mkdir(parents=True)
    for i, text in enumerate(files):
        (config_d / f"{50 + i}-part.conf").write_text(text)
    top = tmp_path / "condor_config"
    top.write_text(
        f"RELEASE_DIR = {release}\nLOCAL_DIR = {tmp_path}\nLOCAL_CONFIG_DIR = {config_d}\n"
    )
    env = {"CONDOR_CONFIG": str(top), "PATH": "/usr/bin:/bin"}
    tool = str(release / "bin" / "condor_config_val")
    listed = subprocess.run(
        [tool, "-config"], env=env, capture_output=True, text=True, check=True, timeout=30
    ).stdout
    assert str(config_d / "50-part.conf") in listed
    dump = subprocess.run(
        [tool, "-dump", "-expanded"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    values = {}
    for line in dump.splitlines():
        name, sep, value = line.partition(" = ")
        if sep and not line.startswith("#"):
            values[name.upper()] = value
    return values


def snippet(**kw: object) -> str:
    cfg = ExecuteHostConfig(hooks_dir=HOOKS, glite_vm=GLITE_VM, **kw)  # type: ignore[arg-type]
    return render_execute_config(cfg)


def test_condor_config_val_reads_the_snippet_as_intended(
    htcondor_release: Path, tmp_path: Path
) -> None:
    values = read_config(htcondor_release, tmp_path, snippet())
    assert values["STARTER_JOB_HOOK_KEYWORD"] == "GLITE_VM"
    for hook, name in HOOK_FILES.items():
        assert values[f"GLITE_VM_HOOK_{hook}"] == str(HOOKS / name)
    assert values["GLITE_VM_HOOK_JOB_EXIT_TIMEOUT"] == "60"
    assert values["GLITE_VM_LAUNCHER"] == str(HOOKS / "launcher")
    # the site's historical layout: 3 x (1 core, 2 GB, 30 GB), one root-enabled
    assert values["NUM_CPUS"] == "3"
    assert int(values["DISK"]) * 1024 == 3 * 30 * GIB
    assert values["SLOT_TYPE_1"] == "cpus=1, memory=2048, disk=1/3"
    assert (values["NUM_SLOTS_TYPE_1"], values["NUM_SLOTS_TYPE_2"]) == ("2", "1")
    assert values["SLOT_TYPE_2"] == values["SLOT_TYPE_1"]
    assert values["SLOT_TYPE_1_PARTITIONABLE"] == values["SLOT_TYPE_2_PARTITIONABLE"] == "False"
    assert values["GLITEVMROOTENABLED"] == "False"
    assert values["SLOT_TYPE_2_GLITEVMROOTENABLED"] == "True"
    assert "GliteVmRootEnabled" in values["STARTD_ATTRS"].split()
    assert values["GLITE_VM_MAX_HOST_FAILURES"] == "3"
    assert values["GLITE_VM_MAX_DEBUG_HOLD"] == "0"  # debug holds off unless the admin says
    assert set(CRON_JOBS) <= set(values["STARTD_CRON_JOBLIST"].split())
    for job, command in CRON_JOBS.items():
        assert values[f"STARTD_CRON_{job}_EXECUTABLE"] == str(GLITE_VM)
        assert values[f"STARTD_CRON_{job}_ARGS"] == command
        assert values[f"STARTD_CRON_{job}_MODE"] == "Periodic"
    assert values["STARTD_CRON_GLITE_VM_REAP_PERIOD"] == "30s"
    # START and RANK must be ClassAd expressions once expanded
    classad2.ExprTree(values["START"])
    classad2.ExprTree(values["RANK"])


def test_a_custom_layout_and_policy_come_through(htcondor_release: Path, tmp_path: Path) -> None:
    layout = SlotLayout(slots=4, root_slots=4, cpus=2, memory_mib=4096, disk_bytes=10 * GIB)
    text = snippet(layout=layout, default_image="debian-12", root_users=("alice", "bob"))
    values = read_config(htcondor_release, tmp_path, text)
    assert "NUM_SLOTS_TYPE_1" not in values
    assert values["NUM_SLOTS_TYPE_2"] == "4"
    assert values["SLOT_TYPE_2"] == "cpus=2, memory=4096, disk=1/4"
    assert values["NUM_CPUS"] == "8"
    assert values["GLITE_VM_DEFAULT_IMAGE"] == "debian-12"
    assert values["GLITE_VM_ROOT_USERS"] == "alice, bob"


def test_the_debug_hold_maximum_reaches_the_service_through_htcondors_configuration(
    htcondor_release: Path, tmp_path: Path
) -> None:
    settings = Settings(max_debug_hold=1800.0)
    cfg = ExecuteHostConfig.from_settings(
        settings, hooks_dir=HOOKS, glite_vm=GLITE_VM, layout=SlotLayout()
    )
    values = read_config(htcondor_release, tmp_path, render_execute_config(cfg))
    assert values["GLITE_VM_MAX_DEBUG_HOLD"] == "1800"
    read_back = Settings.from_strings({"max_debug_hold": values["GLITE_VM_MAX_DEBUG_HOLD"]})
    assert read_back.max_debug_hold == 1800.0


# --- the START and RANK policy ----------------------------------------------------------------

USER_SLOT: dict[str, object] = {"GliteVmRootEnabled": False}
ROOT_SLOT: dict[str, object] = {"GliteVmRootEnabled": True}


def evaluate(expression: str, slot: dict[str, object], job: dict[str, object]) -> object:
    return classad2.ExprTree(expression).eval(classad2.ClassAd(slot), classad2.ClassAd(job))


def user_job(**kw: object) -> dict[str, object]:
    return {"Owner": "alice", "GliteVmImage": "debian-12", **kw}


def root_job(**kw: object) -> dict[str, object]:
    return user_job(GliteVmRoot=True, **kw)


def policy(release: Path, tmp_path: Path, *files: str) -> tuple[str, str]:
    values = read_config(release, tmp_path, *files)
    return values["START"], values["RANK"]


def test_root_jobs_match_only_root_slots(htcondor_release: Path, tmp_path: Path) -> None:
    start, rank = policy(htcondor_release, tmp_path, snippet())
    assert evaluate(start, ROOT_SLOT, root_job()) is True
    assert evaluate(start, USER_SLOT, root_job()) is False
    assert evaluate(start, USER_SLOT, user_job()) is True
    # a user job may use a root slot, but every user slot ranks it higher
    assert evaluate(start, ROOT_SLOT, user_job()) is True
    assert evaluate(rank, USER_SLOT, user_job()) > evaluate(rank, ROOT_SLOT, user_job())  # type: ignore[operator]
    # GliteVmRoot must be the boolean: anything else is no root request (the hook holds it)
    assert evaluate(start, USER_SLOT, user_job(GliteVmRoot="True")) is True
    assert evaluate(start, USER_SLOT, user_job(GliteVmRoot=False)) is True


def test_a_host_whose_service_is_down_takes_no_jobs(htcondor_release: Path, tmp_path: Path) -> None:
    start, _ = policy(htcondor_release, tmp_path, snippet())
    down = {**USER_SLOT, "GliteVmServiceUp": False}
    assert evaluate(start, down, user_job()) is False
    assert evaluate(start, {**USER_SLOT, "GliteVmServiceUp": True}, user_job()) is True
    assert evaluate(start, USER_SLOT, user_job()) is True  # not reported yet: counts as up


def test_root_users_narrow_who_matches_root_slots(htcondor_release: Path, tmp_path: Path) -> None:
    start, _ = policy(htcondor_release, tmp_path, snippet(root_users=("alice", "bob")))
    assert evaluate(start, ROOT_SLOT, root_job(Owner="bob")) is True
    assert evaluate(start, ROOT_SLOT, root_job(Owner="carol")) is not True
    assert evaluate(start, ROOT_SLOT, root_job(Owner="alice_b")) is not True
    assert evaluate(start, USER_SLOT, user_job(Owner="carol")) is True


def test_jobs_without_image_match_only_with_a_default(
    htcondor_release: Path, tmp_path: Path
) -> None:
    no_image: dict[str, object] = {"Owner": "alice"}
    start, _ = policy(htcondor_release, tmp_path / "a", snippet())
    assert evaluate(start, USER_SLOT, no_image) is False
    start, _ = policy(htcondor_release, tmp_path / "b", snippet(default_image="debian-12"))
    assert evaluate(start, USER_SLOT, no_image) is True


def test_jobs_asking_for_a_network_match_only_hosts_that_offer_it(
    htcondor_release: Path, tmp_path: Path
) -> None:
    start, _ = policy(htcondor_release, tmp_path / "a", snippet())
    assert evaluate(start, USER_SLOT, user_job()) is True  # no request: the host's default
    assert evaluate(start, USER_SLOT, user_job(GliteVmNetwork="none")) is True
    assert evaluate(start, USER_SLOT, user_job(GliteVmNetwork="user")) is False
    offered = snippet(network="none", job_networks=("user", "build-net"))
    start, _ = policy(htcondor_release, tmp_path / "b", offered)
    for name in ("none", "user", "build-net"):
        assert evaluate(start, USER_SLOT, user_job(GliteVmNetwork=name)) is True, name
    assert evaluate(start, USER_SLOT, user_job(GliteVmNetwork="other")) is False
    with pytest.raises(ValueError, match="not a network name"):
        snippet(job_networks=("two words",))


def test_a_later_site_file_changes_the_policy_without_regenerating(
    htcondor_release: Path, tmp_path: Path
) -> None:
    site = "GLITE_VM_ROOT_USERS = bob\nGLITE_VM_DEFAULT_IMAGE = centos-7\n"
    start, _ = policy(htcondor_release, tmp_path, snippet(), site)
    assert evaluate(start, ROOT_SLOT, root_job(Owner="bob")) is True
    assert evaluate(start, ROOT_SLOT, root_job(Owner="alice")) is not True
    assert evaluate(start, USER_SLOT, {"Owner": "alice"}) is True


def test_the_snippet_keeps_the_sites_own_start_and_rank(
    htcondor_release: Path, tmp_path: Path
) -> None:
    site_first = 'START = (TARGET.Owner =!= "mallory")\nRANK = 10\n'
    start, rank = policy(htcondor_release, tmp_path, site_first, snippet())
    assert evaluate(start, USER_SLOT, user_job(Owner="mallory")) is False
    assert evaluate(start, USER_SLOT, user_job()) is True
    assert evaluate(rank, USER_SLOT, user_job()) == 11


# --- validation and the command --------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        {"slots": 0},
        {"root_slots": 4},
        {"root_slots": -1},
        {"cpus": 0},
        {"memory_mib": 32},
        {"disk_bytes": MIB},
    ],
)
def test_impossible_layouts_are_refused(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        SlotLayout(**kw)


@pytest.mark.parametrize(
    "kw",
    [
        {"hooks_dir": Path("relative/hooks")},
        {"hooks_dir": Path("/opt/my hooks")},
        {"glite_vm": Path("/usr/bin/$(EVIL)")},
        {"default_image": 'debian"12'},
        {"default_image": "deb\\ian"},
        {"default_image": "a b"},
        {"root_users": ("alice", "bob smith")},
        {"root_users": ('x", "y',)},
        {"max_host_failures": -1},
        {"job_exit_timeout": 0},
    ],
)
def test_values_that_would_change_the_config_language_are_refused(kw: dict[str, object]) -> None:
    args: dict[str, object] = {"hooks_dir": HOOKS, "glite_vm": GLITE_VM, **kw}
    with pytest.raises(ValueError):
        ExecuteHostConfig(**args)  # type: ignore[arg-type]


def test_settings_feed_the_policy_knobs() -> None:
    settings = Settings(
        default_image="debian-12", root_users=("alice",), max_host_failures=5, teardown_timeout=40
    )
    cfg = ExecuteHostConfig.from_settings(
        settings, hooks_dir=HOOKS, glite_vm=GLITE_VM, layout=SlotLayout()
    )
    assert (cfg.default_image, cfg.root_users, cfg.max_host_failures) == (
        "debian-12",
        ("alice",),
        5,
    )
    assert cfg.job_exit_timeout > settings.teardown_timeout


def test_the_command_prints_the_snippet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GLITE_VM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("GLITE_VM_DEFAULT_IMAGE", "debian-12")
    argv = ["config", "--slots", "4", "--root-slots", "2", "--memory", "1GiB", "--disk", "10GB"]
    assert main([*argv, "--hooks-dir", "/srv/hooks", "--glite-vm", "/srv/glite-vm"]) == 0
    out = capsys.readouterr().out
    assert "GLITE_VM_HOOK_PREPARE_JOB = /srv/hooks/prepare_job\n" in out
    assert "STARTD_CRON_GLITE_VM_ADVERTISE_EXECUTABLE = /srv/glite-vm\n" in out
    assert "SLOT_TYPE_1 = cpus=1, memory=1024, disk=1/4\n" in out
    assert "NUM_SLOTS_TYPE_2 = 2\n" in out
    assert f"DISK = {4 * 10 * GIB // 1024}\n" in out
    assert "GLITE_VM_DEFAULT_IMAGE = debian-12\n" in out

    target = tmp_path / "60-glite-vm.conf"
    assert main(["config", "--hooks-dir", "/srv/hooks", "-o", str(target)]) == 0
    assert target.read_text().startswith("# glite-vm ")

    assert main(["config", "--slots", "2", "--root-slots", "3"]) == 125
    assert "request error: root slots must be within 0 .. 2" in capsys.readouterr().err
    assert main(["config", "--memory", "lots"]) == 125
    assert main(["config", "--memory", "2048"]) == 125  # MiB? bytes? the unit is required
    assert "--memory: '2048' has no unit; write e.g. '2048MiB'" in capsys.readouterr().err


def test_the_central_managers_rank_is_the_default_plus_the_cached_image_term(
    htcondor_release: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default = read_config(htcondor_release, tmp_path / "a", "# nothing\n")
    assert default["NEGOTIATOR_PRE_JOB_RANK"] == DEFAULT_PRE_JOB_RANK
    assert main(["config", "--central-manager"]) == 0
    printed = capsys.readouterr().out
    assert printed == render_negotiator_config()
    ours = read_config(htcondor_release, tmp_path / "b", printed)["NEGOTIATOR_PRE_JOB_RANK"]
    term = (
        f" + ({CACHED_IMAGE_WEIGHT} * "
        "(stringListMember(TARGET.GliteVmImage, MY.GliteVmCachedImages) =?= True))"
    )
    # the default's terms, in order, with ours between "idle first" and the size terms: the
    # slot's own RANK and an idle slot still count for more than a cached image
    head, sep, tail = DEFAULT_PRE_JOB_RANK.partition(" - (100000 * Cpus)")
    assert ours == head + term + sep + tail
    assert 1000000 > CACHED_IMAGE_WEIGHT > 4 * 100000
