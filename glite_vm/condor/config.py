"""The condor_config.d snippet of an execute host (``glite-vm config``). Pure: text out.

Knob names and behaviour were checked against HTCondor 25.0.13 (docs/condor.md):

* ``STARTER_JOB_HOOK_KEYWORD`` is the admin's keyword; a job's ``+HookKeyword`` cannot replace it.
* Static slots: ``SLOT_TYPE_<n>`` / ``NUM_SLOTS_TYPE_<n>`` / ``SLOT_TYPE_<n>_PARTITIONABLE``.
  Memory may be absolute (MiB); disk only as a fraction, so ``DISK`` (KiB) sets the total the
  fractions divide: the VMs' disks live in glite-vm's state directory, not in HTCondor's
  execute directory, and their size is the site's choice.
* A job's ``GliteVmNetwork`` matches only slots whose host offers it: ``GLITE_VM_NETWORK`` (the
  default) or one of ``GLITE_VM_JOB_NETWORKS``, written into this snippet and read by START.
* ``STARTD_ATTRS`` publishes ``GliteVmRootEnabled``; ``SLOT_TYPE_<n>_GliteVmRootEnabled``
  overrides it per slot type. Slots of type 1 (user) are numbered before type 2 (root).
* The negotiator's default ``NEGOTIATOR_PRE_JOB_RANK`` starts with ``10000000 * My.Rank``, so
  a slot ``RANK`` that is higher on user slots makes ordinary jobs prefer them; the ``RANK``
  is constant per slot, so it never preempts a running job.
* Cache-aware matching lives in the central manager's ``NEGOTIATOR_PRE_JOB_RANK``
  (:func:`render_negotiator_config`), not in the slot's ``RANK``: a slot ``RANK`` that depends
  on the job makes a job whose image the host holds a candidate for *Rank preemption* of a
  running job that does not (the negotiator sorts candidates by the pre-job rank, then the
  job's ``RANK``, then ``NEGOTIATOR_POST_JOB_RANK``; a slot whose ``RANK`` for a new job beats
  its running job's is a preemption candidate even with ``PREEMPT = False``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Final

from glite_vm import __version__
from glite_vm.config import Settings
from glite_vm.errors import RequestError
from glite_vm.knob_values import check_network_name
from glite_vm.slots import ROOT_SLOT_TYPE, USER_SLOT_TYPE, SlotLayout
from glite_vm.units import KIB, MIB, format_size

HOOK_KEYWORD: Final = "GLITE_VM"
#: HTCondor hook name -> file in the hooks directory. No UPDATE_JOB_INFO: the starter ignores
#: its output, and the service's reaper (not a Python start per slot every
#: STARTER_UPDATE_INTERVAL) is what notices a guest or job that is gone.
HOOK_FILES: Final = {
    "PREPARE_JOB": "prepare_job",
    "JOB_EXIT": "job_exit",
}
LAUNCHER_FILE: Final = "launcher"
#: Where `glite-vm hook install` puts the hooks and where `glite-vm config` points by default.
DEFAULT_HOOKS_DIR: Final = Path("/usr/local/libexec/glite-vm")
#: The interpreter line of the copies in the source tree's ``hooks/``: whatever ``python3`` is
#: first on PATH, in isolated mode. Installed copies name the interpreter that has glite_vm.
PORTABLE_INTERPRETER: Final = "/usr/bin/env -S python3"
#: Hook or launcher file -> (module, the hook's name for ``main``).
HOOK_ENTRY_POINTS: Final = {
    "prepare_job": ("glite_vm.condor.hooks", "prepare_job"),
    "job_exit": ("glite_vm.condor.hooks", "job_exit"),
    LAUNCHER_FILE: ("glite_vm.condor.launcher", ""),
}
#: STARTD_CRON job name -> ``glite-vm`` sub-command.
CRON_JOBS: Final = {"GLITE_VM_ADVERTISE": "advertise", "GLITE_VM_REAP": "reap"}

# Characters a value may carry into condor_config unquoted: no blanks, '$' (macro expansion),
# quotes or backslashes (they end up inside ClassAd strings of the START expression).
_CONFIG_SAFE = re.compile(r"^[A-Za-z0-9_./+@%,:=~-]+$")
_USER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")  # as VMRequest checks owners


def default_hooks_dir() -> Path:
    """``hooks/`` of the source tree this package runs from (the portable copies)."""
    return Path(__file__).resolve().parents[2] / "hooks"


def hook_script(name: str, interpreter: str) -> str:
    """The executable ``name`` (a key of :data:`HOOK_ENTRY_POINTS`) run by ``interpreter``.

    ``-I`` (isolated mode) keeps the job's environment (``PYTHONPATH``, ``PYTHONHOME``, ...; the
    launcher *is* the job) and the hooks directory out of the interpreter's module search.
    """
    module, hook = HOOK_ENTRY_POINTS[name]
    if not interpreter.startswith("/") or "\n" in interpreter:
        raise ValueError(f"interpreter {interpreter!r} must be an absolute path")
    call = f"main({hook!r}, sys.argv[1:])" if hook else "main(sys.argv[1:])"
    return (
        f"#!{interpreter} -I\n"
        f"# glite-vm {name}: HTCondor calls this (docs/condor.md); all logic is in {module}.\n"
        "# `glite-vm hook install DIR` writes copies naming the Python that has glite_vm.\n"
        "import sys\n"
        "\n"
        f"from {module} import main\n"
        "\n"
        f"sys.exit({call})\n"
    )


@dataclasses.dataclass(frozen=True)
class ExecuteHostConfig:
    """Everything the snippet states. Build with :meth:`from_settings` or directly."""

    hooks_dir: Path
    glite_vm: Path  # the executable STARTD_CRON runs
    layout: SlotLayout = dataclasses.field(default_factory=SlotLayout)
    default_image: str = ""
    root_users: tuple[str, ...] = ()
    max_host_failures: int = 3
    network: str = "none"  # the VMs' network when a job asks for none
    job_networks: tuple[str, ...] = ()  # further networks a job may ask for
    max_debug_hold: int = 0  # seconds a failed job's VM may be kept (+GliteVmDebugHold); 0: off
    job_exit_timeout: int = 60  # seconds; HTCondor's default is 30
    advertise_period: int = 60
    reap_period: int = 30
    # where hooks, launcher and STARTD_CRON find the service and its state (they may run as
    # other users than `glite-vm config`, whose defaults depend on the user); None: not written
    state_dir: Path | None = None
    cache_dir: Path | None = None
    socket_path: Path | None = None

    def __post_init__(self) -> None:
        paths = [("hooks directory", self.hooks_dir), ("glite-vm", self.glite_vm)]
        for label, optional in (
            ("state directory", self.state_dir),
            ("cache directory", self.cache_dir),
            ("socket", self.socket_path),
        ):
            if optional is not None:
                paths.append((label, optional))
        for label, path in paths:
            if not path.is_absolute() or not _CONFIG_SAFE.match(str(path)):
                raise ValueError(
                    f"{label} path {str(path)!r} must be absolute and free of blanks, quotes, "
                    "backslashes and '$'"
                )
        if self.default_image and not _CONFIG_SAFE.match(self.default_image):
            raise ValueError(
                f"default image {self.default_image!r} must be free of blanks, quotes, "
                "backslashes and '$'"
            )
        for user in self.root_users:
            if not _USER_NAME.match(user):
                raise ValueError(f"root user {user!r} is not a valid user name")
        for name in (self.network, *self.job_networks):
            try:
                check_network_name(name)
            except RequestError as exc:
                raise ValueError(f"network {exc.problem}") from None
        for label, seconds in (
            ("job exit timeout", self.job_exit_timeout),
            ("advertise period", self.advertise_period),
            ("reap period", self.reap_period),
        ):
            if seconds < 1:
                raise ValueError(f"{label} must be at least 1 s, got {seconds}")
        if self.max_debug_hold < 0:
            raise ValueError(f"max debug hold must not be negative, got {self.max_debug_hold}")
        if self.max_host_failures < 0:
            raise ValueError(
                f"max host failures must not be negative, got {self.max_host_failures}"
            )

    @classmethod
    def from_settings(
        cls, settings: Settings, *, hooks_dir: Path, glite_vm: Path, layout: SlotLayout
    ) -> ExecuteHostConfig:
        return cls(
            hooks_dir=hooks_dir,
            glite_vm=glite_vm,
            layout=layout,
            default_image=settings.default_image,
            root_users=settings.root_users,
            max_host_failures=settings.max_host_failures,
            network=settings.network,
            job_networks=settings.job_networks,
            max_debug_hold=math.ceil(settings.max_debug_hold),
            # teardown is bounded by teardown_timeout; leave room for the hook's own start-up
            job_exit_timeout=math.ceil(settings.teardown_timeout) + 15,
            state_dir=settings.state_dir,
            cache_dir=settings.cache_dir,
            socket_path=settings.socket_path,
        )


#: HTCondor 25.0's default ``NEGOTIATOR_PRE_JOB_RANK`` (``condor_config_val`` of the release).
DEFAULT_PRE_JOB_RANK: Final = (
    "(10000000 * My.Rank) + (1000000 * (RemoteOwner =?= UNDEFINED)) - (100000 * Cpus) - Memory"
)
#: The weight of "this slot's host holds the job's image" in the pre-job rank: below the slot's
#: own RANK (user slots before root slots) and below "the slot is idle" (never preempt for a
#: cache hit), above the default's size terms for slots of up to 4 CPUs and 400 GiB.
CACHED_IMAGE_WEIGHT: Final = 500000


def render_negotiator_config() -> str:
    """The central manager's snippet (``glite-vm config --central-manager``): the default
    pre-job rank plus a term for slots whose host advertises the job's image in
    ``GliteVmCachedImages`` (docs/condor.md, "Cache-aware matching")."""
    lines = [
        f"# glite-vm {__version__}: central-manager configuration, written by "
        "`glite-vm config --central-manager`.",
        "# Regenerate rather than edit; `condor_reconfig` the negotiator after a change.",
        "",
        "# --- cache-aware matching: prefer an idle slot whose host already holds the job's",
        "# image (GliteVmImage in GliteVmCachedImages, from `glite-vm advertise`) ---",
        "GLITE_VM_HAS_IMAGE = "
        "(stringListMember(TARGET.GliteVmImage, MY.GliteVmCachedImages) =?= True)",
        "NEGOTIATOR_PRE_JOB_RANK = (10000000 * My.Rank) + "
        "(1000000 * (RemoteOwner =?= UNDEFINED)) + "
        f"({CACHED_IMAGE_WEIGHT} * $(GLITE_VM_HAS_IMAGE)) - (100000 * Cpus) - Memory",
    ]
    return "\n".join(lines) + "\n"


def _slot_type(n: int, count: int, layout: SlotLayout) -> list[str]:
    return [
        f"SLOT_TYPE_{n} = cpus={layout.cpus}, memory={layout.memory_mib}, disk=1/{layout.slots}",
        f"NUM_SLOTS_TYPE_{n} = {count}",
        f"SLOT_TYPE_{n}_PARTITIONABLE = False",
    ]


def _location_knobs(cfg: ExecuteHostConfig) -> list[str]:
    knobs = {
        "GLITE_VM_STATE_DIR": cfg.state_dir,
        "GLITE_VM_CACHE_DIR": cfg.cache_dir,
        "GLITE_VM_SOCKET_PATH": cfg.socket_path,
    }
    lines = [f"{name} = {value}" for name, value in knobs.items() if value is not None]
    if lines:
        lines.insert(0, "# the service's socket and state, for hooks and STARTD_CRON (other users)")
    return lines


def render_execute_config(cfg: ExecuteHostConfig) -> str:
    """The complete snippet, ready for ``/etc/condor/config.d/``."""
    layout = cfg.layout
    kw = HOOK_KEYWORD
    lines = [
        f"# glite-vm {__version__}: execute-host configuration, written by `glite-vm config`.",
        "# Regenerate rather than edit. Slot changes need `condor_restart -startd`; the rest",
        "# `condor_reconfig`.",
        "",
        "# --- hooks: every job on this host runs in its own VM ---",
        "# The admin's keyword wins over a job's +HookKeyword, so a job cannot skip the hooks.",
        f"STARTER_JOB_HOOK_KEYWORD = {kw}",
        *(f"{kw}_HOOK_{hook} = {cfg.hooks_dir / name}" for hook, name in HOOK_FILES.items()),
        f"{kw}_HOOK_JOB_EXIT_TIMEOUT = {cfg.job_exit_timeout}",
        f"GLITE_VM_LAUNCHER = {cfg.hooks_dir / LAUNCHER_FILE}",
        "",
        "# --- policy, read by the hooks and by START below ---",
        f"GLITE_VM_DEFAULT_IMAGE = {cfg.default_image}",
        f"GLITE_VM_ROOT_USERS = {', '.join(cfg.root_users)}",
        f"GLITE_VM_MAX_HOST_FAILURES = {cfg.max_host_failures}",
        "# the VMs' network, and the others a job may ask for (+GliteVmNetwork)",
        f"GLITE_VM_NETWORK = {cfg.network}",
        f"GLITE_VM_JOB_NETWORKS = {', '.join(cfg.job_networks)}",
        "# seconds a job's VM may be kept running after its program failed (+GliteVmDebugHold);",
        "# the slot stays taken meanwhile; 0: off. The service reads it (serve --condor-config).",
        f"GLITE_VM_MAX_DEBUG_HOLD = {cfg.max_debug_hold}",
        *_location_knobs(cfg),
        "",
        f"# --- {layout.slots} static VM slots of {layout.cpus} CPU(s), "
        f"{format_size(layout.memory_mib * MIB)}, {format_size(layout.disk_bytes)} disk; "
        f"the last {layout.root_slots} root-enabled ---",
        "# VM vCPUs are host threads: the startd counts exactly the VMs' CPUs.",
        f"NUM_CPUS = {layout.slots * layout.cpus}",
        "# The service reads the same layout (`glite-vm serve --condor-config`) and trusts only",
        "# it: a VM's root and size come from the slot its job's condor_starter runs.",
        *(f"{name} = {value}" for name, value in layout.knobs().items()),
        "# KiB shared out as the slots' Disk (the VMs' disk size; overlays are sparse).",
        f"DISK = {layout.slots * (layout.disk_bytes // KIB)}",
    ]
    if layout.user_slots:
        lines += _slot_type(USER_SLOT_TYPE, layout.user_slots, layout)
    if layout.root_slots:
        lines += _slot_type(ROOT_SLOT_TYPE, layout.root_slots, layout)
    lines += [
        "GliteVmRootEnabled = False",
        f"SLOT_TYPE_{ROOT_SLOT_TYPE}_GliteVmRootEnabled = True",
        "STARTD_ATTRS = $(STARTD_ATTRS) GliteVmRootEnabled",
        "",
        "# --- matching ---",
        "# Root jobs only on root-enabled slots, and only for GLITE_VM_ROOT_USERS when set;",
        "# jobs without GliteVmImage only when there is a default image; a job's GliteVmNetwork",
        "# only where it is offered.",
        "GLITE_VM_ROOT_JOB = (TARGET.GliteVmRoot =?= True)",
        # stringListsIntersect, not stringListMember: the PyPI classad2 bindings answer error
        # for stringListMember, and tools evaluating this policy with them must agree.
        'GLITE_VM_ROOT_USER_OK = (size("$(GLITE_VM_ROOT_USERS)") == 0 || '
        'stringListsIntersect(TARGET.Owner, "$(GLITE_VM_ROOT_USERS)", ", "))',
        "GLITE_VM_IMAGE_OK = (TARGET.GliteVmImage =!= undefined || "
        'size("$(GLITE_VM_DEFAULT_IMAGE)") > 0)',
        "GLITE_VM_NETWORK_OK = (TARGET.GliteVmNetwork =?= undefined || "
        'stringListsIntersect(TARGET.GliteVmNetwork, "$(GLITE_VM_NETWORK), '
        '$(GLITE_VM_JOB_NETWORKS)", ", "))',
        "# no new jobs while the host's service does not answer (`glite-vm advertise`)",
        "GLITE_VM_SERVICE_OK = (MY.GliteVmServiceUp =!= False)",
        "GLITE_VM_START = $(GLITE_VM_SERVICE_OK) && $(GLITE_VM_IMAGE_OK) && "
        "$(GLITE_VM_NETWORK_OK) && "
        "ifThenElse($(GLITE_VM_ROOT_JOB), "
        "MY.GliteVmRootEnabled =?= True && $(GLITE_VM_ROOT_USER_OK), True)",
        "START = ($(START)) && $(GLITE_VM_START)",
        "# Ordinary jobs prefer user slots (NEGOTIATOR_PRE_JOB_RANK weighs the slot's RANK).",
        "RANK = ($(RANK:0)) + ifThenElse(MY.GliteVmRootEnabled =?= True, 0, 1)",
        "",
        "# --- host facts for slot ads (GliteVmHypervisors, GliteVmCachedImages, ...) and the",
        "# reaper of VMs whose job is gone ---",
        f"STARTD_CRON_JOBLIST = $(STARTD_CRON_JOBLIST) {' '.join(CRON_JOBS)}",
    ]
    periods = {"advertise": cfg.advertise_period, "reap": cfg.reap_period}
    for job, command in CRON_JOBS.items():
        lines += [
            f"STARTD_CRON_{job}_EXECUTABLE = {cfg.glite_vm}",
            f"STARTD_CRON_{job}_ARGS = {command}",
            f"STARTD_CRON_{job}_MODE = Periodic",
            f"STARTD_CRON_{job}_PERIOD = {periods[command]}s",
        ]
    return "\n".join(lines) + "\n"
