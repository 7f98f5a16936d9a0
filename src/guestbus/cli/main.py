"""Entry point of the ``guestbus`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from guestbus import __version__

# Sub-command modules, each with add_parser(sub) that sets ``func``.
COMMANDS = (
    "guestbus.cli.up",
    "guestbus.cli.vms",
    "guestbus.cli.guest",
    "guestbus.cli.bus",
    "guestbus.cli.vm",
    "guestbus.cli.cert",
    "guestbus.cli.iso",
    "guestbus.cli.snapshot",
    "guestbus.cli.dr",
    "guestbus.cli.schemas",
    "guestbus.cli.deploy",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guestbus",
        description="Operate guestbus: the embedded cluster, VMs and their links, and the bus.",
    )
    parser.add_argument("--version", action="version", version=f"guestbus {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
