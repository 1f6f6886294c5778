"""The VM hostname: from the admin's pattern, or from the job when the site allows it."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glite_vm.config import Settings
from glite_vm.errors import Disposition, RequestError
from glite_vm.identity.errors import IdentityConfigError
from glite_vm.identity.hostname import hostname_from_pattern, resolve_hostname, validate_hostname

# An oracle written from RFC 1123 / RFC 1035, independent of the code under test.
_RFC_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def is_rfc1123(name: str) -> bool:
    labels = name.split(".")
    return (
        0 < len(name) <= 253
        and all(0 < len(label) <= 63 and _RFC_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def site(**overrides: object) -> Settings:
    return Settings.from_strings({}, overrides)


def resolve(settings: Settings, requested: str | None = None, **facts: str) -> str:
    values = {"host": "node1.example.org", "slot": "slot1_2@node1.example.org", "job_id": "123.0"}
    values.update(facts)
    return resolve_hostname(settings, requested=requested, **values)


# -- the admin's pattern ------------------------------------------------------------------------


def test_default_pattern_names_host_and_slot_in_the_hosts_domain() -> None:
    assert resolve(site()) == "node1-slot1-2.example.org"


def test_default_pattern_on_a_host_without_domain_has_no_trailing_dot() -> None:
    assert resolve(site(), host="node1") == "node1-slot1-2"


@pytest.mark.parametrize(
    ("pattern", "job_id", "expected"),
    [
        ("vm-{cluster}-{proc}.{domain}", "123.4", "vm-123-4.example.org"),
        ("vm-{cluster}-{proc}", "schedd.example.org#77.1#1700000000", "vm-77-1"),
        ("vm-{job}.grid.test", "123.0", "vm-123-0.grid.test"),
        ("vm-{job}", "local-abc.def", "vm-local-abc-def"),
        ("{slot}.{fqdn}", "1.0", "slot1-2.node1.example.org"),
        ("{host}", "1.0", "node1"),
        ("VM_{host}", "1.0", "vm-node1"),
    ],
)
def test_pattern_placeholders(pattern: str, job_id: str, expected: str) -> None:
    assert resolve(site(hostname_pattern=pattern), job_id=job_id) == expected


def test_odd_characters_from_the_host_become_hyphens_and_case_folds() -> None:
    name = resolve(site(), host="Node_1.Example.ORG", slot="Slot 3")
    assert name == "node-1-slot-3.example.org"


def test_a_label_too_long_is_cut_but_distinct_values_stay_distinct() -> None:
    long_a = hostname_from_pattern("{job}", host="h", slot="s", job_id="a" * 120 + "x")
    long_b = hostname_from_pattern("{job}", host="h", slot="s", job_id="a" * 120 + "y")
    assert len(long_a) == 63 and len(long_b) == 63
    assert long_a != long_b
    assert is_rfc1123(long_a) and is_rfc1123(long_b)


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("vm-{user}", ["unknown placeholder", "{user}", "{host}"]),
        ("vm-{host.__class__}", ["unknown placeholder"]),
        ("vm-{host!r}", ["unknown placeholder"]),
        ("vm-{0}", ["unknown placeholder"]),
        ("vm-{host", ["unmatched brace"]),
        ("vm-}host", ["unmatched brace"]),
        ("", ["empty"]),
        ("{cluster}", ["all-numeric"]),
        ("-.-", ["empty hostname"]),
        (".".join(["a" * 63] * 5), ["at most 253"]),
    ],
)
def test_bad_patterns_are_the_hosts_fault(pattern: str, words: list[str]) -> None:
    with pytest.raises(IdentityConfigError) as caught:
        resolve(site(hostname_pattern=pattern))
    assert caught.value.disposition is Disposition.REQUEUE
    assert "GLITE_VM_HOSTNAME_PATTERN" in str(caught.value)
    for word in words:
        assert word in str(caught.value)


def test_cluster_placeholder_needs_a_cluster_proc_job_id() -> None:
    with pytest.raises(IdentityConfigError, match=r"no cluster\.proc form"):
        resolve(site(hostname_pattern="vm-{cluster}"), job_id="local-run")


# -- the job's own choice -----------------------------------------------------------------------


def test_job_hostname_is_refused_unless_the_site_allows_it() -> None:
    with pytest.raises(RequestError) as caught:
        resolve(site(), requested="mine.example.org")
    assert caught.value.field == "GliteVmHostname"
    assert caught.value.disposition is Disposition.HOLD
    assert "GLITE_VM_ALLOW_JOB_HOSTNAME" in str(caught.value)


def test_job_hostname_is_used_when_allowed_and_wins_over_the_pattern() -> None:
    assert resolve(site(allow_job_hostname=True), requested="CE01.Example.org") == (
        "ce01.example.org"
    )
    assert resolve(site(allow_job_hostname=True), requested=None) == "node1-slot1-2.example.org"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "-lead.example.org",
        "trail-.example.org",
        "a..b",
        "dot.",
        ".dot",
        "with space",
        "under_score",
        "ümlaut.example.org",
        "a" * 64,
        "1.2.3.4",
        "host.123",
        ".".join(["a" * 63] * 4) + ".ab",
        "line\nbreak",
        "new\n",
        "../etc",
        "a/b",
        "nul\0",
        "*.example.org",
    ],
)
def test_invalid_job_hostnames_hold_the_job_naming_the_field(name: str) -> None:
    with pytest.raises(RequestError) as caught:
        resolve(site(allow_job_hostname=True), requested=name)
    assert caught.value.field == "GliteVmHostname"
    assert caught.value.disposition is Disposition.HOLD
    assert "\n" not in str(caught.value)  # a hold reason is one line


def test_non_string_job_hostname_is_refused() -> None:
    with pytest.raises(RequestError, match="must be a string"):
        resolve(site(allow_job_hostname=True), requested=42)  # type: ignore[arg-type]


def test_site_can_restrict_job_hostnames_to_its_domains() -> None:
    restricted = site(allow_job_hostname=True, job_hostname_domains=("Example.org.", "grid.test"))
    assert resolve(restricted, requested="vm7.example.org") == "vm7.example.org"
    assert resolve(restricted, requested="example.org") == "example.org"
    assert resolve(restricted, requested="a.b.grid.test") == "a.b.grid.test"
    for outside in ("www.cern.ch", "badexample.org", "example.org.evil.com"):
        with pytest.raises(RequestError, match="outside the domains"):
            resolve(restricted, requested=outside)


def test_identity_settings_come_from_knobs() -> None:
    loaded = Settings.load(
        {
            "GLITE_VM_CONFIG": "/nonexistent/glite-vm.toml",
            "GLITE_VM_HOSTNAME_PATTERN": "vm-{job}",
            "GLITE_VM_ALLOW_JOB_HOSTNAME": "yes",
            "GLITE_VM_JOB_HOSTNAME_DOMAINS": "a.org, b.org",
            "GLITE_VM_HOST_CERT_DIR": "/etc/glite-vm/hostcerts",
            "GLITE_VM_CA_CERT": "/etc/glite-vm/ca.pem",
            "GLITE_VM_CA_KEY": "/etc/glite-vm/ca.key",
            "GLITE_VM_HOST_KEY_TYPE": "ec",
            "GLITE_VM_CERT_MARGIN": "600",
            "GLITE_VM_CERT_DEFAULT_RUNTIME": "7200",
            "GLITE_VM_CERT_MAX_LIFETIME": "86400",
        }
    )
    assert loaded.hostname_pattern == "vm-{job}"
    assert loaded.allow_job_hostname is True
    assert loaded.job_hostname_domains == ("a.org", "b.org")
    assert str(loaded.host_cert_dir) == "/etc/glite-vm/hostcerts"
    assert str(loaded.ca_cert) == "/etc/glite-vm/ca.pem"
    assert str(loaded.ca_key) == "/etc/glite-vm/ca.key"
    assert loaded.host_key_type == "ec"
    assert (loaded.cert_margin, loaded.cert_default_runtime, loaded.cert_max_lifetime) == (
        600.0,
        7200.0,
        86400.0,
    )


# -- hostile input ------------------------------------------------------------------------------

_PATTERNS = st.sampled_from(
    [
        "{host}-{slot}.{domain}",
        "vm-{job}",
        "{fqdn}",
        "{slot}.{host}.{domain}",
        "vm{cluster}-{proc}.{domain}",
        "x-{job}-{host}-{slot}",
    ]
)


@settings(max_examples=300)
@given(pattern=_PATTERNS, host=st.text(), slot=st.text(), job_id=st.text())
def test_any_host_slot_and_job_id_give_a_valid_name_or_a_host_error(
    pattern: str, host: str, slot: str, job_id: str
) -> None:
    try:
        name = hostname_from_pattern(pattern, host=host, slot=slot, job_id=job_id)
    except IdentityConfigError as exc:
        assert exc.disposition is Disposition.REQUEUE
        return
    assert is_rfc1123(name), name


@settings(max_examples=200)
@given(cluster=st.integers(0, 10**9), proc=st.integers(0, 10**5))
def test_distinct_jobs_get_distinct_names(cluster: int, proc: int) -> None:
    first = hostname_from_pattern("vm-{job}", host="h", slot="s", job_id=f"{cluster}.{proc}")
    second = hostname_from_pattern("vm-{job}", host="h", slot="s", job_id=f"{cluster}.{proc + 1}")
    assert first != second


@settings(max_examples=500)
@given(requested=st.text() | st.from_regex(r"\A[A-Za-z0-9.-]{1,70}\Z"))
def test_any_requested_name_is_used_exactly_or_refused(requested: str) -> None:
    try:
        name = resolve(site(allow_job_hostname=True), requested=requested)
    except RequestError as exc:
        assert exc.field == "GliteVmHostname"
        assert not is_rfc1123(requested.lower()) or not requested.isascii()
        return
    assert name == requested.lower()
    assert is_rfc1123(name)


_LABELS = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?\Z")


@given(labels=st.lists(_LABELS, min_size=1, max_size=5), tld=st.from_regex(r"\A[a-z]{2,6}\Z"))
def test_every_valid_name_is_accepted_unchanged(labels: list[str], tld: str) -> None:
    name = ".".join([*labels, tld])
    assert validate_hostname(name) == name
