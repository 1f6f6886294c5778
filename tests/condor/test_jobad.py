"""Job ad -> VMRequest, and the lines the hooks print (pure; no daemons)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import classad2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glite_vm.condor.jobad import (
    HOLD_CODES,
    HOST_FAILURES_HOLD_CODE,
    MAX_HISTORY,
    ad_safe_text,
    append_host_failure,
    chirp_literal,
    format_ad_updates,
    hook_status_lines,
    host_failure_count,
    host_failure_history,
    request_from_job_ad,
    status_code,
    v2_quote,
)
from glite_vm.condor.payload import split_v2_arguments
from glite_vm.config import Settings
from glite_vm.errors import (
    BootError,
    ChecksumMismatchError,
    Disposition,
    GliteVmError,
    GuestUserError,
    ImageBootError,
    ImageRefusedError,
    RequestError,
    RootNotPermittedError,
    ServiceUnavailableError,
    TransientBootError,
)
from glite_vm.request import JobRequest, KeepSnapshot, VMRequest
from glite_vm.slots import SlotFacts
from glite_vm.units import GIB, MIB
from tests.support import sized

SETTINGS = Settings(max_cpus=8, max_memory_mib=16384, max_disk_bytes=100 * GIB)
SLOT = SlotFacts(root_enabled=False, cpus=1, memory_mib=2048, disk_kib=30 * GIB // 1024)
ROOT_SLOT = SlotFacts(root_enabled=True, cpus=1, memory_mib=2048, disk_kib=30 * GIB // 1024)
NO_FACTS = SlotFacts()

# What the starter hands PREPARE_JOB on stdin (trimmed from a real 25.0.13 job ad).
STARTER_AD = """\
ClusterId = 12
ProcId = 3
Owner = "alice"
User = "alice@personal.local"
Cmd = "/bin/echo"
GliteVmImage = "debian-12"
GliteVmImageSha256 = "{sha}"
GliteVmKeepSnapshot = "always"
DiskUsage = 45
RequestCpus = 1
RequestDisk = DiskUsage
RequestMemory = ifthenelse(MemoryUsage =!= undefined,MemoryUsage,(ImageSize + 1023) / 1024)
ImageSize = 45
NumVacatesByReason = [ StarterError = 2; FailedToActivateClaim = 2 ]
NumJobStarts = 0
""".format(sha="ab" * 32)


def job(**attrs: object) -> dict[str, object]:
    ad: dict[str, object] = {
        "ClusterId": 12,
        "ProcId": 3,
        "Owner": "alice",
        "GliteVmImage": "debian-12",
    }
    ad.update(attrs)
    return {k: v for k, v in ad.items() if v is not None}


def parsed(text: str) -> object:
    return classad2.parseOne(text, classad2.ParserType.Old)


def hold_error(ad: object, slot: SlotFacts = SLOT, cfg: Settings = SETTINGS) -> GliteVmError:
    with pytest.raises(GliteVmError) as info:
        sized(ad, slot, cfg)
    assert info.value.disposition is Disposition.HOLD, info.value
    return info.value


# --- mapping ---------------------------------------------------------------------------------


def test_a_starter_ad_becomes_the_slots_vm() -> None:
    r = sized(parsed(STARTER_AD), SLOT, SETTINGS)
    assert r == VMRequest(
        image="debian-12",
        cpus=1,
        memory_mib=2048,
        disk_bytes=30 * GIB,
        root=False,
        keep_snapshot=KeepSnapshot.ALWAYS,
        job_id="12.3",
        owner="alice",
        image_sha256="ab" * 32,
    )


def test_without_slot_facts_the_request_counts_and_request_disk_is_kib() -> None:
    ad = job(RequestCpus=2, RequestMemory=4096, RequestDisk=2 * 1024 * 1024)
    r = sized(ad, NO_FACTS, SETTINGS)
    assert (r.cpus, r.memory_mib, r.disk_bytes) == (2, 4096, 2 * GIB)


def test_without_request_or_slot_the_settings_defaults_apply() -> None:
    r = sized(job(), NO_FACTS, SETTINGS)
    sizes = (r.cpus, r.memory_mib, r.disk_bytes)
    assert sizes == (
        SETTINGS.default_cpus,
        SETTINGS.default_memory_mib,
        SETTINGS.default_disk_bytes,
    )


def test_size_expressions_are_evaluated_in_the_ad() -> None:
    ad = parsed(
        'ClusterId = 1\nProcId = 0\nOwner = "bob"\nGliteVmImage = "centos-7"\n'
        "Base = 512\nRequestMemory = Base * 2\nRequestDisk = 1024 * 1024\nRequestCpus = 1 + 1\n"
    )
    r = sized(ad, NO_FACTS, SETTINGS)
    assert (r.cpus, r.memory_mib, r.disk_bytes) == (2, 1024, GIB)


def test_mapping_values_may_be_expressions_and_names_any_case() -> None:
    ad: dict[str, object] = {"clusterid": 4, "PROCID": 0, "owner": "bob", "glitevmimage": "x"}
    ad["RequestMemory"] = classad2.ExprTree("Base * 2")
    ad["Base"] = 300
    r = sized(ad, NO_FACTS, SETTINGS)
    assert (r.job_id, r.owner, r.memory_mib) == ("4.0", "bob", 600)


def test_a_job_may_ask_for_a_network_the_site_offers_and_is_held_otherwise() -> None:
    assert sized(job(), SLOT, SETTINGS).network == "none"  # the host's default
    offering = dataclasses.replace(SETTINGS, network="none", job_networks=("user", "build"))
    assert sized(job(GliteVmNetwork="user"), SLOT, offering).network == "user"
    error = hold_error(job(GliteVmNetwork="internet"), SLOT, offering)
    assert isinstance(error, RequestError) and error.field == "GliteVmNetwork"
    assert "'internet' is not offered here" in str(error)
    assert "'none', 'user', 'build'" in str(error)  # the hold reason lists what may be asked
    assert status_code(error) == HOLD_CODES[RequestError]
    for ad, cfg in (
        (job(GliteVmNetwork="user"), SETTINGS),  # the default site offers no other network
        (job(GliteVmNetwork=True), offering),
        (job(GliteVmNetwork="a b"), offering),
    ):
        held = hold_error(ad, SLOT, cfg)
        assert isinstance(held, RequestError) and held.field == "GliteVmNetwork", held


def test_owner_falls_back_to_user() -> None:
    r = sized(job(Owner=None, User="carol@example.org"), SLOT, SETTINGS)
    assert r.owner == "carol"


@pytest.mark.parametrize(
    ("attrs", "field"),
    [
        ({"RequestMemory": 4096}, "RequestMemory"),
        ({"RequestCpus": 2}, "RequestCpus"),
        ({"RequestDisk": 31 * 1024 * 1024}, "RequestDisk"),
    ],
)
def test_a_request_larger_than_the_slot_holds(attrs: dict[str, object], field: str) -> None:
    err = hold_error(job(**attrs))
    assert isinstance(err, RequestError)
    assert err.field == field
    assert "this slot offers" in str(err)


def test_missing_image_uses_the_default_or_holds_with_a_fix() -> None:
    with_default = Settings(default_image="debian-12")
    assert sized(job(GliteVmImage=None), SLOT, with_default).image == "debian-12"
    err = hold_error(job(GliteVmImage=None))
    assert isinstance(err, RequestError)
    assert err.field == "GliteVmImage"
    assert "GLITE_VM_DEFAULT_IMAGE" in str(err)
    assert "+GliteVmImage" in str(err)


# --- root ------------------------------------------------------------------------------------


def test_root_needs_a_root_enabled_slot() -> None:
    assert sized(job(GliteVmRoot=True), ROOT_SLOT, SETTINGS).root is True
    err = hold_error(job(GliteVmRoot=True), SLOT)
    assert isinstance(err, RootNotPermittedError)
    assert "not root-enabled" in str(err)
    assert isinstance(hold_error(job(GliteVmRoot=True), NO_FACTS), RootNotPermittedError)


def test_root_users_restrict_who_may_ask_for_root() -> None:
    policy = Settings(root_users=("alice", "dave"))
    assert sized(job(GliteVmRoot=True), ROOT_SLOT, policy).root is True
    err = hold_error(job(GliteVmRoot=True, Owner="bob"), ROOT_SLOT, policy)
    assert isinstance(err, RootNotPermittedError)
    assert "'bob'" in str(err)
    assert "GLITE_VM_ROOT_USERS" in str(err)
    # GliteVmRoot = False is no request for root, whoever asks
    assert sized(job(GliteVmRoot=False, Owner="bob"), SLOT, policy).root is False


@pytest.mark.parametrize(
    "text",
    ['GliteVmRoot = "True"', "GliteVmRoot = 1", "GliteVmRoot = 1 == 1", "GliteVmRoot = !false"],
)
def test_root_must_be_a_literal_boolean(text: str) -> None:
    ad = parsed(f'ClusterId = 1\nProcId = 0\nOwner = "alice"\nGliteVmImage = "x"\n{text}\n')
    err = hold_error(ad, ROOT_SLOT)
    assert isinstance(err, RequestError)
    assert err.field == "GliteVmRoot"


# --- hostile values ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "field"),
    [
        ({"RequestCpus": 0}, "RequestCpus"),
        ({"RequestCpus": -1}, "RequestCpus"),
        ({"RequestCpus": 1.5}, "RequestCpus"),
        ({"RequestCpus": "1"}, "RequestCpus"),
        ({"RequestCpus": True}, "RequestCpus"),
        ({"RequestMemory": 0}, "RequestMemory"),
        ({"RequestMemory": float("inf")}, "RequestMemory"),
        ({"RequestMemory": float("nan")}, "RequestMemory"),
        ({"RequestMemory": classad2.ExprTree("1/0")}, "RequestMemory"),
        ({"RequestMemory": classad2.ExprTree('strcat("a", "b")')}, "RequestMemory"),
        ({"RequestDisk": -5}, "RequestDisk"),
        ({"RequestDisk": 10**30}, "RequestDisk"),
        ({"GliteVmImage": "../etc/passwd"}, "GliteVmImage"),
        ({"GliteVmImage": "a\x00b"}, "GliteVmImage"),
        ({"GliteVmImage": "x" * 5000}, "GliteVmImage"),
        ({"GliteVmImage": "débian-12"}, "GliteVmImage"),
        ({"GliteVmImage": " debian-12"}, "GliteVmImage"),
        ({"GliteVmImage": classad2.ExprTree('strcat("deb", "ian")')}, "GliteVmImage"),
        ({"GliteVmImage": 12}, "GliteVmImage"),
        ({"GliteVmImageSha256": "not-hex"}, "GliteVmImageSha256"),
        ({"GliteVmKeepSnapshot": "sometimes"}, "GliteVmKeepSnapshot"),
        ({"GliteVmKeepSnapshot": True}, "GliteVmKeepSnapshot"),
        ({"Owner": "../root"}, "Owner"),
        ({"Owner": "a" * 100}, "Owner"),
        ({"Owner": None}, "Owner"),
        ({"ClusterId": None}, "ClusterId"),
        ({"ClusterId": -1}, "ClusterId"),
        ({"ProcId": "0"}, "ProcId"),
        ({"GliteVmDebugHold": -1}, "GliteVmDebugHold"),
        ({"GliteVmDebugHold": 1.5}, "GliteVmDebugHold"),
        ({"GliteVmDebugHold": "600"}, "GliteVmDebugHold"),
        ({"GliteVmDebugHold": True}, "GliteVmDebugHold"),
        ({"GliteVmDebugHold": 10**12}, "GliteVmDebugHold"),
        ({"GliteVmDebugHold": classad2.ExprTree("60 * 10")}, "GliteVmDebugHold"),
    ],
)
def test_hostile_values_hold_and_name_the_field(attrs: dict[str, object], field: str) -> None:
    err = hold_error(job(**attrs), NO_FACTS)
    assert isinstance(err, RequestError)
    assert err.field == field
    assert str(err).startswith(f"{field}:")


@pytest.mark.parametrize(
    "image", ["/etc/shadow", "file:///etc/shadow", "https://evil.example/x.qcow2"]
)
def test_host_paths_and_unlisted_urls_are_refused(image: str) -> None:
    assert isinstance(hold_error(job(GliteVmImage=image)), ImageRefusedError)


def test_job_chosen_hostname_follows_the_site_policy() -> None:
    allowed = Settings(allow_job_hostname=True)
    r = sized(job(GliteVmHostname="Build-1.example.org"), SLOT, allowed)
    assert r.hostname == "build-1.example.org"
    for cfg, name in ((SETTINGS, "build-1.example.org"), (allowed, "a..b"), (allowed, "ü.de")):
        err = hold_error(job(GliteVmHostname=name), SLOT, cfg)
        assert isinstance(err, RequestError)
        assert err.field == "GliteVmHostname"


def test_the_hook_checks_the_form_and_leaves_the_sites_rules_to_the_service() -> None:
    """The hook may not see every setting of the service (the service's own environment, say):
    a custom image, a chosen hostname and a network the hook's settings know nothing of pass
    the hook and meet the service's rules there; malformed values are still held at once."""
    hook = Settings()  # no custom sources, no job hostnames, no job networks
    asked = job(
        GliteVmImage="https://images.example.org/x.qcow2",
        GliteVmHostname="Build-1.example.org",
        GliteVmNetwork="user",
    )
    request = request_from_job_ad(asked, hook, site_policy=False)
    assert (request.image, request.hostname, request.network) == (
        "https://images.example.org/x.qcow2",
        "build-1.example.org",
        "user",
    )
    service = Settings(custom_image_sources=("https://images.example.org/",))
    with pytest.raises(RequestError) as refused:  # the service's rules: no job hostnames here
        JobRequest.from_wire(request.to_wire(), service)
    assert refused.value.field == "GliteVmHostname"
    for bad in ({"GliteVmHostname": "a..b"}, {"GliteVmNetwork": "no spaces"}):
        with pytest.raises(RequestError):
            request_from_job_ad(job(**bad), hook, site_policy=False)
    with pytest.raises(ImageRefusedError):  # with the rules, as the service applies them
        request_from_job_ad(asked, hook)


_EXPRESSIONS = [
    "1/0",
    "undefined",
    "error",
    "1 == 1",
    "{1, 2}",
    "[a = 1]",
    "TARGET.Memory",
    "MemoryUsage",
    'strcat("a", "b")',
    "RequestMemory",
    'real("NaN")',
    "9223372036854775807 + 1",
    "2147483648 * 4096",
]
_PLAIN = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=300),
    st.sampled_from(["debian-12", "../x", "a/b", "https://h/x", "always", "ab" * 32, "alice"]),
    st.builds(classad2.ExprTree, st.sampled_from(_EXPRESSIONS)),
)
_FIELDS = [
    "ClusterId",
    "ProcId",
    "Owner",
    "User",
    "GliteVmImage",
    "GliteVmImageSha256",
    "GliteVmRoot",
    "GliteVmKeepSnapshot",
    "GliteVmHostname",
    "RequestCpus",
    "RequestMemory",
    "RequestDisk",
    "MemoryUsage",
]


