"""The service's Prometheus metrics, from a real ``glite-vm serve`` running real VMs.

One service (its own state, the three slots of the trust-boundary tests) serves its metrics on
a loopback port and writes them to a node_exporter textfile in a directory gvm-alice owns,
where she plants links to a root-only canary. Jobs run as gvm-alice: one under a stand-in for
condor_starter whose image boots (a user job), one whose image panics (held). The tests read
the endpoint and the textfile as Prometheus would (prometheus_client's parser, and Debian's
``promtool check metrics``), and Debian's real ``prometheus`` server scrapes the service while
jobs run and answers PromQL about them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import math
import os
import secrets
import shutil
import socket
import stat
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from glite_vm.condor.jobad import request_from_job_ad
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError
from glite_vm.service import protocol
from tests.service.conftest import REAP_INTERVAL, check_nothing_left, new_state_dir, service_env
from tests.service.svc_support import (
    THREE_SLOTS,
    USER_SLOT,
    Account,
    FakeStarter,
    ServiceProcess,
    as_user,
    call,
    job_ad,
    make_scratch,
    ok,
    run_as,
    wait_for,
)

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parents[2]

#: Text a job or a caller controls, made to break an exposition that took it as a label value.
HOSTILE = 'evil"} 1\nglite_vm_boots_total{outcome="ok"} 31337\n# HELP {injected} \\'
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclasses.dataclass
class Metered:
    svc: ServiceProcess
    root: Path
    state: Path
    port: int
    textfile: Path
    canary: Path
    canary_bytes: bytes
    starter_binary: Path

    def starter(self) -> FakeStarter:
        return FakeStarter(self.starter_binary, self.svc, USER_SLOT[0], slot_type=USER_SLOT[1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plant_link(who: Account, path: Path, target: Path) -> None:
    """``who`` replaces whatever is at ``path`` (in her own directory) by a link to ``target``."""
    subprocess.run(
        [*as_user(who), "sh", "-c", 'rm -f "$1" && ln -s "$2" "$1"', "sh", str(path), str(target)],
        check=True,
        timeout=30,
    )


@pytest.fixture(scope="module")
def metered(
    svc_root: Path, catalogue: Path, hypervisor_probe: Path, fake_starter: Path, alice: Account
) -> Iterator[Metered]:
    root = svc_root / "metrics"
    root.mkdir(mode=0o711)
    state = new_state_dir(root / "state", hypervisor_probe)
    canary = root / "canary.txt"
    canary_bytes = f"CANARY-{secrets.token_hex(16)}\n".encode()
    canary.write_bytes(canary_bytes)
    canary.chmod(0o600)
    textdir = root / "textfiles"  # alice's: she may put any name there
    textdir.mkdir(mode=0o755)
    os.chown(textdir, alice.uid, alice.gid)
    textfile = textdir / "glite-vm.prom"
    plant_link(alice, textfile, canary)  # before the service's first write
    port = free_port()
    extra = {
        **THREE_SLOTS.knobs(),
        "GLITE_VM_METRICS_ADDRESS": f"127.0.0.1:{port}",
        "GLITE_VM_METRICS_TEXTFILE": str(textfile),
    }
    env = service_env(root, catalogue, extra)
    svc = ServiceProcess(Path(env["GLITE_VM_SOCKET_PATH"]), env, root / "service.log")
    svc.start()
    try:
        yield Metered(svc, root, state, port, textfile, canary, canary_bytes, fake_starter)
    finally:
        check_nothing_left(svc, state)
        assert canary.read_bytes() == canary_bytes


# -- reading metrics as Prometheus does --------------------------------------------------------


def scrape_text(port: int) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        conn.close()


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def promtool_accepts(text: str) -> None:
    """Debian's promtool lints the exposition (help texts, names, suffixes, syntax)."""
    tool = shutil.which("promtool")
    assert tool, "promtool (Debian's prometheus package) is missing: run scripts/dev setup"
    done = subprocess.run(
        [tool, "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def vms(samples: Samples) -> dict[tuple[str, str], float]:
    return {
        (dict(ls)["state"], dict(ls)["owner_class"]): v
        for (n, ls), v in samples.items()
        if n == "glite_vm_vms" and v
    }


def check_textfile(m: Metered) -> Samples:
    st = m.textfile.lstat()
    assert stat.S_ISREG(st.st_mode), "the textfile is not a regular file"
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o644)
    assert m.canary.read_bytes() == m.canary_bytes
    assert stat.S_IMODE(m.canary.stat().st_mode) == 0o600
    text = m.textfile.read_text()
    promtool_accepts(text)
    return parse(text)


def good_job(m: Metered, alice: Account, name: str, seconds: int = 0) -> dict[str, Any]:
    """A user job through a starter of slot1: prepare, a payload, teardown; the prepare's
    answer (as the driver gave it)."""
    starter = m.starter()
    try:
        scratch = make_scratch(m.root, alice, name)
        answer = starter.call(alice, "prepare", job_ad=job_ad(), scratch_dir=str(scratch))
        vm = ok(answer)["vm"]
        ok(starter.call(alice, "exec", vm=vm, argv=["sh", "-c", f"sleep {seconds}"]))
        ok(starter.call(alice, "teardown", vm=vm, failed=False))
    finally:
        starter.stop()
    return answer


def failing_job(m: Metered, alice: Account, name: str) -> None:
    """A prepare of an image whose kernel panics, outside HTCondor: held."""
    scratch = make_scratch(m.root, alice, name)
    answer = call(m.svc, alice, "prepare", job_ad=job_ad("test-panic"), scratch_dir=str(scratch))
    assert (answer.get("type"), answer.get("disposition")) == ("ImageBootError", "hold"), answer


# -- the textfile ------------------------------------------------------------------------------


def test_a_link_planted_at_the_textfile_is_replaced_never_followed(
    metered: Metered, alice: Account
) -> None:
    check_textfile(metered)  # the link planted before the start was replaced at once
    for _ in range(2):  # and again while the service runs
        plant_link(alice, metered.textfile, metered.canary)
        wait_for(
            "the service replaces the planted link",
            lambda: not metered.textfile.is_symlink() and metered.textfile.exists(),
            timeout=5 * REAP_INTERVAL,
        )
        got = check_textfile(metered)
        assert ("glite_vm_boots_total", (("outcome", "ok"),)) in got
    assert "cannot write the metrics" not in metered.svc.log()


# -- the endpoint ------------------------------------------------------------------------------


def test_the_scrape_says_what_happened_to_a_good_and_a_failing_job(
    metered: Metered, alice: Account
) -> None:
    before = parse(scrape_text(metered.port))
    starter = metered.starter()
    try:
        scratch = make_scratch(metered.root, alice, "good")
        answer = starter.call(alice, "prepare", job_ad=job_ad(), scratch_dir=str(scratch))
        vm = ok(answer)["vm"]
        during = parse(scrape_text(metered.port))
        ok(starter.call(alice, "exec", vm=vm, argv=["true"]))
        ok(starter.call(alice, "teardown", vm=vm, failed=False))
    finally:
        starter.stop()
    failing_job(metered, alice, "panics")
    text = scrape_text(metered.port)
    promtool_accepts(text)
    after = parse(text)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert vms(during) == {("ready", "user-job"): 1}
    assert vms(after) == {}
    assert delta("glite_vm_boots_total", outcome="ok") == 1
    assert delta("glite_vm_boots_total", outcome="image_fault") == 1
    assert delta("glite_vm_boots_total", outcome="host_fault") == 0
    assert delta("glite_vm_boot_attempts_total", outcome="ok") == 1
    assert delta("glite_vm_boot_attempts_total", outcome="failed") == 1
    assert delta("glite_vm_holds_total", reason="ImageBootError") == 1
    assert delta("glite_vm_requeues_total") == 0
    assert delta("glite_vm_requests_total", op="prepare") == 2
    assert delta("glite_vm_requests_total", op="exec") == 1
    assert delta("glite_vm_requests_total", op="teardown") == 1
    assert delta("glite_vm_request_errors_total", op="prepare", error="ImageBootError") == 1
    assert delta("glite_vm_request_errors_total") == 1
    assert delta("glite_vm_time_to_ready_seconds_count") == 1
    assert delta("glite_vm_teardown_seconds_count") == 2  # the job's VM, and the panicked one
    assert delta("glite_vm_cache_hits_total") + delta("glite_vm_cache_misses_total") == 2
    # the time to ready spans the phases the job's ad reports, within the call's own time
    ready = delta("glite_vm_time_to_ready_seconds_sum")
    ad = ok(answer)["ad_attributes"]
    phases = sum(ad[f"GliteVmTime{p}"] for p in ("Fetch", "Boot", "Ready"))
    assert phases - 0.05 <= ready <= answer["seconds"]

    # the textfile says the same after the next reaper pass
    def textfile_caught_up() -> bool:
        written = parse(metered.textfile.read_text())
        return total(written, "glite_vm_boots_total") == total(after, "glite_vm_boots_total")

    wait_for("the textfile shows the failed boot", textfile_caught_up, timeout=5 * REAP_INTERVAL)
    written = check_textfile(metered)
    for name in ("glite_vm_boots_total", "glite_vm_holds_total", "glite_vm_teardown_seconds_count"):
        assert total(written, name) == total(after, name), name


def error_class_names() -> set[str]:
    names, todo = set(), [GliteVmError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


def test_hostile_names_leave_the_exposition_bounded_and_valid(
    metered: Metered, alice: Account
) -> None:
    before = parse(scrape_text(metered.port))
    site = Settings.load(metered.svc.site_settings)
    scratch = make_scratch(metered.root, alice, "hostile")
    for field in ("image", "job_id", "owner"):
        request = request_from_job_ad(job_ad(), site).to_wire()
        request["image"] = "no-such-image"  # never a VM: the test is about the names
        request[field] = HOSTILE
        answer = call(metered.svc, alice, "prepare", request=request, scratch_dir=str(scratch))
        assert not answer["ok"] and answer["disposition"] == "hold", answer
    for line in (
        json.dumps({"v": 2, "op": HOSTILE, "args": {}}).encode() + b"\n",
        HOSTILE.encode() + b"\n",
    ):
        where = metered.root / f"line-{secrets.token_hex(4)}"
        where.write_bytes(line)
        where.chmod(0o644)
        request = {"op": "raw", "socket": str(metered.svc.socket_path), "line_file": str(where)}
        assert not run_as(alice, request)["ok"]
    text = scrape_text(metered.port)
    promtool_accepts(text)
    for fragment in ("evil", "31337", "injected", "no-such-image", "alice"):
        assert fragment not in text
    after = parse(text)
    new = sorted(set(after) - set(before))
    label_values = {v for _n, labels in new for k, v in labels if k != "le"}
    # what is new: an operation called "invalid", and the names of glite-vm's error classes
    assert label_values <= {"invalid", *protocol.OPS, *error_class_names()}, label_values
    assert len(new) <= 6, new
    assert (
        total(after, "glite_vm_requests_total", op="invalid")
        - total(before, "glite_vm_requests_total", op="invalid")
        == 2
    )
    for outcome in ("ok", "host_fault"):  # an unknown image is the job's fault, no VM started
        assert get(after, "glite_vm_boots_total", outcome=outcome) == get(
            before, "glite_vm_boots_total", outcome=outcome
        )


# -- Debian's Prometheus scraping the service --------------------------------------------------

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: glite-vm
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


@contextlib.contextmanager
def prometheus(workdir: Path, target_port: int) -> Iterator[str]:
    """Debian's ``prometheus`` as a plain process on loopback, scraping the service every
    second; its base URL. Stopped (and its data removed) afterwards."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus is missing: run scripts/dev setup (it installs it)"
    workdir.mkdir(mode=0o700)
    config = workdir / "prometheus.yml"
    config.write_text(PROMETHEUS_CONFIG.format(port=target_port))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (workdir / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=workdir,
        )
    try:

        def ready() -> bool:
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()[-3000:]
            try:
                return http_get(f"{base}/-/ready")[0] == 200
            except OSError:
                return False

        wait_for("prometheus is ready", ready, timeout=60)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        shutil.rmtree(workdir / "data", ignore_errors=True)


def http_get(url: str) -> tuple[int, bytes]:
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def promql(base: str, expr: str, at: float | None = None) -> float:
    """The sum of an instant query's values (0 when it has none), at ``at`` (default now)."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    status, body = http_get(f"{base}/api/v1/query?{urllib.parse.urlencode(params)}")
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", answer
    data = answer["data"]
    if data["resultType"] == "scalar":
        return float(data["result"][1])
    return sum(float(r["value"][1]) for r in data["result"])


def test_prometheus_scrapes_the_service_and_answers_promql(
    metered: Metered, alice: Account
) -> None:
    with prometheus(metered.root / "prometheus", metered.port) as prom:
        wait_for(
            "prometheus scrapes the service",
            lambda: (
                promql(prom, 'up{job="glite-vm"}') == 1
                and promql(prom, 'count(glite_vm_boots_total{job="glite-vm"})') == 3
            ),
            timeout=60,
        )
        t0 = time.time()
        answer = good_job(metered, alice, "scraped-good", seconds=4)  # ready for a few scrapes
        failing_job(metered, alice, "scraped-panics")
        done = time.time()
        wait_for(
            "a scrape after the jobs",
            lambda: promql(prom, "timestamp(glite_vm_boots_total{outcome='ok'})") > done,
            timeout=30,
        )
        t1 = time.time()

        def increase(expr: str) -> float:
            return promql(prom, expr, t1) - promql(prom, expr, t0)

        assert increase('glite_vm_boots_total{outcome="ok"}') == 1
        assert increase('glite_vm_boots_total{outcome="image_fault"}') == 1
        assert increase('glite_vm_boots_total{outcome="host_fault"}') == 0
        assert increase('sum(glite_vm_holds_total{reason="ImageBootError"})') == 1
        assert increase("sum(glite_vm_requeues_total)") == 0
        assert increase('glite_vm_request_errors_total{op="prepare"}') == 1
        assert increase("sum(glite_vm_time_to_ready_seconds_count)") == 1
        assert increase("glite_vm_teardown_seconds_count") == 2
        window = f"{math.ceil(t1 - t0) + 1}s"
        user_ready = f'glite_vm_vms{{state="ready",owner_class="user-job"}}[{window}]'
        assert promql(prom, f"max_over_time({user_ready})", t1) == 1
        assert promql(prom, "sum(glite_vm_vms)", t1) == 0
        # the histogram's sum spans the phases the job's ad reports, within the call's time
        ready = increase("sum(glite_vm_time_to_ready_seconds_sum)")
        ad = ok(answer)["ad_attributes"]
        phases = sum(ad[f"GliteVmTime{p}"] for p in ("Fetch", "Boot", "Ready"))
        assert phases - 0.05 <= ready <= answer["seconds"]
        # every query of the Grafana dashboard is PromQL this Prometheus takes, and those of
        # the panels that count boots and VMs see what happened
        dashboard = json.loads((REPO / "docs" / "grafana-glite-vm.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"].replace("$__rate_interval", window)
                promql(prom, expr.replace("$instance", ".*"), t1)
        boots = [
            t["expr"]
            for p in dashboard["panels"]
            if p["title"] == "Boots by outcome"
            for t in p["targets"]
        ]
        (by_outcome,) = [e.replace("$__rate_interval", window) for e in boots]
        assert promql(prom, by_outcome.replace("$instance", ".*"), t1) >= 1.99  # extrapolated
        # and Prometheus holds what the service says now
        now = parse(scrape_text(metered.port))
        for outcome in ("ok", "image_fault", "host_fault"):
            assert promql(prom, f'glite_vm_boots_total{{outcome="{outcome}"}}', t1) == get(
                now, "glite_vm_boots_total", outcome=outcome
            )
