"""`glite-vm ca ...`: a local CA for a test site, and host certificates issued from it."""

from __future__ import annotations

import argparse
import shlex
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from glite_vm.config import Settings
from glite_vm.errors import UserError
from glite_vm.identity.ca import KEY_TYPES, MAX_CN, LocalCA
from glite_vm.identity.ca_files import init_ca, issue_to_directory
from glite_vm.identity.credentials import not_valid_after
from glite_vm.identity.preissued import HOST_CERT_FILE, HOST_KEY_FILE
from glite_vm.identity.x509name import subject_hash

DEFAULT_DAYS = 365


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ca = subparsers.add_parser(
        "ca",
        help="a local certificate authority for VM host certificates",
        description="Create a certificate authority for a test site and issue host "
        "certificates from it. glite-vm mints a short-lived certificate per VM when "
        "GLITE_VM_CA_CERT and GLITE_VM_CA_KEY are set, or uses pre-issued pairs from "
        "GLITE_VM_HOST_CERT_DIR.",
    )
    actions = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)

    init = actions.add_parser(
        "init",
        help="create a CA (DIR/ca.pem and DIR/ca.key) and print the settings that use it",
    )
    init.add_argument("directory", type=Path, metavar="DIR", help="where to put the CA")
    init.add_argument("--days", type=_positive_int, default=365, help="validity (default 365)")
    init.add_argument("--name", help="the CA's common name (default: glite-vm test CA <host>)")
    init.add_argument("--key-type", choices=KEY_TYPES, default="rsa", help="rsa (3072) or ec")
    init.set_defaults(handler=handle_ca_init)

    issue = actions.add_parser(
        "issue",
        help="pre-issue a host certificate and key into the host certificate directory",
    )
    issue.add_argument("hostname", help="the VM hostname the pair is for")
    issue.add_argument(
        "--cert-dir",
        type=Path,
        help="default: GLITE_VM_HOST_CERT_DIR; the pair goes into "
        "CERT_DIR/HOSTNAME/{hostcert.pem,hostkey.pem}",
    )
    issue.add_argument("--ca-cert", type=Path, help="default: GLITE_VM_CA_CERT")
    issue.add_argument("--ca-key", type=Path, help="default: GLITE_VM_CA_KEY")
    issue.add_argument(
        "--days",
        type=_positive_int,
        default=None,
        help="validity (default: 365, or until the CA's own end if that comes sooner)",
    )
    issue.add_argument("--key-type", choices=KEY_TYPES, default="rsa", help="rsa (2048) or ec")
    issue.set_defaults(handler=handle_ca_issue)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _default_ca_name() -> str:
    return f"glite-vm test CA {socket.gethostname()}"[:MAX_CN].strip()


def handle_ca_init(args: argparse.Namespace, settings: Settings) -> int:
    directory: Path = args.directory.absolute()
    name: str = args.name if args.name is not None else _default_ca_name()
    created = init_ca(directory, name=name, days=args.days, key_type=args.key_type)
    cert = created.authority.certificate
    print(
        f"Created the CA {cert.subject.rfc4514_string()!r}, valid until "
        f"{not_valid_after(cert):%Y-%m-%d %H:%M} UTC."
    )
    print(f"  certificate  {created.cert_path}  (0644; subject hash {subject_hash(cert)})")
    print(
        f"  private key  {created.key_path}  (0600; keep it readable only by the glite-vm service)"
    )
    print()
    print("To mint a short-lived host certificate for every VM, set (condor_config):")
    print(f"  GLITE_VM_CA_CERT = {created.cert_path}")
    print(f"  GLITE_VM_CA_KEY = {created.key_path}")
    print("or in the environment:")
    print(
        f"  export GLITE_VM_CA_CERT={shlex.quote(str(created.cert_path))} "
        f"GLITE_VM_CA_KEY={shlex.quote(str(created.key_path))}"
    )
    return 0


def handle_ca_issue(args: argparse.Namespace, settings: Settings) -> int:
    ca_cert: Path | None = args.ca_cert or settings.ca_cert
    ca_key: Path | None = args.ca_key or settings.ca_key
    cert_dir: Path | None = args.cert_dir or settings.host_cert_dir
    if ca_cert is None or ca_key is None:
        raise UserError(
            "ca issue: no CA; give --ca-cert and --ca-key or set GLITE_VM_CA_CERT and "
            "GLITE_VM_CA_KEY"
        )
    if cert_dir is None:
        raise UserError(
            "ca issue: no certificate directory; give --cert-dir or set GLITE_VM_HOST_CERT_DIR"
        )
    cert_dir = cert_dir.absolute()
    authority = LocalCA.load(ca_cert, ca_key)
    # A certificate never outlives its CA. With the default validity that is no news (a CA of
    # `ca init` lives 365 days too), so only an explicit --days beyond the CA's end is noted.
    ca_left = (not_valid_after(authority.certificate) - datetime.now(UTC)).days
    days = args.days if args.days is not None else max(1, min(DEFAULT_DAYS, ca_left))
    if args.days is not None and args.days > ca_left:
        days = max(1, ca_left)
        print(
            f"glite-vm: ca issue: note: --days {args.days} would outlive the CA, which ends "
            f"{not_valid_after(authority.certificate):%Y-%m-%d}; the certificate ends with it",
            file=sys.stderr,
        )
    issued = issue_to_directory(
        authority, args.hostname, cert_dir, days=days, key_type=args.key_type
    )
    directory = cert_dir / issued.hostname
    print(
        f"Issued a host certificate for {issued.hostname}, valid until "
        f"{not_valid_after(issued.certificate):%Y-%m-%d %H:%M} UTC."
    )
    print(f"  certificate  {directory / HOST_CERT_FILE}  (0644)")
    print(f"  private key  {directory / HOST_KEY_FILE}  (0400)")
    print()
    print("To use pre-issued certificates, set (condor_config; and no GLITE_VM_CA_KEY):")
    print(f"  GLITE_VM_HOST_CERT_DIR = {cert_dir}")
    print(f"  GLITE_VM_CA_CERT = {ca_cert.absolute()}")
    return 0