def _check_outcome(ad: object, slot: SlotFacts, cfg: Settings) -> None:
    try:
        r = sized(ad, slot, cfg)
    except GliteVmError as exc:
        assert exc.disposition is Disposition.HOLD, exc
        assert str(exc)
        return
    assert 1 <= r.cpus <= cfg.max_cpus
    assert 64 <= r.memory_mib <= cfg.max_memory_mib
    assert 64 * MIB <= r.disk_bytes <= cfg.max_disk_bytes
    assert not r.root or slot.root_enabled


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.fixed_dictionaries({}, optional=dict.fromkeys(_FIELDS, _PLAIN)),
    slot=st.sampled_from([SLOT, ROOT_SLOT, NO_FACTS]),
    cfg=st.sampled_from([SETTINGS, Settings(root_users=("alice",), allow_job_hostname=True)]),
)
def test_any_mapping_gives_a_request_or_a_hold(
    values: dict[str, object], slot: SlotFacts, cfg: Settings
) -> None:
    _check_outcome(job(**values), slot, cfg)
    _check_outcome(values, slot, cfg)


def _classad_text(value: object) -> str | None:
    """``value`` as ClassAd source, or None where a ClassAd cannot hold it."""
    if isinstance(value, classad2.ExprTree):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if -(2**63) <= value < 2**63 else None
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    if isinstance(value, str):
        return None if "\0" in value else str(classad2.quote(value))
    return None


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.fixed_dictionaries({}, optional=dict.fromkeys(_FIELDS, _PLAIN)),
    slot=st.sampled_from([SLOT, ROOT_SLOT, NO_FACTS]),
)
def test_any_classad_gives_a_request_or_a_hold(values: dict[str, object], slot: SlotFacts) -> None:
    ad = classad2.ClassAd()
    for name, value in job(**values).items():
        text = _classad_text(value)
        if text is not None:
            ad[name] = classad2.ExprTree(text)
    _check_outcome(ad, slot, SETTINGS)


