"""iso-builder settings (environment variables, prefix ``GUESTBUS_``; docs/iso.md)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from guestbus.contract import AGENT_COMMANDS
from guestbus.runtime import ServiceSettings
from guestbus.runtime.settings import CommaList


class IsoSettings(ServiceSettings):
    iso_output_dir: Path | None = Field(
        default=None,
        description="Where ISOs are written as <vm>.iso (e.g. a libvirt storage pool); "
        "default <state_dir>/isos. Empty string: do not write files.",
    )
    iso_gateway_host: str = Field(
        default_factory=socket.getfqdn,
        description="Host agents reach rpc-router's TLS gateway at (the IP fallback); "
        "goes into every VM's config. Default: this host's FQDN.",
    )
    iso_gateway_port: int = Field(default=2074, ge=1, le=65535)
    iso_serial_device: str = Field(
        default="/dev/ttyS1", description="The guest's serial device (COM2 = target port 1)."
    )
    iso_heartbeat_interval: float = Field(default=5.0, ge=0.05, le=3600)
    iso_allowed_commands: CommaList = Field(
        default_factory=lambda: list(AGENT_COMMANDS),
        description="Comma-separated host commands the agents may serve.",
    )
    iso_cert_lifetime: int | None = Field(
        default=None, ge=60, description="Lifetime of ISO certificates (s); default the CA's."
    )
    iso_wheel_cache: Path | None = Field(
        default=None,
        description="Where the offline wheelhouse is assembled and kept; default "
        "<state_dir>/wheelhouse.",
    )
    iso_wheel_source: str | None = Field(
        default=None,
        description="A directory of wheels to assemble the wheelhouse from (air-gapped "
        "hosts); default PyPI (pip's own configuration applies).",
    )
    iso_concurrency: int = Field(
        default=32,
        ge=1,
        le=256,
        description="Config-only ISOs built at once per replica (each waits mostly on the "
        "CA and JetStream, so more than the cores).",
    )
    iso_full_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Full ISOs (~21 MB each, held in memory while stored) built at once.",
    )
    iso_builder_host: str = Field(
        default_factory=socket.gethostname, description="Name of this instance in manifests."
    )

    @field_validator("iso_allowed_commands")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(AGENT_COMMANDS))
        if unknown:
            raise ValueError(
                f"unknown commands {', '.join(unknown)} (known: {', '.join(AGENT_COMMANDS)})"
            )
        return value

    @field_validator("iso_output_dir", mode="before")
    @classmethod
    def _empty_is_off(cls, value: Any) -> Any:
        return Path("-") if value == "" else value

    @property
    def output_dir(self) -> Path | None:
        if self.iso_output_dir == Path("-"):
            return None
        return self.iso_output_dir or self.state_dir / "isos"

    @property
    def wheel_cache(self) -> Path:
        return self.iso_wheel_cache or self.state_dir / "wheelhouse"
