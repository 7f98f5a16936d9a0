"""``guestbus snapshot …``: snapshots of a VM and restore disks, through the host adapter of
the VM's hypervisor host (serial-bridge with libvirt access, ``gb.hv.<vm>.<op>``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any, TypeVar

from nats.aio.client import Client
from pydantic import BaseModel, TypeAdapter, ValidationError

from guestbus.cli.common import (
    add_nats_option,
    age,
    run_async,
    service_call,
    table,
    vm_uuid,
    with_bus,
)
from guestbus.contract import (
    HV_RESTORE_ATTACH,
    HV_RESTORE_DETACH,
    HV_RESTORE_LIST,
    HV_SNAPSHOT_CREATE,
    HV_SNAPSHOT_DELETE,
    HV_SNAPSHOT_LIST,
    DiskTarget,
    Name,
    RestoreAttachment,
    RestoreAttachRequest,
    RestoreDetachReply,
    RestoreDetachRequest,
    RestoreListReply,
    SnapshotCreateRequest,
    SnapshotDeleteReply,
    SnapshotDeleteRequest,
    SnapshotListReply,
    SnapshotRecord,
    hv_subject,
)

M = TypeVar("M", bound=BaseModel)


async def hv_call(
    nc: Client, vm: str, op: str, request: BaseModel | None, model: type[M], timeout: float
) -> M:
    return await service_call(
        nc,
        hv_subject(vm, op),
        request,
        model,
        service="host adapter",
        timeout=timeout,
        absent=(
            f"no host adapter answers for VM {vm}: the serial-bridge on its hypervisor host "
            "needs libvirt access (GUESTBUS_LIBVIRT_URI) and the VM must be a libvirt domain "
            "it discovered"
        ),
    )


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def describe(rec: SnapshotRecord) -> str:
    """What an operator needs to trust (or not) a snapshot: level, why, and each step."""
    lines = [f"snapshot {rec.name} of {rec.vm}: {rec.consistency.value}-consistent"]
    lines += [f"  why: {reason}" for reason in rec.reasons]
    for step in rec.steps:
        detail = f"  ({step.detail})" if step.detail else ""
        lines.append(
            f"  {step.step:<9} {'ok' if step.ok else 'FAILED':<7} {_ms(step.seconds)}{detail}"
        )
    if rec.frozen_seconds is not None:
        lines.append(f"  file systems frozen for {_ms(rec.frozen_seconds)}")
    if rec.freeze is not None:
        pre = rec.freeze.pre_freeze
        lines.append(
            f"  pre_freeze: {pre.state.value}" + (f" ({pre.reason})" if pre.reason else "")
        )
        if rec.freeze.frozen:
            lines.append(f"  frozen: {', '.join(rec.freeze.frozen)}")
    if rec.thaw is not None:
        post = rec.thaw.post_thaw
        lines.append(
            f"  post_thaw: {post.state.value}" + (f" ({post.reason})" if post.reason else "")
        )
    for disk in rec.disks:
        lines.append(f"  disk {disk.target}: {disk.file} (VM now writes {disk.overlay})")
    return "\n".join(lines)


def _dump(model: BaseModel) -> None:
    print(json.dumps(model.model_dump(mode="json"), indent=2))


async def _create(args: argparse.Namespace) -> int:
    request = SnapshotCreateRequest(
        name=args.name, quiesce=args.quiesce, freeze_deadline=args.freeze_deadline
    )

    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm)
        rec = await hv_call(nc, vm, HV_SNAPSHOT_CREATE, request, SnapshotRecord, args.timeout)
        if args.json:
            _dump(rec)
        else:
            print(describe(rec))
        # asked for quiesce but did not get it: say so in the exit code too (scripts check it)
        return 3 if args.quiesce and args.strict and rec.consistency.value == "crash" else 0

    return await with_bus(args, work)


async def _ls(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm)
        reply = await hv_call(nc, vm, HV_SNAPSHOT_LIST, None, SnapshotListReply, 30.0)
        if args.json:
            _dump(reply)
            return 0
        if not reply.snapshots:
            print(f"VM {vm} has no snapshots")
            return 0
        rows = [
            (
                s.name,
                s.created_at.strftime("%Y-%m-%d %H:%M:%SZ"),
                age(s.created_at),
                s.consistency.value,
                _ms(s.frozen_seconds),
                ",".join(d.target for d in s.disks) or "-",
                "; ".join(s.reasons) or "-",
            )
            for s in sorted(reply.snapshots, key=lambda s: s.created_at)
        ]
        headers = ("NAME", "CREATED", "AGE", "CONSISTENCY", "FROZEN", "DISKS", "NOTES")
        print(table(headers, rows))
        return 0

    return await with_bus(args, work)


async def _rm(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm)
        request = SnapshotDeleteRequest(name=args.name)
        reply = await hv_call(nc, vm, HV_SNAPSHOT_DELETE, request, SnapshotDeleteReply, 600.0)
        print(f"deleted snapshot {reply.name} of {vm} (its changes merged into the VM's disk)")
        return 0

    return await with_bus(args, work)


async def _attach(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm)
        request = RestoreAttachRequest(snapshot=args.name, disk=args.disk, ttl=args.ttl)
        att = await hv_call(nc, vm, HV_RESTORE_ATTACH, request, RestoreAttachment, 90.0)
        if args.json:
            _dump(att)
        else:
            disk = f"'s disk {att.disk}" if att.disk else ""
            print(
                f"attached snapshot {att.snapshot}{disk} to {vm} read-only as {att.target} "
                f"(serial {att.serial}, label {att.label}); detached automatically at "
                f"{att.detach_at:%Y-%m-%d %H:%M:%SZ}"
            )
        return 0

    return await with_bus(args, work)


async def _detach(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm)
        request = RestoreDetachRequest(label=args.label)
        reply = await hv_call(nc, vm, HV_RESTORE_DETACH, request, RestoreDetachReply, 90.0)
        how = ""
        if reply.unmounted is not None:
            how = " (unmounted in the guest first)" if reply.unmounted else " (was not mounted)"
        print(f"detached restore disk {reply.label} from {vm}{how}")
        return 0

    return await with_bus(args, work)


async def _attached(args: argparse.Namespace) -> int:
    async def work(nc: Client) -> int:
        vm = await vm_uuid(nc, args.vm)
        reply = await hv_call(nc, vm, HV_RESTORE_LIST, None, RestoreListReply, 30.0)
        if args.json:
            _dump(reply)
            return 0
        if not reply.attachments:
            print(f"VM {vm} has no restore disks attached")
            return 0
        rows = [
            (
                a.label,
                a.snapshot,
                a.disk or "-",
                a.target,
                a.requested_by,
                f"{a.attached_at:%Y-%m-%d %H:%M:%SZ}",
                f"{a.detach_at:%Y-%m-%d %H:%M:%SZ}",
            )
            for a in reply.attachments
        ]
        headers = ("LABEL", "SNAPSHOT", "OF DISK", "AS", "BY", "ATTACHED", "DETACH AT")
        print(table(headers, rows))
        return 0

    return await with_bus(args, work)


def _checked(adapter: TypeAdapter[str], problem: str) -> Callable[[str], str]:
    """An argparse ``type=`` that checks text with the contract's own type."""

    def check(text: str) -> str:
        try:
            return adapter.validate_python(text)
        except ValidationError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {problem}") from None

    return check


