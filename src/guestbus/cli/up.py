"""``guestbus up``: everything on one machine.

1. If ``GUESTBUS_NATS_URL`` is unset, start the embedded NATS broker (JetStream state in
   ``--state-dir``, default ``./.guestbus``) with one NATS user per service and for the
   operator, least-privilege permissions from :mod:`guestbus.permissions` and fresh
   passwords (:mod:`guestbus.credentials`; ``--no-auth`` to run without); otherwise use that
   server.
2. Provision the JetStream streams and buckets (idempotent).
3. Start every host service in :data:`SERVICES` as a child process (entries whose module
   is not installed are skipped with a warning), restart one that dies (with backoff),
   and print a status table.
4. Run the extra tasks (hooks such as a demo), then wait.
5. On Ctrl-C / SIGTERM: SIGTERM the services (SIGKILL after ``--stop-timeout``), stop the
   broker, exit 0 — no process left behind.

Hooks for other commands: ``add_parser`` returns the ``up`` parser (add options to it) and
``run(args, extra_tasks=[...])`` runs coroutines ``task(ctx: UpContext)`` once everything
is up (module-level :data:`EXTRA_TASKS` are always run too).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_STATE_DIR = ".guestbus"
DEFAULT_STOP_TIMEOUT = 20.0
READY_WAIT = 10.0
RESTART_BACKOFF_MAX = 30.0
RESTART_BACKOFF_RESET_AFTER = 60.0


@dataclass(frozen=True)
class ServiceEntry:
    """A host service that ``guestbus up`` runs: ``python -m guestbus.runtime.launch
    module:func`` with ``GUESTBUS_HTTP_PORT=http_port`` (0 = no probe server)."""

    name: str
    module: str
    http_port: int
    func: str = "main"
    env: Mapping[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    role: str | None = None
    """NATS user and permissions (``guestbus.permissions``); default: the entry's name."""
    bus: bool = True
    """False for a helper that does not talk to NATS (no credentials)."""

    @property
    def nats_role(self) -> str:
        return self.role or self.name


SERVICES: list[ServiceEntry] = [
    ServiceEntry("cert-authority", "guestbus_cert_authority.main", 9102),
    ServiceEntry("rpc-router", "guestbus_rpc_router.main", 9101),
    ServiceEntry("serial-bridge", "guestbus_serial_bridge.main", 9100),
    ServiceEntry(
        "iso-builder",
        "guestbus_iso_builder.main",
        9103,
        # the embedded cluster's TLS gateway listens on this host
        env={"GUESTBUS_ISO_GATEWAY_HOST": os.environ.get("GUESTBUS_ISO_GATEWAY_HOST", "127.0.0.1")},
    ),
    ServiceEntry("dr-orchestrator", "guestbus_dr_orchestrator.main", 9104),
]
"""Services started by ``guestbus up``, in order."""


def say(message: str, *, err: bool = False) -> None:
    stream = sys.stderr if err else sys.stdout
    stream.write(f"guestbus up: {message}\n")
    stream.flush()


def module_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class ChildService:
    """One supervised service process."""

    def __init__(
        self, entry: ServiceEntry, env: Mapping[str, str], log_path: Path | None = None
    ) -> None:
        self.entry = entry
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.state = "pending"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self) -> None:
        from guestbus.runtime.procs import child_preexec

        target = f"{self.entry.module}:{self.entry.func}"
        log = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "guestbus.runtime.launch", target, *self.entry.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                start_new_session=True,
                preexec_fn=child_preexec(),
            )
        finally:
            if log is not None:
                log.close()
        self.state = "running"

    async def supervise(self, stop: asyncio.Event) -> None:
        """Keep the service running until ``stop``; restart with backoff when it dies."""
        backoff = 1.0
        if not stop.is_set():
            self.spawn()
        while not stop.is_set():
            assert self.proc is not None
            started = time.monotonic()
            while self.proc.poll() is None and not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.2)
            if stop.is_set():
                return
            status = self.proc.returncode
            if time.monotonic() - started > RESTART_BACKOFF_RESET_AFTER:
                backoff = 1.0
            self.state = f"exited {status}"
            say(
                f"service {self.entry.name} (pid {self.proc.pid}) exited unexpectedly with "
                f"status {status}; restarting in {backoff:.0f}s",
                err=True,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX)
            self.restarts += 1
            if not stop.is_set():
                self.spawn()
                say(f"restarted service {self.entry.name} (pid {self.pid})")

    async def terminate(self, timeout: float) -> int | None:
        from guestbus.runtime.procs import terminate_async

        if self.proc is None:
            return None
        status = await terminate_async(self.proc, timeout)
        self.state = f"stopped ({status})"
        return status


