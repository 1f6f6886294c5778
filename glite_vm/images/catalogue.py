"""The central catalogue: which images exist, where they are and what their digests are.

The catalogue is a JSON document (format in docs/images.md) at ``GLITE_VM_CATALOGUE``: an
http(s) or file URL, or an absolute path. A copy is kept in the cache directory together with the
server's validators; it is used without asking the server for ``GLITE_VM_CATALOGUE_MAX_AGE``
seconds, then revalidated with If-None-Match / If-Modified-Since. When the repository cannot be
reached (or serves a broken document) the cached copy is used and a warning gives its age.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from glite_vm.config import Settings
from glite_vm.errors import CacheFullError, CatalogueError, DownloadError, UnknownImageError
from glite_vm.images._fsutil import (
    atomic_write_bytes,
    atomic_write_json,
    is_disk_full,
    read_json_object,
)
from glite_vm.images._transport import NotFound, Validators, open_url
from glite_vm.images.inspect import SUPPORTED_FORMATS
from glite_vm.images.sources import NAME_RE, SHA256_RE, URL_SCHEMES

log = logging.getLogger(__name__)

CATALOGUE_VERSION = 1
MAX_CATALOGUE_BYTES = 32 * 1024 * 1024
BOOT_KINDS = ("disk", "kernel")


@dataclasses.dataclass(frozen=True)
class FileRef:
    """A file in the repository: absolute URL, digest and (when listed) size."""

    url: str
    sha256: str
    size: int | None = None


@dataclasses.dataclass(frozen=True)
class CatalogueEntry:
    name: str
    image: FileRef
    format: str  # "qcow2" | "raw"
    os: str = ""
    arch: str = "x86_64"
    boot: str = "disk"  # "disk": boot from the image; "kernel": direct kernel boot
    kernel: FileRef | None = None
    initrd: FileRef | None = None
    cmdline: str | None = None
    guest_user: str | None = None
    description: str = ""
    virtual_size: int | None = None

    @property
    def url(self) -> str:
        return self.image.url

    @property
    def sha256(self) -> str:
        return self.image.sha256

    @property
    def size(self) -> int | None:
        return self.image.size


@dataclasses.dataclass(frozen=True)
class Catalogue:
    """A parsed catalogue. ``stale`` when the repository could not confirm it just now."""

    url: str
    entries: Mapping[str, CatalogueEntry]
    checked_at: float  # when the repository last confirmed this content
    stale: bool = False

    def get(self, name: str) -> CatalogueEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise UnknownImageError(name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self.entries)

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.checked_at)


# --- parsing ---------------------------------------------------------------------------------


def parse_catalogue(data: bytes, base_url: str) -> dict[str, CatalogueEntry]:
    """Parse a catalogue document; relative URLs are resolved against ``base_url``.

    A structurally broken document raises CatalogueError; a single bad entry is skipped with a
    warning so one typo in the repository does not stop every other image.
    """
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise CatalogueError(f"catalogue {base_url} is not valid JSON: {exc}") from None
    except RecursionError:  # json's decoder recurses per level of [ and {
        raise CatalogueError(f"catalogue {base_url} is nested too deeply to be one") from None
    if not isinstance(doc, dict):
        raise CatalogueError(f"catalogue {base_url} is not a JSON object")
    if doc.get("version") != CATALOGUE_VERSION:
        raise CatalogueError(
            f"catalogue {base_url} has version {doc.get('version')!r}; "
            f"this glite-vm reads version {CATALOGUE_VERSION}"
        )
    images = doc.get("images")
    if not isinstance(images, list):
        raise CatalogueError(f"catalogue {base_url} has no 'images' list")
    entries: dict[str, CatalogueEntry] = {}
    for index, raw in enumerate(images):
        try:
            entry = parse_entry(raw, base_url)
        except ValueError as exc:
            log.warning("catalogue %s: image #%d skipped: %s", base_url, index + 1, exc)
            continue
        if entry.name in entries:
            log.warning("catalogue %s: duplicate image %r skipped", base_url, entry.name)
            continue
        entries[entry.name] = entry
    return entries


def parse_entry(raw: object, base_url: str) -> CatalogueEntry:
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    name = _str(raw, "name", required=True)
    if not NAME_RE.match(name):
        raise ValueError(f"invalid name {name!r}")
    image = _file_ref(raw, base_url, what=name)
    fmt = _str(raw, "format", required=True)
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"{name}: format must be one of {', '.join(SUPPORTED_FORMATS)}")
    boot = _str(raw, "boot") or "disk"
    if boot not in BOOT_KINDS:
        raise ValueError(f"{name}: boot must be one of {', '.join(BOOT_KINDS)}")
    kernel = initrd = None
    if boot == "kernel":
        kernel = _file_ref(
            _obj(raw, "kernel", name, required=True), base_url, what=f"{name} kernel"
        )
        initrd_raw = _obj(raw, "initrd", name, required=False)
        initrd = _file_ref(initrd_raw, base_url, what=f"{name} initrd") if initrd_raw else None
    virtual_size = raw.get("virtual_size")
    if virtual_size is not None and (not _is_int(virtual_size) or virtual_size < 0):
        raise ValueError(f"{name}: virtual_size must be a non-negative integer")
    return CatalogueEntry(
        name=name,
        image=image,
        format=fmt,
        os=_str(raw, "os"),
        arch=_str(raw, "arch") or "x86_64",
        boot=boot,
        kernel=kernel,
        initrd=initrd,
        cmdline=_str(raw, "cmdline") or None,
        guest_user=_str(raw, "guest_user") or None,
        description=_str(raw, "description"),
        virtual_size=virtual_size,
    )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(raw: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = raw.get(key)
    if value is None:
        if required:
            raise ValueError(f"missing {key!r}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string")
    if any(ord(c) < 32 for c in value):
        raise ValueError(f"{key!r} contains control characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape
        raise ValueError(f"{key!r} is not valid Unicode") from None
    return value


def _obj(raw: dict[str, Any], key: str, name: str, *, required: bool) -> dict[str, Any]:
    value = raw.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{name}: {key!r} must be an object with url and sha256")
    return value


def _file_ref(raw: dict[str, Any], base_url: str, *, what: str) -> FileRef:
    url = urljoin(base_url, _str(raw, "url", required=True))
    if urlsplit(url).scheme.lower() not in URL_SCHEMES:
        raise ValueError(f"{what}: URL {url!r} is not http, https or file")
    sha = _str(raw, "sha256", required=True).lower()
    if not SHA256_RE.match(sha):
        raise ValueError(f"{what}: sha256 must be 64 hexadecimal digits")
    size = raw.get("size")
    if size is not None and (not _is_int(size) or size < 0):
        raise ValueError(f"{what}: size must be a non-negative integer")
    return FileRef(url=url, sha256=sha, size=size)


# --- loading with a local copy ---------------------------------------------------------------


def catalogue_url(location: str) -> str:
    """The URL of the catalogue document for a ``GLITE_VM_CATALOGUE`` value."""
    loc = location.strip()
    if not loc:
        raise CatalogueError("no catalogue is configured; set GLITE_VM_CATALOGUE")
    if loc.startswith("/"):
        loc = Path(loc).as_uri() + ("/" if loc.endswith("/") else "")
    elif "://" not in loc:
        raise CatalogueError(f"GLITE_VM_CATALOGUE={loc!r} is neither a URL nor an absolute path")
    if urlsplit(loc).scheme.lower() not in URL_SCHEMES:
        raise CatalogueError(f"GLITE_VM_CATALOGUE={loc!r}: use http, https or file")
    return loc + "catalogue.json" if loc.endswith("/") else loc


class CatalogueStore:
    """The local copy of one catalogue, with its validators and the time it was last confirmed."""

    def __init__(self, cache_dir: Path, url: str) -> None:
        self.url = url
        key = hashlib.sha256(url.encode()).hexdigest()[:24]
        self.directory = cache_dir / "catalogue"
        self.body_path = self.directory / f"{key}.json"
        self.meta_path = self.directory / f"{key}.meta.json"

    def read(self) -> tuple[bytes, Validators, float] | None:
        meta = read_json_object(self.meta_path)
        if meta is None or meta.get("url") != self.url:
            return None
        try:
            body = self.body_path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(body).hexdigest() != meta.get("sha256"):
            return None  # body and meta from different writes: ignore the copy
        etag, modified, checked = meta.get("etag"), meta.get("last_modified"), meta.get("checked")
        return (
            body,
            Validators(
                etag if isinstance(etag, str) else None,
                modified if isinstance(modified, str) else None,
            ),
            float(checked) if isinstance(checked, int | float) else 0.0,
        )

    def write(self, body: bytes, validators: Validators, checked: float) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.body_path, body, durable=False)
            self.write_meta(body, validators, checked)
        except OSError as exc:
            if is_disk_full(exc):
                raise CacheFullError("the disk under the image cache is full") from exc
            raise

    def write_meta(self, body: bytes, validators: Validators, checked: float) -> None:
        atomic_write_json(
            self.meta_path,
            {
                "url": self.url,
                "sha256": hashlib.sha256(body).hexdigest(),
                "etag": validators.etag,
                "last_modified": validators.last_modified,
                "checked": checked,
            },
            durable=False,
        )


def load_catalogue(
    settings: Settings,
    *,
    session: requests.Session | None = None,
    max_age: float | None = None,
) -> Catalogue:
    """The catalogue, from the local copy when it is younger than ``max_age`` seconds
    (default ``settings.catalogue_max_age``), else revalidated with the repository.

    Raises CatalogueError when none is configured, DownloadError when the repository is
    unreachable and there is no local copy.
    """
    url = catalogue_url(settings.catalogue)
    store = CatalogueStore(settings.effective_cache_dir, url)
    cached = store.read()
    limit = settings.catalogue_max_age if max_age is None else max_age
    now = time.time()
    if cached is not None and 0 <= now - cached[2] < limit:
        return Catalogue(url, parse_catalogue(cached[0], url), cached[2])
    try:
        with contextlib.nullcontext(session) if session else requests.Session() as http:
            body, validators = _fetch(
                http, url, cached[1] if cached else None, settings.download_timeout
            )
        if body is None:  # 304: our copy is current
            assert cached is not None
            store.write_meta(cached[0], cached[1], now)
            return Catalogue(url, parse_catalogue(cached[0], url), now)
        entries = parse_catalogue(body, url)
    except (DownloadError, CatalogueError) as exc:
        if cached is None:
            raise
        log.warning(
            "catalogue %s: %s; using the local copy last confirmed %s ago",
            url,
            exc,
            format_age(now - cached[2]),
        )
        return Catalogue(url, parse_catalogue(cached[0], url), cached[2], stale=True)
    try:
        store.write(body, validators, now)
    except OSError as exc:  # a read-only or full cache must not stop jobs
        log.warning("catalogue %s: cannot keep a local copy: %s", url, exc)
    return Catalogue(url, entries, now)


def _fetch(
    session: requests.Session, url: str, validators: Validators | None, timeout: float
) -> tuple[bytes | None, Validators]:
    try:
        stream = open_url(session, url, conditional=validators, timeout=timeout)
    except NotFound as exc:
        raise DownloadError(f"the repository has no catalogue here ({exc})") from None
    with stream:
        if stream.status == 304:
            return None, stream.validators
        if stream.status != 200:
            raise DownloadError(f"unexpected answer {stream.status}")
        parts: list[bytes] = []
        size = 0
        for chunk in stream.chunks():
            size += len(chunk)
            if size > MAX_CATALOGUE_BYTES:
                raise CatalogueError(f"catalogue is larger than {MAX_CATALOGUE_BYTES} bytes")
            parts.append(chunk)
        body = b"".join(parts)
        if stream.total is not None and len(body) != stream.total:
            raise DownloadError(f"catalogue download broke off at {len(body)} bytes")
        return body, stream.validators


def format_age(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600}h"
