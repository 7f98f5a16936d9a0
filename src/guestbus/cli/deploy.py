"""``guestbus provision`` and ``guestbus permissions``: what deployments run and render.

- ``guestbus provision`` creates or updates the JetStream streams, KV buckets and object
  store (as the ``provisioner`` user in compose and the chart; ``guestbus up`` does it
  itself). ``--check ROLE`` only waits until everything ``ROLE`` uses exists, with that
  role's own credentials: the chart's init containers run it so a service starts once its
  buckets are there instead of crash-looping.
- ``guestbus permissions`` prints the NATS users and permissions (:mod:`guestbus.permissions`)
  as a nats-server configuration block, as the NATS chart's ``config.merge`` value, or as
  JSON; ``--format env`` makes a fresh password per role for compose's ``.env``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from guestbus import permissions
from guestbus.cli.common import CliError, connect, run_async


def add_parser(subparsers: Any) -> None:
    prov = subparsers.add_parser(
        "provision",
        help="create or update the JetStream streams, buckets and object store",
        description=(
            "Create or update every JetStream resource guestbus uses (idempotent), or with "
            "--check ROLE wait until the resources that role uses exist."
        ),
    )
    prov.add_argument("--nats", help="NATS URL (default: $GUESTBUS_NATS_URL)")
    prov.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="JetStream replicas (default: $GUESTBUS_JS_REPLICAS, else 1; 3 on a cluster)",
    )
    prov.add_argument(
        "--check",
        metavar="ROLE",
        help="do not create anything: wait until the streams ROLE needs exist",
    )
    prov.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep trying (NATS unreachable, resources missing) for this long",
    )
    prov.set_defaults(func=provision_command)

    perms = subparsers.add_parser(
        "permissions",
        help="print the NATS users and least-privilege permissions",
        description=(
            "Print guestbus's NATS users and permissions: a nats-server `authorization` block "
            "(passwords from $GUESTBUS_NATS_PASSWORD_<ROLE>), the official NATS chart's "
            "config.merge value, or JSON."
        ),
    )
    perms.add_argument(
        "--format",
        choices=["nats-conf", "helm", "json", "env"],
        default="nats-conf",
        dest="fmt",
        help="env: a fresh random password per role, as lines for compose's .env",
    )
    perms.add_argument(
        "--role", action="append", help="only this role (repeat for several); default: all"
    )
    perms.set_defaults(func=permissions_command)


def permissions_command(args: argparse.Namespace) -> int:
    roles = args.role or None
    try:
        if args.fmt == "nats-conf":
            sys.stdout.write(permissions.nats_conf(roles))
        elif args.fmt == "helm":
            print(json.dumps({"authorization": permissions.helm_authorization(roles)}, indent=2))
        elif args.fmt == "env":
            for name in roles or list(permissions.ROLES):
                role = permissions.role(name)
                print(f"{role.password_env}={permissions.generate_password()}")
        else:
            print(json.dumps(permissions.as_json(roles), indent=2))
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    return 0


def _replicas(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        return int(args.replicas)
    raw = os.environ.get("GUESTBUS_JS_REPLICAS", "1")
    try:
        value = int(raw)
    except ValueError:
        raise CliError(f"GUESTBUS_JS_REPLICAS must be a number (got {raw!r})", 2) from None
    if not 1 <= value <= 5:
        raise CliError(f"GUESTBUS_JS_REPLICAS must be 1 to 5 (got {value})", 2)
    return value


def provision_command(args: argparse.Namespace) -> int:
    return run_async(_provision(args))


async def _provision(args: argparse.Namespace) -> int:
    from nats.js.errors import NotFoundError

    from guestbus.provision import provision

    role = args.check or permissions.PROVISIONER
    if args.check:
        streams = permissions.role(args.check).streams
    replicas = _replicas(args)
    deadline = time.monotonic() + max(0.0, args.wait)
    last = ""
    while True:
        try:
            nc = await connect(args, role=role)
            try:
                js = nc.jetstream()
                if args.check:
                    missing = []
                    for stream in streams:
                        try:
                            await js.stream_info(stream)
                        except NotFoundError:
                            missing.append(stream)
                    if not missing:
                        print(f"guestbus provision: {len(streams)} streams of {role} exist")
                        return 0
                    last = "missing: " + ", ".join(missing)
                else:
                    summary = await provision(js, replicas)
                    print(f"guestbus provision: replicas {replicas}: {summary}")
                    return 0
            finally:
                await nc.close()
        except CliError as err:
            last = str(err)
        except Exception as err:
            last = f"{type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            raise CliError(f"provisioning not done: {last}")
        print(f"guestbus provision: waiting ({last})", file=sys.stderr)
        await asyncio.sleep(2.0)
