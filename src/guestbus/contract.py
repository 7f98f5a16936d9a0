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
from typing import Annotated, Any, Final, Literal

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
RPC_ENROLL: Final = "enroll"
"""A guest's first certificate or a clone's new identity (serial link only)."""
RPC_RENEW: Final = "renew"
"""A guest renews its certificate over whichever link is up."""

# Host-initiated commands the agent may serve (gb.guest.<vm>.<method>), each allow-listed.
CMD_PING: Final = "ping"
CMD_INFO: Final = "info"
CMD_ALLOWED: Final = "allowed"
CMD_RENEW: Final = "renew"
"""Ask the agent to renew its certificate now."""
CMD_DR_APPLY: Final = "dr_apply"
"""Apply a signed DR network change (:class:`DrSignedChange` of type ``network``)."""
CMD_DR_SCRIPT: Final = "dr_script"
"""Run the guest's DR recovery script (:class:`DrSignedChange` of type ``script``)."""
CMD_FREEZE: Final = "freeze"
"""Quiesce: run ``pre_freeze``, freeze the writable local file systems (:class:`FreezeRequest`);
the agent thaws by itself when no ``thaw`` arrives before the deadline."""
CMD_THAW: Final = "thaw"
"""Thaw in reverse order, then run ``post_thaw`` (:class:`ThawResult`)."""
CMD_FREEZE_STATUS: Final = "freeze_status"
"""Whether the file systems are frozen now, and the last self-thaw (:class:`FreezeStatus`)."""
CMD_SSR_UNMOUNT: Final = "ssr_unmount"
"""Unmount a restore disk before the host detaches it (:class:`SsrUnmountRequest`)."""

# Guest-initiated self-service restore (gb.rpc.<method>): rpc-router forwards each to the
# host adapter of the VM (``gb.hv.<stamped vm>.<op>``), so a VM only ever reaches its own.
RPC_SSR_LIST: Final = "ssr_list"
"""The VM's snapshots (forwarded to ``snapshot_list``)."""
RPC_SSR_ATTACH: Final = "ssr_attach"
"""Attach one of them read-only (forwarded to ``restore_attach``)."""
RPC_SSR_DETACH: Final = "ssr_detach"
"""Detach a restore disk (forwarded to ``restore_detach``)."""
RPC_SSR_ATTACHED: Final = "ssr_attached"
"""The VM's attached restore disks (forwarded to ``restore_list``)."""

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
    agent_rss_bytes: int | None = Field(default=None, description="The agent's resident memory.")
    agent_cpu_seconds: float | None = Field(
        default=None, description="CPU time the agent process has used since it started."
    )


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
    host_capabilities: list[str] = Field(
        default_factory=list,
        description="What the VM's host can do for it: 'snapshot', 'restore' (host adapter).",
    )
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
"""Object store: built per-VM ISO images (object name ``<vm uuid>.iso``)."""
KV_ISO_MANIFESTS = "gb_iso_manifests"
"""KV bucket: the newest ISO built for each VM (:class:`IsoManifest`, key: VM uuid)."""
KV_DR_KEYS = "gb_dr_keys"
"""KV bucket: the DR signing key pair (keys :data:`DR_KEY_PUBLIC`, :data:`DR_KEY_PRIVATE`)."""
DR_KEY_PUBLIC = "signing.public"
"""Ed25519 public key (PEM, SubjectPublicKeyInfo) that agents use to verify DR changes."""
DR_KEY_PRIVATE = "signing.private"
"""Its private key (PEM, PKCS#8); only dr-orchestrator may read it (NATS permissions)."""


# --- certificates ---
# The cluster CA (service cert-authority, docs/pki.md): micro endpoints ``gb.ca.<endpoint>``
# in queue group ``cert-authority``, audit events ``gb.evt.cert.<vm uuid or server name>``,
# CRL announcements ``gb.evt.crl.<ca-id>``, state in KV bucket ``gb_certs``.

CA_PREFIX: Final = "gb.ca"
"""Endpoints of the cert-authority service: ``gb.ca.<endpoint>``."""
CA_QUEUE: Final = "cert-authority"
"""Queue group of the cert-authority replicas."""
CA_ISSUE: Final = "issue"
CA_RENEW: Final = "renew"
CA_SERVER: Final = "server"
CA_REVOKE: Final = "revoke"
CA_CRL: Final = "crl"
CA_INFO: Final = "info"
CA_LIST: Final = "list"
CA_GET: Final = "get"
CA_ENDPOINTS: Final = (CA_ISSUE, CA_RENEW, CA_SERVER, CA_REVOKE, CA_CRL, CA_INFO, CA_LIST, CA_GET)


def ca_subject(endpoint: str) -> str:
    """``gb.ca.<endpoint>``: a cert-authority endpoint."""
    return f"{CA_PREFIX}.{_token(endpoint, 'endpoint')}"


EVT_CERT: Final = "cert"
"""Certificate issued / renewed / revoked: ``gb.evt.cert.<vm uuid or server name>``
(:class:`CertEvent`)."""
EVT_CRL: Final = "crl"
"""A new CRL was signed: ``gb.evt.crl.<ca-id>`` (:class:`CrlEvent`); ``<ca-id>`` is the first
16 hex digits of the CA certificate's SHA-256 fingerprint. Subscribe to ``gb.evt.crl.*``."""

# Keys in KV bucket gb_certs (KV_CERTS).
CERTS_KEY_CA_CERT: Final = "ca.cert"
"""The CA certificate (PEM)."""
CERTS_KEY_CA_KEY: Final = "ca.key"
"""The CA private key: PKCS#8 PEM encrypted with the CA passphrase."""
CERTS_KEY_CRL: Final = "crl"
"""The current CRL (:class:`CrlState` JSON); its CRL number only grows (compare-and-set)."""
CERTS_PREFIX_RECORD: Final = "cert."
"""``cert.<serial>``: one :class:`CertRecord` per certificate ever issued."""
CERTS_PREFIX_PEM: Final = "pem."
"""``pem.<serial>``: the certificate itself (PEM)."""
CERTS_PREFIX_VM: Final = "vm."
"""``vm.<uuid>``: a VM's newest certificates, newest last (:class:`VmCertIndex`)."""

# Error codes of the cert-authority besides those in guestbus.wire.errors.
ERROR_BAD_CSR: Final = "bad_csr"
"""The CSR is unparsable, its signature does not verify, or its key is outside the policy."""
ERROR_CA_UNAVAILABLE: Final = "ca_unavailable"
"""The CA cannot sign right now (its state in JetStream is unreachable); retry later."""
ERROR_NOT_FOUND: Final = "not_found"
"""No certificate with that serial (or no certificate for that VM)."""

