"""The service runtime shared by every guestbus host service.

See docs/runtime.md. The usual imports::

    from guestbus.runtime import BusError, BusService, ServiceContext, run_service
"""

from __future__ import annotations

from guestbus.runtime.errors import BusError, check_reply, parse_request
from guestbus.runtime.service import (
    BusService,
    Handler,
    Reply,
    ServiceContext,
    ServiceHost,
    run_service,
    serve,
)
from guestbus.runtime.settings import ServiceSettings, load_settings

__all__ = [
    "BusError",
    "BusService",
    "Handler",
    "Reply",
    "ServiceContext",
    "ServiceHost",
    "ServiceSettings",
    "check_reply",
    "load_settings",
    "parse_request",
    "run_service",
    "serve",
]
