"""Images nobody tuned for glite-vm, through the real service as a job's hook calls it.

``prepare`` of a broken image ends within seconds of the console showing why (the boot
timeout is 120 s here), with the error class and disposition the hook turns into a hold or a
requeue, and leaves no domain, overlay or lease; the event log says what happened to each
attempt. Transient failures are booted again and the ad says how often (GliteVmBootAttempts).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.pressure import Meddler
from tests.service.svc_support import (
    Account,
    ServiceProcess,
    call,
    domains_of,
    events_of,
    job_ad,
    leases_in,
    make_scratch,
    ok,
    stdout_of,
)
from tests.support import truncated_copy

pytestmark = pytest.mark.vm
FAST = 40.0  # a third of the service's boot timeout (120 s)
AGENT_TIMEOUT = 25.0  # GLITE_VM_AGENT_TIMEOUT's default


def prepare_answer(
    service: ServiceProcess, svc_root: Path, who: Account, image: str, name: str
) -> dict[str, Any]:
    scratch = make_scratch(svc_root, who, name)
    return call(service, who, "prepare", job_ad=job_ad(image), scratch_dir=str(scratch))


def assert_nothing_left(svc_root: Path, who: Account) -> None:
    assert domains_of(who) == []
    assert leases_in(svc_root / "state") == []
    assert list((svc_root / "state" / "snapshots").glob("*/overlay.qcow2")) == []


def abandoned_domain(message: str) -> str:
    """The VM a failed prepare's message names (its boot log's directory)."""
    path = message.split("boot log: ", 1)[1].split(maxsplit=1)[0]
    return Path(path).parent.name


@pytest.mark.parametrize(
    ("image", "says"),
    [
        ("test-panic", "its kernel panicked (Attempted to kill init! exitcode=0x00000100)"),
        ("test-nobootloader", "the firmware found nothing to boot on its disk"),
    ],
)
def test_an_image_that_cannot_boot_is_a_hold_within_seconds(
    service: ServiceProcess, svc_root: Path, alice: Account, image: str, says: str
) -> None:
    answer = prepare_answer(service, svc_root, alice, image, f"broken-{image}")
    assert not answer["ok"]
    assert (answer["type"], answer["disposition"]) == ("ImageBootError", "hold"), answer
    assert answer["message"].startswith(f"the image cannot boot: {says}")
    assert "--- from the boot log ---" in answer["message"]
    assert answer["seconds"] < FAST, answer["seconds"]
    assert_nothing_left(svc_root, alice)
    name = abandoned_domain(answer["message"])
    started, abandoned = events_of(svc_root / "state", name)
    assert (started.event, abandoned.event) == ("started", "abandoned")
    assert says in (abandoned.reason or "")
    # the owner may read the boot log that explains it
    log = svc_root / "state" / "snapshots" / name / "boot.log"
    assert log.stat().st_uid == alice.uid


def test_a_guest_without_agent_is_a_hold_after_the_agent_wait(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    answer = prepare_answer(service, svc_root, alice, "test-agentless", "agentless")
    assert (answer["type"], answer["disposition"]) == ("ImageBootError", "hold"), answer
    assert "did not start qemu-guest-agent within 25 s" in answer["message"]
    assert AGENT_TIMEOUT <= answer["seconds"] < AGENT_TIMEOUT + FAST, answer["seconds"]
    assert_nothing_left(svc_root, alice)


def test_an_account_that_cannot_be_made_is_a_hold(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    answer = prepare_answer(service, svc_root, alice, "test-roetc", "roetc")
    assert (answer["type"], answer["disposition"]) == ("GuestUserError", "hold"), answer
    assert "'builder'" in answer["message"] and "Read-only file system" in answer["message"]
    assert answer["seconds"] < FAST
    assert_nothing_left(svc_root, alice)


def test_a_missing_account_is_made_and_the_job_runs_as_it(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    prepared = ok(prepare_answer(service, svc_root, alice, "test-nouser", "nouser"))
    assert prepared["guest_user"] == "glite"
    assert prepared["ad_attributes"]["GliteVmBootAttempts"] == 1
    vm = prepared["vm"]
    result = ok(call(service, alice, "exec", vm=vm, argv=["sh", "-c", "id -u; id -un"]))
    assert stdout_of(result).split() == ["1000", "glite"]
    ok(call(service, alice, "teardown", vm=vm, failed=False))


def test_a_truncated_custom_image_is_refused_before_any_vm(
    service: ServiceProcess, svc_root: Path, alice: Account, guest_dir: Path, custom_images: Path
) -> None:
    cut = truncated_copy(guest_dir / "disk-boot.qcow2", custom_images / "cut.qcow2")
    before = set((svc_root / "state" / "snapshots").iterdir())
    answer = prepare_answer(service, svc_root, alice, cut.as_uri(), "truncated")
    assert (answer["type"], answer["disposition"]) == ("ImageRefusedError", "hold"), answer
    assert "it is damaged (truncated or corrupt)" in answer["message"]
    assert set((svc_root / "state" / "snapshots").iterdir()) == before  # no VM was made
    assert_nothing_left(svc_root, alice)


def test_a_crashed_qemu_is_booted_again_and_the_ad_says_so(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with Meddler(svc_root / "state", "kill", count=1, match=f"-{alice.name}-") as killer:
        answer = prepare_answer(service, svc_root, alice, "test-direct", "retried")
    prepared = ok(answer)
    assert killer.done and not killer.errors, (killer.done, killer.errors)
    (killed,) = killer.done
    assert prepared["vm"] != killed
    assert prepared["ad_attributes"]["GliteVmBootAttempts"] == 2, events_of(
        svc_root / "state", killed
    )
    started, abandoned = events_of(svc_root / "state", killed)
    assert (started.event, abandoned.event) == ("started", "abandoned")
    assert "boot attempt 1 failed: QEMU stopped unexpectedly" in (abandoned.reason or "")
    ok(call(service, alice, "teardown", vm=prepared["vm"], failed=False))
    assert_nothing_left(svc_root, alice)


def test_boot_attempts_are_bounded_then_the_job_is_requeued(
    service: ServiceProcess, svc_root: Path, alice: Account
) -> None:
    with Meddler(svc_root / "state", "kill", count=9, match=f"-{alice.name}-") as killer:
        answer = prepare_answer(service, svc_root, alice, "test-direct", "exhausted")
    assert len(killer.done) == 3, (killer.done, killer.errors, answer)  # the default attempts
    assert (answer["type"], answer["disposition"]) == ("TransientBootError", "requeue"), answer
    assert "(boot attempt 3 of at most 3 on this host)" in answer["message"]
    assert_nothing_left(svc_root, alice)
