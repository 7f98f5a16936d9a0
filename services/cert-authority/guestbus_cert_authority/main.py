"""``guestbus-cert-authority``: the cluster CA on the bus (see docs/pki.md).

Run as the console script or ``python -m guestbus_cert_authority.main``. A CA that cannot
start safely (a CA key it cannot decrypt, a corrupt CA in KV) exits with status 2 and one
line on stderr naming the setting to fix — no traceback, and never a new CA.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import NoReturn

from guestbus.runtime import load_settings, serve
from guestbus.runtime.logs import setup_logging
from guestbus.runtime.service import run_loop

from .service import CertAuthority
from .settings import CaSettings

EXIT_FATAL = 2


async def _run(settings: CaSettings) -> tuple[int, str | None]:
    stop = asyncio.Event()
    service = CertAuthority(fatal=stop)
    status = await serve(service, settings, stop=stop)
    return status, service.fatal_message


def main() -> NoReturn:
    CertAuthority.check_declaration()
    settings = load_settings(CaSettings)
    setup_logging(CertAuthority.name, settings.log_level)
    status, fatal = run_loop(_run(settings), settings.event_loop)
    logging.shutdown()
    if fatal is not None:
        sys.stderr.write(f"guestbus-cert-authority: cannot start: {fatal}\n")
        sys.stderr.flush()
        status = EXIT_FATAL
    raise SystemExit(status)


if __name__ == "__main__":
    main()
