"""Hostile job ads: every one is held with a message that names the attribute and the fix, and
the path a hook takes (the service's in-process engine) leaves no trace on the host.

The table is what a user could put in a submit file (``+GliteVmImage = ...``,
``request_memory = ...``) or what HTCondor hands PREPARE_JOB for it. Each row asserts the error
class, that it holds the job (a hook status below 300, so HTCondor holds instead of requeueing
it), and the words of the message the user reads in ``HoldReason``.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import classad2
import pytest

from glite_vm.condor.jobad import hook_status_lines, request_from_job_ad
from glite_vm.config import Settings
from glite_vm.errors import (
    Disposition,
    DownloadError,
    GliteVmError,
    ImageNotFoundError,
    ImageRefusedError,
    RequestError,
)
from glite_vm.service.local import LocalService
from glite_vm.slots import SlotFacts
from glite_vm.units import GIB
from glite_vm.vm.connect import open_host
from glite_vm.vm.hypervisor import HypervisorInfo, find_emulator
from tests.support import glite_vm_domains, sized

SOURCES = ("https://repo.example/vm/",)
SETTINGS = Settings(
    max_cpus=8, max_memory_mib=16384, max_disk_bytes=100 * GIB, custom_image_sources=SOURCES
)
SLOT = SlotFacts(root_enabled=False, cpus=1, memory_mib=2048, disk_kib=30 * GIB // 1024)
ROOT_SLOT = dataclasses.replace(SLOT, root_enabled=True)
NO_FACTS = SlotFacts()
ALLOWED_HINT = "GLITE_VM_CUSTOM_IMAGE_SOURCES: https://repo.example/vm/"
NAME_HINT = "neither a catalogue name (letters, digits, '.', '_', '+', '-', at most 128"
RELATIVE_HINT = "looks like a relative path; a job names a catalogue image or an http(s) URL"


@dataclasses.dataclass(frozen=True)
class Hostile:
    """One hostile ad: ``attrs`` go into a plain mapping, ``text`` lines into a parsed ClassAd."""

    attrs: Mapping[str, object] = dataclasses.field(default_factory=dict)
    text: str = ""
    slot: SlotFacts = NO_FACTS
    error: type[GliteVmError] = RequestError
    says: tuple[str, ...] = ()  # what the message must contain, in order
    never_says: tuple[str, ...] = ()

    def ad(self) -> Mapping[str, object]:
        base = {"ClusterId": 12, "ProcId": 0, "Owner": "alice", "GliteVmImage": "debian-12"}
        if self.text:
            lines = [
                f"{k} = {classad2.quote(v) if isinstance(v, str) else v}" for k, v in base.items()
            ]
            parsed: Mapping[str, object] = classad2.parseOne(
                "\n".join([*lines, self.text, ""]), classad2.ParserType.Old
            )
            return parsed
        return {**base, **self.attrs}


def size(field: str, value: object, *says: str, slot: SlotFacts = NO_FACTS) -> Hostile:
    return Hostile({field: value}, slot=slot, says=(f"{field}: ", *says))


def image(value: str, *says: str, error: type[GliteVmError] = RequestError) -> Hostile:
    prefix = ("GliteVmImage: ",) if error is RequestError else ("GliteVmImage",)
    return Hostile({"GliteVmImage": value}, error=error, says=(*prefix, *says))


def refused(value: str, *says: str, never_says: tuple[str, ...] = ()) -> Hostile:
    row = image(value, *says, error=ImageRefusedError)
    return dataclasses.replace(row, says=(*says, "GliteVmImage"), never_says=never_says)


def root(text: str, *says: str) -> Hostile:
    return Hostile(text=text, slot=ROOT_SLOT, says=("GliteVmRoot: ", *says))


LONG_URL = "https://evil.example/" + "a" * 1900
HOSTILE: dict[str, Hostile] = {
    # --- sizes: negative, zero, huge, not whole numbers, not numbers ----------------------------
    "cpus-negative": size("RequestCpus", -1, "must be positive, got -1 CPUs"),
    "cpus-zero": size("RequestCpus", 0, "must be positive, got 0 CPUs"),
    "cpus-huge": size("RequestCpus", 10**6, "1000000 is outside 1 .. 8"),
    "cpus-beyond-int64": size("RequestCpus", 2**70, f"{2**70} is outside 1 .. 8"),
    "cpus-huge-on-a-slot": size(
        "RequestCpus", 64, "asks for 64 CPUs but this slot offers 1 CPUs", slot=SLOT
    ),
    "cpus-fraction": size("RequestCpus", 1.5, "must be a whole number of CPUs, got 1.5"),
    "cpus-string": size("RequestCpus", "2", "must be a whole number of CPUs, got '2'"),
    "cpus-infinite": size("RequestCpus", float("inf"), "must be a whole number of CPUs, got inf"),
    "memory-negative": size("RequestMemory", -512, "must be positive, got -512 MiB"),
    "memory-zero": size("RequestMemory", 0, "must be positive, got 0 MiB"),
    "memory-too-small": size("RequestMemory", 10, "10 MiB is outside 64 MiB .. 16384 MiB"),
    "memory-huge": size("RequestMemory", 10**12, "1000000000000 MiB is outside 64 MiB .. 16384"),
    "memory-huge-on-a-slot": size(
        "RequestMemory", 10**9, "asks for 1000000000 MiB but this slot offers 2048 MiB", slot=SLOT
    ),
    "memory-fraction": size("RequestMemory", 100.5, "must be a whole number of MiB, got 100.5"),
    "memory-nan": size("RequestMemory", float("nan"), "must be a whole number of MiB, got nan"),
    "memory-string": size("RequestMemory", "2GB", "must be a whole number of MiB, got '2GB'"),
    "disk-negative": size("RequestDisk", -1, "must be positive, got -1 KiB"),
    "disk-zero": size("RequestDisk", 0, "must be positive, got 0 KiB"),
    "disk-too-small": size("RequestDisk", 10, "10.0 KiB is outside 64.0 MiB .. 100.0 GiB"),
    "disk-huge": size("RequestDisk", 10**15, "TiB is outside 64.0 MiB .. 100.0 GiB"),
    "disk-fraction": size("RequestDisk", 1.5, "must be a whole number of KiB, got 1.5"),
    "disk-string": size("RequestDisk", "30G", "must be a whole number of KiB, got '30G'"),
    # the same as HTCondor delivers them: ClassAd text, expressions evaluated in the ad
    "ad-cpus-negative": Hostile(text="RequestCpus = -4", says=("RequestCpus: ", "got -4 CPUs")),
    "ad-memory-string": Hostile(
        text='RequestMemory = "2048"', says=("RequestMemory: ", "whole number of MiB, got '2048'")
    ),
    "ad-memory-overflows": Hostile(
        text="RequestMemory = 1e308 * 10", says=("RequestMemory: ", "evaluates to an error")
    ),
    "ad-disk-division-by-zero": Hostile(
        text="RequestDisk = DiskUsage / 0\nDiskUsage = 10",
        says=("RequestDisk: ", "evaluates to an error"),
    ),
    "ad-disk-list": Hostile(
        text="RequestDisk = {1, 2}", says=("RequestDisk: ", "whole number of KiB, got [1, 2]")
    ),
    # --- image names ----------------------------------------------------------------------------
    "name-dotdot": image("../etc/passwd", "'../etc/passwd' ", RELATIVE_HINT),
    "name-dotdot-only": image("..", "'..' ", RELATIVE_HINT),
    "name-slash": image("images/debian-12", "'images/debian-12' ", RELATIVE_HINT),
    "name-host-path": refused("/etc/shadow", "image /etc/shadow refused", "may not name a host"),
    "name-nul": image("debian\x0012", "contains control characters (NUL", "remove them"),
    "name-newline": image("debian-12\nGliteVmRoot = True", "contains control characters"),
    "name-semicolon": image("x;id", "'x;id' ", NAME_HINT),
    "name-command-substitution": image("$(reboot)", "'$(reboot)' ", NAME_HINT),
    "name-backticks": image("`id`", "'`id`' ", NAME_HINT),
    "name-pipe": image("a|b", NAME_HINT),
    "name-and": image("a&&b", NAME_HINT),
    "name-redirect-with-slash": image("x >/tmp/y", "'x >/tmp/y' ", NAME_HINT),
    "name-quotes": image("'; rm -rf / #", NAME_HINT),
    "name-blank-inside": image("debian 12", NAME_HINT),
    "name-leading-blank": image(" debian-12", "has leading or trailing blanks"),
    "name-leading-dash": image("-debian", NAME_HINT),
    "name-10k": image("x" * 10_000, "is 10000 characters long; at most 2048 are allowed"),
    "name-200": image("d" * 200, "'" + "d" * 97 + "...' ", NAME_HINT),
    "name-accented": image("débian-12", "'débian-12' ", NAME_HINT),
    "name-cyrillic": image("образ", NAME_HINT),
    "name-fullwidth-digits": image("debian-\uff11\uff12", NAME_HINT),
    "name-zero-width-space": image("debian\u200b-12", NAME_HINT),
    "name-right-to-left-override": image("debian\u202e21-", NAME_HINT),
    "name-emoji": image("\U0001f600", NAME_HINT),
    # --- URLs -----------------------------------------------------------------------------------
    "url-file": refused("file:///etc/passwd", "image file:///etc/passwd refused", ALLOWED_HINT),
    "url-file-nul": image("file:///srv/vm/x%00y", "contains %00"),
    "url-ftp": image("ftp://repo.example/vm/d.qcow2", "unsupported URL scheme 'ftp'; use http"),
    "url-gopher": image("gopher://repo.example/vm/d", "unsupported URL scheme 'gopher'"),
    "url-nbd": image("nbd://repo.example:10809/d", "unsupported URL scheme 'nbd'"),
    "url-data": image("data:text/plain,x", NAME_HINT),
    "url-credentials": refused(
        "https://user:s3cret@repo.example/vm/d.qcow2",
        "image https://***@repo.example/vm/d.qcow2 refused",
        "user names or passwords are not accepted; remove them from",
        never_says=("s3cret", "user:"),
    ),
    "url-userinfo-trick": refused(
        "https://repo.example@evil.example/vm/d.qcow2",
        "image https://***@evil.example/vm/d.qcow2 refused",
        "user names or passwords",
    ),
    "url-other-host": refused("https://evil.example/vm/d.qcow2", ALLOWED_HINT),
    "url-look-alike-host": refused("https://repo.example.evil.example/vm/d.qcow2", ALLOWED_HINT),
    "url-sibling-directory": refused("https://repo.example/vm-evil/d.qcow2", ALLOWED_HINT),
    "url-plain-http": refused("http://repo.example/vm/d.qcow2", ALLOWED_HINT),
    "url-other-port": refused("https://repo.example:8443/vm/d.qcow2", ALLOWED_HINT),
    "url-dotdot": refused("https://repo.example/vm/../private/d", "'.', '..' or '\\' segments"),
    "url-encoded-dotdot": refused("https://repo.example/vm/%2e%2e/private/d", "'..' or"),
    "url-broken-ipv6": image("https://[::1/vm/d.qcow2", "malformed URL", "Invalid IPv6 URL"),
    "url-no-slashes": image("https:repo.example/vm/d", "is not a well-formed URL"),
    "url-bad-port": image("https://repo.example:99999/vm/d", "URL with an invalid port"),
    "url-no-host": image("https:///vm/d.qcow2", "URL without a host"),
    # the advice must survive the cut to 1000 characters that a hold reason gets
    "url-very-long": refused(LONG_URL, "image https://evil.example/aaa", ALLOWED_HINT),
    # --- GliteVmRoot must be the literal True or False --------------------------------------
    "root-string": root('GliteVmRoot = "True"', "must be True or False without quotes, got 'True'"),
    "root-string-yes": root('GliteVmRoot = "yes"', "without quotes, got 'yes'"),
    "root-number": root("GliteVmRoot = 1", "must be True or False without quotes, got 1"),
    "root-comparison": root(
        "GliteVmRoot = 1 == 1", "must be the literal True or False, not the expression 1 == 1"
    ),
    "root-owner-expression": root(
        'GliteVmRoot = Owner == "alice"', 'not the expression Owner == "alice"'
    ),
    "root-if-then-else": root(
        "GliteVmRoot = ifThenElse(true, true, false)", "not the expression ifThenElse("
    ),
    "root-error": root("GliteVmRoot = error", "is the ClassAd value error; fix or remove it"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_ad_is_held_with_a_message_that_names_the_fix(case: str) -> None:
    row = HOSTILE[case]
    with pytest.raises(GliteVmError) as info:
        sized(row.ad(), row.slot, SETTINGS)
    err = info.value
    assert type(err) is row.error, f"{type(err).__name__}: {err}"
    assert err.disposition is Disposition.HOLD
    # What the user reads: PREPARE_JOB's HookStatusMessage, as HoldReason shows it.
    lines = hook_status_lines(err, previous_failures=0, max_host_failures=3)
    status = classad2.parseOne("\n".join(lines) + "\n", classad2.ParserType.Old)
    assert 0 < status["HookStatusCode"] < 300  # held, not requeued
    message = status["HookStatusMessage"]
    position = 0
    for words in row.says:
        found = message.find(words, position)
        assert found >= 0, f"{words!r} not in {message!r} (after position {position})"
        position = found + len(words)
    for words in row.never_says:
        assert words not in message
        assert words not in repr(err.args)
    assert len(message) <= 1000


def test_the_same_values_are_accepted_where_they_are_sane() -> None:
    """The table's refusals are about the values, not the attributes: sane ones pass."""
    ok = sized(
        {
            "ClusterId": 12,
            "ProcId": 0,
            "Owner": "alice",
            "GliteVmImage": "https://repo.example/vm/d.qcow2",
            "RequestCpus": 2,
            "RequestMemory": 4096,
            "RequestDisk": 2 * 1024 * 1024,
            "GliteVmRoot": True,
        },
        dataclasses.replace(NO_FACTS, root_enabled=True),
        SETTINGS,
    )
    assert (ok.image, ok.cpus, ok.memory_mib, ok.disk_bytes, ok.root) == (
        "https://repo.example/vm/d.qcow2",
        2,
        4096,
        2 * GIB,
        True,
    )