@dataclass
class UpContext:
    """What extra tasks get: the parsed args, the bus, the children, and a way to stop."""

    args: argparse.Namespace
    nats_url: str
    state_dir: Path
    nc: Any  # nats.aio.client.Client (kept as Any so this module imports without nats)
    children: list[ChildService]
    stop_event: asyncio.Event
    broker: Any = None  # guestbus.broker.EmbeddedBroker | None

    def request_stop(self) -> None:
        self.stop_event.set()


ExtraTask = Callable[[UpContext], Awaitable[None]]
EXTRA_TASKS: list[ExtraTask] = []
"""Tasks run once everything is up (in addition to ``run(..., extra_tasks=...)``)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``up`` sub-command to ``subparsers`` (from ``add_subparsers()``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "up",
        help="run NATS (embedded) and all host services on this machine",
        description=(
            "Start the embedded NATS broker (unless GUESTBUS_NATS_URL is set), provision "
            "JetStream, run the host services; Ctrl-C stops everything."
        ),
    )
    configure_parser(parser)
    return parser


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(DEFAULT_STATE_DIR),
        help=f"where the broker and services keep state (default: ./{DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address the embedded broker listens on"
    )
    parser.add_argument(
        "--port", type=int, default=4222, help="embedded broker client port; 0 = any free port"
    )
    parser.add_argument(
        "--monitor-port",
        type=int,
        default=None,
        help="embedded broker monitoring port (default: 8222, or any free port with --port 0)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=DEFAULT_STOP_TIMEOUT,
        help="seconds a service gets to stop gracefully before it is killed",
    )
    parser.add_argument(
        "--logs",
        choices=["files", "terminal"],
        default="files",
        help="where the services' JSON logs go: STATE_DIR/logs/NAME.log (default) or here",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="run the embedded broker without users and permissions (development only; by "
        "default every service and the CLI get their own user with least privilege)",
    )
    parser.add_argument(
        "--demo",
        type=int,
        default=0,
        metavar="N",
        help="also run a lab hypervisor with N demo VMs, each with a real agent, whose serial "
        "sockets the serial-bridge serves (instead of libvirt's)",
    )
    parser.add_argument(
        "--demo-mode",
        choices=["auto", "pty", "socketpair"],
        default="auto",
        help="demo guests' serial devices: ptys (as real UARTs) or socket pairs (thousands); "
        "auto = pty up to 200 VMs",
    )
    parser.add_argument(
        "--demo-heartbeat", type=float, default=5.0, help="demo agents' heartbeat interval (s)"
    )
    parser.set_defaults(func=run)


def service_entries(args: argparse.Namespace, state_dir: Path) -> list[ServiceEntry]:
    """The services to run; with ``--demo N`` the bridge serves the lab's sockets instead."""
    demo = int(getattr(args, "demo", 0) or 0)
    if demo <= 0:
        return list(SERVICES)
    lab_dir = state_dir / "lab"
    mode = getattr(args, "demo_mode", "auto")
    if mode == "auto":
        mode = "pty" if demo <= 200 else "socketpair"
    entries = []
    for entry in SERVICES:
        if entry.name == "serial-bridge":
            env = dict(entry.env)
            env.update(
                GUESTBUS_SOCKET_PATTERN=str(lab_dir / "{uuid}.serial.1"),
                GUESTBUS_LIBVIRT_XML_DIRS=str(lab_dir / "xml"),
                GUESTBUS_BRIDGE_HOST="lab",
                GUESTBUS_SCAN_INTERVAL="1",
                # lab VMs are not libvirt domains: nothing to snapshot, no host adapter
                GUESTBUS_LIBVIRT_URI="",
            )
            entry = replace(entry, env=env)
        entries.append(entry)
    entries.append(
        ServiceEntry(
            "lab-hypervisor",
            "guestbus.lab.fleet",
            0,
            args=(
                "--dir",
                str(lab_dir),
                "--vms",
                str(demo),
                "--mode",
                mode,
                "--heartbeat",
                str(getattr(args, "demo_heartbeat", 5.0)),
                "--quiet",
                "--xml-dir",
                str(lab_dir / "xml"),
            ),
            bus=False,
        )
    )
    return entries


