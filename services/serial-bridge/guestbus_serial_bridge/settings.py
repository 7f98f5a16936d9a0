"""serial-bridge settings (environment variables, prefix ``GUESTBUS_``)."""

from __future__ import annotations

import socket

from pydantic import Field, field_validator

from guestbus.contract import FREEZE_DEADLINE_DEFAULT, FREEZE_DEADLINE_MAX, RESTORE_TTL_DEFAULT
from guestbus.runtime import ServiceSettings
from guestbus.runtime.settings import CommaList
from guestbus.wire import MAX_FRAME

from .discovery import DEFAULT_PATTERN, compile_pattern


class BridgeSettings(ServiceSettings):
    socket_pattern: str = Field(
        default=DEFAULT_PATTERN,
        description="Path pattern of VM serial sockets; {uuid} marks the VM uuid. Empty: off.",
    )
    libvirt_xml_dirs: CommaList = Field(
        default_factory=lambda: ["/run/libvirt/qemu"],
        description="Comma-separated directories of libvirt domain XML (live or persistent).",
    )
    serial_port_index: int = Field(
        default=1, ge=0, le=3, description="<target port> of the guest UART to use (0-3)."
    )
    scan_interval: float = Field(default=2.0, gt=0, description="Seconds between discovery scans.")
    bridge_host: str = Field(
        default_factory=socket.gethostname, description="Host name stamped on links (GB-Host)."
    )
    command_timeout: float = Field(
        default=10.0, gt=0, description="Default deadline of host → guest commands (s)."
    )
    rpc_timeout: float = Field(default=5.0, gt=0, description="Deadline of guest RPCs (s).")
    max_frame: int = Field(default=MAX_FRAME, ge=1024, le=16 * 1024 * 1024)
    rate_limit: float = Field(default=50.0, gt=0, description="Guest frames/s allowed per VM.")
    rate_burst: int = Field(default=200, ge=1, description="Burst of guest frames per VM.")
    write_limit: int = Field(
        default=1 << 20, ge=4096, description="Bytes buffered towards one VM before refusing."
    )
    # --- the host adapter: snapshots and restore disks through libvirt (docs/snapshots.md) ---
    libvirt_uri: str = Field(
        default="qemu:///system",
        description="libvirt connection of the host adapter (gb.hv.<vm>.*); empty: no adapter.",
    )
    restore_ttl: float = Field(
        default=RESTORE_TTL_DEFAULT,
        gt=0,
        description="Longest a restore disk stays attached (s); a request may ask for less.",
    )
    restore_check_interval: float = Field(
        default=30.0, gt=0, description="Seconds between checks for restore disks that are due."
    )
    restore_max_per_vm: int = Field(
        default=4, ge=1, le=16, description="Restore disks one VM may have attached at once."
    )
    freeze_deadline: float = Field(
        default=FREEZE_DEADLINE_DEFAULT,
        gt=0,
        le=FREEZE_DEADLINE_MAX,
        description="The guest thaws by itself this long after a freeze, unless asked for less.",
    )
    freeze_timeout: float = Field(
        default=45.0,
        gt=0,
        le=600,
        description="How long freeze and thaw may take in the guest (its pre_freeze/post_thaw "
        "timeout, 30 s by default, plus a margin) before the snapshot goes on without.",
    )
    unmount_timeout: float = Field(
        default=10.0, gt=0, le=60, description="How long the agent may take to unmount (s)."
    )
    detach_timeout: float = Field(
        default=30.0,
        gt=0,
        le=300,
        description="How long the guest may take to release a restore disk being detached (s).",
    )

    @field_validator("socket_pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if value:
            compile_pattern(value)
        return value
