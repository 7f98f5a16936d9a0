"""``guestbus cert …`` and ``guestbus ca …``: the cluster CA's certificates (docs/pki.md).

::

    guestbus cert list [--expiring 30d] [--revoked] [--state S] [--vm VM] [--kind K] [--json]
    guestbus cert show SERIAL [--pem] [--json]
    guestbus cert revoke VM-OR-SERIAL --reason REASON [--comment TEXT] [--json]
    guestbus ca show [--pem] [--json]
    guestbus ca crl [-o FILE] [--json]

Durations: ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or seconds. Every command asks the
cert-authority service over the bus (``gb.ca.*``).

Hook: ``guestbus cert renew <vm>`` (ask the agent to renew now) belongs to the agent's
renewal work; it registers itself by appending a function ``add(cert_subparsers)`` to
:data:`CERT_COMMAND_HOOKS` (or by adding its sub-command here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from nats.aio.client import Client
from pydantic import BaseModel

from guestbus import pki
from guestbus.cli.common import (
    UUID_RE,
    CliError,
    add_nats_option,
    resolve_vm,
    run_async,
    service_call,
    table,
    vm_uuid,
    with_bus,
)
from guestbus.contract import (
    CA_CRL,
    CA_GET,
    CA_INFO,
    CA_LIST,
    CA_REVOKE,
    CaInfo,
    CertGetReply,
    CertGetRequest,
    CertListReply,
    CertListRequest,
    CertRecord,
    CertState,
    CrlReply,
    RevocationReason,
    RevokeReply,
    RevokeRequest,
    ca_subject,
)

M = TypeVar("M", bound=BaseModel)

REASONS: tuple[str, ...] = tuple(r.value for r in RevocationReason)
REQUEST_TIMEOUT = 15.0
_HEX = re.compile(r"^(0[xX])?[0-9a-fA-F:]+$")

_EKU_NAMES = {
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
}

CERT_COMMAND_HOOKS: list[Callable[[Any], None]] = []
"""Functions ``add(cert_subparsers)`` that add more ``guestbus cert`` actions (e.g. renew)."""


# --- parsing helpers ----------------------------------------------------------------------


def parse_reason(text: str) -> RevocationReason:
    """``keyCompromise`` / ``key-compromise`` / ``key_compromise`` (any case) → the reason."""
    wanted = text.replace("-", "").replace("_", "").lower()
    for reason in RevocationReason:
        if reason.value.lower() == wanted:
            return reason
    raise CliError(f"unknown revocation reason {text!r}; valid reasons: {', '.join(REASONS)}")


def parse_duration(text: str) -> int:
    try:
        return int(pki.parse_duration(text))
    except pki.PkiError as exc:
        raise CliError(str(exc), status=2) from None


def when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def expires_in(not_after: datetime, now: datetime | None = None) -> str:
    left = (not_after - (now or datetime.now(UTC))).total_seconds()
    if left <= 0:
        return f"expired {pki.format_duration(-left)} ago"
    return pki.format_duration(left)


# --- bus ----------------------------------------------------------------------------------


async def ca_call(nc: Client, endpoint: str, request: BaseModel | None, model: type[M]) -> M:
    """One request to ``gb.ca.<endpoint>``; typed errors become a one-line CliError."""
    return await service_call(
        nc, ca_subject(endpoint), request, model, service="cert-authority", timeout=REQUEST_TIMEOUT
    )


def dump(model: BaseModel) -> None:
    print(json.dumps(model.model_dump(mode="json"), indent=2))


# --- parsers ------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    cert = sub.add_parser(
        "cert",
        help="certificates issued by the cluster CA: list, show, revoke",
        description="Certificates issued by the cluster CA (the cert-authority service).",
    )
    actions = cert.add_subparsers(dest="cert_action", metavar="ACTION")
    cert.set_defaults(func=lambda args: _usage(cert))

    p = actions.add_parser(
        "list",
        help="list certificates (soonest expiry first)",
        description="List certificate records, soonest expiry first. Filters combine.",
    )
    p.add_argument(
        "--expiring",
        metavar="DURATION",
        help="only valid certificates expiring within DURATION (e.g. 30d, 12h, 90m)",
    )
    p.add_argument("--revoked", action="store_true", help="only revoked certificates")
    p.add_argument("--state", choices=[s.value for s in CertState], help="only this state")
    p.add_argument("--vm", metavar="VM", help="only this VM (uuid, name or uuid prefix)")
    p.add_argument("--kind", choices=["vm", "server"], help="only VM or server certificates")
    p.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_nats_option(p)
    p.set_defaults(func=run_list)

    p = actions.add_parser(
        "show",
        help="one certificate: record, SANs, PEM",
        description="Show one certificate by serial (hex; colons and 0x are accepted).",
    )
    p.add_argument("serial", metavar="SERIAL")
    p.add_argument("--pem", action="store_true", help="print only the certificate (PEM)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_nats_option(p)
    p.set_defaults(func=run_show)

    p = actions.add_parser(
        "revoke",
        help="revoke one certificate (serial) or every valid certificate of a VM",
        description="Revoke a certificate by serial, or every valid certificate of a VM "
        "(uuid, or name via the VM registry). A new CRL is signed and published.",
    )
    p.add_argument("target", metavar="VM-OR-SERIAL")
    p.add_argument(
        "--reason",
        required=True,
        metavar="REASON",
        help=f"one of: {', '.join(REASONS)}",
    )
    p.add_argument("--comment", help="free text kept in the record (audit)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_nats_option(p)
    p.set_defaults(func=run_revoke)

    p = actions.add_parser(
        "renew",
        help="ask a VM's agent to renew its certificate now (over its active link)",
        description="Ask the agent inside a VM to renew its certificate now: it makes a new "
        "key in the guest, sends a CSR over its link and installs the new certificate.",
    )
    p.add_argument("vm", help="VM uuid, name, or unique uuid prefix")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    add_nats_option(p)
    p.set_defaults(func=run_renew)

    for hook in CERT_COMMAND_HOOKS:
        hook(actions)

    ca = sub.add_parser(
        "ca",
        help="the cluster CA: certificate, fingerprint, CRL",
        description="The cluster CA (the cert-authority service).",
    )
    ca_actions = ca.add_subparsers(dest="ca_action", metavar="ACTION")
    ca.set_defaults(func=lambda args: _usage(ca))

    p = ca_actions.add_parser(
        "show",
        help="fingerprint, subject, validity, trust domain, lifetimes, counts",
        description="Show the cluster CA.",
    )
    p.add_argument("--pem", action="store_true", help="print only the CA certificate (PEM)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_nats_option(p)
    p.set_defaults(func=run_ca_show)

    p = ca_actions.add_parser(
        "crl",
        help="the current CRL (PEM to stdout, or -o FILE)",
        description="Fetch the current certificate revocation list.",
    )
    p.add_argument("-o", "--output", metavar="FILE", help="write the CRL (PEM) to FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_nats_option(p)
    p.set_defaults(func=run_ca_crl)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# --- commands -----------------------------------------------------------------------------


def run_list(args: argparse.Namespace) -> int:
    state: CertState | None = CertState(args.state) if args.state else None
    if args.revoked:
        if state not in (None, CertState.REVOKED):
            print(f"error: --revoked and --state {state} disagree", file=sys.stderr)
            return 2
        state = CertState.REVOKED
    try:
        expiring = parse_duration(args.expiring) if args.expiring else None
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.status
    if not 1 <= args.limit <= 2000:
        print("error: --limit must be between 1 and 2000", file=sys.stderr)
        return 2

    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm) if args.vm else None
        request = CertListRequest(
            expiring_within_seconds=expiring,
            state=state,
            vm=vm,
            kind=args.kind,
            limit=args.limit,
        )
        result = await ca_call(nc, CA_LIST, request, CertListReply)
        if args.json:
            dump(result)
            return 0
        print(render_list(result.certificates, result.total, result.truncated))
        return 0

    return run_async(with_bus(args, work))


def render_list(records: Sequence[CertRecord], total: int, truncated: bool) -> str:
    if not records:
        return "no certificates match"
    now = datetime.now(UTC)
    rows = [
        (
            r.serial,
            r.kind.value,
            r.vm or r.name or "-",
            when(r.not_after),
            expires_in(r.not_after, now) if r.state is not CertState.REVOKED else "-",
            r.state.value + (f" ({r.reason.value})" if r.reason else ""),
        )
        for r in records
    ]
    header = ("SERIAL", "KIND", "VM/NAME", "NOT AFTER (UTC)", "EXPIRES IN", "STATE")
    counts: dict[str, int] = {}
    for r in records:
        counts[r.state.value] = counts.get(r.state.value, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    more = f"; showing {len(records)} of {total} (use --limit)" if truncated else ""
    noun = "certificate" if len(records) == 1 else "certificates"
    return table(header, rows) + f"\n\n{len(records)} {noun} ({summary}){more}"


def run_show(args: argparse.Namespace) -> int:
    try:
        serial = pki.canonical_serial(args.serial)
    except pki.PkiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def work(nc: Client) -> int:
        result = await ca_call(nc, CA_GET, CertGetRequest(serial=serial), CertGetReply)
        if args.json:
            dump(result)
        elif args.pem:
            if result.certificate is None:
                raise CliError(f"the PEM of {serial} is no longer stored")
            sys.stdout.write(result.certificate)
        else:
            print(render_record(result.record, result.certificate))
        return 0

    return run_async(with_bus(args, work))


def render_record(rec: CertRecord, pem: str | None) -> str:
    rows: list[tuple[str, str]] = [
        ("serial", rec.serial),
        ("kind", rec.kind.value),
        ("vm" if rec.vm else "name", rec.vm or rec.name or "-"),
        ("subject", rec.subject),
        ("state", rec.state.value),
        ("not before", rec.not_before.isoformat()),
        ("not after", f"{rec.not_after.isoformat()} ({expires_in(rec.not_after)})"),
        ("issued at", rec.issued_at.isoformat()),
        ("fingerprint", pki.fingerprint_colons(rec.fingerprint)),
    ]
    if rec.renewal_of:
        rows.append(("renewal of", rec.renewal_of))
    if rec.revoked_at:
        rows.append(("revoked at", rec.revoked_at.isoformat()))
        rows.append(("reason", rec.reason.value if rec.reason else "-"))
    if rec.comment:
        rows.append(("comment", rec.comment))
    if pem:
        try:
            cert = pki.load_pem_certificate(pem)
            rows.extend(_describe_extensions(cert))
        except pki.PkiError:
            rows.append(("certificate", "unreadable PEM"))
    else:
        rows.append(("certificate", "PEM no longer stored"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _describe_extensions(cert: x509.Certificate) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = [("key", pki.describe_key(cert.public_key()))]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        out.append(("SANs", ", ".join(pki.names_of(san))))
    except x509.ExtensionNotFound:
        pass
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        out.append(("usage", ", ".join(_EKU_NAMES.get(u, u.dotted_string) for u in eku)))
    except x509.ExtensionNotFound:
        pass
    return out


def run_revoke(args: argparse.Namespace) -> int:
    try:
        reason = parse_reason(args.reason)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    async def work(nc: Client) -> int:
        target = args.target.strip()
        if UUID_RE.match(target):
            request = RevokeRequest(vm=target.lower(), reason=reason, comment=args.comment)
        elif _HEX.match(target):
            try:
                serial = pki.canonical_serial(target)
            except pki.PkiError as exc:
                raise CliError(str(exc), status=2) from None
            request = RevokeRequest(serial=serial, reason=reason, comment=args.comment)
        else:
            rec = await resolve_vm(nc, target)
            request = RevokeRequest(vm=rec.uuid, reason=reason, comment=args.comment)
        result = await ca_call(nc, CA_REVOKE, request, RevokeReply)
        if args.json:
            dump(result)
            return 0
        what = f"VM {request.vm}" if request.vm else f"certificate {request.serial}"
        if result.revoked:
            print(f"revoked {len(result.revoked)} certificate(s) of {what} ({reason.value}):")
            for serial in result.revoked:
                print(f"  {serial}")
        else:
            print(f"nothing to revoke for {what}: no valid certificate")
        for serial in result.already_revoked:
            print(f"  {serial} was already revoked")
        print(f"CRL {result.crl_number}, next update {when(result.crl_next_update)} UTC")
        return 0

    return run_async(with_bus(args, work))


def run_ca_show(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        info = await ca_call(nc, CA_INFO, None, CaInfo)
        if args.json:
            dump(info)
        elif args.pem:
            sys.stdout.write(info.certificate)
        else:
            print(render_info(info))
        return 0

    return run_async(with_bus(args, work))


def render_info(info: CaInfo) -> str:
    lifetime = pki.format_duration(info.vm_cert_lifetime_seconds)
    if info.compat_1000_days:
        lifetime += " (GUESTBUS_CERT_COMPAT_1000_DAYS)"
    counts = info.counts
    rows = [
        ("subject", info.subject),
        ("fingerprint", f"SHA256 {pki.fingerprint_colons(info.fingerprint)}"),
        ("ca id", info.ca_id),
        ("valid", f"{when(info.not_before)} .. {when(info.not_after)} UTC"),
        ("expires in", expires_in(info.not_after)),
        ("trust domain", info.trust_domain),
        ("VM identity", f"spiffe://{info.trust_domain}/vm/<uuid>"),
        ("VM cert life", lifetime),
        ("server life", pki.format_duration(info.server_cert_lifetime_seconds)),
        (
            "CRL",
            f"number {info.crl_number}, next update {when(info.crl_next_update)} UTC"
            if info.crl_number is not None and info.crl_next_update is not None
            else "none yet",
        ),
        (
            "certificates",
            f"{counts.valid} valid, {counts.revoked} revoked, {counts.expired} expired",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run_ca_crl(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        crl = await ca_call(nc, CA_CRL, None, CrlReply)
        if args.output:
            _write_file(Path(args.output), crl.crl)
        if args.json:
            dump(crl)
        elif args.output:
            print(
                f"CRL {crl.number}: {len(crl.revoked)} revoked, next update "
                f"{when(crl.next_update)} UTC -> {args.output}"
            )
        else:
            sys.stdout.write(crl.crl)
        return 0

    return run_async(with_bus(args, work))


def _write_file(path: Path, text: str) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


def run_renew(args: argparse.Namespace) -> int:
    from guestbus.cli.common import resolve_vm, with_bus
    from guestbus.cli.guest import command

    async def work(nc: Any) -> int:
        rec = await resolve_vm(nc, args.vm)
        result, rtt = await command(nc, rec.uuid, "renew", {}, args.timeout)
        print(
            f"renewed: VM {rec.name or rec.uuid} has certificate {result.get('serial')} "
            f"until {result.get('not_after')} (over {result.get('link')}, {rtt:.2f}s)"
        )
        return 0

    return run_async(with_bus(args, work))
