"""Errors of the identity module: which side must fix what."""

from __future__ import annotations

from glite_vm.errors import HostError, UserError


class HostCertificateError(UserError):
    """No usable host certificate for the VM's hostname; the job is held with the reason.

    Raised in pre-issued mode when the pair for the hostname is missing, unreadable as PEM, for
    another host, out of its validity period, or when the key does not belong to the
    certificate. Another execute host of the same site shares the directory, so requeueing
    would not help: the job waits on hold until the admin (or the job's GliteVmHostname) is
    fixed.
    """

    def __init__(self, hostname: str, reason: str) -> None:
        super().__init__(f"no usable host certificate for {hostname}: {reason}")
        self.hostname = hostname
        self.reason = reason


class IdentityConfigError(HostError, ValueError):
    """This host's identity settings (pattern, CA, certificate directory) are unusable."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"setting GLITE_VM_{setting}: {problem}")
        self.setting = setting
        self.problem = problem
