"""Run a service's entry function: ``python -m guestbus.runtime.launch MODULE[:FUNC] [ARGS...]``.

``guestbus up`` starts each host service this way, so a service module needs no
``if __name__ == "__main__"`` block: ``FUNC`` (default ``main``) is imported and called,
and its integer return value (if any) becomes the exit status.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        sys.stderr.write("usage: python -m guestbus.runtime.launch MODULE[:FUNC] [ARGS...]\n")
        return 2
    module_name, _, func_name = args[0].partition(":")
    module = importlib.import_module(module_name)
    func = getattr(module, func_name or "main")
    sys.argv = [module_name, *args[1:]]
    result = func()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
