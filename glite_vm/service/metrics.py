"""The service's Prometheus metrics: what an admin's dashboard shows of one execute host.

One :class:`ServiceMetrics` per service, with its **own** ``CollectorRegistry`` (never
``prometheus_client``'s global one, so two services or two tests in one process count apart).
The engine holds it (:class:`~glite_vm.service.registry.VmRegistry` ``.metrics``) and calls its
``note``-methods where things happen; the image cache reports through it as its
:class:`~glite_vm.images.cache_observer.CacheObserver`; the server exports it
(:mod:`glite_vm.service.metrics_export`). The metric names and what each counts are listed in
docs/admin.md ("Metrics"); docs/grafana-glite-vm.json draws them.

Invariant: every label value comes from a fixed set (here, the protocol's operations and the
reaper's :data:`~glite_vm.service.reaper.REAP_KINDS`), or is the name of one of glite-vm's own
error classes (:func:`error_label`). Never a user name, an image name, a path, a
reason's text or anything else a job or a caller sent: a job could otherwise make one new series
per job (memory of the service and of every Prometheus that scrapes it), and its quotes and
newlines would have to be escaped right by every reader of the exposition. A value outside
the fixed sets is counted under ``other``.

Only this module, its exporter and ``glite-vm serve`` import ``prometheus_client``; the hooks
never do (tests/unit/test_plain_packages.py).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from glite_vm import __version__
from glite_vm.errors import GliteVmError, UserError
from glite_vm.service import protocol
from glite_vm.service.reaper import REAP_KINDS

log = logging.getLogger(__name__)

PREFIX = "glite_vm"

#: Whose a VM is, as far as a dashboard needs to know: a HTCondor job's that runs as root in
#: its guest, an ordinary HTCondor job's, or one started outside HTCondor (never a user name).
ROOT_JOB, USER_JOB, UNMANAGED = "root-job", "user-job", "unmanaged"
OWNER_CLASSES = (ROOT_JOB, USER_JOB, UNMANAGED)

#: Where a VM is in its life: admitted and fetching its image (no domain yet), booting (domain
#: defined, agent not ready), ready (prepared, serving its job), teardown-only (adopted after a
#: restart without its state: it can only be torn down), debug-held (its payload failed and it
#: is kept running for its owner to look inside: +GliteVmDebugHold).
PREPARING, BOOTING, READY, TEARDOWN_ONLY = "preparing", "booting", "ready", "teardown-only"
DEBUG_HELD = "debug-held"
VM_STATES = (PREPARING, BOOTING, READY, TEARDOWN_ONLY, DEBUG_HELD)

#: How a job's boot (one prepare call past admission, all its attempts) ended: its VM is ready,
#: the job's image or request is at fault (a hold-class error: the job is held), or the host is
#: (a requeue-class error).
BOOT_OUTCOMES = ("ok", "image_fault", "host_fault")
#: How one boot attempt ended: ready, failed in a way that is tried again (TransientBootError),
#: or failed for good.
ATTEMPT_OUTCOMES = ("ok", "transient", "failed")

OTHER = "other"
UNEXPECTED = "unexpected"  # an exception that is none of glite-vm's errors

#: Seconds from a prepare call to its VM's agent answering: from a warm cache on KVM (about a
#: second) to a cold download and a TCG boot (minutes); the site's target is 5 minutes.
READY_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TEARDOWN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

#: What a source of VM facts yields for each VM: (state, owner class).
VmFacts = Callable[[], Iterable[tuple[str, str]]]


def owner_class(*, managed: bool, root: bool) -> str:
    """The owner class of a VM (:data:`OWNER_CLASSES`)."""
    if not managed:
        return UNMANAGED
    return ROOT_JOB if root else USER_JOB


def error_label(exc: BaseException) -> str:
    """The label of an error: its class name when it is one of glite-vm's own (a bounded set,
    written in this code), else ``unexpected``. Never the message: that may quote a job."""
    cls = type(exc)
    if isinstance(exc, GliteVmError) and cls.__module__.startswith("glite_vm."):
        return cls.__name__
    return UNEXPECTED


def _bounded(value: str, allowed: Iterable[str]) -> str:
    return value if value in allowed else OTHER


class ServiceMetrics:
    """The service's counters, histograms and gauges, in their own registry (:attr:`registry`).

    Thread-safe (``prometheus_client``'s metrics are). Also the image cache's observer:
    :meth:`received`, :meth:`download_ended` and :meth:`evicted`.
    """

    def __init__(self, *, process: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            f"{PREFIX}_requests", "Calls the service answered, by operation", ["op"], registry=r
        )
        self.request_errors = Counter(
            f"{PREFIX}_request_errors",
            "Calls the service answered with an error, by operation and error class",
            ["op", "error"],
            registry=r,
        )
        self.boots = Counter(
            f"{PREFIX}_boots",
            "Jobs' VM boots (a prepare past admission, all attempts), by outcome",
            ["outcome"],
            registry=r,
        )
        self.boot_attempts = Counter(
            f"{PREFIX}_boot_attempts",
            "Boot attempts (image lease, VM start, agent wait), by outcome",
            ["outcome"],
            registry=r,
        )
        self.time_to_ready = Histogram(
            f"{PREFIX}_time_to_ready_seconds",
            "Seconds from a prepare call to its VM's agent answering (successful boots), by "
            "whether the image was in the cache",
            ["cache"],
            buckets=READY_BUCKETS,
            registry=r,
        )
        self.teardown = Histogram(
            f"{PREFIX}_teardown_seconds",
            "Seconds a VM's teardown took (destroy, snapshot by policy, hand-over)",
            buckets=TEARDOWN_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            f"{PREFIX}_cache_hits", "Image lookups found complete in the cache", registry=r
        )
        self.cache_misses = Counter(
            f"{PREFIX}_cache_misses", "Image lookups that had to fetch a file", registry=r
        )
        self.downloads = Counter(
            f"{PREFIX}_cache_downloads",
            "Files fetched into the image cache, by outcome (ok or the error class)",
            ["outcome"],
            registry=r,
        )
        self.downloaded_bytes = Counter(
            f"{PREFIX}_cache_downloaded_bytes",
            "Bytes received over the wire by completed downloads into the image cache",
            registry=r,
        )
        self.evictions = Counter(
            f"{PREFIX}_cache_evictions", "Cached files removed to make room", registry=r
        )
        self.evicted_bytes = Counter(
            f"{PREFIX}_cache_evicted_bytes",
            "Bytes of cached files removed to make room",
            registry=r,
        )
        self.reaps = Counter(
            f"{PREFIX}_reaps",
            "VMs the reaper tore down, by reason",
            ["reason"],
            registry=r,
        )
        self.holds = Counter(
            f"{PREFIX}_holds",
            "Prepares that failed with a hold-class error (the job is held), by error class",
            ["reason"],
            registry=r,
        )
        self.requeues = Counter(
            f"{PREFIX}_requeues",
            "Prepares that failed with a requeue-class error (the job is requeued, or held "
            "after GLITE_VM_MAX_HOST_FAILURES), by error class",
            ["reason"],
            registry=r,
        )
        Info(f"{PREFIX}_build", "The glite-vm version of the service", registry=r).info(
            {"version": __version__}
        )
        if process:
            ProcessCollector(namespace=PREFIX, registry=r)
        # Every fixed label value from the start: a dashboard shows 0, not "no data".
        for op in protocol.OPS:
            self.requests.labels(op)
        for outcome in BOOT_OUTCOMES:
            self.boots.labels(outcome)
        for outcome in ATTEMPT_OUTCOMES:
            self.boot_attempts.labels(outcome)
        for cache in ("hit", "miss"):
            self.time_to_ready.labels(cache)
        for reason in REAP_KINDS:
            self.reaps.labels(reason)
        self.downloads.labels("ok")
        self._vm_facts: VmFacts | None = None

    # -- the VMs now -------------------------------------------------------------------------

    def watch_vms(self, facts: VmFacts) -> None:
        """Count, at each scrape, the VMs ``facts()`` yields as ``glite_vm_vms`` (once)."""
        if self._vm_facts is not None:
            raise ValueError("these metrics already watch a book of VMs")
        self._vm_facts = facts
        self.registry.register(_VmGauge(facts))

    # -- what happened -----------------------------------------------------------------------

    def note_call(self, op: str, error: BaseException | None) -> None:
        """A call of ``op`` was answered (``error``: with that error)."""
        label = op if op in protocol.OPS else "invalid"
        self.requests.labels(label).inc()
        if error is not None:
            self.request_errors.labels(label, error_label(error)).inc()
            if label == "prepare":
                self.note_prepare_failed(error)

    def note_prepare_failed(self, error: BaseException) -> None:
        """A prepare failed: the hook holds or requeues its job by the error's class."""
        counter = self.holds if isinstance(error, UserError) else self.requeues
        counter.labels(error_label(error)).inc()

    def note_ready(self, seconds: float, *, cache_hit: bool) -> None:
        """A job's VM answered, ``seconds`` after its prepare call began."""
        self.boots.labels("ok").inc()
        self.time_to_ready.labels("hit" if cache_hit else "miss").observe(max(0.0, seconds))

    def note_boot_failed(self, error: BaseException) -> None:
        """A job's boot failed (after admission): the image's fault or the host's."""
        self.boots.labels("image_fault" if isinstance(error, UserError) else "host_fault").inc()

    def note_boot_attempt(self, outcome: str) -> None:
        self.boot_attempts.labels(_bounded(outcome, ATTEMPT_OUTCOMES)).inc()

    def note_cache_lookup(self, *, hit: bool) -> None:
        (self.cache_hits if hit else self.cache_misses).inc()

    def note_teardown(self, seconds: float) -> None:
        self.teardown.observe(max(0.0, seconds))

    def note_reap(self, reason: str) -> None:
        self.reaps.labels(_bounded(reason, REAP_KINDS)).inc()

    # -- the image cache's observer (glite_vm.images.cache_observer) -------------------------

    def received(self, transferred: int) -> None:
        self.downloaded_bytes.inc(max(0, transferred))

    def download_ended(self, error: BaseException | None) -> None:
        self.downloads.labels("ok" if error is None else error_label(error)).inc()

    def evicted(self, size: int) -> None:
        self.evictions.inc()
        self.evicted_bytes.inc(max(0, size))

    # -- exposition --------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format (what a scrape and the textfile get)."""
        return generate_latest(self.registry)


class _VmGauge(Collector):
    """``glite_vm_vms{state, owner_class}``: every combination, counted at each scrape."""

    NAME = f"{PREFIX}_vms"
    HELP = "VMs of the service, by state and owner class"

    def __init__(self, facts: VmFacts) -> None:
        self._facts = facts

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["state", "owner_class"])

    def collect(self) -> Iterator[Metric]:
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        try:
            for state, owner in self._facts():
                counts[_bounded(state, VM_STATES), _bounded(owner, OWNER_CLASSES)] += 1
        except Exception:  # a scrape must not fail over one VM's record
            log.exception("cannot count the VMs for the metrics")
            return
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["state", "owner_class"])
        for state in (*VM_STATES, OTHER):
            for owner in (*OWNER_CLASSES, OTHER):
                if OTHER not in (state, owner) or counts[state, owner]:
                    family.add_metric([state, owner], counts[state, owner])
        yield family


__all__ = [
    "BOOT_OUTCOMES",
    "OWNER_CLASSES",
    "VM_STATES",
    "ServiceMetrics",
    "error_label",
    "owner_class",
]