def _outcome(ad: object, slot: SlotFacts) -> object:
    try:
        return sized(ad, slot, SETTINGS)
    except GliteVmError as exc:
        return (type(exc), str(exc))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.fixed_dictionaries({}, optional=dict.fromkeys(_FIELDS, _PLAIN)))
def test_a_request_travels_to_the_service_unchanged(values: dict[str, object]) -> None:
    """What the hook makes of an ad is what the service gets back from the wire (the service
    validates it again, with the same settings here: the same request)."""
    try:
        request = request_from_job_ad(job(**values), SETTINGS)
    except GliteVmError:
        return
    wire = json.loads(json.dumps(request.to_wire()))
    assert JobRequest.from_wire(wire, SETTINGS) == request


# --- hook status lines -----------------------------------------------------------------------


def status(lines: list[str]) -> tuple[int, str]:
    """What the starter makes of the lines (old-ClassAd line format)."""
    ad = parsed("\n".join(lines) + "\n")
    assert set(ad) == {"HookStatusCode", "HookStatusMessage"}  # type: ignore[call-overload]
    return ad["HookStatusCode"], ad["HookStatusMessage"]  # type: ignore[index]


def test_user_errors_hold_with_their_message() -> None:
    err = RequestError("GliteVmImage", 'bad "name"\nwith a \\ backslash')
    code, message = status(hook_status_lines(err, 0, 3))
    assert code == 10
    assert message == 'GliteVmImage: bad "name" | with a \\ backslash'
    code, _ = status(hook_status_lines(ChecksumMismatchError("u", "a", "b"), 5, 3))
    assert code == 12


