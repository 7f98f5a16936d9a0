"""The bus contract: the source of truth for every message, subject and header on the bus.

Anyone can watch the bus with ``nats sub 'gb.>'``; what they see is described here. The JSON
Schemas in ``schemas/`` are generated from these models (``guestbus schemas --write``) and CI
fails when they drift. Guest-side code (the agent) does not import this module: it runs on
older Pythons without pydantic and speaks the same JSON through ``guestbus.wire``.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Final

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from guestbus.wire import errors as _wire_errors

# --- subjects -----------------------------------------------------------------------------

RPC_PREFIX: Final = "gb.rpc"
"""Guest → host RPCs; rpc-router serves ``gb.rpc.<method>`` in queue group ``rpc-router``."""
GUEST_PREFIX: Final = "gb.guest"
"""Host → guest commands; the link terminator holding the VM's link serves them."""
EVT_PREFIX: Final = "gb.evt"
"""Events, captured by the ``GB_EVENTS`` stream."""

RPC_QUEUE: Final = "rpc-router"
"""Queue group of the rpc-router replicas."""

_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def _token(value: str, what: str) -> str:
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} is not a valid subject token (A-Z a-z 0-9 _ -)")
    return value


def rpc_subject(method: str) -> str:
    """``gb.rpc.<method>``: a guest-initiated RPC."""
    return f"{RPC_PREFIX}.{_token(method, 'method')}"


def guest_subject(vm: str, method: str) -> str:
    """``gb.guest.<vm>.<method>``: a host → guest command for one VM."""
    return f"{GUEST_PREFIX}.{_token(vm, 'vm')}.{_token(method, 'method')}"


def guest_wildcard(vm: str) -> str:
    """``gb.guest.<vm>.*``: every command for one VM (what a link terminator serves)."""
    return f"{GUEST_PREFIX}.{_token(vm, 'vm')}.*"


def evt_subject(kind: str, vm: str) -> str:
    """``gb.evt.<kind>.<vm>``: an event about one VM."""
    return f"{EVT_PREFIX}.{_token(kind, 'kind')}.{_token(vm, 'vm')}"


# Event kinds (second token of gb.evt.<kind>.<vm>).
EVT_LINK: Final = "link"
"""A VM's link went up or down (:class:`LinkEvent`)."""
EVT_GUEST: Final = "guest"
"""Events a guest sent over its link (rate-limited), stamped with its VM headers."""
EVT_VM: Final = "vm"
"""A registry change the operator cares about, e.g. a VM marked down (:class:`VmEvent`)."""

# --- headers ------------------------------------------------------------------------------

HEADER_VM: Final = "GB-VM"
"""The VM uuid, stamped by the link terminator from the socket it read (never the payload)."""
HEADER_VM_NAME: Final = "GB-VM-Name"
"""The VM's name where the terminator knows it (libvirt domain XML)."""
HEADER_LINK: Final = "GB-Link"
"""The link kind a guest RPC arrived on: ``serial`` or ``ip``."""
HEADER_HOST: Final = "GB-Host"
"""The host (bridge or gateway instance) that terminates the link."""
HEADER_REQUEST_ID: Final = "GB-Request-Id"
"""A caller-chosen id; the same id retried runs once in the guest."""
HEADER_DEADLINE_MS: Final = "GB-Deadline-Ms"
"""How long the caller waits, in milliseconds; the terminator passes it to the guest."""
HEADER_ERROR_CODE: Final = "GB-Error-Code"
"""Stable error code of a typed error reply (also in the :class:`ErrorBody`)."""

# Guest-initiated methods (gb.rpc.<method>).
RPC_HELLO: Final = "hello"
RPC_HEARTBEAT: Final = "heartbeat"
RPC_REPORT: Final = "report"

# Host-initiated commands the agent may serve (gb.guest.<vm>.<method>), each allow-listed.
CMD_PING: Final = "ping"
CMD_INFO: Final = "info"
CMD_ALLOWED: Final = "allowed"

# --- errors -------------------------------------------------------------------------------

ERROR_CODES: Final = _wire_errors.ALL_CODES
"""Every stable error code; shared with the wire protocol so guest and bus speak alike."""

