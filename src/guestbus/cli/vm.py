"""``guestbus vm …``: per-VM helpers for operators."""

from __future__ import annotations

import argparse
from typing import Any

from guestbus.cli.common import UUID_RE
from guestbus.libvirt_xml import serial_port_xml


def add_parser(sub: Any) -> None:
    p = sub.add_parser("vm", help="per-VM helpers", description="Per-VM helpers.")
    vm_sub = p.add_subparsers(dest="vm_command", metavar="COMMAND", required=True)
    x = vm_sub.add_parser(
        "serial-port-xml",
        help="the libvirt <serial> XML that gives a VM its guestbus serial port",
        description=(
            "Print the libvirt domain XML snippet for a unix-socket serial port (QEMU binds "
            "the socket, the serial-bridge connects). Add it under <devices> with "
            "`virsh edit`, or `virsh attach-device --config`."
        ),
    )
    x.add_argument("vm", help="the VM's uuid (libvirt <uuid>)")
    x.add_argument("--index", type=int, default=1, help="0-3 = COM1-COM4 (default 1 = COM2)")
    x.add_argument(
        "--dir", default="/var/lib/libvirt/qemu", help="socket directory (default: libvirt's)"
    )
    x.set_defaults(func=run_xml)


def run_xml(args: argparse.Namespace) -> int:
    if not UUID_RE.match(args.vm):
        print(f"error: {args.vm!r} is not a VM uuid (as in `virsh domuuid NAME`)")
        return 2
    if not 0 <= args.index <= 3:
        print(f"error: --index must be 0-3 (COM1-COM4), got {args.index}")
        return 2
    path = f"{args.dir.rstrip('/')}/{args.vm.lower()}.serial.{args.index}"
    print(serial_port_xml(path, args.index), end="")
    return 0
