"""`glite-vm` command line: a thin shell over the library.

Each sub-module registers its sub-commands with ``register(subparsers)``; a handler returns the
process exit code. Only this package prints, exits or configures logging.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from glite_vm import __version__
from glite_vm.config import Settings
from glite_vm.errors import GliteVmError

# Modules that contribute sub-commands, in the order `--help` lists them.
_COMMAND_MODULES = (
    "glite_vm.cli.vm",
    "glite_vm.cli.images",
    "glite_vm.cli.condor",
    "glite_vm.cli.service",
    "glite_vm.cli.snapshots",
    "glite_vm.cli.identity",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glite-vm",
        description="Run jobs in short-lived virtual machines; inspect and clean up after them.",
        epilog="Settings come from GLITE_VM_* environment variables, HTCondor's configuration "
        "and /etc/glite-vm/config.toml; see the docs/ directory.",
    )
    parser.add_argument("--version", action="version", version=f"glite-vm {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    import importlib  # noqa: PLC0415

    for name in _COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(build_parser().parse_args(argv))


def dispatch(args: argparse.Namespace) -> int:
    """Set up logging and settings, run the chosen handler, map errors to exit statuses."""
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="glite-vm: %(levelname)s: %(message)s",
    )
    try:
        settings = Settings.load()
    except ValueError as exc:
        print(f"glite-vm: {exc}", file=sys.stderr)
        return 2
    try:
        code: int = args.handler(args, settings)
    except GliteVmError as exc:
        kind = "error (fix the request)" if exc.is_user_error else "error (host problem)"
        print(f"glite-vm: {kind}: {exc}", file=sys.stderr)
        return 2 if exc.is_user_error else 3
    except KeyboardInterrupt:
        print("glite-vm: interrupted", file=sys.stderr)
        return 130
    return code