Uuid = Annotated[
    str,
    StringConstraints(pattern=r"^[0-9a-fA-F-]{8,64}$", to_lower=True),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErrorBody(_Model):
    """A typed error: a stable ``code`` for programs and a ``message`` a person can act on."""

    code: str = Field(description="Stable error code, one of guestbus.contract.ERROR_CODES.")
    message: str = Field(description="What went wrong and what to do about it.")
    details: dict[str, Any] | None = Field(default=None, description="Structured context.")


class LinkKind(StrEnum):
    """Which path a VM's link uses; ``down`` when neither answers."""

    SERIAL = "serial"
    IP = "ip"
    DOWN = "down"


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- guest → host ----------------------------------------------------------------------------


class Hello(_Model):
    """First request on every (re)connected link; the guest says who it thinks it is."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    protocol: int = Field(ge=1, description="Wire protocol version.")
    agent_version: str = Field(max_length=64)
    capabilities: list[str] = Field(default_factory=list, max_length=64)
    vm: Uuid | None = Field(default=None, description="VM uuid from the agent's config (a claim).")
    config_uuid: str | None = Field(default=None, max_length=64)
    hostname: str | None = Field(default=None, max_length=255)


class HelloAck(_Model):
    """Answer to :class:`Hello`: the identity the host stamped, which wins over the claim."""

    vm: Uuid = Field(description="The VM identity the host stamped from the socket or cert.")
    link: LinkKind
    host: str = Field(description="The link terminator instance.")
    protocol: int
    identity_matches: bool = Field(description="False when the agent's claim differs (a clone).")
    heartbeat_interval: float = Field(gt=0, description="Seconds between heartbeats.")
    server_time: datetime


class Heartbeat(_Model):
    """Periodic liveness from the guest."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    seq: int = Field(ge=0)
    vm: Uuid | None = Field(default=None, description="Optional claim; must equal the stamp.")
    uptime: float | None = Field(default=None, ge=0, description="Guest uptime in seconds.")
    config_uuid: str | None = Field(default=None, max_length=64)


class HeartbeatAck(_Model):
    seq: int
    server_time: datetime


class Interface(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str
    mac: str | None = None
    addresses: list[str] = Field(default_factory=list, description="CIDR strings.")
    up: bool | None = None


class GuestInfo(_Model):
    """What ``info`` answers, and what the agent reports after hello."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    vm: Uuid | None = None
    hostname: str
    os: str = Field(description="Pretty OS name, e.g. from /etc/os-release.")
    kernel: str
    arch: str | None = None
    agent_version: str
    python: str | None = None
    uptime: float = Field(ge=0)
    interfaces: list[Interface] = Field(default_factory=list)


class ReportAck(_Model):
    accepted: bool


# --- host → guest --------------------------------------------------------------------------


class PingResult(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True)

    pong: bool = True
    agent_time: float | None = Field(default=None, description="Guest wall clock (epoch s).")


class AllowedCommands(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True)

    commands: list[str]


# --- events and registry ---------------------------------------------------------------------


class LinkState(StrEnum):
    UP = "up"
    DOWN = "down"


class LinkEvent(_Model):
    """Published on ``gb.evt.link.<vm>`` when a link terminator gains or loses a VM's link."""

    vm: Uuid
    state: LinkState
    link: LinkKind
    host: str
    reason: str | None = None
    at: datetime = Field(default_factory=utcnow)


class VmEvent(_Model):
    """Published on ``gb.evt.vm.<vm>`` for registry changes (e.g. marked down)."""

    vm: Uuid
    kind: str = Field(description="e.g. `registered`, `down`, `identity_refused`.")
    detail: str | None = None
    at: datetime = Field(default_factory=utcnow)


class VmRecord(_Model):
    """One VM in the registry (KV bucket ``gb_vms``, key = uuid)."""

    uuid: Uuid
    name: str | None = None
    agent_version: str | None = None
    protocol: int | None = None
    link: LinkKind = LinkKind.DOWN
    host: str | None = None
    last_heartbeat: datetime | None = None
    last_hello: datetime | None = None
    capabilities: list[str] = Field(default_factory=list)
    config_uuid: str | None = None
    hostname: str | None = None
    os: str | None = None
    kernel: str | None = None


SCHEMA_MODELS: Final[dict[str, type[BaseModel]]] = {
    "error": ErrorBody,
    "hello": Hello,
    "hello-ack": HelloAck,
    "heartbeat": Heartbeat,
    "heartbeat-ack": HeartbeatAck,
    "guest-info": GuestInfo,
    "report-ack": ReportAck,
    "ping-result": PingResult,
    "allowed-commands": AllowedCommands,
    "link-event": LinkEvent,
    "vm-event": VmEvent,
    "vm-record": VmRecord,
}
"""Models published as JSON Schemas in ``schemas/<name>.json``."""


# --- JetStream resources ---
# Names of the JetStream stream, KV buckets and object store that hold all durable state.
# Created (idempotently) by `guestbus.provision.provision`; see docs/runtime.md.

STREAM_EVENTS = "GB_EVENTS"
"""Stream capturing every event published on ``gb.evt.>``."""
STREAM_EVENTS_SUBJECTS = "gb.evt.>"
"""Subjects captured by :data:`STREAM_EVENTS`."""

KV_VMS = "gb_vms"
"""KV bucket: the VM registry (key: VM uuid)."""
KV_CERTS = "gb_certs"
"""KV bucket: issued certificates and their state."""
KV_DR_PLANS = "gb_dr_plans"
"""KV bucket: disaster-recovery plans."""
KV_DR_RUNS = "gb_dr_runs"
"""KV bucket: DR runs and their per-VM step status."""
KV_LEASES = "gb_leases"
"""KV bucket: leases (e.g. the active DR orchestrator); entries expire after LEASE_TTL_SECONDS."""
LEASE_TTL_SECONDS = 15.0
"""Age after which an un-renewed lease in :data:`KV_LEASES` expires; renew well before (TTL/3)."""

OBJ_ISOS = "gb_isos"
"""Object store: built per-VM ISO images."""
