"""HTCondor integration: job-ad I/O, hook status lines, the execute-host config generator.

Pure modules (no daemons needed): :mod:`glite_vm.condor.jobad` turns a job ad into a
:class:`~glite_vm.request.VMRequest` and formats what the hooks print;
:mod:`glite_vm.condor.config` writes the condor_config.d snippet of an execute host.
The measured HTCondor facts these rely on are in docs/condor.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glite_vm._lazy import lazy_exports

if TYPE_CHECKING:
    from glite_vm.condor.config import (
        ExecuteHostConfig,
        render_execute_config,
    )
    from glite_vm.condor.jobad import (
        HOST_FAILURES_ATTR,
        ad_safe_text,
        append_host_failure,
        chirp_literal,
        format_ad_updates,
        hook_status_lines,
        host_failure_count,
        host_failure_history,
        request_from_job_ad,
        status_code,
    )

# Imported on first use: see glite_vm._lazy.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "glite_vm.condor.config": ("ExecuteHostConfig", "render_execute_config"),
    "glite_vm.condor.jobad": (
        "HOST_FAILURES_ATTR",
        "ad_safe_text",
        "append_host_failure",
        "chirp_literal",
        "format_ad_updates",
        "hook_status_lines",
        "host_failure_count",
        "host_failure_history",
        "request_from_job_ad",
        "status_code",
    ),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "HOST_FAILURES_ATTR",
    "ExecuteHostConfig",
    "ad_safe_text",
    "append_host_failure",
    "chirp_literal",
    "format_ad_updates",
    "hook_status_lines",
    "host_failure_count",
    "host_failure_history",
    "render_execute_config",
    "request_from_job_ad",
    "status_code",
]