_name = _checked(
    TypeAdapter(Name),
    "a valid name: 1-64 of A-Z a-z 0-9 _ - (it becomes a libvirt snapshot name and a bus key)",
)
_disk = _checked(
    TypeAdapter(DiskTarget), "a disk name: a guest disk as libvirt names it, e.g. vda or sdb"
)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def add_parser(sub: Any) -> None:
    snap = sub.add_parser(
        "snapshot",
        help="VM snapshots (optionally quiesced) and read-only restore disks",
        description="Disk-only snapshots through libvirt on the VM's host, optionally quiesced "
        "by its agent (pre_freeze, file-system freeze, post_thaw), and snapshot disks attached "
        "read-only for file-level restore (docs/snapshots.md).",
    )
    actions = snap.add_subparsers(dest="snapshot_action", metavar="ACTION", required=True)

    def vm_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("vm", metavar="VM", help="VM uuid, name or unique uuid prefix")

    p = actions.add_parser(
        "create",
        help="take a snapshot: freeze → libvirt disk-only snapshot → thaw",
        description="Take an atomic disk-only snapshot of every writable disk of the VM. With "
        "--quiesce the agent runs /usr/local/sbin/pre_freeze, freezes the file systems, and "
        "after the snapshot thaws them and runs /usr/local/sbin/post_thaw. The result says how "
        "far the snapshot can be trusted (application, filesystem or crash) and why.",
    )
    vm_arg(p)
    p.add_argument(
        "--name", type=_name, help="snapshot name (A-Z a-z 0-9 _ -; default snap-<UTC time>)"
    )
    p.add_argument("--quiesce", action="store_true", help="freeze the guest for the snapshot")
    p.add_argument(
        "--freeze-deadline",
        type=_positive,
        metavar="S",
        help="the guest thaws by itself after S seconds whatever happens (default: agent's, 60)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="exit 3 when --quiesce was asked for but the snapshot is only crash-consistent",
    )
    p.add_argument("--timeout", type=_positive, default=600.0, metavar="S", help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="the snapshot record as JSON")
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_create(args)))

    p = actions.add_parser("ls", help="list a VM's snapshots", description="List snapshots.")
    vm_arg(p)
    p.add_argument("--json", action="store_true", help="records as JSON")
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_ls(args)))

    p = actions.add_parser(
        "rm",
        help="delete a snapshot",
        description="Delete a snapshot: libvirt merges its overlay back so the VM keeps its "
        "data. Refused while the snapshot is attached as a restore disk.",
    )
    vm_arg(p)
    p.add_argument("name", metavar="NAME", type=_name, help="snapshot name")
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_rm(args)))

    p = actions.add_parser(
        "attach",
        help="attach a snapshot's disk to the running VM, read-only",
        description="Hot-plug one of the snapshot's disks (its first, or --disk) into the "
        "running VM read-only (the guest finds it by its serial; `guestbus-agent ssr` in the "
        "guest mounts it). It is detached automatically after --ttl seconds (default and "
        "maximum: the adapter's, 24 h). Its label is the snapshot's name for the first disk, "
        "<name>-<disk> for another.",
    )
    vm_arg(p)
    p.add_argument("name", metavar="NAME", type=_name, help="snapshot name")
    p.add_argument(
        "--disk",
        type=_disk,
        metavar="DISK",
        help="which disk of the snapshot, by the guest disk it was of (e.g. vdb; `snapshot ls` "
        "lists them); default: the first",
    )
    p.add_argument("--ttl", type=_positive, metavar="S", help="detach after S seconds")
    p.add_argument("--json", action="store_true", help="the attachment as JSON")
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_attach(args)))

    p = actions.add_parser(
        "detach",
        help="detach a restore disk",
        description="Ask the agent to unmount it, then detach it.",
    )
    vm_arg(p)
    p.add_argument(
        "label",
        metavar="LABEL",
        type=_name,
        help="restore disk label (the snapshot name, or <name>-<disk>; see `attached`)",
    )
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_detach(args)))

    p = actions.add_parser(
        "attached", help="list a VM's restore disks", description="List restore disks."
    )
    vm_arg(p)
    p.add_argument("--json", action="store_true", help="attachments as JSON")
    add_nats_option(p)
    p.set_defaults(func=lambda args: run_async(_attached(args)))
