"""``guestbus-agent``: the in-guest agent (CPython 3.9+)."""

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import List, Optional

from . import __version__, layout
from .agent import Agent
from .config import ISO_CONFIG_NAME, ISO_LABEL, AgentConfig, ConfigError, load
from .dr import DrOptions
from .identity import IdentityError
from .link import serial_opener
from .provisioning import IsoLocator, ProvisioningError, take_at_start, take_from
from .quiesce import Quiescer
from .ssr import CONTROL_SOCKET
from .ssr import main as ssr_main

log = logging.getLogger("guestbus.agent")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="guestbus-agent",
        description=(
            "guestbus guest agent: keeps a link to the cluster over the VM's serial port, "
            "heartbeats, and answers allow-listed host commands. Config comes from --config, "
            f"else from {ISO_CONFIG_NAME} on the mounted ISO labelled {ISO_LABEL}. "
            "With --config, the agent first takes a newer config (and certificate) from the "
            "ISO if one is attached, mounting it read-only for the moment if needed."
        ),
        epilog=(
            "Self-service restore (root in the guest): 'guestbus-agent ssr ls-snaps | attach "
            "SNAPSHOT | detach LABEL [--force] | ls-attached' asks the running agent over its "
            "control socket; see 'guestbus-agent ssr --help'."
        ),
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the installed config JSON file, e.g. /etc/guestbus/config.json (default: "
        "read the ISO's, without installing it)",
    )
    p.add_argument("--device", help="serial device, overrides the config (e.g. /dev/ttyS1)")
    p.add_argument(
        "--state-dir",
        type=Path,
        help="where the agent keeps its certificate and derived config (default: the "
        "config's state_dir, /var/lib/guestbus)",
    )
    p.add_argument("--gateway", help="HOST:PORT of the TLS gateway, overrides the config")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--check-config",
        action="store_true",
        help="validate the config and exit (does not look at the ISO)",
    )
    p.add_argument(
        "--no-iso", action="store_true", help="at start, do not look for a newer config on the ISO"
    )
    p.add_argument(
        "--take-config-from",
        type=Path,
        metavar="DIR",
        help="install the config, certificate and DR key of DIR (the ISO's root) at --config "
        "and in the state dir if DIR's config is newer, print one line saying what was done "
        "and exit: 0 when done or when there was nothing to take, 2 on any problem",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --take-config-from: take it even if it is not newer or names another VM",
    )
    p.add_argument(
        "--dr-key",
        type=Path,
        metavar="FILE",
        help="Ed25519 public key that verifies DR changes (default: dr-verify.pem beside "
        f"--config, else {layout.DR_KEY_PATH})",
    )
    p.add_argument(
        "--dr-root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help="root under which DR changes write the network files and find the recovery "
        "scripts (default /; another directory is for tests and inspection)",
    )
    p.add_argument(
        "--control-socket",
        default=CONTROL_SOCKET,
        metavar="PATH",
        help=f"serve self-service restore on this unix socket (default {CONTROL_SOCKET}; root "
        "only, mode 0600)",
    )
    p.add_argument("--version", action="version", version="guestbus-agent " + __version__)
    return p


async def run_agent(
    config: AgentConfig, dr: Optional[DrOptions] = None, control_socket: Optional[str] = None
) -> int:
    agent = Agent(
        config,
        serial_opener(config.serial_device),
        dr=dr,
        quiescer=Quiescer.from_config(config),
        control_socket=control_socket,
    )
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


def take_config(source: Path, config: Path, state_dir: Optional[Path], force: bool) -> int:
    """``--take-config-from``: one line on stdout, or the problem on stderr and exit 2."""
    try:
        outcome = take_from(source, config, state_dir, force)
    except (ConfigError, ProvisioningError, IdentityError) as exc:
        print(f"guestbus-agent: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"guestbus-agent: error: cannot install from {source}: {exc}", file=sys.stderr)
        return 2
    print(outcome.summary())
    return 0


def main(argv: Optional[List[str]] = None, locator: Optional[IsoLocator] = None) -> int:
    """``locator`` says where to look for the ISO (tests stand in for /dev and /proc)."""
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["ssr"]:
        return ssr_main(args_in[1:])
    parser = build_parser()
    args = parser.parse_args(args_in)
    if args.force and not args.take_config_from:
        parser.error("--force goes with --take-config-from")
    if args.take_config_from and not args.config:
        parser.error("--take-config-from needs --config FILE: where to install the config")
    logging.basicConfig(
        stream=sys.stderr, level=args.log_level, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.take_config_from:
        return take_config(args.take_config_from, args.config, args.state_dir, args.force)
    if args.config and not (args.no_iso or args.check_config):
        take_at_start(args.config, args.state_dir, locator)
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
    if args.dr_key is not None:
        dr_key = args.dr_key
    elif args.config is not None:
        dr_key = args.config.parent / layout.ISO_DR_KEY
    else:
        dr_key = Path(layout.DR_KEY_PATH)
    dr = DrOptions(key_path=dr_key.absolute(), root=args.dr_root.absolute())
    return asyncio.run(run_agent(config, dr, args.control_socket))


if __name__ == "__main__":
    sys.exit(main())