def test_host_errors_requeue_until_the_limit_then_hold_with_all_reasons() -> None:
    boot = BootError("the guest agent did not answer within 300 s")
    code, message = status(hook_status_lines(boot, 0, 3))
    assert code == 305
    assert message.startswith("host failure 1 of at most 3, the job goes back to the queue: ")
    assert status(hook_status_lines(boot, 1, 3))[0] == 305
    code, message = status(hook_status_lines(boot, 2, 3, "hostA: libvirt down"))
    assert code == HOST_FAILURES_HOLD_CODE
    assert "held after 3 host failures" in message
    assert "last: the guest agent did not answer" in message
    assert "earlier: hostA: libvirt down" in message
    # 0 means never hold for host errors
    assert status(hook_status_lines(ServiceUnavailableError("slow"), 99, 0))[0] == 307


def test_unexpected_exceptions_requeue_as_internal_errors() -> None:
    code, message = status(hook_status_lines(KeyError("x"), 0, 3))
    assert code == 399
    assert "internal error in glite-vm: KeyError" in message
    assert status_code(GliteVmError("generic")) == 300


def test_status_codes_stay_in_their_ranges() -> None:
    for err in (RequestError("f", "p"), RootNotPermittedError("no"), ImageRefusedError("s", "r")):
        assert 1 <= status_code(err) <= 299
    assert status_code(BootError("b")) >= 300


