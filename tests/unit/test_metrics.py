"""The service's metrics (glite_vm/service/metrics.py) and their exports (metrics_export.py):
what an admin's Prometheus reads, parsed with prometheus_client's own parser; label values that
stay a fixed set whatever a job sends; settings that refuse what would surprise an admin; a
textfile no local user can redirect; an endpoint a flood of connections cannot swell.

Everything here runs without VMs: the metrics are fed as the engine feeds them, the endpoint is
a real HTTP server on loopback, the textfile a real file with a real planted link.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from glite_vm.config import Settings
from glite_vm.errors import (
    ChecksumMismatchError,
    DownloadError,
    GliteVmError,
    HostError,
    ImageBootError,
    TransientBootError,
    UserError,
)
from glite_vm.knob_values import MetricsAddress
from glite_vm.service.metrics import (
    OWNER_CLASSES,
    VM_STATES,
    ServiceMetrics,
    error_label,
    owner_class,
)
from glite_vm.service.metrics_export import MetricsEndpoint, MetricsExport, write_textfile
from glite_vm.service.reaper import REAP_KINDS

HOSTILE = 'evil"} 1\nglite_vm_boots_total{outcome="ok"} 999\n# \\'


def samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, by name and sorted labels (parsed as Prometheus would)."""
    text = metrics.exposition().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    return samples(metrics)[name, tuple(sorted(labels.items()))]


# -- settings ---------------------------------------------------------------------------------


def test_the_metrics_address_is_a_literal_ip_and_port() -> None:
    s = Settings.from_strings({"metrics_address": "127.0.0.1:9464"})
    assert s.metrics_address == MetricsAddress("127.0.0.1", 9464)
    s6 = Settings.from_strings({"metrics_address": "[::1]:9464"})
    assert s6.metrics_address == MetricsAddress("::1", 9464)
    assert str(s6.metrics_address) == "[::1]:9464"
    assert Settings.from_strings({"metrics_address": "off"}).metrics_address is None
    assert Settings().metrics_address is None and Settings().metrics_textfile is None


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("localhost:9464", "'localhost' is not an IP address (host names are not taken)"),
        ("127.0.0.1", "'127.0.0.1' is not an address and port"),
        ("127.0.0.1:0", "'0' is not a port (1-65535)"),
        ("127.0.0.1:70000", "'70000' is not a port"),
        ("::1:9464", "put an IPv6 address in brackets"),
        ("9464", "is not an address and port"),
    ],
)
def test_a_bad_metrics_address_is_refused_with_the_fix(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="setting GLITE_VM_METRICS_ADDRESS") as info:
        Settings.from_strings({"metrics_address": text})
    assert says in str(info.value)
    assert "'127.0.0.1:9464'" in str(info.value)


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "192.0.2.7:9464", "[::]:9464"])
def test_an_address_beyond_loopback_needs_the_admins_word(address: str) -> None:
    with pytest.raises(ValueError, match="not a loopback address") as info:
        Settings.from_strings({"metrics_address": address})
    assert "GLITE_VM_METRICS_ALLOW_REMOTE = true" in str(info.value)
    allowed = Settings.from_strings({"metrics_address": address, "metrics_allow_remote": "true"})
    assert allowed.metrics_address is not None
    assert not allowed.metrics_address.loopback


@pytest.mark.parametrize(
    "text", ["glite-vm.prom", "/var/lib/node/glite-vm.txt", "/var/lib/node/.glite-vm.prom"]
)
def test_the_textfile_is_an_absolute_prom_file(text: str) -> None:
    with pytest.raises(ValueError, match=r"setting GLITE_VM_METRICS_TEXTFILE: .* ending in \.prom"):
        Settings.from_strings({"metrics_textfile": text})
    ok = Settings.from_strings({"metrics_textfile": "/var/lib/node/glite-vm.prom"})
    assert ok.metrics_textfile == Path("/var/lib/node/glite-vm.prom")


