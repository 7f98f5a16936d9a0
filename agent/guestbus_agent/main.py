"""``guestbus-agent``: the in-guest agent (CPython 3.9+)."""

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from . import __version__
from .agent import Agent
from .config import ISO_CONFIG_NAME, ISO_LABEL, AgentConfig, ConfigError, load
from .link import serial_opener

log = logging.getLogger("guestbus.agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestbus-agent",
        description=(
            "guestbus guest agent: keeps a link to the cluster over the VM's serial port, "
            "heartbeats, and answers allow-listed host commands. Config comes from --config, "
            f"else from {ISO_CONFIG_NAME} on the mounted ISO labelled {ISO_LABEL}."
        ),
    )
    p.add_argument("--config", type=Path, help="config JSON file (default: from the ISO)")
    p.add_argument("--device", help="serial device, overrides the config (e.g. /dev/ttyS1)")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where the agent keeps its certificate and derived config (default: the "
        "config's state_dir, /var/lib/guestbus)",
    )
    p.add_argument("--gateway", help="HOST:PORT of the TLS gateway, overrides the config")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--version", action="version", version="guestbus-agent " + __version__)
    return p


async def run_agent(config: AgentConfig) -> int:
    agent = Agent(config, serial_opener(config.serial_device))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(agent.run())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    stopper.cancel()
    await asyncio.gather(task, stopper, return_exceptions=True)
    log.info("agent stopped")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load(args.config, args.state_dir)
    except ConfigError as exc:
        print(f"guestbus-agent: error: {exc}", file=sys.stderr)
        return 2
    if args.device:
        config = replace(config, serial_device=args.device)
    if args.state_dir:
        config = replace(config, state_dir=str(args.state_dir.absolute()))
    if args.gateway:
        host, _, port = args.gateway.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            print("guestbus-agent: error: --gateway must be HOST:PORT", file=sys.stderr)
            return 2
        config = replace(config, gateway_host=host, gateway_port=int(port))
    if args.check_config:
        print(f"config OK: vm {config.vm_uuid} from {config.source}")
        return 0
    log.info(
        "guestbus-agent %s starting: vm %s, device %s, config %s",
        __version__,
        config.vm_uuid,
        config.serial_device,
        config.source,
    )
    return asyncio.run(run_agent(config))


if __name__ == "__main__":
    sys.exit(main())