def test_an_image_that_cannot_boot_is_held_and_a_transient_boot_failure_requeued() -> None:
    image = ImageBootError("its kernel panicked (x)", "fix the kernel", Path("/v/boot.log"))
    code, message = status(hook_status_lines(image, 0, 3))
    assert code == 16
    assert message.startswith("the image cannot boot: its kernel panicked (x); fix the kernel")
    code, message = status(hook_status_lines(GuestUserError("builder", "read-only /etc"), 0, 3))
    assert code == 17
    assert "'builder'" in message and "read-only /etc" in message
    code, message = status(hook_status_lines(TransientBootError("QEMU stopped"), 0, 3))
    assert code == 308
    assert message.startswith("host failure 1 of at most 3, the job goes back to the queue: ")


def test_host_failures_are_counted_from_num_vacates_by_reason() -> None:
    assert host_failure_count(parsed(STARTER_AD)) == 2  # type: ignore[arg-type]
    assert host_failure_count({"NumVacatesByReason": {"StarterError": 1}}) == 1
    assert host_failure_count({}) == 0
    assert host_failure_count({"NumVacatesByReason": "lots"}) == 0
    assert host_failure_count({"NumVacatesByReason": {"StarterError": -4}}) == 0


def test_the_failure_history_accumulates_and_stays_bounded() -> None:
    assert host_failure_history({}) == ""
    history = append_host_failure("", "hostA: boot\ntimeout")
    assert history == "hostA: boot | timeout"
    history = append_host_failure(history, "hostB: libvirt down")
    assert host_failure_history({"GliteVmHostFailures": history}) == (
        "hostA: boot | timeout || hostB: libvirt down"
    )
    for i in range(200):
        history = append_host_failure(history, f"host{i}: " + "x" * 50)
    assert len(history) == MAX_HISTORY
    assert history.endswith("x" * 50)


