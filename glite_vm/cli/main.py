"""`glite-vm` command line: a thin shell over the library.

Each sub-module registers its sub-commands with ``register(subparsers)``; a handler returns the
process exit code. Only this package prints, exits or configures logging. Exit statuses and
error reports are :mod:`glite_vm.cli.common`'s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from glite_vm import __version__
from glite_vm.cli.common import EXIT_FAILURE, report_error
from glite_vm.config import Settings

log = logging.getLogger("glite_vm.cli")

# Modules that contribute sub-commands, in the order `--help` lists them.
_COMMAND_MODULES = (
    "glite_vm.cli.vm",
    "glite_vm.cli.vms",
    "glite_vm.cli.shell",
    "glite_vm.cli.images",
    "glite_vm.cli.condor",
    "glite_vm.cli.service",
    "glite_vm.cli.snapshots",
    "glite_vm.cli.identity",
)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 125 like every other glite-vm failure (``run`` passes
    the command's own statuses through, so 2 must not mean "bad option")."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_FAILURE, f"glite-vm: request error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="glite-vm",
        description="Run jobs in short-lived virtual machines; inspect and clean up after them.",
        epilog="Settings come from GLITE_VM_* environment variables, HTCondor's configuration "
        "and /etc/glite-vm/config.toml; see the docs/ directory. Exit status: 0 done, 1 done "
        "but a problem was found, 125 glite-vm failed (`glite-vm run` exits with the command's "
        "own status; see its --help).",
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
    """Set up logging and settings, run the chosen handler, map errors to exit statuses.

    Nothing escapes as a traceback: every exception ends in one line naming its class
    (:func:`glite_vm.cli.common.report_error`) and exit status 125; ``-vv`` adds the traceback
    of an unexpected one.
    """
    if os.geteuid() == 0:
        # root's files (the image cache, templates, VM directories, the event log) are never
        # made writable by others, whatever umask an admin's shell or service manager gave:
        # a writable cache directory would let any local user plant blobs, locks or links
        os.umask(os.umask(0o022) | 0o022)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="glite-vm: %(levelname)s: %(message)s",
    )
    try:
        settings = Settings.load()
    except ValueError as exc:
        print(f"glite-vm: configuration error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        code: int = args.handler(args, settings)
    except KeyboardInterrupt:
        print("glite-vm: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        report_error(exc)
        log.debug("where it happened:", exc_info=True)  # -vv
        return EXIT_FAILURE
    return code