def _redact(url: str) -> str:
    if "@" not in url:
        return url
    return ",".join(
        (u.split("://", 1)[0] + "://***@" + u.rsplit("@", 1)[1]) if "@" in u else u
        for u in url.split(",")
    )


async def _http_ready(port: int) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), 1.0)
        return line.split()[1:2] == [b"200"]
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


async def _status_table(
    children: list[ChildService], skipped: list[ServiceEntry], stop: asyncio.Event
) -> str:
    deadline = time.monotonic() + READY_WAIT
    ready: dict[str, bool] = {}
    pending = [c for c in children if c.entry.http_port]
    while pending and time.monotonic() < deadline and not stop.is_set():
        for child in list(pending):
            if await _http_ready(child.entry.http_port):
                ready[child.entry.name] = True
                pending.remove(child)
        if pending:
            await asyncio.sleep(0.2)
    rows: list[tuple[str, ...]] = [("SERVICE", "PID", "HTTP", "STATUS", "MODULE")]
    for child in children:
        port = child.entry.http_port
        if child.proc is not None and child.proc.poll() is not None:
            status = f"exited {child.proc.returncode}"
        elif not port:
            status = "running"
        else:
            status = "ready" if ready.get(child.entry.name) else "starting"
        rows.append(
            (child.entry.name, str(child.pid or "-"), str(port or "-"), status, child.entry.module)
        )
    for entry in skipped:
        rows.append((entry.name, "-", "-", "skipped (not installed)", entry.module))
    return _table(rows)


