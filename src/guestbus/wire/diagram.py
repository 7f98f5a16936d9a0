"""The session state diagram, generated from TRANSITIONS so the docs cannot drift from code.

``python -m guestbus.wire.diagram`` prints the Mermaid source;
``python -m guestbus.wire.diagram --write docs/wire-protocol.md`` refreshes the doc's block.
"""

import argparse
import sys
from typing import Dict, List, Optional, Tuple

from .session import TRANSITIONS, SessionState

BEGIN_MARKER = "<!-- BEGIN GENERATED: session-states -->"
END_MARKER = "<!-- END GENERATED: session-states -->"


def mermaid() -> str:
    """Mermaid stateDiagram-v2 source: one edge per (from, to) pair, triggers in table order."""
    edges: Dict[Tuple[str, str], List[str]] = {}
    for (src, trigger), dst in TRANSITIONS.items():
        edges.setdefault((src.name, dst.name), []).append(trigger.name)
    lines = ["stateDiagram-v2", f"    [*] --> {SessionState.IDLE.name}"]
    for (start, end), triggers in edges.items():
        lines.append("    {} --> {}: {}".format(start, end, ", ".join(triggers)))
    lines.append(f"    {SessionState.CLOSED.name} --> [*]")
    return "\n".join(lines) + "\n"


def doc_block() -> str:
    """What belongs between the markers in docs/wire-protocol.md."""
    return f"{BEGIN_MARKER}\n```mermaid\n{mermaid()}```\n{END_MARKER}"


def update_doc(text: str) -> str:
    """``text`` with its generated block replaced; ValueError if the markers are missing."""
    start = text.find(BEGIN_MARKER)
    end = text.find(END_MARKER, start)
    if start < 0 or end < 0:
        raise ValueError(f"markers {BEGIN_MARKER} ... {END_MARKER} not found")
    return text[:start] + doc_block() + text[end + len(END_MARKER) :]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m guestbus.wire.diagram", description=__doc__)
    parser.add_argument("--write", metavar="DOC", help="replace the generated block in DOC")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(mermaid())
        return 0
    with open(args.write, encoding="utf-8") as f:
        text = f.read()
    new = update_doc(text)
    if new != text:
        with open(args.write, "w", encoding="utf-8") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