Pem = Annotated[str, StringConstraints(max_length=16384)]
SerialText = Annotated[
    str,
    StringConstraints(pattern=r"^(0[xX])?[0-9a-fA-F:]{1,64}$", strip_whitespace=True),
]
ServerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class CertKind(StrEnum):
    VM = "vm"
    SERVER = "server"


class CertState(StrEnum):
    """``valid`` and ``revoked`` are stored; ``expired`` is computed from ``not_after``."""

    VALID = "valid"
    REVOKED = "revoked"
    EXPIRED = "expired"


class RevocationReason(StrEnum):
    """CRL reason codes accepted by ``gb.ca.revoke`` (names as RFC 5280 / cryptography's
    ``x509.ReasonFlags``)."""

    KEY_COMPROMISE = "keyCompromise"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    AFFILIATION_CHANGED = "affiliationChanged"
    UNSPECIFIED = "unspecified"


class CertAction(StrEnum):
    ISSUED = "issued"
    RENEWED = "renewed"
    REVOKED = "revoked"


class CertIssueRequest(_Model):
    """``gb.ca.issue`` / ``gb.ca.renew``: sign a VM's CSR."""

    csr: Pem = Field(
        description="PEM CSR; only its public key is used (EC P-256/P-384, RSA ≥ 2048)."
    )
    vm: Uuid = Field(description="The VM the certificate is for (subject CN, URI SAN).")
    stamped_vm: Uuid | None = Field(
        default=None,
        description="The VM the link terminator stamped when the request came from a guest; "
        "vm and the CSR's CN / URI SAN must equal it.",
    )
    lifetime_seconds: int | None = Field(
        default=None, ge=1, description="Shorter lifetime than the configured maximum."
    )


class CertReply(_Model):
    """A VM certificate just issued (``gb.ca.issue`` / ``gb.ca.renew``)."""

    serial: str = Field(description="Serial number, lower-case hex.")
    vm: Uuid
    certificate: str = Field(description="The certificate (PEM).")
    ca: str = Field(description="The CA certificate (PEM) that signed it.")
    not_before: datetime
    not_after: datetime
    renewal_of: str | None = Field(
        default=None, description="Serial of the VM's certificate this one renews (still valid)."
    )