# --- formatting values -----------------------------------------------------------------------

TRICKY = ['q"uote', "back\\slash", 'in\\"side', "tab\there", "é ü", "\x01\x7f", "tail\\", ""]


@pytest.mark.parametrize("text", TRICKY)
def test_ad_updates_keep_every_character_for_the_starter(text: str) -> None:
    (line,) = format_ad_updates({"GliteVmNote": text}).split("\n")[:-1]
    assert line.startswith("GliteVmNote = ")
    assert parsed(line + "\n")["GliteVmNote"] == text  # type: ignore[index]


_ONE_LINE = st.text().filter(lambda s: not {"\n", "\r", "\0"} & set(s))


@given(_ONE_LINE)
def test_any_one_line_string_survives_the_ad_update_format(text: str) -> None:
    assert parsed(format_ad_updates({"X": text}))["X"] == text  # type: ignore[index]


@pytest.mark.parametrize("text", ["two\nlines", "cr\rhere", "nul\0"])
def test_strings_the_line_format_cannot_carry_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        format_ad_updates({"X": text})


def test_ad_updates_write_typed_literals_and_refuse_what_ads_cannot_hold() -> None:
    text = format_ad_updates(
        {"A": True, "B": 7, "C": 1.25, "D": Path("/var/lib/glite-vm/boot.log"), "E": False}
    )
    assert text == 'A = true\nB = 7\nC = 1.25\nD = "/var/lib/glite-vm/boot.log"\nE = false\n'
    for bad in ({"not a name": 1}, {"X": "nul\0"}, {"X": float("nan")}, {"X": 2**64}):
        with pytest.raises(ValueError):
            format_ad_updates(bad)


@given(st.text(max_size=3000))
def test_chirp_literals_carry_the_safe_text(text: str) -> None:
    assert parsed(f"A = {chirp_literal(text)}\n")["A"] == ad_safe_text(text, MAX_HISTORY)  # type: ignore[index]


def test_ad_safe_text_is_one_line_without_control_characters() -> None:
    assert ad_safe_text('a "b"\\c\r\n\n\td\x00é') == 'a "b"\\c | d?é'
    # what a hostile guest's stderr may hold: escapes of 7 and 8 bits, DEL, separators
    # (NEL and the line separator end lines; a no-break space is no blank a reader can see)
    assert ad_safe_text("\x1b[2J\x9b31m\x7f\x85a\u2028b\u00a0c") == "?[2J?31m? | a | b?c"
    # bidi overrides and zero-width characters would make a reason read other than it is
    assert ad_safe_text("ok\u202egnp.exe\u200b") == "ok?gnp.exe?"
    assert ad_safe_text("x" * 50, 10) == "xxxxxxx..."
    assert chirp_literal(3) == "3"
    assert chirp_literal(Path("/p q")) == '"/p q"'


@given(st.lists(st.text(st.characters(blacklist_characters="\x00"))))
def test_v2_quoting_round_trips_through_the_launchers_reader(words: list[str]) -> None:
    assert split_v2_arguments(v2_quote(words)) == words


def test_a_debug_hold_is_read_from_the_ad_in_seconds_and_travels_to_the_service() -> None:
    from glite_vm.condor.jobad import request_from_job_ad  # noqa: PLC0415

    request = request_from_job_ad(job(GliteVmDebugHold=1800), SETTINGS, site_policy=False)
    assert request.debug_hold == 1800
    # the service reads it back from the wire, and a job without one sends nothing new
    assert JobRequest.from_wire(request.to_wire(), SETTINGS).debug_hold == 1800
    plain = request_from_job_ad(job(), SETTINGS, site_policy=False)
    assert plain.debug_hold is None
    assert "debug_hold" not in plain.to_wire()
    zero = request_from_job_ad(job(GliteVmDebugHold=0), SETTINGS, site_policy=False)
    assert zero.debug_hold is None