# -- counting ---------------------------------------------------------------------------------


def test_each_service_counts_in_its_own_registry() -> None:
    one, two = ServiceMetrics(), ServiceMetrics()
    one.note_ready(4.0, cache_hit=False)
    assert value(one, "glite_vm_boots_total", outcome="ok") == 1
    assert value(two, "glite_vm_boots_total", outcome="ok") == 0
    # nothing of ours in prometheus_client's process-wide registry
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not {n for n in global_names if n.startswith("glite_vm")}


def test_boots_attempts_and_times_are_counted_by_outcome() -> None:
    m = ServiceMetrics(process=False)
    m.note_boot_attempt("transient")
    m.note_boot_attempt("ok")
    m.note_ready(4.0, cache_hit=True)
    m.note_ready(75.0, cache_hit=False)
    m.note_boot_attempt("failed")
    m.note_boot_failed(ImageBootError("its kernel panicked", "fix the image"))
    m.note_boot_failed(TransientBootError("QEMU crashed"))
    assert value(m, "glite_vm_boots_total", outcome="ok") == 2
    assert value(m, "glite_vm_boots_total", outcome="image_fault") == 1
    assert value(m, "glite_vm_boots_total", outcome="host_fault") == 1
    for outcome, n in (("ok", 1), ("transient", 1), ("failed", 1)):
        assert value(m, "glite_vm_boot_attempts_total", outcome=outcome) == n
    assert value(m, "glite_vm_time_to_ready_seconds_count", cache="hit") == 1
    assert value(m, "glite_vm_time_to_ready_seconds_bucket", cache="hit", le="5.0") == 1
    assert value(m, "glite_vm_time_to_ready_seconds_bucket", cache="miss", le="60.0") == 0
    assert value(m, "glite_vm_time_to_ready_seconds_bucket", cache="miss", le="120.0") == 1
    m.note_teardown(0.4)
    assert value(m, "glite_vm_teardown_seconds_count") == 1
    assert value(m, "glite_vm_teardown_seconds_sum") == pytest.approx(0.4)


def test_calls_holds_and_requeues_are_counted_by_op_and_error_class() -> None:
    m = ServiceMetrics(process=False)
    m.note_call("ping", None)
    m.note_call("prepare", ImageBootError("no agent", "install qemu-guest-agent"))
    m.note_call("prepare", DownloadError("the repository timed out"))
    m.note_call("exec", HostError("the VM was already torn down"))
    m.note_call("no-such-op", HostError("unknown operation"))
    assert value(m, "glite_vm_requests_total", op="ping") == 1
    assert value(m, "glite_vm_requests_total", op="prepare") == 2
    assert value(m, "glite_vm_requests_total", op="invalid") == 1
    assert value(m, "glite_vm_request_errors_total", op="prepare", error="ImageBootError") == 1
    assert value(m, "glite_vm_request_errors_total", op="exec", error="HostError") == 1
    assert value(m, "glite_vm_holds_total", reason="ImageBootError") == 1
    assert value(m, "glite_vm_requeues_total", reason="DownloadError") == 1
    # only a prepare's failure holds or requeues a job
    assert ("glite_vm_requeues_total", (("reason", "HostError"),)) not in samples(m)


def test_the_cache_is_counted_through_its_observer() -> None:
    m = ServiceMetrics(process=False)
    m.note_cache_lookup(hit=True)
    m.note_cache_lookup(hit=False)
    m.received(1000)
    m.download_ended(None)
    m.download_ended(ChecksumMismatchError("debian-12", "a" * 64, "b" * 64))
    m.evicted(300)
    m.evicted(200)
    assert value(m, "glite_vm_cache_hits_total") == 1
    assert value(m, "glite_vm_cache_misses_total") == 1
    assert value(m, "glite_vm_cache_downloaded_bytes_total") == 1000
    assert value(m, "glite_vm_cache_downloads_total", outcome="ok") == 1
    assert value(m, "glite_vm_cache_downloads_total", outcome="ChecksumMismatchError") == 1
    assert value(m, "glite_vm_cache_evictions_total") == 2
    assert value(m, "glite_vm_cache_evicted_bytes_total") == 500


