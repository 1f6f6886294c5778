"""Warm start, the engine's side: which template a job's VM may be restored from, and making
templates (ahead of time, on request, and again after a template failed).

A job's VM is restored from a template (:mod:`glite_vm.vm.warm`, kept by
:mod:`glite_vm.images.templates`) when warm start is on (``GLITE_VM_WARM_START``) and a complete
template exists for its key: the image's digest and the VM's shape, the hypervisor's versions and
the template format. Anything else boots cold. Templates are made by booting the image once
through the same :meth:`~glite_vm.vm.lifecycle.VmHost.start` every job uses, for the images of
``GLITE_VM_WARM_IMAGES`` (ahead of time when the service starts, and after any cold boot of
theirs that found no usable template), or by ``glite-vm images warm NAME``.

A template is built from the image alone: no job's request, files, account name or identity
enters it (it boots as the image's own guest user, with no hostname and no certificates), so
what one job's guest learns is never in another's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import threading

import libvirt

from glite_vm.config import Settings
from glite_vm.images.acquire import ResolvedImage, acquire_image
from glite_vm.images.cache import ImageCache
from glite_vm.images.cache_budget import release_reservation, reserve
from glite_vm.images.templates import Template, TemplateKey, TemplateStore
from glite_vm.request import JobRequest, KeepSnapshot, VMRequest, vm_request
from glite_vm.slots import SlotFacts, SlotLayout
from glite_vm.vm.lifecycle import Vm, VmHost
from glite_vm.vm.qemu_user import qemu_ids
from glite_vm.vm.warm import TEMPLATE_FORMAT, save_template

log = logging.getLogger(__name__)

TEMPLATE_JOB = "warm-template"  # the job id of a template's VM (in its domain's name)
TEMPLATE_OWNER = "glite-vm"
# One template build at a time in this process: each is a VM that no slot, no per-user cap and
# no job counts, and with GLITE_VM_WARM_IMAGES = * any job's image gets one after its boot.
_BUILDER = threading.Lock()
_BUILDING: set[Vm] = set()  # the template VMs this process is building now (stop_builds)
_BUILDING_LOCK = threading.Lock()


def template_key(host: VmHost, request: VMRequest, image: ResolvedImage) -> TemplateKey:
    """The key of the template a VM for ``request`` of ``image`` may be restored from."""
    try:
        qemu, lib = str(host.conn.getVersion()), str(host.conn.getLibVersion())
    except libvirt.libvirtError:
        qemu = lib = "?"
    return TemplateKey(
        image_sha256=image.sha256,
        kernel=image.kernel.name if image.kernel else None,
        initrd=image.initrd.name if image.initrd else None,
        cmdline=image.cmdline,
        cpus=request.cpus,
        memory_mib=request.memory_mib,
        disk_bytes=max(image.virtual_size, request.disk_bytes),
        network=request.network,
        machine="pc",
        hypervisor=host.hypervisor.kind,
        qemu_version=f"{host.hypervisor.emulator}:{qemu}",
        libvirt_version=lib,
        template_format=TEMPLATE_FORMAT,
    )


def find_template(
    settings: Settings, host: VmHost, request: VMRequest, image: ResolvedImage
) -> Template | None:
    """The usable template for this VM, or None (warm start off, or none made yet)."""
    if not settings.warm_start:
        return None
    store = TemplateStore(ImageCache(settings))
    return store.find(template_key(host, request, image), image.path)


def wanted(settings: Settings, image_name: str) -> bool:
    """Should the service keep a template of ``image_name`` (GLITE_VM_WARM_IMAGES)?"""
    names = settings.warm_images
    return settings.warm_start and ("*" in names or image_name in names)


def build_template(
    settings: Settings, host: VmHost, request: VMRequest, image: ResolvedImage
) -> Template | None:
    """Boot ``image`` for a VM shaped like ``request`` and keep it as a template; the template
    (None when another process is building it right now). Raises what the boot raises."""
    key = template_key(host, request, image)
    cache = ImageCache(settings)
    store = TemplateStore(cache)
    digest = key.digest
    shape = dataclasses.replace(
        request,
        job_id=TEMPLATE_JOB,
        owner=TEMPLATE_OWNER,
        root=False,
        keep_snapshot=KeepSnapshot.NEVER,
        hostname=None,
    )
    estimate = request.memory_mib * (1 << 20) + (64 << 20)
    with store.building(key, image.path) as build:
        if build is None:
            return store.load(digest)
        reserve(cache, digest, estimate, cache.part_path(digest), f"template of {image.name}")
        try:
            # The building process stands as the VM's starter: if it dies before the save,
            # the service's next start adopts the VM and reaps it (its "starter" is gone).
            vm = host.start(shape, image, genid=True, starter_pid=os.getpid())
            with _BUILDING_LOCK:
                _BUILDING.add(vm)
            try:
                vm.wait_ready()
                assert vm.domain is not None
                ids = qemu_ids(host.conn, host.hypervisor.kind)
                made = vm.guest_account  # the account its clones' jobs run as
                save_template(
                    vm.domain,
                    vm.overlay,
                    vm.boot_log,
                    build,
                    qemu_gid=ids[1] if ids else None,
                    account=None if made is None else (vm.guest_user, made.gid),
                )
            finally:
                with _BUILDING_LOCK:
                    _BUILDING.discard(vm)
                vm.teardown(failed=False, keep_override=False)
                shutil.rmtree(vm.dir, ignore_errors=True)
        finally:
            release_reservation(cache, digest)
    return store.load(digest)


def stop_builds() -> None:
    """Take down the VMs of the template builds under way in this process (the service stops:
    a build's VM is nobody's job, and the next start would only reap it). Each build then
    fails and leaves no template; the image's next cold boot asks for one again."""
    with _BUILDING_LOCK:
        building = list(_BUILDING)
    for vm in building:
        log.info("stopping: the warm-start template build of %s ends", vm.name)
        vm.teardown(failed=False, keep_override=False)


