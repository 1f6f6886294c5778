"""Opening a URL as a stream of bytes: http(s) through requests, file:// from the disk.

The one seam where bytes come from the outside world. Answers are normalised into
:class:`Stream`: whether the server honoured a Range request, the resource's full size when
known, and its validators (ETag, Last-Modified) for resuming and revalidating.

A ``file://`` URL a job named is opened under a :class:`FileAccess`: with the job owner's rights
(:mod:`glite_vm.images._open_as`), and refused unless the file *actually opened* lies under an
allowed prefix, judged by the real path of the open descriptor. A check of the path before the
open would let a link swapped in between lead anywhere, as a followed redirect would for http.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http.client
import os
import re
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import requests
import urllib3

from glite_vm.errors import DownloadError
from glite_vm.images._open_as import Reader, open_as
from glite_vm.images.sources import file_within

CHUNK = 1024 * 1024
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class NotFound(Exception):
    """The server or file system says the resource does not exist (404/410, ENOENT)."""


class Refused(Exception):
    """The file may not be used: its owner-to-be could not read it, or it lies elsewhere than
    the allowed sources. The text says which."""


@dataclasses.dataclass(frozen=True)
class FileAccess:
    """How a ``file://`` URL is opened: ``reader``'s rights (None: this process's), and
    ``within`` the ``file://`` prefixes the opened file's real path must lie under (None:
    anywhere, for the catalogue's files and the person at the keyboard)."""

    within: tuple[str, ...] | None = None
    reader: Reader | None = None


class Redirected(Exception):
    """The server redirects, and the caller asked not to follow redirects."""

    def __init__(self, url: str, location: str) -> None:
        super().__init__(f"{url} redirects to {location or '(nowhere)'}")
        self.location = location


