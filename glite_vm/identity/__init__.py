"""Guest identity: the VM's hostname, its X.509 host certificate and the CAs it trusts.

Host-side and pure where it can be: :func:`prepare_guest_identity` turns settings and the job's
facts into a :class:`GuestSetup` (files, directories, commands) that the VM layer applies through
the guest agent before the payload starts. Private keys travel as :class:`Secret` and never show
in a ``repr``, a log line or an error message. See docs/identity.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from glite_vm._lazy import lazy_exports

if TYPE_CHECKING:
    from glite_vm.identity._certs import (
        BACKDATE,
        CA_CERT_FILE,
        CA_KEY_FILE,
        HOST_CERT_FILE,
        HOST_KEY_FILE,
        KEY_TYPES,
        MAX_CN,
        CaFiles,
        CertificateSource,
        CertificateSummary,
        HostCredentials,
        LocalCA,
        certificate_lifetime,
        certificate_source,
        host_credentials,
        init_ca,
        issue_to_directory,
        key_matches_certificate,
        load_ca_bundle,
        load_preissued,
        not_valid_after,
        not_valid_before,
        split_pem_certificates,
    )
    from glite_vm.identity._errors import (
        HostCertificateError,
        IdentityConfigError,
    )
    from glite_vm.identity._guest import (
        GRID_SECURITY_DIR,
        HOSTCERT_PATH,
        HOSTKEY_PATH,
        HOSTNAME_PATH,
        HOSTS_PATH,
        KERNEL_HOSTNAME_MAX,
        TRUST_DIR,
        GuestDirectory,
        GuestFile,
        GuestSetup,
        hosts_entry,
        merge_etc_hosts,
        plan_guest_setup,
        prepare_guest_identity,
        render_etc_hosts,
        trust_directory_files,
    )
    from glite_vm.identity._hostname import (
        JOB_HOSTNAME_FIELD,
        PLACEHOLDERS,
        hostname_from_pattern,
        resolve_hostname,
        validate_hostname,
    )
    from glite_vm.identity._secret import (
        Secret,
    )
    from glite_vm.identity._x509name import (
        subject_hash,
        subject_hash_old,
        subject_oneline,
    )

# Imported on first use: see glite_vm._lazy.
_EXPORTS: dict[str, tuple[str, ...]] = {
    "glite_vm.identity._certs": (
        "BACKDATE",
        "CA_CERT_FILE",
        "CA_KEY_FILE",
        "HOST_CERT_FILE",
        "HOST_KEY_FILE",
        "KEY_TYPES",
        "MAX_CN",
        "CaFiles",
        "CertificateSource",
        "CertificateSummary",
        "HostCredentials",
        "LocalCA",
        "certificate_lifetime",
        "certificate_source",
        "host_credentials",
        "init_ca",
        "issue_to_directory",
        "key_matches_certificate",
        "load_ca_bundle",
        "load_preissued",
        "not_valid_after",
        "not_valid_before",
        "split_pem_certificates",
    ),
    "glite_vm.identity._errors": ("HostCertificateError", "IdentityConfigError"),
    "glite_vm.identity._guest": (
        "GRID_SECURITY_DIR",
        "HOSTCERT_PATH",
        "HOSTKEY_PATH",
        "HOSTNAME_PATH",
        "HOSTS_PATH",
        "KERNEL_HOSTNAME_MAX",
        "TRUST_DIR",
        "GuestDirectory",
        "GuestFile",
        "GuestSetup",
        "hosts_entry",
        "merge_etc_hosts",
        "plan_guest_setup",
        "prepare_guest_identity",
        "render_etc_hosts",
        "trust_directory_files",
    ),
    "glite_vm.identity._hostname": (
        "JOB_HOSTNAME_FIELD",
        "PLACEHOLDERS",
        "hostname_from_pattern",
        "resolve_hostname",
        "validate_hostname",
    ),
    "glite_vm.identity._secret": ("Secret",),
    "glite_vm.identity._x509name": ("subject_hash", "subject_hash_old", "subject_oneline"),
}
__getattr__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "BACKDATE",
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "GRID_SECURITY_DIR",
    "HOSTCERT_PATH",
    "HOSTKEY_PATH",
    "HOSTNAME_PATH",
    "HOSTS_PATH",
    "HOST_CERT_FILE",
    "HOST_KEY_FILE",
    "JOB_HOSTNAME_FIELD",
    "KERNEL_HOSTNAME_MAX",
    "KEY_TYPES",
    "MAX_CN",
    "PLACEHOLDERS",
    "TRUST_DIR",
    "CaFiles",
    "CertificateSource",
    "CertificateSummary",
    "GuestDirectory",
    "GuestFile",
    "GuestSetup",
    "HostCertificateError",
    "HostCredentials",
    "IdentityConfigError",
    "LocalCA",
    "Secret",
    "certificate_lifetime",
    "certificate_source",
    "host_credentials",
    "hostname_from_pattern",
    "hosts_entry",
    "init_ca",
    "issue_to_directory",
    "key_matches_certificate",
    "load_ca_bundle",
    "load_preissued",
    "merge_etc_hosts",
    "not_valid_after",
    "not_valid_before",
    "plan_guest_setup",
    "prepare_guest_identity",
    "render_etc_hosts",
    "resolve_hostname",
    "split_pem_certificates",
    "subject_hash",
    "subject_hash_old",
    "subject_oneline",
    "trust_directory_files",
    "validate_hostname",
]
