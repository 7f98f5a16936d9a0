"""dr-orchestrator settings (environment variables, prefix ``GUESTBUS_``; docs/dr.md)."""

from __future__ import annotations

import socket

from pydantic import Field

from guestbus.runtime import ServiceSettings


class DrSettings(ServiceSettings):
    dr_instance: str = Field(
        default_factory=socket.gethostname,
        pattern=r"^[A-Za-z0-9_.-]{1,128}$",
        description="This replica's name in leases; unique among live replicas. A replica "
        "restarted under the same name takes its runs back at once (no lease expiry wait).",
    )
    dr_concurrency: int = Field(
        default=64, ge=1, le=4096, description="VMs of one run driven at once by a replica."
    )
    dr_scan_interval: float = Field(
        default=2.0, gt=0, le=60, description="How often to look for runs nobody drives (s)."
    )
    dr_link_poll: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="While waiting for a VM's link, ask again this often besides link events (s).",
    )
    dr_change_validity: float = Field(
        default=900, ge=60, le=86400, description="How long a signed change stays valid (s)."
    )
    dr_info_timeout: float = Field(
        default=10, gt=0, le=120, description="Deadline of the 'info' command (s)."
    )