def shape_request(
    settings: Settings, image_name: str, *, own: bool = False, network: str | None = None
) -> VMRequest:
    """The VM a job of ``image_name`` gets on this host, whose template to build ahead of
    time: a HTCondor job's in slot 1 (its size is the slot's), or with ``own`` a VM of
    ``glite-vm run`` (the default sizes)."""
    job = JobRequest.create(
        settings, image=image_name, job_id=TEMPLATE_JOB, owner=TEMPLATE_OWNER, network=network
    )
    slot = SlotFacts.own_vm() if own else SlotLayout.from_settings(settings).facts("slot1")
    assert slot is not None  # every layout has a slot 1
    return vm_request(job, slot, settings)


def build_ahead(settings: Settings, host: VmHost) -> threading.Thread | None:
    """Build the templates of ``GLITE_VM_WARM_IMAGES`` (catalogue names; ``*`` alone names
    none ahead of time) in one background thread; the thread, or None when there are none."""
    names = [n for n in settings.warm_images if n != "*"] if settings.warm_start else []
    if not names:
        return None

    def run() -> None:
        for name in names:
            try:
                request = shape_request(settings, name)
                with (
                    _BUILDER,
                    acquire_image(settings, name, job_id=f"{TEMPLATE_JOB}/ahead") as lease,
                ):
                    build_template(settings, host, request, lease.image)
            except Exception as exc:
                log.warning("building the warm-start template of %s failed: %s", name, exc)

    thread = threading.Thread(target=run, name="warm-template ahead of time", daemon=True)
    thread.start()
    return thread


def build_in_background(
    settings: Settings, host: VmHost, request: VMRequest, image_name: str, sha256: str
) -> threading.Thread | None:
    """Build the template for ``request`` in a thread of its own (with its own lease on the
    image) unless this process builds a template now (then none is queued: the image's next
    cold boot asks again); the thread, or None."""
    if not _BUILDER.acquire(blocking=False):
        log.info("a warm-start template is being built; %s's waits for its next cold boot", sha256)
        return None

    def run() -> None:
        try:
            lease = acquire_image(
                settings, image_name, sha256=sha256, job_id=f"{TEMPLATE_JOB}/{sha256[:16]}"
            )
            try:
                build_template(settings, host, request, lease.image)
            finally:
                lease.release()
        except Exception as exc:
            log.warning("building a warm-start template of %s failed: %s", image_name, exc)
        finally:
            _BUILDER.release()

    thread = threading.Thread(target=run, name=f"warm-template {image_name}", daemon=True)
    try:
        thread.start()
    except BaseException:
        _BUILDER.release()
        raise
    return thread


def discard_template(settings: Settings, key: str, reason: str) -> None:
    """Remove the template ``key`` (it failed: ``reason``); whoever wants it builds it again."""
    TemplateStore(ImageCache(settings)).remove(key, reason)


__all__ = [
    "build_ahead",
    "build_in_background",
    "build_template",
    "discard_template",
    "find_template",
    "shape_request",
    "stop_builds",
    "template_key",
    "wanted",
]
