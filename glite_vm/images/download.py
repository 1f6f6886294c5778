"""Streaming a URL into a ``.part`` file: resumable, hashed on the fly, durable at the end.

Next to ``X.part`` lives ``X.part.json`` (the *sidecar*): the URL, the validators the server gave
(ETag, Last-Modified) and the full size. It is written before the first byte of a fresh download,
so after a crash at any instant the pair tells whether the bytes on disk may be continued with an
HTTP Range request. A resume is only attempted when something can prove the bytes still belong to
the same resource: a strong ETag or Last-Modified (sent as If-Range, so a changed resource comes
back whole), or a known sha256 (checked end to end anyway). Otherwise the download starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import requests

from glite_vm.errors import CacheFullError, ChecksumMismatchError, DownloadError, ImageRefusedError
from glite_vm.images._fsutil import (
    atomic_write_json,
    is_disk_full,
    read_json_object,
    unlink_quietly,
)
from glite_vm.images._transport import CHUNK, FileAccess, Stream, Validators, open_url
from glite_vm.units import format_size

log = logging.getLogger(__name__)

#: Called as ``progress(bytes_done, bytes_total_or_None)`` while an image downloads.
Progress = Callable[[int, int | None], None]
Reserve = Callable[[int | None], None]
MAX_ATTEMPTS = 3  # connections that break after making progress are resumed this often


@dataclasses.dataclass(frozen=True)
class Downloaded:
    """A complete, fsynced ``.part`` file and what is known about it."""

    sha256: str
    size: int
    validators: Validators
    resumed_from: int  # bytes reused from an earlier, interrupted download (0: from scratch)
    transferred: int  # bytes received over the wire by this call


@dataclasses.dataclass(frozen=True)
class _Sidecar:
    url: str
    validators: Validators
    total: int | None

    @classmethod
    def load(cls, path: Path, url: str) -> _Sidecar | None:
        data = read_json_object(path)
        if data is None or data.get("url") != url:
            return None
        total = data.get("total")
        etag, modified = data.get("etag"), data.get("last_modified")
        if total is not None and (not isinstance(total, int) or total < 0):
            return None
        return cls(
            url,
            Validators(
                etag if isinstance(etag, str) else None,
                modified if isinstance(modified, str) else None,
            ),
            total,
        )

    def save(self, path: Path) -> None:
        atomic_write_json(
            path,
            {
                "url": self.url,
                "etag": self.validators.etag,
                "last_modified": self.validators.last_modified,
                "total": self.total,
            },
            durable=False,  # after a power cut a bad resume is caught by the digest and retried
        )


def sidecar_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def discard_part(part: Path) -> None:
    unlink_quietly(part, sidecar_path(part))


@dataclasses.dataclass(frozen=True)
class Fetch:
    """What to download where, and what the result must look like."""

    url: str
    part: Path
    label: str  # for messages: the catalogue name or the URL the user wrote
    expected_sha256: str | None
    expected_size: int | None
    max_bytes: int
    timeout: float
    follow_redirects: bool = True
    file_access: FileAccess = dataclasses.field(default_factory=FileAccess)


def download(
    session: requests.Session,
    fetch: Fetch,
    *,
    reserve: Reserve,
    progress: Progress | None = None,
    first: Stream | None = None,
    resume: bool = True,
) -> Downloaded:
    """Fetch ``fetch.url`` into ``fetch.part``, continuing an earlier part when provably safe.

    ``reserve(total)`` is called once the size is known and before any byte is written; it may
    raise (budget, free space). ``first`` is an already-open whole-resource answer to use instead
    of a new request. Errors: DownloadError (network; the part is kept for a later resume),
    CacheFullError (disk full; part removed), ChecksumMismatchError / ImageRefusedError when the
    size contradicts ``expected_size`` / ``max_bytes`` (part removed). Comparing the digest is
    the caller's job.
    """
    attempt = 0
    while True:
        attempt += 1
        stream = first
        first = None
        try:
            if stream is None:
                stream = _open(session, fetch, resume=resume)
            with stream:
                return _receive(stream, fetch, reserve=reserve, progress=progress)
        except _Interrupted as exc:
            if exc.received == 0 or attempt >= MAX_ATTEMPTS:
                raise exc.error from exc.error.__cause__
            log.warning("%s; resuming (attempt %d of %d)", exc.error, attempt + 1, MAX_ATTEMPTS)


class _Interrupted(Exception):
    def __init__(self, error: DownloadError, received: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.received = received


def _open(session: requests.Session, fetch: Fetch, *, resume: bool) -> Stream:
    """Open the resource, from where the part left off when that is provably the same resource."""
    url, part = fetch.url, fetch.part
    state = _Sidecar.load(sidecar_path(part), url) if resume else None
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        have = 0
    offset = have if state is not None else 0
    if (
        state is not None
        and state.total is not None
        and (
            have > state.total
            or (fetch.expected_size is not None and state.total != fetch.expected_size)
        )
    ):
        offset = 0
    validator = state.validators.if_range if state is not None else None
    if validator is None and fetch.expected_sha256 is None:
        offset = 0  # nothing could tell a changed resource from the old one
    if offset == 0:
        return _open_whole(session, fetch)
    assert state is not None
    log.info("resuming %s at byte %d", url, offset)
    stream = open_url(
        session,
        url,
        offset=offset,
        if_range=validator,
        timeout=fetch.timeout,
        follow_redirects=fetch.follow_redirects,
        file_access=fetch.file_access,
    )
    if stream.status == 206:
        same_total = stream.total is not None and stream.total == state.total
        etag = stream.validators.etag
        same_etag = not etag or not state.validators.etag or etag == state.validators.etag
        if same_total and same_etag:
            return stream
        log.info("%s changed since the interrupted download; starting over", url)
    elif stream.status == 200:
        log.info("%s: the server sent the whole file; starting over", url)
        return stream
    stream.close()
    return _open_whole(session, fetch)


def _open_whole(session: requests.Session, fetch: Fetch) -> Stream:
    return open_url(
        session,
        fetch.url,
        timeout=fetch.timeout,
        follow_redirects=fetch.follow_redirects,
        file_access=fetch.file_access,
    )


def _receive(
    stream: Stream, fetch: Fetch, *, reserve: Reserve, progress: Progress | None
) -> Downloaded:
    url, part = fetch.url, fetch.part
    if stream.status not in (200, 206):
        raise DownloadError(f"cannot fetch {url}: unexpected answer {stream.status}")
    offset = stream.offset if stream.status == 206 else 0
    total = stream.total
    if total is not None:
        _check_size(total, fetch)
    reserve(total)
    received = 0
    hasher = _Hasher()
    try:
        if offset == 0:
            _Sidecar(url, stream.validators, total).save(sidecar_path(part))
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        else:
            fd = os.open(part, os.O_RDWR | os.O_CLOEXEC)
            _hash_prefix(fd, offset, hasher.sha256)
            os.ftruncate(fd, offset)
            os.lseek(fd, offset, os.SEEK_SET)
        try:
            limit = min(x for x in (total, fetch.expected_size, fetch.max_bytes) if x is not None)
            for chunk in stream.chunks():
                received += len(chunk)
                if offset + received > limit:
                    _check_size(offset + received, fetch)
                    discard_part(part)
                    raise DownloadError(f"{url}: the server sent more bytes than it announced")
                hasher.feed(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                if progress is not None:
                    progress(offset + received, total)
            done = offset + received
            if total is not None and done != total:
                raise DownloadError(f"download of {url} broke off after {done} of {total} bytes")
            os.fsync(fd)
        finally:
            os.close(fd)
    except DownloadError as exc:
        if part.exists():
            raise _Interrupted(exc, received) from exc
        raise
    except OSError as exc:
        if is_disk_full(exc):
            discard_part(part)
            raise CacheFullError(
                f"the disk under the image cache filled up while downloading {fetch.label} "
                f"({format_size(offset + received)} written)"
            ) from exc
        raise DownloadError(f"cannot write the download of {fetch.label}: {exc}") from exc
    finally:
        digest = hasher.finish()
    return Downloaded(
        sha256=digest,
        size=offset + received,
        validators=stream.validators,
        resumed_from=offset,
        transferred=received,
    )


def _check_size(size: int, fetch: Fetch) -> None:
    if fetch.expected_size is not None and size != fetch.expected_size:
        discard_part(fetch.part)
        raise ChecksumMismatchError(
            fetch.label,
            fetch.expected_sha256 or "(none given)",
            f"a file of {size} bytes where the catalogue lists {fetch.expected_size}",
        )
    if size > fetch.max_bytes:
        discard_part(fetch.part)
        raise ImageRefusedError(
            fetch.label,
            f"file size {format_size(size)} exceeds the limit {format_size(fetch.max_bytes)} "
            "(GLITE_VM_MAX_IMAGE_FILE_BYTES)",
        )


class _Hasher:
    """sha256 on a second thread. hashlib releases the GIL for large buffers, so hashing one
    chunk overlaps receiving and writing the next; the queue bounds the memory in flight."""

    _DONE = b""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=8)
        self._thread: threading.Thread | None = None

    def feed(self, chunk: bytes) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self._thread.start()
        self._queue.put(chunk)

    def _run(self) -> None:
        while chunk := self._queue.get():
            self.sha256.update(chunk)

    def finish(self) -> str:
        if self._thread is not None:
            self._queue.put(self._DONE)
            self._thread.join()
            self._thread = None
        return self.sha256.hexdigest()


def _hash_prefix(fd: int, length: int, hasher: hashlib._Hash) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    left = length
    while left > 0:
        chunk = os.read(fd, min(CHUNK, left))
        if not chunk:
            raise DownloadError("the partial download shrank while it was being resumed")
        hasher.update(chunk)
        left -= len(chunk)