@dataclasses.dataclass(frozen=True)
class Validators:
    etag: str | None = None
    last_modified: str | None = None

    @property
    def if_range(self) -> str | None:
        """A validator usable in If-Range (weak ETags are not)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


class Stream:
    """An open response. ``status`` is 200 (whole resource), 206 (from ``offset``), 304, 416."""

    def __init__(
        self,
        status: int,
        *,
        offset: int = 0,
        total: int | None = None,
        validators: Validators = Validators(),
    ) -> None:
        self.status = status
        self.offset = offset
        self.total = total
        self.validators = validators

    def chunks(self) -> Iterator[bytes]:
        return iter(())

    def close(self) -> None:
        return None

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HttpStream(Stream):
    def __init__(
        self,
        response: requests.Response,
        url: str,
        status: int,
        *,
        offset: int,
        total: int | None,
        validators: Validators,
    ) -> None:
        super().__init__(status, offset=offset, total=total, validators=validators)
        self._response = response
        self._url = url

    def chunks(self) -> Iterator[bytes]:
        raw = self._response.raw
        while True:
            try:
                chunk = raw.read(CHUNK, decode_content=False)
            except (urllib3.exceptions.HTTPError, requests.RequestException) as exc:
                raise DownloadError(f"download of {self._url} failed: {_describe(exc)}") from exc
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        self._response.close()


class _FileStream(Stream):
    def __init__(
        self, handle: BinaryIO, status: int, *, offset: int, total: int, validators: Validators
    ) -> None:
        super().__init__(status, offset=offset, total=total, validators=validators)
        self._handle = handle

    def chunks(self) -> Iterator[bytes]:
        while chunk := self._handle.read(CHUNK):
            yield chunk

    def close(self) -> None:
        self._handle.close()


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: requests wraps urllib3, which wraps the socket's error."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [getattr(current, "reason", None), current.__cause__, current.__context__]
        wrapped += [a for a in current.args if isinstance(a, BaseException)]
        todo += [w for w in wrapped if isinstance(w, BaseException)]


def _describe(exc: BaseException) -> str:
    """What went wrong with a connection, in words (not urllib3's object dumps)."""
    causes = list(_causes(exc))
    for cause in causes:
        if isinstance(cause, socket.gaierror):
            return "the host name does not resolve"
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the server's TLS certificate is not trusted ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return f"the TLS handshake failed ({cause.reason or cause})"
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused (nothing listens there)"
        if isinstance(cause, ConnectionResetError):
            return "the server reset the connection"
        if isinstance(cause, OSError) and cause.errno in _UNREACHABLE:
            return f"{cause.strerror or 'unreachable'}".lower()
    for cause in causes:
        if isinstance(cause, TimeoutError | requests.Timeout) or (
            isinstance(cause, urllib3.exceptions.TimeoutError)
            and not isinstance(cause, urllib3.exceptions.NewConnectionError)
        ):
            return "no answer in time (GLITE_VM_DOWNLOAD_TIMEOUT)"
        if isinstance(cause, urllib3.exceptions.ProtocolError | http.client.IncompleteRead):
            return "the connection broke off"
    text = re.sub(r" object at 0x[0-9a-f]+", "", str(exc)) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def open_url(
    session: requests.Session,
    url: str,
    *,
    offset: int = 0,
    if_range: str | None = None,
    conditional: Validators | None = None,
    timeout: float,
    follow_redirects: bool = True,
    file_access: FileAccess = FileAccess(),
) -> Stream:
    """Open ``url`` from ``offset``. Raise :class:`NotFound`, :class:`Redirected` (only when
    ``follow_redirects`` is false), :class:`Refused` (a file ``file_access`` does not allow)
    or DownloadError."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "file":
        return _open_file(url, offset=offset, conditional=conditional, access=file_access)
    if scheme not in ("http", "https"):
        raise DownloadError(f"cannot fetch {url}: unsupported scheme")
    headers = {"Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        if if_range:
            headers["If-Range"] = if_range
    if conditional is not None:
        if conditional.etag:
            headers["If-None-Match"] = conditional.etag
        if conditional.last_modified:
            headers["If-Modified-Since"] = conditional.last_modified
    try:
        response = session.get(
            url,
            headers=headers,
            stream=True,
            timeout=(timeout, timeout),
            allow_redirects=follow_redirects,
        )
    except requests.RequestException as exc:
        raise DownloadError(f"cannot fetch {url}: {_describe(exc)}") from exc
    try:
        return _interpret(response, url, offset)
    except BaseException:
        response.close()
        raise


def _interpret(response: requests.Response, url: str, offset: int) -> Stream:
    code = response.status_code
    validators = Validators(response.headers.get("ETag"), response.headers.get("Last-Modified"))
    if code in (404, 410):
        raise NotFound(f"HTTP {code} from {url}")
    if 300 <= code < 400 and code != 304:
        raise Redirected(url, response.headers.get("Location", ""))
    if code in (304, 416):
        response.close()
        return Stream(code, validators=validators)
    if code not in (200, 206):
        raise DownloadError(f"cannot fetch {url}: HTTP {code} {response.reason}")
    encoding = response.headers.get("Content-Encoding", "identity").lower()
    if encoding not in ("identity", ""):
        raise DownloadError(f"cannot fetch {url}: server sent Content-Encoding {encoding}")
    if code == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != offset:
            raise DownloadError(f"cannot fetch {url}: bad Content-Range in a partial answer")
        total = None if match.group(3) == "*" else int(match.group(3))
        return _HttpStream(response, url, 206, offset=offset, total=total, validators=validators)
    length = response.headers.get("Content-Length")
    total = int(length) if length and length.isdigit() else None
    return _HttpStream(response, url, 200, offset=0, total=total, validators=validators)


def file_validators(st: os.stat_result) -> Validators:
    """What stands in for an ETag for a local file: identity, size and modification time."""
    return Validators(etag=f'"{st.st_dev}-{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"')


def _open_file(
    url: str, *, offset: int, conditional: Validators | None, access: FileAccess
) -> Stream:
    path = Path(unquote(urlsplit(url).path))
    fd = _open_checked(path, access)
    handle = os.fdopen(fd, "rb", buffering=0)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        validators = file_validators(st)
        if conditional is not None and conditional.etag == validators.etag:
            handle.close()
            return Stream(304, validators=validators)
        if offset > st.st_size:
            handle.close()
            return Stream(416, validators=validators)
        handle.seek(offset)
        status = 206 if offset else 200
        return _FileStream(handle, status, offset=offset, total=st.st_size, validators=validators)
    except BaseException:
        with contextlib.suppress(OSError):
            handle.close()
        raise


def _open_checked(path: Path, access: FileAccess) -> int:
    """``path`` opened under ``access``; the descriptor."""
    reader = access.reader
    try:
        fd = open_as(reader, str(path))
    except FileNotFoundError as exc:
        raise NotFound(f"no such file {path}") from exc
    except OSError as exc:
        if reader is not None and exc.errno in (errno.EACCES, errno.EPERM):
            raise Refused(
                f"uid {reader.uid}, the job's owner, may not read {path} "
                f"({exc.strerror}); make it readable by the job's owner"
            ) from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(f"cannot open {path}: {exc.strerror}") from None
        raise DownloadError(f"cannot read {path}: {exc.strerror}") from exc
    if access.within is None:
        return fd
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        os.close(fd)
        raise DownloadError(f"cannot tell where {path} leads: {exc.strerror}") from exc
    if not file_within(real, access.within):
        os.close(fd)
        raise Refused(
            f"{path} leads to {real}, outside the allowed sources (GLITE_VM_CUSTOM_IMAGE_SOURCES)"
        )
    return fd
