"""``guestbus dr …``: DR plans (YAML), failover and test runs with a live table, status and
reports (service dr-orchestrator, docs/dr.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar

import yaml
from nats.aio.client import Client
from nats.aio.msg import Msg
from pydantic import BaseModel

from guestbus.cli.common import (
    CliError,
    add_nats_option,
    run_async,
    service_call,
    table,
    with_bus,
)
from guestbus.contract import (
    DR_MAX_PAGE,
    EVT_DR,
    EVT_PREFIX,
    DrPlanListReply,
    DrPlanPutReply,
    DrPlanRecord,
    DrRun,
    DrRunGetReply,
    DrRunListReply,
    DrRunState,
    DrStepState,
    DrVmState,
    DrVmStatus,
    dr_subject,
)

SERVICE = "dr-orchestrator"
M = TypeVar("M", bound=BaseModel)
OK_STATES = {DrVmState.APPLIED, DrVmState.SCRIPT_OK}


async def call(
    nc: Client, endpoint: str, payload: dict[str, Any], model: type[M], timeout: float = 30.0
) -> M:
    """One ``gb.dr.*`` request; absence, silence and typed errors become one-line CliErrors."""
    return await service_call(
        nc, dr_subject(endpoint), payload, model, service=SERVICE, timeout=timeout
    )


class _Empty(BaseModel):
    pass


# --- plans ---------------------------------------------------------------------------------


def load_plan_file(path: str) -> dict[str, Any]:
    """A plan from YAML (or JSON, which is YAML); one clear line on any problem."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(f"{path}{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise CliError(f"{path}: a plan is a YAML mapping (name:, mappings:, groups: …)")
    return data


def _fail(exc: CliError) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return exc.status


def run_plan_apply(args: argparse.Namespace) -> int:
    try:
        plan = load_plan_file(args.file)
    except CliError as exc:
        return _fail(exc)

    async def work(nc: Client) -> int:
        request: dict[str, Any] = {"plan": plan, "validate_only": args.dry_run}
        if args.revision is not None:
            request["expected_revision"] = args.revision
        reply = await call(nc, "plan.put", request, DrPlanPutReply)
        for warning in reply.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        shape = f"{reply.vms} VM(s) in {reply.groups} group(s)"
        if args.dry_run:
            print(f"plan {reply.name} is valid: {shape} (not stored: --dry-run)")
        else:
            what = "created" if reply.created else "updated"
            print(f"plan {reply.name} {what} (revision {reply.revision}): {shape}")
        return 0

    return run_async(with_bus(args, work))


def run_plan_show(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        record = await call(nc, "plan.get", {"name": args.plan}, DrPlanRecord)
        data = record.plan.model_dump(mode="json", exclude_none=True)
        data["vms"] = [{"vm": v["vm"], **v} for v in data.get("vms", [])]  # the VM first
        if args.json:
            print(json.dumps({**record.model_dump(mode="json")}, indent=2))
            return 0
        updated = _ts(record.updated_at)
        print(f"# plan {record.plan.name}, revision {record.revision}, updated {updated}")
        print(yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=100), end="")
        return 0

    return run_async(with_bus(args, work))


def run_plan_ls(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        reply = await call(nc, "plan.list", {}, DrPlanListReply)
        if not reply.plans:
            print("no DR plans (guestbus dr plan apply plan.yaml)")
            return 0
        rows = [
            (
                p.name,
                str(p.vms),
                str(p.groups),
                str(p.revision),
                _ts(p.updated_at),
                p.description or "",
            )
            for p in reply.plans
        ]
        print(table(("PLAN", "VMS", "GROUPS", "REVISION", "UPDATED", "DESCRIPTION"), rows))
        return 0

    return run_async(with_bus(args, work))


def run_plan_rm(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        await call(nc, "plan.delete", {"name": args.plan}, _Empty)
        print(f"plan {args.plan} deleted (runs keep their own copy)")
        return 0

    return run_async(with_bus(args, work))


# --- runs ----------------------------------------------------------------------------------


def _ts(when: datetime | None) -> str:
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if when else "-"


def _secs(a: datetime | None, b: datetime | None) -> str:
    if a is None:
        return "-"
    return f"{((b or datetime.now(UTC)) - a).total_seconds():.1f}s"


async def resolve_run(nc: Client, ref: str) -> str:
    """A run by id or unique id prefix."""
    runs = await call(nc, "run.list", {"limit": 1000}, DrRunListReply)
    if any(r.id == ref for r in runs.runs):
        return ref
    found = [r.id for r in runs.runs if r.id.startswith(ref)]
    if len(found) == 1:
        return found[0]
    if found:
        raise CliError(f"{ref!r} matches several runs ({', '.join(found[:5])}): give more of it")
    raise CliError(f"no DR run {ref!r} (see `guestbus dr runs`)")


async def fetch(nc: Client, run: str) -> DrRunGetReply:
    """The run and every VM status (paged)."""
    first = await call(nc, "run.get", {"run": run, "limit": DR_MAX_PAGE}, DrRunGetReply)
    vms = list(first.vms)
    while len(vms) < first.total:
        page = await call(
            nc, "run.get", {"run": run, "offset": len(vms), "limit": DR_MAX_PAGE}, DrRunGetReply
        )
        if not page.vms:
            break
        vms.extend(page.vms)
    return DrRunGetReply(run=first.run, vms=vms, total=first.total)


def _vm_label(v: DrVmStatus) -> str:
    return v.name or v.vm[:8]


def _detail(v: DrVmStatus) -> str:
    if v.state is DrVmState.FAILED or v.reason:
        return v.reason or ""
    if v.target is not None:
        new = [a for i in v.target.interfaces for a in i.addresses]
        return ", ".join(new)
    if v.state is DrVmState.WAITING:
        return "waiting for the agent's link"
    return ""


def vm_rows(reply: DrRunGetReply, only: list[DrVmStatus] | None = None) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for v in only if only is not None else reply.vms:
        rows.append(
            (
                _vm_label(v),
                str(v.group),
                v.state.value + ("" if v.finished or v.state is DrVmState.FAILED else " …"),
                _secs(v.started_at, v.finished_at),
                _detail(v),
            )
        )
    return rows


HEADER = ("VM", "GROUP", "STATE", "TIME", "ADDRESSES / REASON")


def summary(run: DrRun, vms: list[DrVmStatus]) -> str:
    counts: dict[str, int] = {}
    for v in vms:
        counts[v.state.value] = counts.get(v.state.value, 0) + 1
    done = sum(1 for v in vms if v.finished)
    parts = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return (
        f"run {run.id} ({run.kind.value} of plan {run.plan}): {run.state.value}; "
        f"{done}/{run.total} VMs finished: {parts}"
    )


class Live:
    """The per-VM table, redrawn in place on a terminal; a line per change otherwise."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.tty = out.isatty()
        self.lines = 0
        self.seen: dict[str, str] = {}

    def draw(self, reply: DrRunGetReply) -> None:
        if not self.tty:
            for v in reply.vms:
                state = v.state.value + (" (finished)" if v.finished else "")
                if self.seen.get(v.vm) != state:
                    self.seen[v.vm] = state
                    tail = f": {_detail(v)}" if _detail(v) else ""
                    print(
                        f"{time.strftime('%H:%M:%S')}  {_vm_label(v)}  {v.state.value}{tail}",
                        file=self.out,
                        flush=True,
                    )
            return
        rows_max = max(5, shutil.get_terminal_size((120, 40)).lines - 4)
        shown = reply.vms
        note = ""
        if len(shown) > rows_max:  # a big run: what moves or failed, then the rest
            busy = [v for v in shown if not v.finished or v.state is DrVmState.FAILED]
            shown = busy[:rows_max]
            note = f"({len(reply.vms) - len(shown)} more VMs not shown: finished fine)"
        text = "\n".join([summary(reply.run, reply.vms), table(HEADER, vm_rows(reply, shown))])
        if note:
            text += "\n" + note
        if self.lines:
            self.out.write(f"\033[{self.lines}F\033[J")
        self.out.write(text + "\n")
        self.out.flush()
        self.lines = text.count("\n") + 1


def confirm(args: argparse.Namespace) -> None:
    if args.test or args.yes:
        return
    if not sys.stdin.isatty():
        raise CliError(
            "a failover changes every VM of the plan: pass --yes (or run it on a terminal)"
        )
    answer = input(f"Fail over plan {args.plan}? This re-IPs its VMs. Type the plan name: ")
    if answer.strip() != args.plan:
        raise CliError("not confirmed: nothing started", status=2)


def run_failover(args: argparse.Namespace) -> int:
    try:
        confirm(args)
    except CliError as exc:
        return _fail(exc)

    async def work(nc: Client) -> int:
        run_id = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)
        changed = asyncio.Event()

        async def on_event(msg: Msg) -> None:
            changed.set()

        sub = await nc.subscribe(f"{EVT_PREFIX}.{EVT_DR}.{run_id}.>", cb=on_event)
        await nc.flush()
        kind = "test" if args.test else "failover"
        run = await call(nc, "run.start", {"plan": args.plan, "kind": kind, "run": run_id}, DrRun)
        print(
            f"started {kind} run {run.id} of plan {run.plan}: {run.total} VM(s) in "
            f"{len(run.groups)} group(s)",
            file=sys.stderr,
        )
        if args.detach:
            print(run.id)
            return 0
        live = Live()
        deadline = time.monotonic() + args.timeout if args.timeout else None
        try:
            while True:
                reply = await fetch(nc, run.id)
                live.draw(reply)
                if reply.run.state is not DrRunState.RUNNING:
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise CliError(
                        f"stopped watching after {args.timeout:g}s; run {run.id} goes on "
                        f"(guestbus dr status {run.id})"
                    )
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), 2.0)
                    await asyncio.sleep(0.2)  # gather a burst of changes into one redraw
                except asyncio.TimeoutError:
                    pass
        except (KeyboardInterrupt, asyncio.CancelledError):
            print(
                f"\nstopped watching; run {run.id} goes on: `guestbus dr status {run.id}`, "
                f"`guestbus dr cancel {run.id}` stops it",
                file=sys.stderr,
            )
            raise
        finally:
            await sub.unsubscribe()
        if not live.tty:
            print(summary(reply.run, reply.vms))
        print(f"details: guestbus dr report {run.id}", file=sys.stderr)
        return 0 if reply.run.state is DrRunState.SUCCEEDED else 1

    return run_async(with_bus(args, work))


def run_status(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        reply = await fetch(nc, await resolve_run(nc, args.run))
        if args.json:
            print(reply.model_dump_json(indent=2))
            return 0
        print(summary(reply.run, reply.vms))
        print(table(HEADER, vm_rows(reply)))
        return 0

    return run_async(with_bus(args, work))


def run_runs(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        payload: dict[str, Any] = {"limit": args.limit}
        if args.plan:
            payload["plan"] = args.plan
        reply = await call(nc, "run.list", payload, DrRunListReply)
        if not reply.runs:
            print("no DR runs")
            return 0
        rows = [
            (
                r.id,
                r.plan,
                r.kind.value,
                r.state.value,
                str(r.total),
                _ts(r.created_at),
                _secs(r.created_at, r.finished_at) if r.finished_at else "running",
            )
            for r in reply.runs
        ]
        print(table(("RUN", "PLAN", "KIND", "STATE", "VMS", "STARTED", "TOOK"), rows))
        return 0

    return run_async(with_bus(args, work))


def run_cancel(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        run = await call(nc, "run.cancel", {"run": await resolve_run(nc, args.run)}, DrRun)
        print(
            f"cancelling run {run.id}: VMs not yet started are cancelled, changes in flight finish"
        )
        return 0

    return run_async(with_bus(args, work))


def report_text(reply: DrRunGetReply) -> str:
    run = reply.run
    out = [
        f"DR run {run.id}: {run.kind.value} of plan {run.plan} (revision {run.plan_revision})",
        f"state: {run.state.value}; started {_ts(run.created_at)}, "
        + (
            f"finished {_ts(run.finished_at)} ({_secs(run.created_at, run.finished_at)})"
            if run.finished_at
            else "still running"
        )
        + f"; driven by {run.driver or '-'}"
        + (f" (picked up again {run.resumed}x)" if run.resumed else ""),
        summary(run, reply.vms),
    ]
    group = -1
    for v in reply.vms:
        if v.group != group:
            group = v.group
            out += ["", f"group {group}"]
        verdict = "ok" if v.state in OK_STATES and v.finished else v.state.value
        out.append(f"  {v.name or '-'} ({v.vm})  {verdict}  {_secs(v.started_at, v.finished_at)}")
        if v.reason:
            out.append(f"    reason: {v.reason}")
        for name in ("link", "network", "script"):
            step = v.steps.get(name)
            if step is None:
                continue
            took = _secs(step.started_at, step.ended_at) if step.started_at else "-"
            detail = step.detail or ""
            if name == "link" and v.link:
                detail = v.link
            out.append(f"    {name:<8} {step.state.value:<8} {took:>7}  {detail}".rstrip())
            if name == "network" and v.target is not None and step.state is not DrStepState.PENDING:
                for i in v.target.interfaces:
                    gw = f", gateway {', '.join(i.gateways)}" if i.gateways else ""
                    out.append(
                        f"             {i.name or i.mac}: {', '.join(i.previous) or '-'} → "
                        f"{', '.join(i.addresses)}{gw}"
                    )
                if v.target.dns or v.target.search:
                    dns = " ".join(v.target.dns) or "-"
                    search = " ".join(v.target.search) or "-"
                    out.append(f"             dns {dns}; search {search}")
                for note in v.target.notes:
                    out.append(f"             note: {note}")
                for path in v.persisted:
                    out.append(f"             persisted: {path}")
                for warning in v.warnings:
                    out.append(f"             warning: {warning}")
                if v.repeat:
                    out.append(
                        "             the agent had applied it already (acknowledged, not redone)"
                    )
            if name == "script" and v.script is not None:
                s = v.script
                what = f"exit {s.exit_code}" if s.exit_code is not None else s.outcome
                secs = f" in {s.seconds:.1f}s" if s.seconds is not None else ""
                out.append(f"             {s.path or ''}: {what}{secs}".rstrip())
                if s.tail:
                    kept = len(s.tail.encode())
                    out.append(f"             output (last {kept} of {s.output_bytes} bytes):")
                    out += [
                        f"             | {line}" for line in s.tail.rstrip("\n").splitlines()[-20:]
                    ]
    return "\n".join(out)


def run_report(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        reply = await fetch(nc, await resolve_run(nc, args.run))
        print(report_text(reply))
        return 0

    return run_async(with_bus(args, work))


# --- parser --------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    dr = sub.add_parser(
        "dr",
        help="disaster recovery: plans, failover and test runs, status and reports",
        description="DR plans (YAML) and runs of dr-orchestrator: re-IP and recovery scripts "
        "through each VM's agent, over serial. See docs/dr.md.",
    )
    dr_sub = dr.add_subparsers(dest="dr_command", metavar="COMMAND", required=True)

    plan = dr_sub.add_parser("plan", help="apply, show, list or delete plans")
    plan_sub = plan.add_subparsers(dest="plan_command", metavar="COMMAND", required=True)
    p = plan_sub.add_parser(
        "apply",
        help="validate a plan file (YAML) and store it",
        description="Validate a plan and store it (create or update). Every problem is "
        "reported at once; nothing is stored unless the whole plan is valid.",
    )
    p.add_argument("file", help="the plan, YAML (- for stdin)")
    p.add_argument("--dry-run", action="store_true", help="validate only; store nothing")
    p.add_argument(
        "--revision",
        type=int,
        help="update only if the stored plan is at this revision (0: only if it is new)",
    )
    add_nats_option(p)
    p.set_defaults(func=run_plan_apply)
    p = plan_sub.add_parser("show", help="a stored plan, as YAML")
    p.add_argument("plan")
    p.add_argument("--json", action="store_true", help="JSON with revision and update time")
    add_nats_option(p)
    p.set_defaults(func=run_plan_show)
    p = plan_sub.add_parser("ls", help="every plan")
    add_nats_option(p)
    p.set_defaults(func=run_plan_ls)
    p = plan_sub.add_parser("rm", help="delete a plan (its runs keep their copy)")
    p.add_argument("plan")
    add_nats_option(p)
    p.set_defaults(func=run_plan_rm)

    p = dr_sub.add_parser(
        "failover",
        help="fail a plan over (or --test it) and watch it VM by VM",
        description="Start a run of a plan and show a live per-VM table until it ends. Exit "
        "status 0 when every VM succeeded, 1 otherwise. Ctrl-C stops watching, not the run.",
    )
    p.add_argument("plan")
    p.add_argument(
        "--test", action="store_true", help="test failover: test mappings and test script"
    )
    p.add_argument("--yes", action="store_true", help="do not ask before a real failover")
    p.add_argument("--detach", action="store_true", help="start it, print the run id, exit")
    p.add_argument(
        "--timeout", type=float, default=0, help="stop watching after S seconds (default: never)"
    )
    add_nats_option(p)
    p.set_defaults(func=run_failover)

    p = dr_sub.add_parser("status", help="a run's state per VM")
    p.add_argument("run", help="run id or unique prefix")
    p.add_argument("--json", action="store_true", help="the run and every VM status as JSON")
    add_nats_option(p)
    p.set_defaults(func=run_status)
    p = dr_sub.add_parser("report", help="a readable report of a run, per VM and step")
    p.add_argument("run", help="run id or unique prefix")
    add_nats_option(p)
    p.set_defaults(func=run_report)
    p = dr_sub.add_parser("runs", help="runs, newest first")
    p.add_argument("--plan", help="only this plan's runs")
    p.add_argument("--limit", type=int, default=50)
    add_nats_option(p)
    p.set_defaults(func=run_runs)
    p = dr_sub.add_parser("cancel", help="stop a run: VMs not yet started are cancelled")
    p.add_argument("run", help="run id or unique prefix")
    add_nats_option(p)
    p.set_defaults(func=run_cancel)
