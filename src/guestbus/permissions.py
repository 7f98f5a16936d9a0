"""Who may do what on the bus: one NATS user per service, with least-privilege permissions.

This module is the single source of truth for the permission set. The three deployments
render it, never copy it by hand:

- ``guestbus up`` (the embedded broker) renders :func:`nats_conf` at every start;
- ``deploy/compose/nats.conf`` is :func:`nats_conf` written out (``guestbus permissions
  --format nats-conf``; a test fails when the file drifts);
- the Helm chart's NATS values carry :func:`helm_authorization` (same check).

Every role gets:

- publish allow-lists per subject: the events it emits, the RPCs and endpoints it calls, and
  the exact JetStream API subjects of the streams, KV keys and object stores it uses
  (``$JS.API.STREAM.INFO.<stream>``, ``$JS.API.DIRECT.GET.KV_<bucket>.$KV.<bucket>.<key>``,
  ``$KV.<bucket>.<key>``, ``$O.<store>.>``, consumers for watches and scans);
- subscribe allow-lists: its endpoints and subscriptions, ``$SRV.*`` discovery for its own
  name, and **its own inbox** ``_INBOX.<role>.>`` (each client uses that inbox prefix, see
  :func:`inbox_prefix`), so no service can read replies meant for another — e.g. the DR
  private key on its way to dr-orchestrator;
- ``allow_responses`` (services only): a service may answer the requests it receives,
  without a blanket publish permission on other clients' inboxes.

Passwords never appear in a rendered configuration: the user entries reference environment
variables (``$GUESTBUS_NATS_PASSWORD_<ROLE>``) that the server resolves at start. NATS parses
such a value like a configuration token, so a password must start with a letter and contain
only letters and digits (:func:`generate_password` makes such ones; see
:func:`check_password`).

Guests hold no bus credentials at all. Only link terminators (serial-bridge, and rpc-router's
TLS gateway) may publish ``gb.rpc.*`` and serve ``gb.guest.>``; the operator can watch every
``gb.>`` subject but cannot answer a host → guest command or impersonate a guest.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from guestbus.contract import (
    CA_INFO,
    CA_ISSUE,
    CA_PREFIX,
    CA_RENEW,
    CA_SERVER,
    CMD_DR_APPLY,
    CMD_DR_SCRIPT,
    CMD_FREEZE,
    CMD_INFO,
    CMD_SSR_UNMOUNT,
    CMD_THAW,
    DR_KEY_PRIVATE,
    DR_KEY_PUBLIC,
    DR_PREFIX,
    EVT_CERT,
    EVT_CRL,
    EVT_DR,
    EVT_GUEST,
    EVT_ISO,
    EVT_LINK,
    EVT_PREFIX,
    EVT_SNAPSHOT,
    EVT_VM,
    GUEST_PREFIX,
    HV_PREFIX,
    ISO_PREFIX,
    KV_CERTS,
    KV_DR_KEYS,
    KV_DR_PLANS,
    KV_DR_RUNS,
    KV_ISO_MANIFESTS,
    KV_LEASES,
    KV_RESTORES,
    KV_SNAPSHOTS,
    KV_VMS,
    OBJ_ISOS,
    RPC_PREFIX,
    STREAM_EVENTS,
    ca_subject,
)

PASSWORD_ENV_PREFIX: Final = "GUESTBUS_NATS_PASSWORD_"
INBOX_ROOT: Final = "_INBOX"

OPERATOR: Final = "operator"
"""The CLI and ``guestbus up``: operates the cluster, provisions JetStream, watches the bus."""
PROVISIONER: Final = "provisioner"
"""Creates and updates the streams, buckets and object store; nothing else."""

SERVICES: Final = (
    "serial-bridge",
    "rpc-router",
    "cert-authority",
    "iso-builder",
    "dr-orchestrator",
)
"""The host services, in the order ``guestbus up`` starts them."""

_PASSWORD_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]{15,}$")


# --- building blocks --------------------------------------------------------------------------


def kv_stream(bucket: str) -> str:
    return f"KV_{bucket}"


def obj_stream(store: str) -> str:
    return f"OBJ_{store}"


@dataclass(frozen=True)
class Grant:
    """A piece of a role: subjects it may publish and subscribe, streams it uses."""

    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    streams: tuple[str, ...] = ()

    def __add__(self, other: Grant) -> Grant:
        return Grant(
            self.publish + other.publish,
            self.subscribe + other.subscribe,
            self.streams + other.streams,
        )


def pub(*subjects: str) -> Grant:
    return Grant(publish=subjects)


def sub(*subjects: str) -> Grant:
    return Grant(subscribe=subjects)


def stream_info(stream: str) -> Grant:
    """Look a stream (or a bucket, or an object store) up: ``js.key_value()`` does."""
    return Grant(publish=(f"$JS.API.STREAM.INFO.{stream}",), streams=(stream,))


def kv_read(bucket: str, keys: str = ">") -> Grant:
    """Get ``keys`` of a KV bucket (direct get; buckets are provisioned with direct gets)."""
    stream = kv_stream(bucket)
    return stream_info(stream) + pub(f"$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{keys}")


def kv_write(bucket: str, keys: str = ">") -> Grant:
    """Put, create, update, delete or purge ``keys``: publishes to ``$KV.<bucket>.<key>``."""
    return stream_info(kv_stream(bucket)) + pub(f"$KV.{bucket}.{keys}")


def consume(stream: str) -> Grant:
    """Consumers: ordered ones (KV watches, object reads; flow control) and pull ones (KV
    scans, :mod:`guestbus.kvscan`; next). Create, info, delete. Consumers are granted per
    stream: whoever may watch or scan a bucket may read every key of it."""
    return stream_info(stream) + pub(
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def kv_watch(bucket: str) -> Grant:
    return consume(kv_stream(bucket))


def kv_all(bucket: str) -> Grant:
    return kv_read(bucket) + kv_write(bucket) + kv_watch(bucket)


def obj_read(store: str) -> Grant:
    stream = obj_stream(store)
    return consume(stream) + pub(
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        # js.subscribe() without a stream name looks the stream up by subject
        "$JS.API.STREAM.NAMES",
    )


def obj_write(store: str) -> Grant:
    stream = obj_stream(store)
    return stream_info(stream) + pub(
        f"$O.{store}.>",
        f"$JS.API.DIRECT.GET.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.STREAM.PURGE.{stream}",
    )


def events(*kinds: str) -> Grant:
    """Publish events ``gb.evt.<kind>.*`` (plainly or with a JetStream acknowledgement)."""
    return pub(*(f"{EVT_PREFIX}.{kind}.*" for kind in kinds)) + stream_info(STREAM_EVENTS)


def link_terminator() -> Grant:
    """What holding guests' links takes: forward their RPCs (stamped), publish their link
    and guest events, serve host → guest commands for the VMs whose link is up here."""
    return pub(f"{RPC_PREFIX}.*") + events(EVT_LINK, EVT_GUEST) + sub(f"{GUEST_PREFIX}.*.*")


def host_adapter() -> Grant:
    """What the host adapter in serial-bridge takes (snapshots, restore disks): serve
    ``gb.hv.<vm>.<op>`` for its host's VMs, ask their agents to freeze, thaw and unmount,
    keep its records and announce them."""
    return (
        sub(f"{HV_PREFIX}.*.*")
        + pub(*(f"{GUEST_PREFIX}.*.{cmd}" for cmd in (CMD_FREEZE, CMD_THAW, CMD_SSR_UNMOUNT)))
        + events(EVT_SNAPSHOT)
        + kv_read(KV_SNAPSHOTS)
        + kv_write(KV_SNAPSHOTS)
        # the restore disks of its host are read back at start (a watch over the bucket)
        + kv_all(KV_RESTORES)
    )


# --- roles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """One NATS user: its name, what it is for, and its permissions."""

    name: str
    description: str
    grant: Grant
    service: bool = True
    """A host service: it answers requests (``allow_responses``) and registers with
    nats.micro (``$SRV.*`` discovery subjects for its name)."""

    @property
    def inbox(self) -> str:
        return inbox_prefix(self.name)

    @property
    def password_env(self) -> str:
        return password_env(self.name)

    @property
    def streams(self) -> tuple[str, ...]:
        """Streams (``KV_*``, ``OBJ_*``, ``GB_EVENTS``) this role needs to exist."""
        return tuple(dict.fromkeys(self.grant.streams))

    @property
    def publish(self) -> list[str]:
        return _unique(self.grant.publish)

    @property
    def subscribe(self) -> list[str]:
        subjects = [*self.grant.subscribe, f"{self.inbox}.>"]
        if self.service:
            subjects += [
                *(f"$SRV.{verb}" for verb in ("PING", "INFO", "STATS")),
                f"$SRV.*.{self.name}",
                f"$SRV.*.{self.name}.*",
            ]
        return _unique(subjects)

    def permissions(self) -> dict[str, Any]:
        """The NATS ``permissions`` block of this user."""
        perms: dict[str, Any] = {
            "publish": {"allow": self.publish},
            "subscribe": {"allow": self.subscribe},
        }
        if self.service:
            perms["allow_responses"] = True
        return perms


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def inbox_prefix(role: str) -> str:
    """The inbox prefix a client of ``role`` uses (nats-py ``inbox_prefix``)."""
    return f"{INBOX_ROOT}.{role}"


def password_env(role: str) -> str:
    """``GUESTBUS_NATS_PASSWORD_RPC_ROUTER`` for ``rpc-router``."""
    return PASSWORD_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", role).upper()


def _ca(*endpoints: str) -> Grant:
    return pub(*(ca_subject(e) for e in endpoints))


def _provisioning() -> Grant:
    from guestbus.provision import KV_SPECS  # the resources provision() manages

    streams = [STREAM_EVENTS, *(kv_stream(s.bucket) for s in KV_SPECS), obj_stream(OBJ_ISOS)]
    grant = Grant()
    for stream in streams:
        grant += stream_info(stream) + pub(
            f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}"
        )
    return grant


def default_roles() -> dict[str, Role]:
    """The permission set of guestbus, by role name."""
    roles = [
        Role(
            "serial-bridge",
            "one per hypervisor host: terminates VM serial links; records discovered VMs; "
            "snapshots and restore disks through libvirt (host adapter)",
            link_terminator() + kv_read(KV_VMS, "*") + kv_write(KV_VMS, "*") + host_adapter(),
        ),
        Role(
            "rpc-router",
            "guest RPCs, the VM registry, and the TLS gateway (a link terminator too)",
            sub(f"{RPC_PREFIX}.*", f"{EVT_PREFIX}.{EVT_LINK}.*", f"{EVT_PREFIX}.{EVT_CERT}.*")
            + link_terminator()
            # guests' self-service restore requests, forwarded to their VM's host adapter
            + pub(f"{HV_PREFIX}.*.*")
            + events(EVT_VM)
            + _ca(CA_ISSUE, CA_RENEW, CA_INFO, CA_SERVER)
            + kv_all(KV_VMS)
            # the gateway checks a client certificate's record (revocation), nothing else
            + kv_read(KV_CERTS, "cert.*"),
        ),
        Role(
            "cert-authority",
            "the cluster CA: signs, renews, revokes; the only reader of the CA key",
            sub(f"{CA_PREFIX}.*", f"{EVT_PREFIX}.{EVT_CRL}.*")
            + events(EVT_CERT, EVT_CRL)
            + kv_all(KV_CERTS),
        ),
        Role(
            "iso-builder",
            "per-VM ISOs: reads the registry, asks the CA, writes ISOs and manifests",
            sub(f"{ISO_PREFIX}.*")
            + events(EVT_ISO)
            + _ca(CA_ISSUE, CA_INFO)
            + kv_read(KV_VMS, "*")
            + kv_all(KV_ISO_MANIFESTS)
            # the public half only; it may create the pair once, never read the private key
            + kv_read(KV_DR_KEYS, DR_KEY_PUBLIC)
            + kv_write(KV_DR_KEYS, DR_KEY_PUBLIC)
            + kv_write(KV_DR_KEYS, DR_KEY_PRIVATE)
            + obj_write(OBJ_ISOS),
        ),
        Role(
            "dr-orchestrator",
            "DR plans and runs: signs network changes, drives agents, holds a KV lease",
            sub(f"{DR_PREFIX}.>", f"{EVT_PREFIX}.{EVT_LINK}.*")
            # only the commands a DR run sends to agents
            + pub(*(f"{GUEST_PREFIX}.*.{cmd}" for cmd in (CMD_DR_APPLY, CMD_DR_SCRIPT, CMD_INFO)))
            + pub(f"{EVT_PREFIX}.{EVT_DR}.>")
            + stream_info(STREAM_EVENTS)
            + kv_read(KV_VMS, "*")
            + kv_watch(KV_VMS)
            + kv_all(KV_DR_PLANS)
            + kv_all(KV_DR_RUNS)
            + kv_all(KV_LEASES)
            + kv_all(KV_DR_KEYS),
        ),
        Role(
            OPERATOR,
            "the guestbus CLI and `guestbus up`: operates services and VMs, watches the bus",
            sub("gb.>", "$SRV.>")
            + pub(
                f"{GUEST_PREFIX}.*.*",
                f"{CA_PREFIX}.*",
                f"{ISO_PREFIX}.*",
                f"{DR_PREFIX}.>",
                f"{HV_PREFIX}.*.*",
                "$SRV.>",
            )
            + kv_read(KV_VMS)
            + kv_watch(KV_VMS)
            + kv_read(KV_ISO_MANIFESTS)
            + kv_read(KV_SNAPSHOTS)
            + kv_read(KV_RESTORES)
            + obj_read(OBJ_ISOS)
            + _provisioning(),
            service=False,
        ),
        Role(
            PROVISIONER,
            "creates and updates the JetStream streams, buckets and object store",
            _provisioning(),
            service=False,
        ),
    ]
    return {role.name: role for role in roles}


ROLES: dict[str, Role] = default_roles()
"""The roles in force. :func:`register` adds one (e.g. a site's own service under
``guestbus up``)."""


def register(role: Role) -> None:
    ROLES[role.name] = role


def role(name: str) -> Role:
    try:
        return ROLES[name]
    except KeyError:
        raise KeyError(
            f"no NATS role named {name!r} (known: {', '.join(ROLES)}); add one with "
            "guestbus.permissions.register()"
        ) from None


# --- passwords --------------------------------------------------------------------------------


def generate_password(length: int = 40) -> str:
    """A random password NATS reads back unchanged from an environment variable."""
    alphabet = string.ascii_letters + string.digits
    return secrets.choice(string.ascii_letters) + "".join(
        secrets.choice(alphabet) for _ in range(length - 1)
    )


def check_password(value: str) -> str | None:
    """Why ``value`` cannot be a NATS password given through the environment, or None."""
    if not _PASSWORD_RE.match(value):
        return (
            "a NATS password set through the environment must be at least 16 letters and "
            "digits, starting with a letter (NATS parses it as a configuration token: "
            "'123', 'true' or '5mb' would not stay text)"
        )
    return None


# --- rendering --------------------------------------------------------------------------------


def users(
    roles: Iterable[str] | None = None, password: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """User entries for ``roles`` (default: all). ``password`` maps a role to the text of its
    password field; by default the environment reference ``$GUESTBUS_NATS_PASSWORD_<ROLE>``."""
    names = list(ROLES) if roles is None else list(roles)
    entries = []
    for name in names:
        r = role(name)
        secret = (password or {}).get(name, f"${r.password_env}")
        entries.append({"user": r.name, "password": secret, "permissions": r.permissions()})
    return entries


def nats_conf(roles: Iterable[str] | None = None) -> str:
    """The ``authorization`` block of a nats-server configuration file: every user with its
    permissions, passwords referenced from the environment."""
    lines = [
        "# guestbus NATS users and permissions, generated by guestbus.permissions",
        "# (guestbus permissions --format nats-conf). Do not edit: change the module.",
        "# Passwords come from the environment: " + PASSWORD_ENV_PREFIX + "<ROLE>.",
        "authorization {",
        "  users = [",
    ]
    for entry in users(roles):
        perms = entry["permissions"]
        lines.append("    {")
        lines.append(f"      user: {json.dumps(entry['user'])}")
        lines.append(f"      password: {entry['password']}")
        lines.append("      permissions: {")
        for kind in ("publish", "subscribe"):
            lines.append(f"        {kind}: {{")
            lines.append("          allow: [")
            lines.extend(f"            {json.dumps(s)}" for s in perms[kind]["allow"])
            lines.append("          ]")
            lines.append("        }")
        if perms.get("allow_responses"):
            lines.append("        allow_responses: true")
        lines.append("      }")
        lines.append("    }")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


def helm_authorization(roles: Iterable[str] | None = None) -> dict[str, Any]:
    """The ``authorization`` block for the official NATS chart's ``config.merge``: the same
    users, passwords as ``<< $GUESTBUS_NATS_PASSWORD_<ROLE> >>`` (the chart writes them
    unquoted, so the server reads them from the container's environment)."""
    names = list(ROLES) if roles is None else list(roles)
    refs = {name: f"<< ${role(name).password_env} >>" for name in names}
    return {"users": users(names, refs)}


def as_json(roles: Iterable[str] | None = None) -> dict[str, Any]:
    """Every role with its description, inbox and permissions (for other tooling)."""
    names = list(ROLES) if roles is None else list(roles)
    return {
        name: {
            "description": role(name).description,
            "inbox_prefix": role(name).inbox,
            "password_env": role(name).password_env,
            "streams": list(role(name).streams),
            "permissions": role(name).permissions(),
        }
        for name in names
    }
