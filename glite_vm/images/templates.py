"""Warm-start templates in the image cache: keyed, locked, crash-safe, counted and evicted.

A template (what :mod:`glite_vm.vm.warm` makes and restores VMs from) lives in the cache::

    templates/<key>/layer.qcow2    the frozen disk layer (backing file: the cached image)
    templates/<key>/state.sav      the saved memory state (a libvirt save image)
    templates/<key>/boot.log       the template's boot log
    templates/<key>/template.json  what the key was made of; written last; its mtime is the
                                   template's last use (LRU)
    templates/.build-<key>-<pid>/  a template being made (never handed out)
    locks/<key>.lock               the template's lock

``key`` is the sha256 of everything a saved machine depends on (:class:`TemplateKey`): the
image's digest (and its kernel, initrd and command line), vCPUs, memory, disk size, network,
machine type, hypervisor kind, QEMU and libvirt versions and :data:`TEMPLATE_FORMAT`. A change
of any part is another key; the old template is never used again and ages out.

Invariants. Everything is root's (the service's user's) and private: the directory is 0700,
the layer readable by QEMU's group only, the state and boot log 0600; a template is visible
only once complete (``rename`` of its build directory after ``template.json`` is written in
it) and never changes afterwards; only whole templates are removed, under their lock. Jobs do
not lease a template: a VM restored from one holds a hard link to its layer and a private
copy of its state, so eviction may remove a template at any time it is not locked. A template
whose image is gone from the cache, or whose files do not match its record, is removed when
looked up (and rebuilt by whoever wants it). A template of a custom image is keyed by that
image's digest: only jobs that boot exactly those bytes use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from glite_vm.images._fsutil import atomic_write_json, read_json_object
from glite_vm.images.cache_store import CacheEntry, CacheStore
from glite_vm.images.leases import process_alive

log = logging.getLogger(__name__)

TEMPLATES = "templates"
META = "template.json"
_KEY = re.compile(r"^[0-9a-f]{64}$")
_BUILD = re.compile(r"^\.build-(?P<key>[0-9a-f]{64})-(?P<pid>\d+)$")


@dataclasses.dataclass(frozen=True)
class TemplateKey:
    """Everything a saved machine depends on; :attr:`digest` names its template."""

    image_sha256: str
    kernel: str | None  # the cached kernel's and initrd's names (their digests), if any
    initrd: str | None
    cmdline: str | None
    cpus: int
    memory_mib: int
    disk_bytes: int
    network: str
    machine: str
    hypervisor: str
    qemu_version: str
    libvirt_version: str
    template_format: int

    @property
    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Template:
    """A complete template on disk (see the module docstring)."""

    key: str
    directory: Path
    image_path: Path  # the cached image its layer backs onto
    size: int

    @property
    def layer(self) -> Path:
        return self.directory / "layer.qcow2"

    @property
    def state(self) -> Path:
        return self.directory / "state.sav"

    @property
    def boot_log(self) -> Path:
        return self.directory / "boot.log"


class TemplateStore:
    """The templates of the cache of ``store`` (an :class:`ImageCache` or its store)."""

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self.root = store.root / TEMPLATES

    def path(self, key: str) -> Path:
        return self.root / key

    def find(self, key: TemplateKey, image_path: Path) -> Template | None:
        """The complete template for ``key`` whose layer backs onto ``image_path``, marked as
        used now; None when there is none. A template that no longer matches (its image gone,
        files missing, another key) is removed on the way; one whose files no longer match
        its record raises ``ValueError`` after it is removed (the caller says why it boots
        cold)."""
        digest = key.digest
        found = self.load(digest)
        if found is None:
            if (self.path(digest) / META).exists() and self.remove(digest, "files changed"):
                raise ValueError(f"template {digest} was incomplete or changed; removed")
            return None
        meta = read_json_object(found.directory / META) or {}
        stale = meta.get("key") != dataclasses.asdict(key) or found.image_path != image_path
        if stale or not image_path.exists():
            self.remove(digest, "its image or key changed")
            return None
        with contextlib.suppress(OSError):
            os.utime(found.directory / META)
        return found

    def load(self, key: str) -> Template | None:
        """The template named ``key`` if it is complete (no checks beyond its files)."""
        directory = self.path(key)
        meta = read_json_object(directory / META)
        if meta is None or not _KEY.match(key):
            return None
        try:
            image = Path(str(meta["image_path"]))
            sizes = {name: (directory / name).stat().st_size for name in _FILES}
        except (KeyError, FileNotFoundError):
            return None
        if sizes != meta.get("sizes"):
            return None
        return Template(key, directory, image, sum(sizes.values()))

    @contextlib.contextmanager
    def building(self, key: TemplateKey, image_path: Path) -> Iterator[Path | None]:
        """A new, private build directory for ``key``'s template, installed as the template
        when the block ends without an error (and removed when it raises). Yields None, and
        builds nothing, when another process is building it now or it exists already."""
        digest = key.digest
        self.store.make_dirs()
        self.root.mkdir(mode=0o700, exist_ok=True)
        lock = self.store.try_lock(digest)
        if lock is None:
            yield None
            return
        build = self.root / f".build-{digest}-{os.getpid()}"
        try:
            if self.load(digest) is not None:
                yield None
                return
            shutil.rmtree(build, ignore_errors=True)
            build.mkdir(mode=0o700)
            yield build
            sizes = {name: (build / name).stat().st_size for name in _FILES}
            doc = {
                "key": dataclasses.asdict(key),
                "image_path": str(image_path),
                "sizes": sizes,
                "created": time.time(),
            }
            atomic_write_json(build / META, doc, durable=True)
            shutil.rmtree(self.path(digest), ignore_errors=True)  # an incomplete leftover
            build.rename(self.path(digest))
            log.info("built warm-start template %s (%d bytes)", digest, sum(sizes.values()))
        finally:
            shutil.rmtree(build, ignore_errors=True)
            lock.release()

    def remove(self, key: str, reason: str) -> bool:
        """Remove the template ``key`` unless someone holds its lock; whether it went."""
        lock = self.store.try_lock(key)
        if lock is None:
            return False
        try:
            if not self.path(key).exists():
                return False
            shutil.rmtree(self.path(key), ignore_errors=True)
            log.info("removed warm-start template %s: %s", key, reason)
            return True
        finally:
            lock.release()

    @contextlib.contextmanager
    def held(self, key: str) -> Iterator[None]:
        """Hold ``key``'s lock (waiting): a restore links the template's files under it."""
        with self.store.locked(key, what=f"warm-start template {key}"):
            yield

    def entries(self) -> list[CacheEntry]:
        """Complete templates as cache entries (``kind`` "template"), for the budget; build
        directories of dead processes are removed on the way."""
        out = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        for name in names:
            build = _BUILD.match(name)
            if build is not None:
                if not process_alive(int(build["pid"]), None):
                    shutil.rmtree(self.root / name, ignore_errors=True)
                continue
            found = self.load(name)
            if found is None:
                continue
            try:
                mst = (found.directory / META).stat()
            except FileNotFoundError:
                continue
            out.append(
                CacheEntry(
                    sha256=name,
                    path=found.directory,
                    size=found.size,
                    kind="template",
                    format=None,
                    virtual_size=None,
                    sources=(f"warm-start template of {found.image_path.name}",),
                    created=mst.st_ctime,
                    last_used=mst.st_mtime,
                )
            )
        return out


_FILES = ("layer.qcow2", "state.sav", "boot.log")

__all__ = ["META", "TEMPLATES", "Template", "TemplateKey", "TemplateStore"]
