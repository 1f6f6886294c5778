"""Where the service's metrics go: an HTTP endpoint for Prometheus, a node_exporter textfile.

Both are the admin's choice and off by default (``GLITE_VM_METRICS_ADDRESS``,
``GLITE_VM_METRICS_TEXTFILE``, docs/admin.md "Metrics").

The endpoint (:class:`MetricsEndpoint`) is ``prometheus_client``'s WSGI app behind a server
that every local user can reach (loopback), so it is bounded like the service's socket: at most
:data:`MAX_CLIENTS` connections are served at once (more are closed at once, unanswered), and
a connection that sends nothing for :data:`CLIENT_TIMEOUT` seconds is dropped, so a flood of
idle connections costs neither threads nor the admin's scrape. It binds exactly the address
the settings name (a literal IP; one that is not loopback only when the admin allowed it,
:class:`~glite_vm.config.MetricsAddress`).

The textfile (:func:`write_textfile`) is rewritten whole: a new file with a random name is
created next to it (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0644 whatever the umask), written
and renamed over the old one, so node_exporter never reads half a file, and a link someone
planted at the file's name (or at any name the service might use for the new file) is
replaced, never written through. ``prometheus_client.write_to_textfile`` is not used: its
temporary name is predictable and it opens it following links, which as root would write
the metrics into whatever file a local user's link pointed at.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client.exposition import make_wsgi_app

from glite_vm.config import Settings
from glite_vm.errors import HostError
from glite_vm.knob_values import MetricsAddress
from glite_vm.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)

MAX_CLIENTS = 8  # connections to the endpoint served at once
CLIENT_TIMEOUT = 10.0  # seconds a connection may stay silent before it is dropped
TEXTFILE_MODE = 0o644


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (one every few seconds)."""


class _BoundedServer(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most ``max_clients`` of them."""

    daemon_threads = True
    max_clients = MAX_CLIENTS

    def server_activate(self) -> None:
        self._slots = threading.BoundedSemaphore(self.max_clients)
        super().server_activate()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: closed unanswered, a scraper retries
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsEndpoint:
    """Serves ``metrics`` over HTTP at ``address`` from a thread, until :meth:`stop`."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        address: MetricsAddress,
        *,
        max_clients: int = MAX_CLIENTS,
        client_timeout: float = CLIENT_TIMEOUT,
    ) -> None:
        self.address = address
        self.max_clients = max_clients
        self.client_timeout = client_timeout
        self._app = make_wsgi_app(metrics.registry)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port."""
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Bind and serve; a HostError naming the setting when the address cannot be bound."""
        server_class: type[_BoundedServer] = type(
            "MetricsServer",
            (_BoundedServer,),
            {
                "max_clients": self.max_clients,
                "address_family": socket.AF_INET6 if ":" in self.address.host else socket.AF_INET,
            },
        )
        # socketserver sets a handler's timeout on its connection: a silent client is dropped
        handler_class: type[_Handler] = type(
            "MetricsHandler", (_Handler,), {"timeout": self.client_timeout}
        )
        try:
            server: _BoundedServer = make_server(
                self.address.host,
                self.address.port,
                self._app,
                server_class=server_class,
                handler_class=handler_class,
            )
        except OSError as exc:
            raise HostError(
                f"cannot serve metrics at {self.address} (GLITE_VM_METRICS_ADDRESS): "
                f"{exc.strerror or exc}"
            ) from None
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


class MetricsExport:
    """The exports the settings ask for: :meth:`start` binds the endpoint (if any), :meth:`write`
    rewrites the textfile (if any; the service calls it every reaper pass), :meth:`stop` ends
    both. A textfile that cannot be written is logged when the problem starts or changes, and
    never stops the service."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.metrics = metrics
        self.textfile = settings.metrics_textfile
        self.endpoint = (
            MetricsEndpoint(metrics, settings.metrics_address)
            if settings.metrics_address is not None
            else None
        )
        self._problem: str | None = None

    def start(self) -> None:
        if self.endpoint is not None:
            self.endpoint.start()
            log.info("serving metrics at http://%s/metrics", self.endpoint.address)
        if self.textfile is not None:
            self.write()
            log.info("writing metrics to %s every reaper pass", self.textfile)

    def write(self) -> None:
        if self.textfile is None:
            return
        try:
            write_textfile(self.textfile, self.metrics.exposition())
        except OSError as exc:
            problem = f"cannot write the metrics to {self.textfile}: {exc.strerror or exc}"
            if problem != self._problem:
                log.warning("%s (GLITE_VM_METRICS_TEXTFILE)", problem)
            self._problem = problem
            return
        if self._problem is not None:
            log.info("writing metrics to %s again", self.textfile)
            self._problem = None

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()


def write_textfile(path: Path, data: bytes) -> None:
    """Replace ``path`` by a file holding ``data`` (mode 0644), atomically and without following
    a link at ``path`` (see the module docstring). Raises OSError."""
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        temp = f".{path.name}.{secrets.token_hex(8)}.tmp"  # node_exporter reads only *.prom
        fd = os.open(
            temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            TEXTFILE_MODE,
            dir_fd=directory,
        )
        try:
            try:
                os.fchmod(fd, TEXTFILE_MODE)  # the umask may have taken bits off
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.rename(temp, path.name, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=directory)
            raise
    finally:
        os.close(directory)


__all__ = ["CLIENT_TIMEOUT", "MAX_CLIENTS", "MetricsEndpoint", "MetricsExport", "write_textfile"]