def test_every_reap_kind_is_a_series_from_the_start() -> None:
    m = ServiceMetrics(process=False)
    for kind in REAP_KINDS:
        assert value(m, "glite_vm_reaps_total", reason=kind) == 0
    m.note_reap("starter_gone")
    m.note_reap(HOSTILE)  # a kind the reaper does not know is "other", not a new series
    assert value(m, "glite_vm_reaps_total", reason="starter_gone") == 1
    assert value(m, "glite_vm_reaps_total", reason="other") == 1


class ForeignError(GliteVmError):
    """Not one of glite-vm's own classes (defined outside the package)."""


def test_labels_never_carry_what_a_job_sent() -> None:
    m = ServiceMetrics(process=False)
    m.note_call(HOSTILE, UserError(HOSTILE))
    m.note_call("prepare", UserError(HOSTILE))
    m.note_call("prepare", ForeignError(HOSTILE))
    m.note_call("prepare", ValueError(HOSTILE))
    m.download_ended(RuntimeError(HOSTILE))
    m.note_boot_attempt(HOSTILE)
    text = m.exposition().decode()
    assert "evil" not in text
    assert value(m, "glite_vm_boots_total", outcome="ok") == 0  # the injected line is no sample
    assert value(m, "glite_vm_requests_total", op="invalid") == 1
    assert value(m, "glite_vm_request_errors_total", op="invalid", error="UserError") == 1
    assert value(m, "glite_vm_holds_total", reason="UserError") == 1
    assert value(m, "glite_vm_requeues_total", reason="unexpected") == 2
    assert value(m, "glite_vm_boot_attempts_total", outcome="other") == 1
    assert error_label(ForeignError("x")) == "unexpected"
    assert error_label(KeyError("x")) == "unexpected"
    assert error_label(ImageBootError("p", "f")) == "ImageBootError"
    labels = {v for s in samples(m) for _k, v in s[1] if _k != "le"}
    assert all(v.replace("_", "").replace("-", "").replace(".", "").isalnum() for v in labels)


def test_the_vm_gauge_shows_every_state_and_owner_class() -> None:
    m = ServiceMetrics(process=False)
    vms = [
        ("ready", owner_class(managed=True, root=False)),
        ("ready", owner_class(managed=True, root=False)),
        ("booting", owner_class(managed=True, root=True)),
        ("preparing", owner_class(managed=False, root=True)),
    ]
    m.watch_vms(lambda: vms)
    got = {
        (dict(k[1])["state"], dict(k[1])["owner_class"]): v
        for k, v in samples(m).items()
        if k[0] == "glite_vm_vms"
    }
    assert set(got) == {(s, o) for s in VM_STATES for o in OWNER_CLASSES}
    assert got["ready", "user-job"] == 2
    assert got["booting", "root-job"] == 1
    assert got["preparing", "unmanaged"] == 1  # no root outside HTCondor: unmanaged it is
    assert sum(got.values()) == 4
    vms.clear()
    assert value(m, "glite_vm_vms", state="ready", owner_class="user-job") == 0
    with pytest.raises(ValueError, match="already watch"):
        m.watch_vms(list)


def test_a_failing_vm_source_costs_the_gauge_not_the_scrape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> list[tuple[str, str]]:
        raise RuntimeError("a record without its request")

    m = ServiceMetrics(process=False)
    m.watch_vms(broken)
    with caplog.at_level(logging.ERROR):
        got = samples(m)
    assert ("glite_vm_boots_total", (("outcome", "ok"),)) in got
    assert not [k for k in got if k[0] == "glite_vm_vms"]
    assert "cannot count the VMs" in caplog.text


