"""The VM's hostname: from the admin's pattern, or from the job where the admin allows it.

Pure: the caller passes the execute host's name, the slot name and the job id.
"""

from __future__ import annotations

import hashlib
import re

from glite_vm.config import Settings
from glite_vm.errors import RequestError
from glite_vm.identity.errors import IdentityConfigError

MAX_HOSTNAME = 253  # RFC 1035 name length without the trailing dot
MAX_LABEL = 63
JOB_HOSTNAME_FIELD = "GliteVmHostname"
PLACEHOLDERS = ("host", "fqdn", "domain", "slot", "cluster", "proc", "job")

_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_NOT_LABEL_CHAR = re.compile(r"[^a-z0-9-]")
_NOT_NAME_CHAR = re.compile(r"[^a-z0-9.-]")
# "123.0" (ClusterId.ProcId) or a GlobalJobId "schedd.example.org#123.0#1700000000"
_CLUSTER_PROC = re.compile(r"(?:^|#)(\d+)\.(\d+)(?:#|$)")
_HASH_SUFFIX = 8


def _shown(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def validate_hostname(name: object, field: str = JOB_HOSTNAME_FIELD) -> str:
    """Check that ``name`` is an RFC 1123 host name as it stands; return it in lower case.

    Nothing is repaired: a name a job asks for is used exactly or refused with a
    :class:`~glite_vm.errors.RequestError` naming ``field``.
    """
    if not isinstance(name, str):
        raise RequestError(field, f"must be a string, got {type(name).__name__}")
    if not name:
        raise RequestError(field, "is empty")
    if len(name) > MAX_HOSTNAME:
        raise RequestError(field, f"is {len(name)} characters long; at most {MAX_HOSTNAME}")
    if not name.isascii():
        raise RequestError(
            field, f"{_shown(name)} is not ASCII; write internationalised names as xn-- labels"
        )
    lowered = name.lower()
    labels = lowered.split(".")
    for label in labels:
        if not label:
            raise RequestError(
                field, f"{_shown(name)} has an empty label (a leading, trailing or doubled dot)"
            )
        if len(label) > MAX_LABEL:
            raise RequestError(
                field, f"label {_shown(label)} is {len(label)} characters; at most {MAX_LABEL}"
            )
        if not _LABEL.fullmatch(label):
            raise RequestError(
                field,
                f"label {_shown(label)} may hold only letters, digits and hyphens, "
                "and must not start or end with a hyphen",
            )
    if labels[-1].isdigit():
        raise RequestError(
            field, f"{_shown(name)} ends in an all-numeric label and would read as an IP address"
        )
    return lowered


def resolve_hostname(
    settings: Settings, *, host: str, slot: str, job_id: str, requested: str | None
) -> str:
    """The hostname of the job's VM.

    ``requested`` is the job's ``GliteVmHostname`` (``None`` when the job has none): used only
    when ``settings.allow_job_hostname`` is on and, when ``settings.job_hostname_domains`` is
    set, only inside those domains; validated strictly. Otherwise the name comes from
    ``settings.hostname_pattern`` (see :func:`hostname_from_pattern`).
    """
    if requested is not None:
        return _job_hostname(settings, requested)
    return hostname_from_pattern(settings.hostname_pattern, host=host, slot=slot, job_id=job_id)


def _job_hostname(settings: Settings, requested: object) -> str:
    if not settings.allow_job_hostname:
        raise RequestError(
            JOB_HOSTNAME_FIELD,
            "this site does not let jobs choose the VM hostname "
            "(GLITE_VM_ALLOW_JOB_HOSTNAME is off); remove it from the submit file",
        )
    name = validate_hostname(requested, JOB_HOSTNAME_FIELD)
    domains = [d.strip(".").lower() for d in settings.job_hostname_domains if d.strip(".")]
    if domains and not any(name == d or name.endswith("." + d) for d in domains):
        raise RequestError(
            JOB_HOSTNAME_FIELD,
            f"{name!r} is outside the domains this site allows: {', '.join(domains)}",
        )
    return name


def hostname_from_pattern(pattern: str, *, host: str, slot: str, job_id: str) -> str:
    """Fill ``pattern``'s placeholders and turn the result into a valid host name.

    Placeholders: ``{host}`` (first label of the execute host's name), ``{fqdn}`` (its full
    name), ``{domain}`` (its name without the first label; empty if it has none), ``{slot}``
    (the slot name before any ``@``, e.g. ``slot1_2``), ``{cluster}`` and ``{proc}`` (from a
    ``cluster.proc`` job id or a GlobalJobId) and ``{job}`` (``cluster-proc``, or the whole job
    id when it has no such form).

    The result is lower-cased; characters other than letters, digits, hyphens and dots become
    hyphens; empty labels disappear (so ``{host}.{domain}`` works on a host without a domain);
    hyphens at the ends of labels are dropped; a label longer than 63 characters is cut and
    ends in a short digest of the whole label, so distinct long values stay distinct.
    Raises :class:`IdentityConfigError` (the host's fault: requeue) for a malformed pattern or
    when the result is empty, longer than 253 characters or all-numeric at the end.
    """
    used = _placeholders(pattern)
    values = _placeholder_values(used, host=host, slot=slot, job_id=job_id, pattern=pattern)
    filled = _PLACEHOLDER.sub(lambda m: values[m.group(1)], pattern)
    name = _normalise(filled)
    context = f"(host={_shown(host)}, slot={_shown(slot)}, job id={_shown(job_id)})"
    if not name:
        raise IdentityConfigError(
            "HOSTNAME_PATTERN", f"{pattern!r} gives an empty hostname {context}"
        )
    if len(name) > MAX_HOSTNAME:
        raise IdentityConfigError(
            "HOSTNAME_PATTERN",
            f"{pattern!r} gives a hostname of {len(name)} characters; at most {MAX_HOSTNAME} "
            f"{context}",
        )
    if name.rsplit(".", 1)[-1].isdigit():
        raise IdentityConfigError(
            "HOSTNAME_PATTERN",
            f"{pattern!r} gives {name!r}, which ends in an all-numeric label and would read as "
            f"an IP address {context}",
        )
    return validate_hostname(name, "GLITE_VM_HOSTNAME_PATTERN")


def _placeholders(pattern: str) -> set[str]:
    if not isinstance(pattern, str) or not pattern.strip():
        raise IdentityConfigError("HOSTNAME_PATTERN", "is empty")
    used: set[str] = set()
    for match in _PLACEHOLDER.finditer(pattern):
        if match.group(1) not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
            raise IdentityConfigError(
                "HOSTNAME_PATTERN",
                f"{pattern!r} uses unknown placeholder {match.group(0)!r}; known: {known}",
            )
        used.add(match.group(1))
    if "{" in _PLACEHOLDER.sub("", pattern) or "}" in _PLACEHOLDER.sub("", pattern):
        raise IdentityConfigError("HOSTNAME_PATTERN", f"{pattern!r} has an unmatched brace")
    return used


def _placeholder_values(
    used: set[str], *, host: str, slot: str, job_id: str, pattern: str
) -> dict[str, str]:
    fqdn = host.strip().strip(".")
    first, _, domain = fqdn.partition(".")
    values = {
        "host": _label_fragment(first),
        "fqdn": fqdn,
        "domain": domain,
        "slot": _label_fragment(slot.partition("@")[0]),
    }
    match = _CLUSTER_PROC.search(job_id)
    if match:
        values.update(cluster=match.group(1), proc=match.group(2))
        values["job"] = f"{match.group(1)}-{match.group(2)}"
    else:
        missing = used & {"cluster", "proc"}
        if missing:
            raise IdentityConfigError(
                "HOSTNAME_PATTERN",
                f"{pattern!r} uses {{{sorted(missing)[0]}}} but job id {_shown(job_id)} has no "
                "cluster.proc form",
            )
        values["job"] = _label_fragment(job_id)
    return values


def _label_fragment(text: str) -> str:
    """A value that must stay inside one label: dots become hyphens too."""
    return _NOT_LABEL_CHAR.sub("-", text.lower())


def _normalise(text: str) -> str:
    labels = []
    for raw in _NOT_NAME_CHAR.sub("-", text.lower()).split("."):
        label = raw.strip("-")
        if len(label) > MAX_LABEL:
            digest = hashlib.sha256(label.encode()).hexdigest()[:_HASH_SUFFIX]
            label = label[: MAX_LABEL - _HASH_SUFFIX - 1].rstrip("-") + "-" + digest
        if label:
            labels.append(label)
    return ".".join(labels)