async def _run(args: argparse.Namespace, extra_tasks: Sequence[ExtraTask]) -> int:
    from pydantic import SecretStr

    from guestbus.broker import BrokerError, EmbeddedBroker
    from guestbus.credentials import OPERATOR_FILE_NAME, EmbeddedAuth
    from guestbus.permissions import OPERATOR, inbox_prefix
    from guestbus.provision import provision
    from guestbus.runtime.nats import connect
    from guestbus.runtime.settings import ServiceSettings, load_settings

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        if signals:
            say(f"{sig.name} again: still stopping (at most {args.stop_timeout:.0f}s per service)")
            return
        signals.append(sig.name)
        say(f"{sig.name} received; stopping")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    state_dir: Path = args.state_dir.absolute()
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    broker: EmbeddedBroker | None = None
    nc: Any = None
    children: list[ChildService] = []
    supervisors: list[asyncio.Task[None]] = []
    extras: list[asyncio.Task[None]] = []
    status = 0
    auth: EmbeddedAuth | None = None
    operator_path = state_dir / OPERATOR_FILE_NAME
    try:
        if getattr(args, "demo", 0) < 0:
            say("--demo must be 0 or more", err=True)
            return 2
        entries = service_entries(args, state_dir)
        external = os.environ.get("GUESTBUS_NATS_URL")
        if external:
            url = external
            say(f"using NATS at {_redact(url)} (GUESTBUS_NATS_URL)")
        else:
            monitor = args.monitor_port
            if monitor is None:
                monitor = 0 if args.port == 0 else 8222
            if not getattr(args, "no_auth", False):
                roles = [e.nats_role for e in entries if e.bus and module_available(e.module)]
                try:
                    auth = EmbeddedAuth.generate(roles)
                except KeyError as err:
                    say(f"{err.args[0]} (or run with --no-auth)", err=True)
                    return 2
            broker = EmbeddedBroker(
                state_dir,
                host=args.host,
                port=args.port,
                monitor_port=monitor,
                config_text=auth.config_text() if auth else None,
                env=auth.server_env() if auth else None,
            )
            try:
                await broker.start()
            except BrokerError as err:
                say(f"cannot start the embedded NATS broker: {err}", err=True)
                return 1
            url = broker.url
            say(
                f"embedded NATS at {url} (pid {broker.pid}, monitor {broker.monitor_url}, "
                f"state in {state_dir})"
            )
            if auth is not None:
                auth.write_operator_file(operator_path, url)
                say(
                    f"NATS users: one per service with least privilege; operator credentials "
                    f"in {operator_path} (the CLI reads them from there)"
                )
            else:
                say("NATS without users or permissions (--no-auth): development only", err=True)
        if stop.is_set():
            return 0

        settings = load_settings(ServiceSettings).model_copy(update={"nats_url": url})
        if auth is not None:
            settings = settings.model_copy(
                update={
                    "nats_user": OPERATOR,
                    "nats_password": SecretStr(auth.passwords[OPERATOR]),
                    "nats_creds": None,
                }
            )
        try:
            nc = await asyncio.wait_for(
                connect(settings, "guestbus-up", inbox_prefix=inbox_prefix(OPERATOR)), 20.0
            )
        except (asyncio.TimeoutError, OSError) as err:
            say(f"cannot connect to NATS at {_redact(url)}: {err!r}", err=True)
            return 1
        summary = await provision(nc.jetstream(), settings.js_replicas)
        say(f"provisioned JetStream: {summary}")

        skipped: list[ServiceEntry] = []
        for entry in entries:
            if not module_available(entry.module):
                say(
                    f"warning: skipping service {entry.name}: module {entry.module} is not "
                    "installed",
                    err=True,
                )
                skipped.append(entry)
                continue
            env = dict(os.environ)
            env.update(
                GUESTBUS_NATS_URL=url,
                GUESTBUS_HTTP_PORT=str(entry.http_port),
                GUESTBUS_STATE_DIR=str(state_dir / "services" / entry.name),
            )
            if auth is not None:
                for name in ("GUESTBUS_NATS_USER", "GUESTBUS_NATS_PASSWORD", "GUESTBUS_NATS_CREDS"):
                    env.pop(name, None)
                if entry.bus:
                    env.update(auth.client_env(entry.nats_role))
            env.update(entry.env)
            log_path = None if args.logs == "terminal" else state_dir / "logs" / f"{entry.name}.log"
            child = ChildService(entry, env, log_path)
            children.append(child)
            supervisors.append(
                asyncio.create_task(child.supervise(stop), name=f"supervise:{entry.name}")
            )
        await asyncio.sleep(0)  # let the supervisors spawn
        if children or skipped:
            say("services:\n" + await _status_table(children, skipped, stop))
        else:
            say("no host services registered")
        ctx = UpContext(args, url, state_dir, nc, children, stop, broker)
        for task in [*EXTRA_TASKS, *extra_tasks]:
            extras.append(asyncio.create_task(_guard(task, ctx)))
        if args.logs == "files" and children:
            say(f"service logs: {state_dir / 'logs'}/<service>.log")
        say("ready; press Ctrl-C to stop")

        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            if broker is not None and not broker.running and not stop.is_set():
                say(
                    f"the embedded NATS broker died; last log lines:\n{broker.log_tail()}", err=True
                )
                status = 1
                stop.set()
    finally:
        stop.set()
        for extra in extras:
            extra.cancel()
        await asyncio.gather(*supervisors, *extras, return_exceptions=True)
        await asyncio.gather(*(c.terminate(args.stop_timeout) for c in children))
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.drain(), 5.0)
            with contextlib.suppress(Exception):
                await nc.close()
        if broker is not None:
            await broker.stop()
        if auth is not None:
            with contextlib.suppress(OSError):
                operator_path.unlink()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        say("stopped")
    return status


async def _guard(task: ExtraTask, ctx: UpContext) -> None:
    try:
        await task(ctx)
    except asyncio.CancelledError:
        raise
    except Exception as err:
        say(f"extra task {getattr(task, '__name__', task)!s} failed: {err!r}", err=True)


def run(args: argparse.Namespace, *, extra_tasks: Sequence[ExtraTask] = ()) -> int:
    """Run ``guestbus up`` with parsed ``args``; returns the exit status."""
    return asyncio.run(_run(args, extra_tasks))


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m guestbus.cli.up [options]``."""
    parser = argparse.ArgumentParser(
        prog="guestbus up", description=(__doc__ or "").split("\n\n")[0]
    )
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
