"""A real HTTP/1.1 server on loopback for the image tests.

It serves byte strings, honours Range / If-Range / If-None-Match / If-Modified-Since, logs every
request with the body bytes it actually sent, and can be told to misbehave per path: cut the
connection after N bytes, stall after N bytes, serve wrong bytes, ignore Range, omit validators,
omit Content-Length, answer with an error status, or trickle slowly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import socket
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STALL_LIMIT = 20.0  # seconds a stalled response waits for release() before giving up
_WRITE = 64 * 1024


@dataclasses.dataclass
class Fault:
    cut_after: int | None = None  # drop the connection after this many body bytes
    stall_after: int | None = None  # send this many body bytes, then wait for ``unstall``
    then_continue: bool = False  # after the stall, send the rest (default: drop the connection)
    corrupt: bool = False  # flip one byte in the middle of the body
    ranges: bool = True  # honour Range requests
    validators: bool = True  # send ETag and Last-Modified
    etag: bool = True  # with validators: send (and honour) the ETag too, not only Last-Modified
    chunked: bool = False  # no Content-Length; the body ends when the connection closes
    status: int | None = None  # answer every request with this status and no body
    redirect_to: str | None = None  # answer 302 with this Location
    delay: float = 0.0  # seconds to sleep after each 64 KiB written
    times: int | None = None  # apply to this many requests, then behave (None: always)


@dataclasses.dataclass
class Logged:
    """One request; logged when it arrives, ``status``/``body_bytes`` filled in as it goes."""

    method: str
    path: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0


@dataclasses.dataclass
class _File:
    data: bytes
    etag: str
    last_modified: str


class LoopbackServer:
    """Start with :meth:`start`; stop with :meth:`stop` (idempotent)."""

    def __init__(self) -> None:
        self.files: dict[str, _File] = {}
        self.faults: dict[str, Fault] = {}
        self.log: list[Logged] = []
        self.guard = threading.Condition()
        self.busy = 0  # requests being answered right now (not counting stalled ones)
        self.unstall = threading.Event()
        self.stalled = threading.Event()  # set when a response has reached its stall point
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- control -----------------------------------------------------------------------------

    def start(self) -> LoopbackServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.unstall.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def put(self, path: str, data: bytes, *, last_modified: float | None = None) -> str:
        """Serve ``data`` at ``path``; returns its sha256. A new body gets a new ETag."""
        digest = hashlib.sha256(data).hexdigest()
        stamp = formatdate(last_modified if last_modified is not None else time.time(), usegmt=True)
        with self.guard:
            self.files["/" + path.lstrip("/")] = _File(data, f'"{digest[:16]}"', stamp)
        return digest

    def fault(self, path: str, fault: Fault | None) -> None:
        with self.guard:
            if fault is None:
                self.faults.pop("/" + path.lstrip("/"), None)
            else:
                self.faults["/" + path.lstrip("/")] = fault

    def requests(self, path: str | None = None, method: str = "GET") -> list[Logged]:
        """Logged requests (stalled ones included); waits, boundedly, for answers still being
        written to finish, so their status and byte counts are final."""
        with self.guard:
            self.guard.wait_for(lambda: self.busy == 0, timeout=5)
            return [
                r
                for r in self.log
                if r.method == method and (path is None or r.path == "/" + path.lstrip("/"))
            ]

    def bytes_served(self, path: str) -> int:
        return sum(r.body_bytes for r in self.requests(path))

    def clear_log(self) -> None:
        with self.guard:
            self.guard.wait_for(lambda: self.busy == 0, timeout=5)
            self.log.clear()

    def _busy(self, delta: int) -> None:
        with self.guard:
            self.busy += delta
            self.guard.notify_all()

    def _take_fault(self, path: str) -> Fault | None:
        with self.guard:
            fault = self.faults.get(path)
            if fault is None:
                return None
            if fault.times is not None:
                if fault.times <= 0:
                    return None
                fault.times -= 1
            return fault


class _Handler(BaseHTTPRequestHandler):
    owner: LoopbackServer
    protocol_version = "HTTP/1.1"
    _sent = 0
    _record: Logged | None = None

    def log_message(self, format: str, *args: object) -> None:
        return None

    def do_GET(self) -> None:
        owner = self.owner
        owner._busy(+1)
        try:
            path = self.path.split("?", 1)[0]
            fault = owner._take_fault(path)
            with owner.guard:
                file = owner.files.get(path)
            record = Logged("GET", path, {k: v for k, v in self.headers.items()})
            with owner.guard:
                owner.log.append(record)
            self._record = record
            status, sent = self._answer(file, fault or Fault())
            with owner.guard:
                record.status, record.body_bytes = status, sent
        finally:
            owner._busy(-1)

    def _answer(self, file: _File | None, fault: Fault) -> tuple[int, int]:
        if fault.redirect_to is not None:
            self.send_response(302)
            self.send_header("Location", fault.redirect_to)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return 302, 0
        if fault.status is not None:
            return self._empty(fault.status), 0
        if file is None:
            return self._empty(404), 0
        data = file.data
        if fault.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        validators = fault.validators
        if validators:
            inm = self.headers.get("If-None-Match") if fault.etag else None
            ims = self.headers.get("If-Modified-Since")
            if (inm is not None and inm == file.etag) or (
                inm is None and ims is not None and ims == file.last_modified
            ):
                return self._empty(304, file), 0
        start = 0
        rng = self.headers.get("Range")
        if rng and fault.ranges and rng.startswith("bytes=") and rng.endswith("-"):
            if_range = self.headers.get("If-Range")
            current = validators and if_range in (file.etag, file.last_modified)
            if if_range is None or current:
                start = int(rng[len("bytes=") : -1])
                if start >= len(data):
                    return self._empty(416, file), 0
        body = data[start:]
        assert self._record is not None
        self._record.status = 206 if start else 200
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if fault.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if validators:
            if fault.etag:
                self.send_header("ETag", file.etag)
            self.send_header("Last-Modified", file.last_modified)
        if fault.chunked:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return (206 if start else 200), self._body(body, fault)

    def _body(self, body: bytes, fault: Fault) -> int:
        self._sent = 0
        try:
            if fault.stall_after is not None and fault.stall_after < len(body):
                self._send(body, fault.stall_after, fault)
                self.owner.stalled.set()
                self.owner._busy(-1)
                try:
                    self.owner.unstall.wait(STALL_LIMIT)
                finally:
                    self.owner._busy(+1)
                if not fault.then_continue:
                    self._drop()
                    return self._sent
            end = len(body)
            if fault.cut_after is not None:
                end = min(end, fault.cut_after)
            self._send(body, end, fault)
            if self._sent < len(body):
                self._drop()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        return self._sent

    def _send(self, body: bytes, end: int, fault: Fault) -> None:
        """Write body[self._sent:end]; self._sent counts what the socket accepted."""
        while self._sent < end:
            n = min(_WRITE, end - self._sent)
            self.wfile.write(body[self._sent : self._sent + n])
            self._sent += n
            if self._record is not None:
                self._record.body_bytes = self._sent
            if fault.delay:
                time.sleep(fault.delay)
        self.wfile.flush()

    def _drop(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _empty(self, status: int, file: _File | None = None) -> int:
        self.send_response(status)
        if file is not None and status in (304, 416):
            self.send_header("ETag", file.etag)
            if status == 416:
                self.send_header("Content-Range", f"bytes */{len(file.data)}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        return status
