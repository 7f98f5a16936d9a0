"""What every bus-talking sub-command shares: connecting, resolving VMs, clear errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError, NoServersError
from nats.errors import TimeoutError as NatsTimeoutError
from pydantic import BaseModel, ValidationError

from guestbus.contract import KV_VMS, VmRecord
from guestbus.credentials import read_operator_file
from guestbus.permissions import OPERATOR, inbox_prefix
from guestbus.registry import Registry
from guestbus.runtime import BusError, check_reply

DEFAULT_URL = "nats://127.0.0.1:4222"
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)


class CliError(Exception):
    """A failure to show as one line (``error: …``) with a non-zero exit."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def nats_url(args: argparse.Namespace) -> str:
    return str(getattr(args, "nats", None) or os.environ.get("GUESTBUS_NATS_URL") or DEFAULT_URL)


def _explicit_url(args: argparse.Namespace) -> str | None:
    return getattr(args, "nats", None) or os.environ.get("GUESTBUS_NATS_URL") or None


async def connect(args: argparse.Namespace, role: str = OPERATOR) -> Client:
    """Connect as the operator (or ``role``): credentials from ``GUESTBUS_NATS_USER`` /
    ``GUESTBUS_NATS_PASSWORD`` or ``GUESTBUS_NATS_CREDS``; without them, the embedded
    cluster's operator file (``./.guestbus/operator.json``, ``$GUESTBUS_OPERATOR_FILE``),
    whose URL is used too unless one is given."""
    url = nats_url(args)
    options: dict[str, Any] = {
        "servers": [url],
        "name": "guestbus-cli",
        "connect_timeout": 3,
        "allow_reconnect": False,
        "max_reconnect_attempts": 0,
        "inbox_prefix": os.environ.get("GUESTBUS_NATS_INBOX_PREFIX") or inbox_prefix(role),
    }
    user, password = os.environ.get("GUESTBUS_NATS_USER"), os.environ.get("GUESTBUS_NATS_PASSWORD")
    creds = os.environ.get("GUESTBUS_NATS_CREDS")
    if user:
        options.update(user=user, password=password or "")
    elif not creds:
        saved = read_operator_file()
        explicit = _explicit_url(args)
        if saved is not None and (explicit is None or explicit == saved.get("url")):
            url = str(saved.get("url") or url)
            options.update(servers=[url], user=saved["user"], password=saved["password"])
            if not os.environ.get("GUESTBUS_NATS_INBOX_PREFIX") and saved.get("inbox_prefix"):
                options["inbox_prefix"] = str(saved["inbox_prefix"])
    if creds:
        options["user_credentials"] = creds

    async def quiet(_: Exception) -> None:
        return None

    options["error_cb"] = quiet
    try:
        # nats-py may keep retrying a refused first connect; bound it ourselves.
        return await asyncio.wait_for(nats.connect(**options), timeout=5)
    except (NoServersError, OSError, TimeoutError, asyncio.TimeoutError) as exc:
        raise CliError(
            f"cannot reach NATS at {url} ({type(exc).__name__}): is `guestbus up` running? "
            "Set GUESTBUS_NATS_URL or --nats to point at your cluster."
        ) from None
    except Exception as exc:
        if "authorization" in str(exc).lower():
            raise CliError(
                f"NATS at {url} refused our credentials: set GUESTBUS_NATS_USER/"
                "GUESTBUS_NATS_PASSWORD or GUESTBUS_NATS_CREDS (the embedded cluster's are in "
                "<state-dir>/operator.json while `guestbus up` runs)"
            ) from None
        raise


async def with_bus(args: argparse.Namespace, work: Callable[[Client], Awaitable[T]]) -> T:
    nc = await connect(args)
    try:
        return await work(nc)
    finally:
        await nc.close()


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run a command; CliError → one line on stderr and its status; Ctrl-C → 130."""
    try:
        return asyncio.run(coro)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


async def registry(nc: Client) -> Registry:
    try:
        kv = await nc.jetstream().key_value(KV_VMS)
    except Exception as exc:
        raise CliError(
            f"the VM registry (KV bucket {KV_VMS}) is not available: {exc}. "
            "Was the cluster provisioned (`guestbus up` does it)?"
        ) from None
    return Registry(kv)


async def resolve_vm(nc: Client, ref: str) -> VmRecord:
    """A VM by uuid, name or unique uuid prefix."""
    records = await (await registry(nc)).all()
    ref_l = ref.lower()
    for rec in records:
        if rec.uuid == ref_l:
            return rec
    by_name = [r for r in records if r.name == ref]
    if len(by_name) == 1:
        return by_name[0]
    by_prefix = [r for r in records if r.uuid.startswith(ref_l)]
    if len(by_prefix) == 1:
        return by_prefix[0]
    if len(by_name) + len(by_prefix) > 1:
        raise CliError(f"{ref!r} matches several VMs; give more of the uuid")
    raise CliError(f"no VM {ref!r} in the registry (see `guestbus vms`)")


async def vm_uuid(nc: Client, ref: str) -> str:
    """A VM uuid as given, or looked up by name / uuid prefix in the registry."""
    if UUID_RE.match(ref):
        return ref.lower()
    return (await resolve_vm(nc, ref)).uuid


async def service_call(
    nc: Client,
    subject: str,
    request: BaseModel | Mapping[str, Any] | None,
    model: type[M],
    *,
    service: str,
    timeout: float = 15.0,
    absent: str | None = None,
) -> M:
    """One request to a service endpoint; its absence, silence and typed errors become a
    one-line CliError (``absent`` replaces the default advice when nobody answers). An
    empty reply body reads as ``{}``."""
    if isinstance(request, BaseModel):
        data = request.model_dump_json(exclude_none=True).encode()
    else:
        data = json.dumps(dict(request or {})).encode()
    try:
        msg = await nc.request(subject, data, timeout=timeout)
    except NoRespondersError:
        raise CliError(
            absent
            or f"the {service} service is not running (no responder on {subject}); "
            "`guestbus up` starts it"
        ) from None
    except (NatsTimeoutError, asyncio.TimeoutError):
        raise CliError(f"the {service} did not answer on {subject} within {timeout:.0f}s") from None
    try:
        body = check_reply(msg.headers, msg.data)
    except BusError as err:
        raise CliError(f"{err.message} ({err.code})") from None
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise CliError(f"unexpected reply from {subject}: {exc.errors()[0]['msg']}") from None


def add_nats_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nats",
        metavar="URL",
        help=f"NATS URL (default: $GUESTBUS_NATS_URL or {DEFAULT_URL})",
    )


def age(when: datetime | None, now: datetime | None = None) -> str:
    if when is None:
        return "never"
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    if seconds < 1:
        return "now"
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h ago"
    return f"{seconds / 86400:.0f}d ago"


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