def test_the_service_process_itself_is_measured() -> None:
    got = samples(ServiceMetrics())
    assert got["glite_vm_process_resident_memory_bytes", ()] > 0
    (version,) = [dict(k[1])["version"] for k in got if k[0] == "glite_vm_build_info"]
    assert version


# -- the textfile -----------------------------------------------------------------------------


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_the_textfile_is_replaced_whole_with_mode_0644(tmp_path: Path) -> None:
    path = tmp_path / "glite-vm.prom"
    path.write_text("old\n")
    old_inode = path.stat().st_ino
    with umask(0o077):
        write_textfile(path, b"glite_vm_x 1\n")
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    assert st.st_uid == os.geteuid()
    assert st.st_ino != old_inode  # a new file renamed over the old: a reader sees either whole
    assert path.read_bytes() == b"glite_vm_x 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["glite-vm.prom"]


def test_a_link_planted_at_the_textfile_is_replaced_not_followed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    canary.write_bytes(b"CANARY\n")
    canary.chmod(0o600)
    textdir = tmp_path / "textfiles"
    textdir.mkdir(mode=0o1777)
    textdir.chmod(0o1777)  # a directory local users may write (sticky, like /tmp)
    path = textdir / "glite-vm.prom"
    path.symlink_to(canary)
    write_textfile(path, b"glite_vm_x 1\n")
    assert canary.read_bytes() == b"CANARY\n"
    assert stat.S_IMODE(canary.stat().st_mode) == 0o600
    assert not path.is_symlink() and path.read_bytes() == b"glite_vm_x 1\n"
    assert [p.name for p in textdir.iterdir()] == ["glite-vm.prom"]