class ServerCertRequest(_Model):
    """``gb.ca.server``: a TLS server certificate (the gateway on 2074)."""

    csr: Pem
    name: ServerName = Field(description="Server name (subject CN, event subject token).")
    dns: list[Annotated[str, StringConstraints(max_length=253)]] = Field(
        default_factory=list, max_length=100
    )
    ips: list[Annotated[str, StringConstraints(max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    lifetime_seconds: int | None = Field(default=None, ge=1)


class ServerCertReply(_Model):
    serial: str
    name: str
    certificate: str
    ca: str
    not_before: datetime
    not_after: datetime
    dns: list[str]
    ips: list[str]


class RevokeRequest(_Model):
    """``gb.ca.revoke``: one certificate by ``serial``, or every valid one of ``vm``."""

    serial: SerialText | None = None
    vm: Uuid | None = None
    reason: RevocationReason = RevocationReason.UNSPECIFIED
    comment: str | None = Field(default=None, max_length=512)


class RevokeReply(_Model):
    revoked: list[str] = Field(description="Serials revoked by this request.")
    already_revoked: list[str] = Field(default_factory=list)
    reason: RevocationReason
    crl_number: int
    crl_next_update: datetime


class CertRecord(_Model):
    """One certificate (KV ``gb_certs``, key ``cert.<serial>``). Stored ``state`` is
    ``valid`` or ``revoked``; replies show ``expired`` once ``not_after`` has passed."""

    serial: str
    kind: CertKind
    vm: Uuid | None = None
    name: str | None = None
    subject: str
    not_before: datetime
    not_after: datetime
    state: CertState = CertState.VALID
    issued_at: datetime
    renewal_of: str | None = None
    revoked_at: datetime | None = None
    reason: RevocationReason | None = None
    comment: str | None = None
    fingerprint: str = Field(description="SHA-256 of the DER certificate, hex.")

    def effective_state(self, now: datetime | None = None) -> CertState:
        if self.state is CertState.REVOKED:
            return CertState.REVOKED
        if self.not_after <= (now or utcnow()):
            return CertState.EXPIRED
        return CertState.VALID


class VmCertEntry(_Model):
    serial: str
    not_after: datetime
    revoked: bool = False


class VmCertIndex(_Model):
    """KV ``vm.<uuid>``: the VM's newest certificates, newest last (bounded). Lets a renewal
    find the certificate it renews with one read; the records stay authoritative."""

    certificates: list[VmCertEntry] = Field(default_factory=list)

    def current(self, now: datetime) -> str | None:
        """Serial of the newest certificate that is neither revoked nor expired."""
        for entry in reversed(self.certificates):
            if not entry.revoked and entry.not_after > now:
                return entry.serial
        return None


class CertListRequest(_Model):
    """``gb.ca.list``: filters combine (AND); sorted by ``not_after``, soonest first."""

    expiring_within_seconds: int | None = Field(
        default=None, ge=0, description="Valid certificates whose not_after is within this."
    )
    state: CertState | None = None
    vm: Uuid | None = None
    kind: CertKind | None = None
    limit: int = Field(default=1000, ge=1, le=2000)
    offset: int = Field(default=0, ge=0)


class CertListReply(_Model):
    certificates: list[CertRecord]
    total: int = Field(description="Matching certificates (before limit/offset).")
    truncated: bool


class CertGetRequest(_Model):
    serial: SerialText


class CertGetReply(_Model):
    record: CertRecord
    certificate: str | None = Field(description="PEM, when still stored.")


class RevokedEntry(_Model):
    serial: str
    reason: RevocationReason | None = None
    revoked_at: datetime
    not_after: datetime = Field(description="When the certificate expires (then leaves the CRL).")


class CrlState(_Model):
    """KV ``crl``: the current CRL."""

    number: int = Field(ge=1)
    this_update: datetime
    next_update: datetime
    crl: str = Field(description="The CRL (PEM), signed by the CA.")
    revoked: list[RevokedEntry] = Field(default_factory=list)


class CrlReply(_Model):
    """``gb.ca.crl``: the current CRL and what it revokes (unexpired revoked certificates)."""

    number: int
    this_update: datetime
    next_update: datetime
    crl: str
    revoked: list[RevokedEntry]


class CertCounts(_Model):
    valid: int = 0
    revoked: int = 0
    expired: int = 0


class CaInfo(_Model):
    """``gb.ca.info``."""

    certificate: str = Field(description="The CA certificate (PEM).")
    fingerprint: str = Field(description="SHA-256 of the CA certificate (hex).")
    ca_id: str = Field(description="First 16 hex digits of the fingerprint (CRL event subject).")
    subject: str
    not_before: datetime
    not_after: datetime
    trust_domain: str
    vm_cert_lifetime_seconds: int
    server_cert_lifetime_seconds: int
    compat_1000_days: bool
    crl_number: int | None
    crl_next_update: datetime | None
    counts: CertCounts
    counts_by_kind: dict[str, CertCounts]


class CertEvent(_Model):
    """Audit event on ``gb.evt.cert.<vm uuid or server name>``."""

    action: CertAction
    serial: str
    kind: CertKind
    vm: Uuid | None = None
    name: str | None = None
    not_after: datetime
    renewal_of: str | None = None
    reason: RevocationReason | None = None
    at: datetime = Field(default_factory=utcnow)


class CrlEvent(_Model):
    """A new CRL, on ``gb.evt.crl.<ca-id>``."""

    number: int
    this_update: datetime
    next_update: datetime
    revoked_count: int
    crl: str = Field(description="The CRL (PEM).")
    ca_fingerprint: str
    at: datetime = Field(default_factory=utcnow)


SCHEMA_MODELS.update(
    {
        "cert-issue-request": CertIssueRequest,
        "cert-reply": CertReply,
        "server-cert-request": ServerCertRequest,
        "server-cert-reply": ServerCertReply,
        "cert-revoke-request": RevokeRequest,
        "cert-revoke-reply": RevokeReply,
        "cert-record": CertRecord,
        "cert-list-request": CertListRequest,
        "cert-list-reply": CertListReply,
        "cert-get-request": CertGetRequest,
        "cert-get-reply": CertGetReply,
        "crl-state": CrlState,
        "cert-vm-index": VmCertIndex,
        "crl-reply": CrlReply,
        "ca-info": CaInfo,
        "cert-event": CertEvent,
        "crl-event": CrlEvent,
    }
)


# --- ISO media ---
# Service iso-builder (docs/iso.md): micro endpoints ``gb.iso.<endpoint>`` in queue group
# ``iso-builder``, progress events ``gb.evt.iso.<job>``, manifests in KV bucket
# ``gb_iso_manifests``, images in object store ``gb_isos``.

ISO_PREFIX: Final = "gb.iso"
ISO_QUEUE: Final = "iso-builder"
ISO_BUILD: Final = "build"
ISO_LIST: Final = "list"
ISO_GET: Final = "get"
ISO_INFO: Final = "info"
ISO_ENDPOINTS: Final = (ISO_BUILD, ISO_LIST, ISO_GET, ISO_INFO)
ISO_LABEL: Final = "GUESTBUS"
"""Volume label of every guestbus ISO; the agent finds its media by it."""
ISO_MAX_BATCH: Final = 1000
"""VMs per ``gb.iso.build`` request (the reply lists each); the CLI splits longer lists."""
EVT_ISO: Final = "iso"
"""Progress of a build job: ``gb.evt.iso.<job>`` (:class:`IsoProgress`)."""

ERROR_UNKNOWN_VM: Final = "unknown_vm"
"""The VM is not in the registry (no bridge has discovered it and no agent said hello)."""
ERROR_WHEELHOUSE: Final = "wheelhouse_unavailable"
"""The offline wheelhouse for ``full`` ISOs could not be assembled (see the message)."""
ERROR_ISO_FAILED: Final = "iso_failed"
"""Mastering or storing the image failed."""


def iso_subject(endpoint: str) -> str:
    """``gb.iso.<endpoint>``: an iso-builder endpoint."""
    return f"{ISO_PREFIX}.{_token(endpoint, 'endpoint')}"


def iso_object_name(vm: str) -> str:
    """The object store name of a VM's ISO."""
    return f"{_token(vm, 'vm')}.iso"


JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

FREEZE_DEADLINE_DEFAULT: Final = 60.0
"""Seconds a guest stays frozen at most unless the host asks for less (qemu-ga has no bound)."""
FREEZE_DEADLINE_MAX: Final = 600.0
SSR_MOUNT_DIR: Final = "/mnt/guestbus-restore"
"""Where the agent mounts restore disks: ``<dir>/<label>`` (the label is the snapshot name)."""
PRE_FREEZE_SCRIPT: Final = "/usr/local/sbin/pre_freeze"
POST_THAW_SCRIPT: Final = "/usr/local/sbin/post_thaw"

AGENT_COMMANDS: Final = (
    CMD_PING,
    CMD_INFO,
    CMD_ALLOWED,
    CMD_RENEW,
    CMD_DR_APPLY,
    CMD_DR_SCRIPT,
    CMD_FREEZE,
    CMD_THAW,
    CMD_FREEZE_STATUS,
    CMD_SSR_UNMOUNT,
)
"""Host commands an agent can be allowed to serve (the agent's own list must match)."""
AgentCommand = Annotated[str, StringConstraints(pattern="^(" + "|".join(AGENT_COMMANDS) + ")$")]


class AgentConfigFile(_Model):
    """``config.json`` on a VM's ISO: what the agent runs with (it validates the same rules)."""

    vm_uuid: Uuid
    config_uuid: Annotated[str, StringConstraints(min_length=1, max_length=64)] = Field(
        description="Identifies this configuration; the agent records which one it runs."
    )
    config_serial: int = Field(
        ge=0, description="Grows with every ISO built for the VM: a higher one is newer."
    )
    gateway_host: Annotated[str, StringConstraints(pattern=r"^\S{1,255}$")] = Field(
        description="Host of rpc-router's TLS gateway (the IP fallback)."
    )
    gateway_port: int = Field(default=2074, ge=1, le=65535)
    serial_device: Annotated[str, StringConstraints(pattern=r"^/")] = "/dev/ttyS1"
    heartbeat_interval: float = Field(default=5.0, ge=0.05, le=3600)
    serial_failure_limit: int = Field(default=3, ge=1, le=1000)
    heartbeat_failure_limit: int = Field(default=20, ge=1, le=100000)
    request_timeout: float = Field(default=5.0, ge=0.05, le=600)
    allowed_commands: list[AgentCommand] = Field(default_factory=lambda: list(AGENT_COMMANDS))
    state_dir: Annotated[str, StringConstraints(pattern=r"^/")] = "/var/lib/guestbus"
    ip_fallback: bool = True
    freeze_deadline: float = Field(
        default=FREEZE_DEADLINE_DEFAULT,
        ge=1,
        le=FREEZE_DEADLINE_MAX,
        description="Longest a freeze lasts: the agent thaws by itself after this many seconds.",
    )
    freeze_script_timeout: float = Field(
        default=30.0, ge=1, le=600, description="Hard timeout of pre_freeze and post_thaw (s)."
    )
    freeze_exclude: list[Annotated[str, StringConstraints(pattern=r"^/")]] = Field(
        default_factory=list, max_length=64, description="Mount points never frozen."
    )
    ssr: bool = Field(default=True, description="Self-service restore for root in the guest.")
    restore_dir: Annotated[str, StringConstraints(pattern=r"^/.+")] = Field(
        default=SSR_MOUNT_DIR, description="Restore disks are mounted at <restore_dir>/<label>."
    )


class IsoKind(StrEnum):
    FULL = "full"
    """Config, certificates, installer and the offline wheelhouse."""
    CONFIG_ONLY = "config-only"
    """Config and certificates only: refreshes an installed agent."""


class IsoBuildRequest(_Model):
    """``gb.iso.build``: build ISOs for up to :data:`ISO_MAX_BATCH` VMs."""

    vms: list[Uuid] = Field(min_length=1, max_length=ISO_MAX_BATCH)
    kind: IsoKind = IsoKind.FULL
    job: JobId | None = Field(
        default=None,
        description="Progress goes to gb.evt.iso.<job>; subscribe before sending. "
        "Default: a new id (in the reply).",
    )
    store: bool = Field(default=True, description="Also put each image in the object store.")


class IsoManifest(_Model):
    """The newest ISO of a VM (KV ``gb_iso_manifests``, key: VM uuid)."""

    vm: Uuid
    name: str | None = None
    kind: IsoKind
    sha256: str
    size: int
    config_uuid: str
    config_serial: int
    agent_version: str
    wheelhouse: str | None = Field(default=None, description="Wheelhouse id (full ISOs).")
    cert_serial: str
    cert_not_after: datetime
    object: str | None = Field(default=None, description="Name in object store gb_isos.")
    path: str | None = Field(default=None, description="File the builder wrote.")
    builder: str = Field(description="The iso-builder instance that built it.")
    built_at: datetime = Field(default_factory=utcnow)


class IsoResult(_Model):
    vm: Uuid
    ok: bool
    manifest: IsoManifest | None = None
    error: ErrorBody | None = None


class IsoBuildReply(_Model):
    job: JobId
    kind: IsoKind
    built: int
    failed: int
    seconds: float
    results: list[IsoResult] = Field(description="One per requested VM, in request order.")


class IsoProgress(_Model):
    """``gb.evt.iso.<job>``: one VM of a build job is done (built or failed), or, without
    ``vm``, a note about the job (e.g. the wheelhouse being assembled)."""

    job: JobId
    vm: Uuid | None = None
    ok: bool
    done: int
    total: int
    code: str | None = None
    message: str | None = None
    at: datetime = Field(default_factory=utcnow)


class IsoListRequest(_Model):
    vms: list[Uuid] | None = Field(default=None, description="Only these VMs; default all.")


class IsoListReply(_Model):
    manifests: list[IsoManifest]


class IsoGetRequest(_Model):
    vm: Uuid


class IsoInfo(_Model):
    """``gb.iso.info``: what this builder puts on ISOs."""

    agent_version: str
    wheelhouse: str | None = Field(description="Id of the ready wheelhouse, if assembled yet.")
    pythons: list[str]
    archs: list[str]
    dr_public_key: str = Field(description="The DR verify key every ISO carries (PEM).")
    gateway: str
    output_dir: str | None


SCHEMA_MODELS.update(
    {
        "agent-config": AgentConfigFile,
        "iso-build-request": IsoBuildRequest,
        "iso-build-reply": IsoBuildReply,
        "iso-manifest": IsoManifest,
        "iso-progress": IsoProgress,
        "iso-list-request": IsoListRequest,
        "iso-list-reply": IsoListReply,
        "iso-get-request": IsoGetRequest,
        "iso-info": IsoInfo,
    }
)


# --- DR ---
# Service dr-orchestrator (docs/dr.md): micro endpoints ``gb.dr.<endpoint>`` in queue group
# ``dr-orchestrator``; plans in KV ``gb_dr_plans`` (key: plan name); runs in KV ``gb_dr_runs``
# (keys ``run.<run>``, ``vm.<run>.<vm>``, ``active.<run>``, ``cancel.<run>``); one lease per
# run being driven in KV ``gb_leases`` (key ``dr-run.<run>``); progress events
# ``gb.evt.dr.<run>.<vm>`` (and ``gb.evt.dr.<run>.run`` for the run itself). Changes pushed to
# agents (``gb.guest.<vm>.dr_apply`` / ``dr_script``) are signed with the Ed25519 key of
# ``gb_dr_keys``; agents verify them against ``dr-verify.pem`` from their ISO.

DR_PREFIX: Final = "gb.dr"
DR_QUEUE: Final = "dr-orchestrator"
DR_PLAN_PUT: Final = "plan.put"
DR_PLAN_GET: Final = "plan.get"
DR_PLAN_LIST: Final = "plan.list"
DR_PLAN_DELETE: Final = "plan.delete"
DR_RUN_START: Final = "run.start"
DR_RUN_GET: Final = "run.get"
DR_RUN_LIST: Final = "run.list"
DR_RUN_CANCEL: Final = "run.cancel"
DR_INFO: Final = "info"
DR_ENDPOINTS: Final = (
    DR_PLAN_PUT,
    DR_PLAN_GET,
    DR_PLAN_LIST,
    DR_PLAN_DELETE,
    DR_RUN_START,
    DR_RUN_GET,
    DR_RUN_LIST,
    DR_RUN_CANCEL,
    DR_INFO,
)
EVT_DR: Final = "dr"
"""Progress of a DR run: ``gb.evt.dr.<run>.<vm>``, ``gb.evt.dr.<run>.run`` (:class:`DrProgress`)."""
DR_LEASE_PREFIX: Final = "dr-run."
"""Key prefix in :data:`KV_LEASES`: ``dr-run.<run>`` names the replica driving that run."""

DR_SIGNATURE_CONTEXT: Final = b"guestbus-dr-v1\n"
"""Signed bytes are this prefix followed by the UTF-8 payload text (domain separation)."""
DR_SCRIPT_PRODUCTION: Final = "/usr/local/sbin/production_vm_recovery"
DR_SCRIPT_TEST: Final = "/usr/local/sbin/test_vm_recovery"
DR_MAX_PAGE: Final = 500
"""VM statuses per ``gb.dr.run.get`` reply (page with ``offset``)."""

ERROR_INVALID_PLAN: Final = "invalid_plan"
"""The plan breaks a rule; ``details.problems`` lists every problem found."""
ERROR_CONFLICT: Final = "conflict"
"""A concurrent change won (plan revision), or a VM is already in another active run."""
ERROR_NO_SIGNING_KEY: Final = "no_signing_key"
"""dr-orchestrator cannot read the DR private key from KV ``gb_dr_keys``."""


def dr_subject(endpoint: str) -> str:
    """``gb.dr.<endpoint>``: a dr-orchestrator endpoint (``plan.put``, ``run.start``, …)."""
    if endpoint not in DR_ENDPOINTS:
        raise ValueError(f"no dr-orchestrator endpoint {endpoint!r}")
    return f"{DR_PREFIX}.{endpoint}"


def dr_event_subject(run: str, vm: str | None = None) -> str:
    """``gb.evt.dr.<run>.<vm>``, or ``gb.evt.dr.<run>.run`` for the run itself."""
    return f"{EVT_PREFIX}.{EVT_DR}.{_token(run, 'run')}.{_token(vm or 'run', 'vm')}"


NAME_MAX: Final = 64
Name = Annotated[str, StringConstraints(pattern=rf"^[A-Za-z0-9_-]{{1,{NAME_MAX}}}$")]
"""Plan names and run ids: one subject / KV key token."""
Cidr = Annotated[str, StringConstraints(min_length=1, max_length=64, strip_whitespace=True)]
IpText = Annotated[str, StringConstraints(min_length=1, max_length=45, strip_whitespace=True)]
DnsName = Annotated[str, StringConstraints(min_length=1, max_length=253, strip_whitespace=True)]
VmRef = Annotated[str, StringConstraints(min_length=1, max_length=255, strip_whitespace=True)]
"""A VM by uuid or by its registry name."""


class DrRunKind(StrEnum):
    FAILOVER = "failover"
    """Real failover: ``mappings``, ``production_vm_recovery``."""
    TEST = "test"
    """Test failover: ``test_mappings``, ``test_vm_recovery``."""


class DrRoute(_Model):
    to: Cidr = Field(description="Destination network (CIDR).")
    via: IpText = Field(description="Next hop; inside one of the interface's new networks.")


class DrMapping(_Model):
    """One ordered rule: an address inside ``source`` moves into ``target`` keeping its host
    offset (10.0.0.17 in 10.0.0.0/24 → 10.9.0.17 in 10.9.0.0/24). First match wins."""

    source: Cidr
    target: Cidr
    gateway: IpText | None = Field(default=None, description="Default gateway (inside target).")
    dns: list[IpText] = Field(default_factory=list, max_length=8)
    search: list[DnsName] = Field(default_factory=list, max_length=16)
    routes: list[DrRoute] = Field(default_factory=list, max_length=64)


class DrAddresses(_Model):
    """Custom addresses for one VM (they override the rules)."""

    addresses: list[Cidr] = Field(
        default_factory=list, max_length=32, description="CIDRs with prefix, e.g. 10.9.0.200/24."
    )
    gateway: IpText | None = None
    dns: list[IpText] | None = Field(default=None, max_length=8)
    search: list[DnsName] | None = Field(default=None, max_length=16)


class DrVmOverride(DrAddresses):
    """Per-VM settings of a plan: custom addresses (failover and test), which interface
    they go on, whether its script runs, whether its failure stops later groups."""

    vm: VmRef
    interface: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        default=None, description="Interface name or MAC for the custom addresses."
    )
    test: DrAddresses | None = Field(default=None, description="Custom addresses for tests.")
    script: bool | Literal["optional"] | None = Field(
        default=None, description="Overrides the plan's script setting for this VM."
    )
    critical: bool = Field(
        default=False, description="A failure of this VM stops the groups after its own."
    )


class DrTimeouts(_Model):
    link: float = Field(default=300, gt=0, le=86400, description="Wait for the VM's link (s).")
    apply: float = Field(
        default=60, gt=0, le=3600, description="Apply and confirm the network change (s)."
    )
    script: float = Field(default=300, gt=0, le=86400, description="Recovery script (s).")
    gateway: float = Field(
        default=20,
        ge=0,
        le=3600,
        description="Roll back unless the new gateway answers within this (s); 0 = no check.",
    )


class DrPlan(_Model):
    """A DR plan (KV ``gb_dr_plans``, key: name). Validated as a whole on ``plan.put``."""

    name: Name
    description: Annotated[str, StringConstraints(max_length=1024)] | None = None
    mappings: list[DrMapping] = Field(default_factory=list, max_length=1024)
    test_mappings: list[DrMapping] = Field(default_factory=list, max_length=1024)
    vms: list[DrVmOverride] = Field(default_factory=list, max_length=100000)
    groups: list[list[VmRef]] = Field(min_length=1, max_length=1000)
    script: bool | Literal["optional"] = Field(
        default=False,
        description="Run the guest's recovery script after the network change; 'optional': "
        "a missing script is not a failure.",
    )
    timeouts: DrTimeouts = Field(default_factory=DrTimeouts)
    stop_on_failure: bool = Field(
        default=False, description="Any failed VM stops the groups after its own."
    )
    recovery_hosts: list[Annotated[str, StringConstraints(max_length=255)]] = Field(
        default_factory=list,
        max_length=1000,
        description="Only links through these hosts (bridges/gateways) count as up; empty: any.",
    )


class DrPlanRecord(_Model):
    plan: DrPlan
    revision: int = Field(description="KV revision: pass it as expected_revision to update.")
    updated_at: datetime


class DrPlanPutRequest(_Model):
    plan: DrPlan
    expected_revision: int | None = Field(
        default=None,
        ge=0,
        description="Fail with 'conflict' unless the stored plan has it "
        "(0: the plan must not exist yet).",
    )
    validate_only: bool = False


class DrPlanPutReply(_Model):
    name: Name
    revision: int | None = Field(description="None when validate_only.")
    created: bool
    vms: int
    groups: int
    warnings: list[str] = Field(default_factory=list)


class DrPlanGetRequest(_Model):
    name: Name


class DrPlanSummary(_Model):
    name: Name
    description: str | None = None
    vms: int
    groups: int
    revision: int
    updated_at: datetime


class DrPlanListReply(_Model):
    plans: list[DrPlanSummary]


class DrRunState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Finished with at least one VM failed."""
    CANCELLED = "cancelled"


class DrVmState(StrEnum):
    PENDING = "pending"
    WAITING = "waiting-for-link"
    APPLYING = "applying"
    APPLIED = "applied"
    SCRIPT = "running-script"
    SCRIPT_OK = "script-ok"
    FAILED = "failed"
    SKIPPED = "skipped"
    """Not started: an earlier group failed and the plan stops on failure."""
    CANCELLED = "cancelled"


class DrStepState(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    OK = "ok"
    FAILED = "failed"
    SKIPPED = "skipped"


class DrStep(_Model):
    state: DrStepState = DrStepState.PENDING
    started_at: datetime | None = None
    ended_at: datetime | None = None
    attempts: int = 0
    detail: str | None = None


class DrInterfaceTarget(_Model):
    """One interface's new configuration (found in the guest by MAC, else by name)."""

    name: str | None = None
    mac: str | None = None
    addresses: list[Cidr] = Field(description="The new addresses (CIDR).")
    previous: list[Cidr] = Field(default_factory=list, description="Addresses they replace.")
    gateways: list[IpText] = Field(
        default_factory=list, description="Default route via each (at most one per family)."
    )
    routes: list[DrRoute] = Field(default_factory=list)


class DrTarget(_Model):
    interfaces: list[DrInterfaceTarget]
    dns: list[IpText] = Field(default_factory=list)
    search: list[DnsName] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="e.g. addresses left as they were.")


class DrScriptResult(_Model):
    model_config = ConfigDict(extra="ignore", frozen=True)

    outcome: Literal["ok", "failed", "timeout", "not_found", "refused", "interrupted", "skipped"]
    path: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    seconds: float | None = None
    tail: str = Field(default="", description="The last bytes of its output (stdout+stderr).")
    output_bytes: int = 0
    reason: str | None = None


class DrVmStatus(_Model):
    """One VM of a run (KV ``gb_dr_runs``, key ``vm.<run>.<vm>``)."""

    run: Name
    vm: Uuid
    name: str | None = None
    group: int
    state: DrVmState = DrVmState.PENDING
    finished: bool = False
    reason: str | None = Field(default=None, description="Why it failed (or was skipped).")
    critical: bool = False
    link: str | None = Field(default=None, description="kind@host of the link used.")
    steps: dict[str, DrStep] = Field(
        default_factory=dict, description="'link', 'network', 'script'."
    )
    target: DrTarget | None = None
    reported: list[Interface] = Field(
        default_factory=list, description="Interfaces as the agent reported them after applying."
    )
    persisted: list[str] = Field(default_factory=list, description="'stack: file' written.")
    warnings: list[str] = Field(default_factory=list)
    repeat: bool = Field(
        default=False, description="The agent had applied this run's change already."
    )
    script: DrScriptResult | None = None
    started_at: datetime | None = None
    applied_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


class DrRun(_Model):
    """A run (KV ``gb_dr_runs``, key ``run.<run>``); its VMs are ``vm.<run>.<vm>``."""

    id: Name
    plan: Name
    plan_revision: int
    kind: DrRunKind
    state: DrRunState = DrRunState.RUNNING
    created_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    groups: list[list[Uuid]]
    names: dict[str, str] = Field(default_factory=dict, description="VM uuid → name.")
    total: int
    counts: dict[str, int] = Field(
        default_factory=dict, description="VMs per state (at group ends)."
    )
    current_group: int = 0
    driver: str | None = Field(default=None, description="Instance driving it (last known).")
    resumed: int = Field(default=0, description="How often a driver picked it up again.")
    reason: str | None = None
    plan_snapshot: DrPlan


class DrRunSummary(_Model):
    id: Name
    plan: Name
    kind: DrRunKind
    state: DrRunState
    created_at: datetime
    finished_at: datetime | None = None
    total: int
    counts: dict[str, int] = Field(default_factory=dict)


class DrRunStartRequest(_Model):
    plan: Name
    kind: DrRunKind = DrRunKind.FAILOVER
    run: Name | None = Field(
        default=None,
        description="Run id chosen by the caller (subscribe to its events first); "
        "default: a new one.",
    )


class DrRunGetRequest(_Model):
    run: Name
    offset: int = Field(default=0, ge=0)
    limit: int = Field(default=DR_MAX_PAGE, ge=0, le=DR_MAX_PAGE, description="0: run only.")


class DrRunGetReply(_Model):
    run: DrRun
    vms: list[DrVmStatus] = Field(description="In group order, then name.")
    total: int


class DrRunListRequest(_Model):
    plan: Name | None = None
    limit: int = Field(default=100, ge=1, le=1000)


class DrRunListReply(_Model):
    runs: list[DrRunSummary] = Field(description="Newest first.")


class DrRunCancelRequest(_Model):
    run: Name


class DrProgress(_Model):
    """``gb.evt.dr.<run>.<vm>``: a VM changed state; ``gb.evt.dr.<run>.run`` (no ``vm``):
    the run did."""

    run: Name
    vm: Uuid | None = None
    name: str | None = None
    group: int | None = None
    state: str
    finished: bool = False
    reason: str | None = None
    counts: dict[str, int] | None = None
    at: datetime = Field(default_factory=utcnow)


class DrInfo(_Model):
    instance: str
    key_id: str = Field(description="Id of the signing key (first 16 hex of SHA-256 of its DER).")
    public_key: str
    driving: list[str] = Field(description="Runs this replica drives now.")


# The signed change an agent verifies (gb.guest.<vm>.dr_apply / dr_script).


class DrSignedChange(_Model):
    """What ``dr_apply`` and ``dr_script`` carry: ``payload`` is JSON text
    (:class:`DrChangePayload`); ``signature`` is base64 Ed25519 over
    ``DR_SIGNATURE_CONTEXT + payload.encode()``."""

    payload: Annotated[str, StringConstraints(max_length=200000)]
    signature: Annotated[str, StringConstraints(max_length=200)]
    key_id: str | None = None


class DrNetworkChange(_Model):
    interfaces: list[DrInterfaceTarget] = Field(min_length=1, max_length=64)
    dns: list[IpText] = Field(default_factory=list)
    search: list[DnsName] = Field(default_factory=list)
    gateway_timeout: float = Field(ge=0, description="Roll back unless reached (0: no check).")


class DrScriptChange(_Model):
    which: Literal["production", "test"]
    timeout: float = Field(gt=0, description="Hard timeout; the script is killed after it.")
    required: bool = Field(default=True, description="False: a missing script is not an error.")
    env: dict[str, str] = Field(
        default_factory=dict, description="GUESTBUS_DR_* variables (others are refused)."
    )


class DrChangePayload(_Model):
    v: Literal[1] = 1
    type: Literal["network", "script"]
    run: Name
    plan: Name
    kind: DrRunKind
    vm: Uuid
    issued_at: float = Field(description="Epoch seconds.")
    not_before: float
    not_after: float
    network: DrNetworkChange | None = None
    script: DrScriptChange | None = None


class DrApplyResult(_Model):
    """The agent's answer to ``dr_apply``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    outcome: Literal["applied", "rolled_back", "failed"]
    run: Name
    reason: str | None = None
    interfaces: list[Interface] = Field(default_factory=list, description="Read back after.")
    persisted: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    repeat: bool = Field(default=False, description="Already applied: acknowledged, not redone.")
    seconds: float | None = None


class DrScriptReply(DrScriptResult):
    run: Name
    repeat: bool = False


SCHEMA_MODELS.update(
    {
        "dr-plan": DrPlan,
        "dr-plan-record": DrPlanRecord,
        "dr-plan-put-request": DrPlanPutRequest,
        "dr-plan-put-reply": DrPlanPutReply,
        "dr-plan-get-request": DrPlanGetRequest,
        "dr-plan-list-reply": DrPlanListReply,
        "dr-run": DrRun,
        "dr-run-summary": DrRunSummary,
        "dr-vm-status": DrVmStatus,
        "dr-run-start-request": DrRunStartRequest,
        "dr-run-get-request": DrRunGetRequest,
        "dr-run-get-reply": DrRunGetReply,
        "dr-run-list-request": DrRunListRequest,
        "dr-run-list-reply": DrRunListReply,
        "dr-run-cancel-request": DrRunCancelRequest,
        "dr-progress": DrProgress,
        "dr-info": DrInfo,
        "dr-signed-change": DrSignedChange,
        "dr-change-payload": DrChangePayload,
        "dr-apply-result": DrApplyResult,
        "dr-script-reply": DrScriptReply,
    }
)


# --- snapshots and self-service restore ---
# The host adapter (in serial-bridge, one per hypervisor host) serves ``gb.hv.<vm>.<op>`` for
# the libvirt domains of its host; nobody else answers for a VM, so a VM on no host gets "no
# responders" at once. Restore disks it attached live in KV ``gb_restores`` (key
# ``<vm>.<label>``) with their detach time, so a restarted adapter still detaches them.
# libvirt says which snapshots exist; how each was taken (:class:`SnapshotRecord`) is kept in
# KV ``gb_snapshots`` (key ``<vm>.<name>``) and announced on ``gb.evt.snapshot.<vm>``.
# See docs/snapshots.md.

HV_PREFIX: Final = "gb.hv"
HV_SNAPSHOT_CREATE: Final = "snapshot_create"
HV_SNAPSHOT_LIST: Final = "snapshot_list"
HV_SNAPSHOT_DELETE: Final = "snapshot_delete"
HV_RESTORE_ATTACH: Final = "restore_attach"
HV_RESTORE_DETACH: Final = "restore_detach"
HV_RESTORE_LIST: Final = "restore_list"
HV_OPS: Final = (
    HV_SNAPSHOT_CREATE,
    HV_SNAPSHOT_LIST,
    HV_SNAPSHOT_DELETE,
    HV_RESTORE_ATTACH,
    HV_RESTORE_DETACH,
    HV_RESTORE_LIST,
)
SSR_FORWARD: Final = {
    RPC_SSR_LIST: HV_SNAPSHOT_LIST,
    RPC_SSR_ATTACH: HV_RESTORE_ATTACH,
    RPC_SSR_DETACH: HV_RESTORE_DETACH,
    RPC_SSR_ATTACHED: HV_RESTORE_LIST,
}
"""Guest RPC → host adapter op; rpc-router forwards with the VM the link terminator stamped."""

EVT_SNAPSHOT: Final = "snapshot"
"""Snapshot and restore-disk events (:class:`SnapshotEvent`)."""
KV_SNAPSHOTS: Final = "gb_snapshots"
"""KV bucket: how each snapshot was taken (:class:`SnapshotRecord`, key ``<vm>.<name>``)."""
KV_RESTORES: Final = "gb_restores"
"""KV bucket: attached restore disks and when they are detached (:class:`RestoreAttachment`)."""
RESTORE_TTL_DEFAULT: Final = 24 * 3600.0
"""A restore disk is detached this long after it was attached, unless configured otherwise."""
CAP_SSR: Final = "ssr"
"""Agent capability (in its hello): root in the guest may use self-service restore."""
HOST_CAP_SNAPSHOT: Final = "snapshot"
"""Host capability (VmRecord.host_capabilities): the host adapter can snapshot the VM."""
HOST_CAP_RESTORE: Final = "restore"
"""Host capability: the host adapter can attach the VM's snapshots as restore disks."""
RESTORE_SERIAL_PREFIX: Final = "gbssr-"
"""Disk serial of restore disks (``gbssr-`` + 8 hex: virtio-blk keeps only 20 bytes); the
guest finds ``/dev/disk/by-id/virtio-gbssr-…``."""

ERROR_HYPERVISOR: Final = "hypervisor_error"
"""libvirt refused or failed an operation; the message carries libvirt's words."""
ERROR_SNAPSHOT_EXISTS: Final = "snapshot_exists"
ERROR_SNAPSHOT_NOT_FOUND: Final = "snapshot_not_found"
ERROR_NOT_RUNNING: Final = "vm_not_running"
"""The operation needs a running domain (attach, quiesce)."""
ERROR_FROZEN: Final = _wire_errors.FROZEN
"""A freeze is already in progress in this guest."""


def hv_subject(vm: str, op: str) -> str:
    """``gb.hv.<vm>.<op>``: a hypervisor operation on one VM (host adapter)."""
    if op not in HV_OPS:
        raise ValueError(f"no host adapter operation {op!r}")
    return f"{HV_PREFIX}.{_token(vm, 'vm')}.{op}"


def hv_wildcard(vm: str) -> str:
    """``gb.hv.<vm>.*``: what the adapter holding the VM's domain serves."""
    return f"{HV_PREFIX}.{_token(vm, 'vm')}.*"


class Consistency(StrEnum):
    """What a snapshot can be trusted for."""

    APPLICATION = "application"
    """pre_freeze succeeded, file systems were frozen, post_thaw ran."""
    FILESYSTEM = "filesystem"
    """File systems were frozen but applications were not quiesced (no usable pre_freeze)."""
    CRASH = "crash"
    """Nothing was frozen: like a power cut (journals make it whole at mount)."""


class ScriptState(StrEnum):
    OK = "ok"
    MISSING = "missing"
    REFUSED = "refused"
    """Present but not root-owned mode 700 (or not a regular file): not run."""
    FAILED = "failed"
    TIMEOUT = "timeout"
    """Killed at its hard timeout."""
    SKIPPED = "skipped"


class ScriptOutcome(_Model):
    path: str
    state: ScriptState
    exit_code: int | None = None
    seconds: float | None = None
    reason: str | None = Field(default=None, description="Why it did not run or failed.")
    output: str = Field(default="", max_length=4096, description="Tail of its output.")


class FreezeRequest(_Model):
    """Params of ``freeze``."""

    deadline: float | None = Field(
        default=None,
        gt=0,
        le=FREEZE_DEADLINE_MAX,
        description="Thaw by itself after this many seconds (at most the agent's own limit).",
    )
    snapshot: str | None = Field(default=None, max_length=64, description="For the logs.")


class FreezeResult(_Model):
    frozen: list[str] = Field(description="Mount points frozen, in freeze order.")
    excluded: list[str] = Field(default_factory=list)
    consistency: Consistency = Field(description="What a snapshot taken now can be trusted for.")
    pre_freeze: ScriptOutcome
    seconds: float = Field(description="How long pre_freeze and the freeze took.")
    deadline_seconds: float = Field(description="The guest thaws by itself after this long.")
    notes: list[str] = Field(default_factory=list)


class ThawResult(_Model):
    thawed: list[str] = Field(description="Mount points thawed, in thaw order.")
    post_thaw: ScriptOutcome
    frozen_seconds: float | None = Field(default=None, description="How long they were frozen.")
    self_thawed: bool = Field(
        default=False, description="The deadline had passed: the guest had already thawed."
    )
    notes: list[str] = Field(default_factory=list)


class FreezeStatus(_Model):
    frozen: bool
    mounts: list[str] = Field(default_factory=list)
    since: datetime | None = None
    deadline: datetime | None = None
    self_thaws: int = Field(default=0, description="Times the deadline thawed the guest.")
    last_self_thaw: datetime | None = None


class SsrUnmountRequest(_Model):
    label: Name


class SsrUnmountReply(_Model):
    label: Name
    unmounted: bool
    path: str | None = None


class SnapshotStep(_Model):
    step: Annotated[str, StringConstraints(pattern=r"^(freeze|snapshot|thaw)$")]
    ok: bool
    seconds: float
    detail: str | None = None


class SnapshotDisk(_Model):
    target: str = Field(description="The guest disk (e.g. vda).")
    file: str = Field(description="The image as it was at the snapshot (read-only from now).")
    format: str = Field(default="qcow2", description="Image format of ``file`` (qcow2, raw).")
    overlay: str = Field(description="Where the VM has been writing since.")


class SnapshotRecord(_Model):
    """One snapshot and how it was taken (KV ``gb_snapshots``; libvirt says whether it exists)."""

    vm: Uuid
    name: Name
    host: str
    created_at: datetime
    quiesce_requested: bool
    consistency: Consistency
    reasons: list[str] = Field(
        default_factory=list, description="Why it is less than application-consistent."
    )
    frozen_seconds: float | None = None
    steps: list[SnapshotStep] = Field(default_factory=list)
    disks: list[SnapshotDisk] = Field(default_factory=list)
    freeze: FreezeResult | None = None
    thaw: ThawResult | None = None


class SnapshotCreateRequest(_Model):
    name: Name | None = Field(default=None, description="Default: snap-<UTC timestamp>.")
    quiesce: bool = False
    freeze_deadline: float | None = Field(default=None, gt=0, le=FREEZE_DEADLINE_MAX)


class SnapshotListReply(_Model):
    snapshots: list[SnapshotRecord]


class SnapshotDeleteRequest(_Model):
    name: Name


class SnapshotDeleteReply(_Model):
    name: Name
    deleted: bool = True


DiskTarget = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9]{1,15}$")]
"""A guest disk as libvirt names it (``<target dev>``: vda, sdb, …)."""


