"""Networking of a job's VM (GLITE_VM_NETWORK): ``user`` reaches the host's loopback through
QEMU's user-mode gateway 10.0.2.2; ``none`` (the default) has no interface at all.

Only loopback traffic: the HTTP server listens on 127.0.0.1, the guest talks to 10.0.2.2 only.
Every wait is bounded (``timeout`` in the guest, ``timeout=`` on the payload)."""

from __future__ import annotations

import dataclasses
import secrets
import threading
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from glite_vm.vm.guest_run import ExecResult
from glite_vm.vm.lifecycle import Vm, VmHost
from tests.support import LocalImage
from tests.vm.guest_calls import boot

pytestmark = pytest.mark.vm

GATEWAY = "10.0.2.2"  # QEMU user mode: the host, as seen from the guest
GUEST_ADDRESS = "10.0.2.15"  # QEMU user mode's first DHCP lease
# The test guest's busybox looks for /etc/udhcpc/default.script, but the guest ships busybox's
# script at /usr/share/udhcpc/default.script; without it udhcpc brings nothing up.
DHCP = "timeout 30 udhcpc -i eth0 -q -n -t 5 -T 1 -s /usr/share/udhcpc/default.script"
# busybox 1.35's `wget -T` crashes (SIGSEGV) in the test guest: bound it with timeout instead
WGET = "timeout 20 wget -q -O -"
PAYLOAD_TIMEOUT = 90.0


@dataclasses.dataclass
class Output:
    result: ExecResult
    stdout: bytes
    stderr: bytes


def as_root_payload(vm: Vm, script: str) -> Output:
    out, err = bytearray(), bytearray()
    result = vm.run(
        ["sh", "-c", script], stdout=out.extend, stderr=err.extend, timeout=PAYLOAD_TIMEOUT
    )
    return Output(result, bytes(out), bytes(err))


@dataclasses.dataclass
class FileServer:
    port: int
    body: bytes
    requests: list[tuple[str, str]]

    @property
    def url(self) -> str:
        return f"http://{GATEWAY}:{self.port}/file"


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """An HTTP server on the host's loopback serving one random file at /file."""
    body = secrets.token_hex(32).encode() + b"\n"
    requests: list[tuple[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append((self.client_address[0], self.path))
            if self.path != "/file":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield FileServer(server.server_address[1], body, requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert not thread.is_alive()


def boot_root_vm(host: VmHost, image: LocalImage) -> Iterator[Vm]:
    with boot(host, image, root=True, keep_snapshot="never") as vm:
        yield vm


@pytest.fixture(scope="module")
def user_net_vm(vm_host: VmHost, direct_image: LocalImage) -> Iterator[Vm]:
    settings = dataclasses.replace(vm_host.settings, network="user")
    yield from boot_root_vm(VmHost(vm_host.conn, settings, vm_host.hypervisor), direct_image)


@pytest.fixture(scope="module")
def user_net_dhcp(user_net_vm: Vm) -> Output:
    """DHCP from QEMU's built-in server, once for the module."""
    return as_root_payload(user_net_vm, f"{DHCP} 2>&1 && ip -4 -o addr show dev eth0")


@pytest.fixture(scope="module")
def no_net_vm(vm_host: VmHost, direct_image: LocalImage) -> Iterator[Vm]:
    assert vm_host.settings.network == "none", "the test settings should keep the default"
    yield from boot_root_vm(vm_host, direct_image)


def interfaces(vm: Vm) -> list[ET.Element]:
    assert vm.domain is not None
    live = ET.fromstring(vm.domain.XMLDesc(0))  # noqa: S314 - libvirt's own output
    return live.findall("devices/interface")


def test_libvirt_runs_user_mode_networking_under_the_system_uri(user_net_vm: Vm) -> None:
    (iface,) = interfaces(user_net_vm)
    assert iface.get("type") == "user"
    model = iface.find("model")
    assert model is not None and model.get("type") == "virtio"


def test_user_mode_dhcp_is_quick(user_net_dhcp: Output) -> None:
    assert user_net_dhcp.result.exit_code == 0, user_net_dhcp.stdout
    assert f"inet {GUEST_ADDRESS}/24".encode() in user_net_dhcp.stdout
    assert user_net_dhcp.result.seconds < 15


def test_user_mode_guest_fetches_a_file_from_the_host_loopback(
    user_net_vm: Vm, user_net_dhcp: Output, file_server: FileServer
) -> None:
    assert user_net_dhcp.result.exit_code == 0
    out = as_root_payload(user_net_vm, f"{WGET} {file_server.url}")
    assert out.result.exit_code == 0, out.stderr
    assert out.stdout == file_server.body
    # QEMU's user-mode stack connects from the host's loopback, as the guest's proxy
    assert file_server.requests == [("127.0.0.1", "/file")]


def test_none_mode_has_no_interface_and_cannot_fetch(
    no_net_vm: Vm, file_server: FileServer
) -> None:
    assert interfaces(no_net_vm) == []
    out = as_root_payload(
        no_net_vm,
        f"ls /sys/class/net; {DHCP} >&2; echo status:dhcp=$? >&2; "
        f"{WGET} {file_server.url}; echo status:wget=$? >&2",
    )
    assert out.stdout.split() == [b"lo"]  # no eth0; and nothing of the file arrived
    status = dict(
        line.removeprefix("status:").split("=", 1)
        for line in out.stderr.decode().splitlines()
        if line.startswith("status:")
    )
    assert status.keys() == {"dhcp", "wget"}, out.stderr
    assert status["dhcp"] != "0"
    assert status["wget"] != "0"
    assert file_server.requests == []
