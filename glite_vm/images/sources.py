"""What an image reference names, and whether the caller may name it. No I/O but realpath.

A reference is one of

* a **catalogue name** (``debian-12``): letters, digits, ``.``, ``_``, ``+``, ``-``;
* an **http(s) URL** of a custom image: a job may only name one that lies under a prefix in
  ``GLITE_VM_CUSTOM_IMAGE_SOURCES``; the comparison is on parsed, normalised components, so
  ``https://repo.example@evil.example/``, ``../`` segments and look-alike hosts do not pass;
* a **file URL** or an **absolute local path**: a host path. A job's ad may name one only when an
  admin listed a ``file://`` prefix that contains it (symbolic links resolved first), and the
  file is then opened with the job owner's rights and used only if the file actually opened
  lies under such a prefix (:func:`file_within` on the open descriptor's real path, in
  :mod:`glite_vm.images._transport`); the interactive caller (``allow_local=True``:
  ``glite-vm run`` / ``images pull`` in-process) may name any file it can read.

Every custom image, whatever its origin, is copied into the cache and inspected there before use.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from glite_vm.errors import ImageRefusedError, RequestError
from glite_vm.request import check_image_ref

NAME_MAX = 128
NAME_RE = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._+-]{{0,{NAME_MAX - 1}}}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
URL_SCHEMES = ("http", "https", "file")
_PATH_LIKE = re.compile(r"^[A-Za-z0-9._+/-]+$")
_DEFAULT_PORTS = {"http": 80, "https": 443}

RefKind = Literal["name", "url"]


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """A classified reference: a catalogue name, or a URL (local paths become ``file://``)."""

    kind: RefKind
    value: str  # the name, or the normalised URL that will be fetched
    label: str  # what the user wrote; used in messages and as ResolvedImage.name


def check_sha256(value: str | None, field: str = "GliteVmImageSha256") -> str | None:
    if value is None:
        return None
    digest = value.strip().lower()
    if not SHA256_RE.match(digest):
        raise RequestError(field, f"expected 64 hexadecimal digits, got {value!r}")
    return digest


def classify_ref(ref: str, *, sources: tuple[str, ...], allow_local: bool) -> ImageRef:
    """Classify ``ref`` and apply the custom-image policy; raise a hold-class error if refused."""
    check_image_ref(ref)
    if "://" in ref:
        url = normalise_url(ref)
        if allow_local or source_allowed(url, sources):
            return ImageRef("url", url, ref)
        allowed = ", ".join(sources) if sources else "none are configured"
        raise ImageRefusedError(
            _shortened(ref),
            "custom images must come from an allowed source "
            f"(GLITE_VM_CUSTOM_IMAGE_SOURCES: {allowed}); "
            "change GliteVmImage to a catalogue name or a URL under one of them",
        )
    if ref.startswith("/"):
        url = Path(os.path.normpath(ref)).as_uri()
        if allow_local or source_allowed(url, sources):
            return ImageRef("url", url, ref)
        raise ImageRefusedError(
            _shortened(ref),
            "a job may not name a host path; "
            "change GliteVmImage to a catalogue name or an allowed URL",
        )
    if NAME_RE.match(ref):
        return ImageRef("name", ref, ref)
    raise RequestError("GliteVmImage", _why_not_a_reference(ref, allow_local))


def _why_not_a_reference(ref: str, allow_local: bool) -> str:
    """What is wrong with ``ref``, which is neither a catalogue name nor a URL nor a path."""
    shown = repr(_shortened(ref))
    if ref.lower().startswith(tuple(f"{scheme}:" for scheme in URL_SCHEMES)):
        return f"{shown} is not a well-formed URL; write it as https://host/path"
    if _PATH_LIKE.match(ref) and ("/" in ref or ref in (".", "..")):
        if allow_local:
            return f"{shown} looks like a relative path; give it absolute"
        return (
            f"{shown} looks like a relative path; a job names a catalogue image "
            "or an http(s) URL under GLITE_VM_CUSTOM_IMAGE_SOURCES"
        )
    return (
        f"{shown} is neither a catalogue name (letters, digits, '.', '_', '+', '-', "
        f"at most {NAME_MAX} characters, starting with a letter or digit) nor a URL"
    )


def _shortened(text: str, limit: int = 100) -> str:
    """``text`` cut for a message, so the advice after it still fits in a hold reason."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalise_url(url: str) -> str:
    """Check an image URL's shape; return it without fragment. Hold-class error when malformed."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for an unbalanced "["
        raise RequestError("GliteVmImage", f"malformed URL {_shortened(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise RequestError(
            "GliteVmImage",
            f"unsupported URL scheme {_shortened(parts.scheme, 20)!r}; use http, https or file",
        )
    if parts.username is not None or parts.password is not None:
        # The message goes into the job ad and logs: never repeat a password there.
        hidden = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        raise ImageRefusedError(
            _shortened(hidden),
            "URLs with user names or passwords are not accepted; remove them from GliteVmImage",
        )
    path = unquote(parts.path)
    if "\0" in path:
        raise RequestError("GliteVmImage", f"the URL path of {_shortened(url)!r} contains %00")
    if "\\" in path or any(seg in (".", "..") for seg in path.split("/")):
        raise ImageRefusedError(
            _shortened(url),
            "the URL path must not contain '.', '..' or '\\' segments; fix GliteVmImage",
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise RequestError(
                "GliteVmImage", f"file URLs name a local path, not a host: {_shortened(url)}"
            )
        if not path.startswith("/"):
            raise RequestError(
                "GliteVmImage", f"file URL without an absolute path: {_shortened(url)}"
            )
        return Path(path).as_uri()
    if not parts.hostname:
        raise RequestError("GliteVmImage", f"URL without a host: {_shortened(url)}")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise RequestError("GliteVmImage", f"URL with an invalid port: {_shortened(url)}") from None
    return parts._replace(scheme=scheme, fragment="").geturl()


def source_allowed(url: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``url`` lies under one of the admin's allowed prefixes (component-wise)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    for prefix in prefixes:
        pre = urlsplit(prefix.strip())
        if pre.scheme.lower() != scheme:
            continue
        if scheme == "file":
            if _under(_real_file_path(parts.path), _real_file_path(pre.path), pre.path):
                return True
            continue
        if parts.username is not None or (pre.hostname or "") != (parts.hostname or ""):
            continue
        if _port(pre.port, scheme) != _port(parts.port, scheme):
            continue
        if _under(posixpath.normpath(unquote(parts.path) or "/"), unquote(pre.path), pre.path):
            return True
    return False


def file_prefixes(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The ``file://`` ones among the allowed prefixes."""
    return tuple(p.strip() for p in prefixes if urlsplit(p.strip()).scheme.lower() == "file")


def file_within(real_path: str, prefixes: tuple[str, ...]) -> bool:
    """Whether ``real_path`` (a path without links, e.g. of an open descriptor) lies under one
    of the ``file://`` prefixes, themselves taken with their links resolved."""
    for prefix in file_prefixes(prefixes):
        pre = urlsplit(prefix)
        if _under(os.path.normpath(real_path), _real_file_path(pre.path), pre.path):
            return True
    return False


def _real_file_path(path: str) -> str:
    return os.path.realpath(unquote(path) or "/")


def _port(port: int | None, scheme: str) -> int | None:
    return port if port is not None else _DEFAULT_PORTS.get(scheme)


def _under(path: str, prefix_path: str, raw_prefix: str) -> bool:
    """``path`` equals the prefix or lies below it on a segment boundary."""
    base = prefix_path.rstrip("/")
    if not base:  # a prefix of a whole host (or "/")
        return True
    if raw_prefix.endswith("/") or not raw_prefix:
        return path.startswith(base + "/")
    return path == base or path.startswith(base + "/")
