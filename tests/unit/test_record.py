"""The job record and the job-ad attributes: one contract (glite_vm.vm.record), read back as it
was written, tolerant of what a user may put in a record, and the docs' table kept true."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from glite_vm.vm.record import (
    NAMES,
    AdFacts,
    JobRecord,
    Timings,
    VmFiles,
    ad_attributes,
    time_attribute,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "users.md"

RECORD = JobRecord(
    domain="glite-vm-alice-12.3-abcdef",
    job_id="12.3",
    owner="alice",
    image="debian-12",
    image_sha256="ab" * 32,
    base_image="/var/lib/glite-vm/cache/blobs/" + "ab" * 32,
    base_format="qcow2",
    kernel=None,
    initrd=None,
    cmdline=None,
    guest_user="glite",
    hypervisor="qemu",
    root=False,
    failed=True,
    exit_code=3,
    signal=None,
    snapshot="/var/lib/glite-vm/snapshots/x/snapshot.qcow2",
    boot_log="/var/lib/glite-vm/snapshots/x/boot.log",
    timings=Timings(fetch=0.5, boot=1.25, ready=2.0, payload=9.0, teardown=0.3).as_dict(),
    finished=1_800_000_000.0,
)


def test_a_record_reads_back_as_it_was_written(tmp_path: Path) -> None:
    path = VmFiles(tmp_path).record
    RECORD.write(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert JobRecord.from_json(path.read_bytes()) == RECORD
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_a_record_its_owner_changed_is_read_safely() -> None:
    hostile = {
        "domain": "x\x1b[2J\udcff",
        "owner": 7,
        "exit_code": 2**80,
        "finished": float("inf"),
        "timings": {"boot": "fast", "payload": -1.0, "x" * 300: 1.0},
        "root": "yes",
        "kernel": "relative/path",
        "base_image": "/ok",
    }
    record = JobRecord.from_json(json.dumps(hostile).encode())
    assert record.domain == "x?[2J?"
    assert (record.owner, record.exit_code, record.root, record.kernel) == ("?", None, False, None)
    assert record.finished == 0.0
    assert record.timings == {"payload": -1.0, "x" * 256: 1.0}
    assert record.base_image == "/ok"
    for raw in (b"[]", b"[" * 100_000, b"not json"):
        with pytest.raises(ValueError):
            JobRecord.from_json(raw)


def test_the_ad_has_each_known_fact_once_and_leaves_out_the_unknown() -> None:
    ad = ad_attributes(
        domain="d",
        cache_hit=False,
        boot_log=Path("/b/boot.log"),
        snapshot=None,
        timings={"fetch": 1.23456, "overlay": 0.1, "ready": None, "transfer_in": 2.0},
    )
    assert ad == {
        "GliteVmDomain": "d",
        "GliteVmCacheHit": False,
        "GliteVmBootLogPath": "/b/boot.log",
        "GliteVmTimeFetch": 1.235,
        "GliteVmTimeTransferIn": 2.0,
    }
    assert set(ad) <= NAMES
    assert time_attribute("transfer_out") == "GliteVmTimeTransferOut"
    with pytest.raises(ValueError, match="no job-ad attribute"):
        time_attribute("lunch")


def test_the_users_guide_lists_exactly_the_attributes_the_hooks_add() -> None:
    text = DOCS.read_text()
    section = text[text.index("| `GliteVmDomain`") :]
    rows = section[: section.index("\n\n")].splitlines()
    listed = {name for row in rows for name in re.findall(r"`(GliteVm\w+)`", row.split(" | ")[0])}
    assert listed == NAMES, (sorted(listed - NAMES), sorted(NAMES - listed))


def test_what_the_hooks_put_into_an_ad_reads_back_the_same() -> None:
    timings = {"fetch": 1.25, "boot": 3.5, "transfer_in": 0.125, "teardown": 2.0}
    written = ad_attributes(
        domain="glite-vm-alice-12.0-1a2b3c",
        hypervisor="qemu",
        image_digest="ab" * 32,
        cache_hit=False,
        guest_user="glite",
        guest_network="user",
        boot_log="/state/snapshots/d/boot.log",
        snapshot="/state/snapshots/d/snapshot.qcow2",
        record="/state/snapshots/d/record.json",
        boot_attempts=2,
        timings=timings,
    )
    facts = AdFacts.from_ad({**written, "GliteVmPayloadSignal": 9, "Owner": "alice"})
    assert facts.domain == "glite-vm-alice-12.0-1a2b3c"
    assert facts.cache_hit is False
    assert facts.boot_attempts == 2
    assert facts.payload_signal == 9
    assert facts.snapshot == "/state/snapshots/d/snapshot.qcow2"
    assert facts.timings == timings
    assert facts.guest_hostname is None  # not in the ad: not known


def test_values_of_the_wrong_type_in_an_ad_count_as_absent() -> None:
    facts = AdFacts.from_ad(
        {
            "GliteVmBootAttempts": "2",
            "GliteVmCacheHit": 1,
            "GliteVmDomain": "",
            "GliteVmTimeBoot": float("nan"),
            "GliteVmTimeNoSuchPhase": 1.0,
            "GliteVmPayloadSignal": True,
        }
    )
    assert facts == AdFacts()
