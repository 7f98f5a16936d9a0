"""``guestbus schemas``: write or check the generated JSON Schemas."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from guestbus import schemas


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "schemas",
        help="write or check schemas/*.json (generated from the contract models)",
        description="Regenerate the JSON Schema of every bus message, or check for drift.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="(re)write the schema files")
    mode.add_argument("--check", action="store_true", help="exit 1 if the files differ")
    p.add_argument("--dir", type=Path, default=Path("schemas"), help="target (default: schemas)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    directory: Path = args.dir
    if args.write:
        for path in schemas.write(directory):
            print(f"wrote {path}")
        return 0
    if args.check:
        problems = schemas.drift(directory)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print(
                "schemas drifted from the models: run `guestbus schemas --write`", file=sys.stderr
            )
            return 1
        print(f"{directory}: in sync with the contract models")
        return 0
    for name in schemas.render():
        print(name)
    return 0
