"""`glite-vm advertise` (STARTD_CRON) and the location knobs the generated config carries."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import classad2
import pytest

from glite_vm.condor.advertise import collect, render
from glite_vm.condor.config import ExecuteHostConfig, render_execute_config
from glite_vm.config import Settings
from glite_vm.images.acquire import acquire_image
from glite_vm.images.build import build_catalogue, write_catalogue
from glite_vm.images.inspect import Limits
from glite_vm.slots import SlotLayout
from glite_vm.units import MIB
from glite_vm.vm import hypervisor as hv

REPO = Path(__file__).resolve().parents[2]


def advertised(settings: Settings) -> classad2.ClassAd:
    return classad2.parseOne(render(collect(settings)), classad2.ParserType.Old)


def remember_probe(settings: Settings, kind: str, key: str | None = None) -> None:
    record = {
        "key": hv._probe_key(hv.find_emulator()) if key is None else key,
        "preference": settings.hypervisor,
        "kind": kind,
        "reason": "test",
    }
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    (settings.state_dir / "hypervisor.json").write_text(json.dumps(record))


def test_hypervisors_come_from_the_remembered_probe_only(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state")
    assert hv.find_emulator(), "QEMU is part of this project's test environment"
    # no probe yet: TCG is always there when QEMU is, and advertise never probes itself
    assert advertised(settings)["GliteVmHypervisors"] == "qemu"
    assert not (settings.state_dir / "hypervisor.json").exists()
    remember_probe(settings, "kvm")
    assert advertised(settings)["GliteVmHypervisors"] == "kvm,qemu"
    # a probe of another kernel/QEMU/device no longer holds
    remember_probe(settings, "kvm", key="another kernel|/usr/bin/qemu|-|-")
    assert advertised(settings)["GliteVmHypervisors"] == "qemu"
    forced = Settings(state_dir=tmp_path / "state", hypervisor="qemu")
    remember_probe(forced, "kvm")
    assert advertised(forced)["GliteVmHypervisors"] == "qemu"


def test_cached_images_and_room_left_are_advertised(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(repo / "tiny.qcow2"), "16M"], check=True
    )
    limits = Limits(max_virtual_bytes=1 << 30, max_file_bytes=1 << 30)
    write_catalogue(
        build_catalogue(repo, limits=limits, base_url=repo.as_uri()), repo / "catalogue.json"
    )
    settings = Settings(
        state_dir=tmp_path / "state",
        catalogue=(repo / "catalogue.json").as_uri(),
        cache_max_bytes=64 * MIB,
        cache_min_free_bytes=0,
    )
    empty = advertised(settings)
    assert empty["GliteVmCachedImages"] == ""
    assert empty["GliteVmCacheFreeBytes"] == 64 * MIB

    with acquire_image(settings, "tiny", job_id="7.0"):
        pass
    ad = advertised(settings)
    assert ad["GliteVmCachedImages"] == "tiny"
    size = (repo / "tiny.qcow2").stat().st_size
    assert ad["GliteVmCacheFreeBytes"] == 64 * MIB - size
    # what a submit file's rank sees (the daemons evaluate stringListMember; so does this)
    job = classad2.ClassAd({"GliteVmImage": "tiny"})
    rank = classad2.ExprTree(
        'stringListsIntersect(TARGET.GliteVmImage, MY.GliteVmCachedImages, ",")'
    )
    assert rank.eval(ad, job) is True


def test_an_unreadable_cache_leaves_its_facts_out(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "cache").mkdir(parents=True)
    (state / "cache" / "blobs").write_text("not a directory")
    facts = collect(Settings(state_dir=state))
    assert facts.cached_images is None and facts.cache_free_bytes is None
    assert any("image cache" in p for p in facts.problems)
    assert "GliteVmCachedImages" not in render(facts)


def test_the_command_is_cheap_and_reads_htcondors_knobs(tmp_path: Path) -> None:
    state = tmp_path / "from-condor"
    remember_probe(Settings(state_dir=state), "kvm")
    config = tmp_path / "condor_config"
    config.write_text(f"GLITE_VM_STATE_DIR = {state}\n")
    env = {
        "CONDOR_CONFIG": str(config),
        "GLITE_VM_CONFIG": "/nonexistent",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "glite_vm", "advertise"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    ad = classad2.parseOne(result.stdout, classad2.ParserType.Old)
    assert set(ad.keys()) == {
        "GliteVmHypervisors",
        "GliteVmCachedImages",
        "GliteVmCacheFreeBytes",
        "GliteVmNetworks",
        "GliteVmServiceUp",
    }
    # no service listens at the configured socket: new jobs must stay away, and the StartLog
    # says why (tests/condor/test_site.py stops a real one)
    assert ad["GliteVmServiceUp"] is False
    assert "does not answer" in result.stderr
    assert ad["GliteVmNetworks"] == "none"  # the default network, and no others for jobs
    assert ad["GliteVmHypervisors"] == "kvm,qemu"  # the probe in HTCondor's GLITE_VM_STATE_DIR
    assert not (state / "cache").exists()  # read-only: nothing made


def test_the_snippet_tells_hooks_and_cron_where_the_service_and_state_are() -> None:
    settings = Settings(state_dir=Path("/srv/glite"), socket_path=Path("/run/g/s.sock"))
    cfg = ExecuteHostConfig.from_settings(
        settings,
        hooks_dir=Path("/opt/hooks"),
        glite_vm=Path("/usr/bin/glite-vm"),
        layout=SlotLayout(),
    )
    text = render_execute_config(cfg)
    assert "GLITE_VM_STATE_DIR = /srv/glite\n" in text
    assert "GLITE_VM_SOCKET_PATH = /run/g/s.sock\n" in text
    assert "GLITE_VM_CACHE_DIR" not in text  # not set: derived from the state directory
    with pytest.raises(ValueError, match="socket"):
        ExecuteHostConfig(
            hooks_dir=Path("/opt/hooks"),
            glite_vm=Path("/usr/bin/glite-vm"),
            socket_path=Path("/run/with space.sock"),
        )