class RestoreAttachRequest(_Model):
    snapshot: Name
    disk: DiskTarget | None = Field(
        default=None,
        description="Which of the snapshot's disks, by the guest disk it was taken of (e.g. "
        "vdb; the snapshot lists them). Default: its first disk.",
    )
    ttl: float | None = Field(
        default=None, gt=0, description="Detach after this many seconds (at most the default)."
    )


class RestoreAttachment(_Model):
    """A snapshot's disk attached read-only to its VM (KV ``gb_restores``)."""

    vm: Uuid
    label: Name = Field(
        description="Names the attachment; the guest mounts it at <dir>/<label>. The snapshot's "
        "name for its first disk, <snapshot>-<disk> for another."
    )
    snapshot: Name
    disk: str | None = Field(
        default=None, description="The snapshot's disk this is, by the guest disk it was of."
    )
    host: str
    target: str = Field(description="Guest disk the adapter attached (e.g. vdb).")
    serial: str = Field(description="Disk serial the guest finds it by.")
    file: str
    attached_at: datetime
    detach_at: datetime
    requested_by: Annotated[str, StringConstraints(pattern=r"^(guest|operator)$")] = "operator"


class RestoreDetachRequest(_Model):
    label: Name


class RestoreDetachReply(_Model):
    label: Name
    detached: bool = True
    unmounted: bool | None = Field(
        default=None,
        description="Whether the agent unmounted it first (None: not asked or no answer).",
    )


class RestoreListReply(_Model):
    attachments: list[RestoreAttachment]


class SnapshotEvent(_Model):
    vm: Uuid
    action: Annotated[
        str, StringConstraints(pattern=r"^(created|deleted|attached|detached|auto_detached)$")
    ]
    name: Name
    host: str
    consistency: Consistency | None = None
    detail: str | None = None
    at: datetime = Field(default_factory=utcnow)


SCHEMA_MODELS.update(
    {
        "freeze-request": FreezeRequest,
        "freeze-result": FreezeResult,
        "thaw-result": ThawResult,
        "freeze-status": FreezeStatus,
        "snapshot-record": SnapshotRecord,
        "snapshot-create-request": SnapshotCreateRequest,
        "snapshot-list-reply": SnapshotListReply,
        "snapshot-delete-request": SnapshotDeleteRequest,
        "restore-attach-request": RestoreAttachRequest,
        "restore-attachment": RestoreAttachment,
        "restore-detach-request": RestoreDetachRequest,
        "restore-list-reply": RestoreListReply,
        "snapshot-event": SnapshotEvent,
    }
)