# --- no effect on the host ---------------------------------------------------------------------


class CountingServer:
    """An HTTP server on loopback that counts every connection and answers 404 to anything."""

    def __init__(self) -> None:
        self.connections = 0
        self.paths: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return None

            def _not_found(self) -> None:
                server.paths.append(self.path)
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_POST = _not_found

        class Counting(ThreadingHTTPServer):
            def verify_request(self, request: object, client_address: object) -> bool:
                server.connections += 1
                return True

        self.httpd = Counting(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def __enter__(self) -> CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def repository() -> Iterator[CountingServer]:
    with CountingServer() as server:
        yield server


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


# Rows that reach the image layer when the parser lets them through; all of them must stop
# before it. The host's allowed source is the loopback repository.
def hostile_for(repo: CountingServer) -> dict[str, Mapping[str, object]]:
    base = repo.url("images/")
    host = f"127.0.0.1:{repo.port}"
    images = {
        "credentials": f"http://user:pw@{host}/images/d.qcow2",
        "userinfo-trick": f"http://{host}@127.0.0.2:{repo.port}/images/d.qcow2",
        "dotdot": f"{base}../catalogue.json",
        "encoded-dotdot": f"{base}%2e%2e/catalogue.json",
        "sibling-directory": repo.url("images-evil/d.qcow2"),
        "ftp": f"ftp://{host}/images/d.qcow2",
        "file": "file:///etc/passwd",
        "host-path": "/etc/passwd",
        "relative": "../etc/passwd",
        "shell": "$(touch /tmp/glite-vm-pwned)",
        "nul": "debian\x0012",
        "long": "x" * 10_000,
        "non-ascii": "débian-12",
    }
    ads: dict[str, Mapping[str, object]] = {
        name: {"GliteVmImage": value} for name, value in images.items()
    }
    ads.update(
        {
            # well-formed images but impossible sizes or root: the image must not be fetched
            "memory-negative": {"GliteVmImage": repo.url("images/d.qcow2"), "RequestMemory": -1},
            "disk-huge": {"GliteVmImage": "debian-12", "RequestDisk": 10**15},
            "cpus-zero": {"GliteVmImage": "debian-12", "RequestCpus": 0},
            "root-string": {"GliteVmImage": "debian-12", "GliteVmRoot": "True"},
            "root-expression": {
                "GliteVmImage": "debian-12",
                "GliteVmRoot": classad2.ExprTree("1 == 1"),
            },
            "root-on-user-slot": {"GliteVmImage": "debian-12", "GliteVmRoot": True},
        }
    )
    return ads


@pytest.mark.vm
def test_hostile_ads_leave_no_trace_on_the_host(tmp_path: Path, repository: CountingServer) -> None:
    """PREPARE_JOB's path (the hook's ``request_from_job_ad``, then the service's
    ``LocalService.prepare``) for each hostile ad: held, and no domain, no file in the state or
    cache directory, no lease, no connection made."""
    state = tmp_path / "state"
    state.mkdir()
    settings = Settings(
        state_dir=state,
        catalogue=repository.url("catalogue.json"),
        custom_image_sources=(repository.url("images/"),),
        cache_min_free_bytes=0,
        download_timeout=5.0,
    )
    # Nothing may boot, so the accelerator does not matter: skip the probe.
    host = open_host(settings, HypervisorInfo("qemu", "test: nothing boots", find_emulator()))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "input.txt").write_text("input\n")
    cluster = 700_000 + os.getpid() % 100_000
    ours = f"glite-vm-hostile-{cluster}."
    canary = Path("/tmp/glite-vm-pwned")
    try:
        service = LocalService.for_this_user(settings, host)
        before = tree(state)
        for procid, (name, attrs) in enumerate(hostile_for(repository).items()):
            ad = {"ClusterId": cluster, "ProcId": procid, "Owner": "hostile", **attrs}
            with pytest.raises(GliteVmError) as info:
                # the hook's half (the ad to a request), then the service's
                request = request_from_job_ad(ad, settings)
                service.prepare(request, scratch_dir=str(scratch), starter_pid=None)
            assert info.value.disposition is Disposition.HOLD, (name, info.value)
            assert tree(state) == before, name
            assert repository.connections == 0, (name, repository.paths)
        assert tree(scratch) == ["input.txt"]
        assert not list((state / "cache" / "leases").rglob("*"))
        assert [d for d in glite_vm_domains() if d.startswith(ours)] == []
        assert not canary.exists()

        # The same path does reach the repository for a well-formed ad, so the counts above
        # could have seen a fetch: an allowed URL that is missing, then an unknown name.
        well_formed = {"ClusterId": cluster, "ProcId": 999, "Owner": "hostile"}
        missing = {**well_formed, "GliteVmImage": repository.url("images/d.qcow2")}
        with pytest.raises(ImageNotFoundError):
            request = request_from_job_ad(missing, settings)
            service.prepare(request, scratch_dir=str(scratch), starter_pid=None)
        assert "/images/d.qcow2" in repository.paths
        unknown = {**well_formed, "GliteVmImage": "debian-12"}
        with pytest.raises(DownloadError):  # the repository has no catalogue either
            request = request_from_job_ad(unknown, settings)
            service.prepare(request, scratch_dir=str(scratch), starter_pid=None)
        assert "/catalogue.json" in repository.paths
        assert not list((state / "cache" / "leases").rglob("*.json"))
        assert [d for d in glite_vm_domains() if d.startswith(ours)] == []
    finally:
        host.conn.close()