def test_a_link_at_a_guessed_temporary_name_leads_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prometheus_client's own writer uses ``<path>.<pid>.<thread>`` and opens it following
    links; ours is random, and even guessed, it is created only if nothing is there."""
    canary = tmp_path / "canary"
    canary.write_bytes(b"CANARY\n")
    path = tmp_path / "glite-vm.prom"
    path.write_bytes(b"before\n")
    monkeypatch.setattr(secrets, "token_hex", lambda _n: "0" * 16)
    guessed = tmp_path / ".glite-vm.prom.0000000000000000.tmp"
    guessed.symlink_to(canary)
    with pytest.raises(FileExistsError):
        write_textfile(path, b"glite_vm_x 1\n")
    assert canary.read_bytes() == b"CANARY\n"
    assert path.read_bytes() == b"before\n"
    assert guessed.is_symlink()  # not ours to remove


def test_an_unwritable_textfile_is_logged_once_and_never_raises(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "glite-vm.prom"
    path.mkdir()  # a directory where the file should be: rename cannot replace it
    export = MetricsExport(Settings(metrics_textfile=path), ServiceMetrics(process=False))
    with caplog.at_level(logging.INFO, logger="glite_vm.service.metrics_export"):
        export.write()
        export.write()
        assert caplog.text.count("cannot write the metrics to") == 1
        assert "GLITE_VM_METRICS_TEXTFILE" in caplog.text
        assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
        path.rmdir()
        export.write()
        assert "writing metrics to" in caplog.text and path.is_file()


# -- the endpoint -----------------------------------------------------------------------------


@contextlib.contextmanager
def endpoint(
    metrics: ServiceMetrics, *, max_clients: int = 8, client_timeout: float = 10.0
) -> Iterator[MetricsEndpoint]:
    """An endpoint on a free loopback port (port 0: only code, never a setting, asks that)."""
    ep = MetricsEndpoint(
        metrics,
        MetricsAddress("127.0.0.1", 0),
        max_clients=max_clients,
        client_timeout=client_timeout,
    )
    ep.start()
    try:
        yield ep
    finally:
        ep.stop()


def scrape(port: int, timeout: float = 5.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_the_endpoint_serves_the_exposition_on_loopback() -> None:
    m = ServiceMetrics(process=False)
    m.note_ready(3.0, cache_hit=True)
    with endpoint(m) as ep:
        port = ep.port
        status, text = scrape(port)
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    (ok,) = [s for s in families["glite_vm_boots"].samples if s.labels == {"outcome": "ok"}]
    assert ok.value == 1
    with pytest.raises(OSError):
        scrape(port, timeout=2.0)  # stopped: nothing listens any more


def test_the_endpoint_serves_on_ipv6_loopback_too() -> None:
    ep = MetricsEndpoint(ServiceMetrics(process=False), MetricsAddress("::1", 0))
    ep.start()
    try:
        conn = http.client.HTTPConnection("::1", ep.port, timeout=5)
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200 and b"glite_vm_boots_total" in response.read()
        conn.close()
        with pytest.raises(OSError):  # bound to ::1 only, not to IPv4 loopback
            scrape(ep.port, timeout=2.0)
    finally:
        ep.stop()


def test_an_address_in_use_is_a_clear_error() -> None:
    m = ServiceMetrics(process=False)
    with endpoint(m) as first:
        second = MetricsEndpoint(m, MetricsAddress("127.0.0.1", first.port))
        with pytest.raises(HostError, match=r"cannot serve metrics at 127\.0\.0\.1:\d+ \(GLITE_"):
            second.start()


def test_a_flood_of_idle_connections_holds_a_few_threads_for_a_while() -> None:
    m = ServiceMetrics(process=False)
    with endpoint(m, max_clients=4, client_timeout=1.0) as ep:
        before = threading.active_count()
        flood = []
        try:
            for _ in range(60):
                flood.append(socket.create_connection(("127.0.0.1", ep.port), timeout=5))
            time.sleep(0.5)  # let the server accept them all
            assert threading.active_count() - before <= 4
            # the idle ones are dropped: scrapes get through again without closing the flood
            deadline = time.monotonic() + 20
            while True:
                try:
                    status, _text = scrape(ep.port, timeout=3.0)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the endpoint never answered again"
                    time.sleep(0.2)
            assert status == 200
        finally:
            for s in flood:
                s.close()


# -- the docs ---------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def exported_names() -> set[str]:
    """Every sample name the service can export (each labelled metric fed once); not the
    ``*_created`` ones, which ``glite-vm serve`` turns off for its process."""
    m = ServiceMetrics()
    m.watch_vms(list)
    m.note_call("prepare", UserError("held"))
    m.note_call("prepare", HostError("requeued"))
    m.download_ended(DownloadError("gone"))
    text = m.exposition().decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return {n for n in names if not n.endswith("_created")}


def test_the_grafana_dashboard_draws_only_what_the_service_exports() -> None:
    dashboard = json.loads((REPO / "docs" / "grafana-glite-vm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    used = set(re.findall(r"\bglite_vm_[a-z_]+", json.dumps(dashboard)))
    assert used <= exported_names(), used - exported_names()
    families = {n for n in exported_names() if not n.startswith("glite_vm_process_")}
    drawn = {n.removesuffix("_bucket") for n in used}
    for name in families:  # every metric has its panel (histograms by their buckets)
        base = name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        assert base in drawn or name in drawn, name


def test_the_admin_guide_lists_what_the_service_exports() -> None:
    guide = (REPO / "docs" / "admin.md").read_text()
    section = guide.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(glite_vm_[a-z_]+)`", section))
    exported = exported_names()
    histograms = {n.removesuffix("_count") for n in exported if n.endswith("_count")}
    assert listed <= exported | histograms | {"glite_vm_process_"}, listed - exported
    bases = {
        n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        for n in exported
        if not n.startswith("glite_vm_process_")
    }
    assert bases <= listed | histograms, bases - listed
