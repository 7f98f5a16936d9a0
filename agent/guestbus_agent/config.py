"""Agent configuration: one flat JSON object, from ``--config`` or the GUESTBUS ISO.

Runs in guests on CPython 3.9+, standard library only. Every problem names the field, so
an operator reading the journal knows what to fix on the ISO.
"""

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from . import layout
from .files import atomic_write

ISO_LABEL = layout.ISO_LABEL
ISO_CONFIG_NAME = layout.ISO_CONFIG
DEFAULT_PORT = 2074
DEFAULT_DEVICE = "/dev/ttyS1"  # COM2: target port 1 of the reference domain XML
DEFAULT_STATE_DIR = layout.STATE_DIR
KNOWN_COMMANDS = (
    "ping",
    "info",
    "allowed",
    "renew",
    "dr_apply",
    "dr_script",
    "freeze",
    "thaw",
    "freeze_status",
    "ssr_unmount",
)
FREEZE_DEADLINE_MAX = 600.0
DEFAULT_RESTORE_DIR = "/mnt/guestbus-restore"

_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)


class ConfigError(Exception):
    """A config that cannot be used; the message names the field and the source."""


@dataclass(frozen=True)
class AgentConfig:
    vm_uuid: str
    config_uuid: str
    gateway_host: str
    gateway_port: int = DEFAULT_PORT
    serial_device: str = DEFAULT_DEVICE
    heartbeat_interval: float = 5.0
    serial_failure_limit: int = 3
    heartbeat_failure_limit: int = 20
    request_timeout: float = 5.0
    allowed_commands: Tuple[str, ...] = KNOWN_COMMANDS
    state_dir: str = DEFAULT_STATE_DIR
    ip_fallback: bool = True
    # Longest a freeze lasts (s): the agent thaws by itself after it.
    freeze_deadline: float = 60.0
    # Hard timeout of pre_freeze and post_thaw (s).
    freeze_script_timeout: float = 30.0
    # Mount points never frozen.
    freeze_exclude: Tuple[str, ...] = ()
    # Self-service restore for root in the guest; restore disks are mounted under restore_dir.
    ssr: bool = True
    restore_dir: str = DEFAULT_RESTORE_DIR
    source_config_uuid: Optional[str] = None
    # Grows with every ISO built for the VM: which of two configs is newer (provisioning).
    config_serial: Optional[int] = None
    source: str = field(default="", compare=False)

    def to_json(self) -> Dict[str, Any]:
        return {
            "vm_uuid": self.vm_uuid,
            "config_uuid": self.config_uuid,
            "gateway_host": self.gateway_host,
            "gateway_port": self.gateway_port,
            "serial_device": self.serial_device,
            "heartbeat_interval": self.heartbeat_interval,
            "serial_failure_limit": self.serial_failure_limit,
            "heartbeat_failure_limit": self.heartbeat_failure_limit,
            "request_timeout": self.request_timeout,
            "allowed_commands": list(self.allowed_commands),
            "state_dir": self.state_dir,
            "ip_fallback": self.ip_fallback,
            "freeze_deadline": self.freeze_deadline,
            "freeze_script_timeout": self.freeze_script_timeout,
            "freeze_exclude": list(self.freeze_exclude),
            "ssr": self.ssr,
            "restore_dir": self.restore_dir,
            **({"source_config_uuid": self.source_config_uuid} if self.source_config_uuid else {}),
            **({"config_serial": self.config_serial} if self.config_serial is not None else {}),
        }


def _require(data: Dict[str, Any], name: str, source: str) -> Any:
    if name not in data or data[name] in (None, ""):
        raise ConfigError(f"{source}: missing required field '{name}'")
    return data[name]


def _number(
    data: Dict[str, Any],
    name: str,
    default: float,
    lo: float,
    hi: float,
    source: str,
    integer: bool,
) -> Any:
    value = data.get(name, default)
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{source}: field '{name}' must be {kind} (got {value!r})")
    if not lo <= value <= hi:
        raise ConfigError(f"{source}: field '{name}' must be between {lo} and {hi} (got {value!r})")
    return value


def parse_config(data: Any, source: str = "config") -> AgentConfig:
    """Validate a decoded JSON object; raises ConfigError naming the first bad field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    vm = _require(data, "vm_uuid", source)
    if not isinstance(vm, str) or not _UUID.match(vm):
        raise ConfigError(f"{source}: field 'vm_uuid' must be a UUID (got {vm!r})")
    cfg_uuid = _require(data, "config_uuid", source)
    if not isinstance(cfg_uuid, str) or not 1 <= len(cfg_uuid) <= 64:
        raise ConfigError(f"{source}: field 'config_uuid' must be a string of 1-64 characters")
    host = _require(data, "gateway_host", source)
    if not isinstance(host, str) or len(host) > 255 or any(c.isspace() for c in host):
        raise ConfigError(f"{source}: field 'gateway_host' must be a host name or address")
    device = data.get("serial_device", DEFAULT_DEVICE)
    if not isinstance(device, str) or not device.startswith("/"):
        raise ConfigError(f"{source}: field 'serial_device' must be an absolute device path")
    commands = data.get("allowed_commands", list(KNOWN_COMMANDS))
    if not isinstance(commands, list) or not all(isinstance(c, str) for c in commands):
        raise ConfigError(f"{source}: field 'allowed_commands' must be a list of strings")
    unknown = sorted(set(commands) - set(KNOWN_COMMANDS))
    if unknown:
        raise ConfigError(
            "{}: field 'allowed_commands' names unknown commands {} (known: {})".format(
                source, ", ".join(unknown), ", ".join(KNOWN_COMMANDS)
            )
        )
    state_dir = data.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir.startswith("/"):
        raise ConfigError(f"{source}: field 'state_dir' must be an absolute directory path")
    fallback = data.get("ip_fallback", True)
    if not isinstance(fallback, bool):
        raise ConfigError(f"{source}: field 'ip_fallback' must be true or false")
    exclude = data.get("freeze_exclude", [])
    if (
        not isinstance(exclude, list)
        or len(exclude) > 64
        or not all(isinstance(p, str) and p.startswith("/") for p in exclude)
    ):
        raise ConfigError(
            f"{source}: field 'freeze_exclude' must be a list of at most 64 absolute mount points"
        )
    ssr = data.get("ssr", True)
    if not isinstance(ssr, bool):
        raise ConfigError(f"{source}: field 'ssr' must be true or false")
    restore_dir = data.get("restore_dir", DEFAULT_RESTORE_DIR)
    if not isinstance(restore_dir, str) or not restore_dir.startswith("/") or restore_dir == "/":
        raise ConfigError(f"{source}: field 'restore_dir' must be an absolute directory path")
    derived = data.get("source_config_uuid")
    if derived is not None and not isinstance(derived, str):
        raise ConfigError(f"{source}: field 'source_config_uuid' must be a string")
    serial = data.get("config_serial")
    if serial is not None and (
        isinstance(serial, bool) or not isinstance(serial, int) or serial < 0
    ):
        raise ConfigError(
            f"{source}: field 'config_serial' must be a non-negative integer (got {serial!r})"
        )
    return AgentConfig(
        vm_uuid=vm.lower(),
        config_uuid=cfg_uuid,
        gateway_host=host,
        gateway_port=_number(data, "gateway_port", DEFAULT_PORT, 1, 65535, source, True),
        serial_device=device,
        heartbeat_interval=float(
            _number(data, "heartbeat_interval", 5.0, 0.05, 3600, source, False)
        ),
        serial_failure_limit=_number(data, "serial_failure_limit", 3, 1, 1000, source, True),
        heartbeat_failure_limit=_number(
            data, "heartbeat_failure_limit", 20, 1, 100000, source, True
        ),
        request_timeout=float(_number(data, "request_timeout", 5.0, 0.05, 600, source, False)),
        allowed_commands=tuple(dict.fromkeys(commands)),
        state_dir=state_dir,
        ip_fallback=fallback,
        freeze_deadline=float(
            _number(data, "freeze_deadline", 60.0, 1, FREEZE_DEADLINE_MAX, source, False)
        ),
        freeze_script_timeout=float(
            _number(data, "freeze_script_timeout", 30.0, 1, 600, source, False)
        ),
        freeze_exclude=tuple(dict.fromkeys(exclude)),
        ssr=ssr,
        restore_dir=restore_dir.rstrip("/"),
        source_config_uuid=derived,
        config_serial=serial,
        source=source,
    )


def load_file(path: Path) -> AgentConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    return parse_config(data, str(path))


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def find_iso_mount(
    label: str = ISO_LABEL,
    by_label_dir: str = "/dev/disk/by-label",
    mounts: str = "/proc/self/mounts",
) -> Optional[Path]:
    """Where the labelled ISO is mounted, if it is (the device is resolved by its label link)."""
    link = Path(by_label_dir) / label
    try:
        device = os.path.realpath(str(link)) if link.exists() else None
    except OSError:
        device = None
    if device is None:
        return None
    try:
        lines = Path(mounts).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and os.path.realpath(_unescape_mount(parts[0])) == device:
            return Path(_unescape_mount(parts[1]))
    return None


def candidate_sources(explicit: Optional[Path]) -> List[Path]:
    """Where to look, in order: the explicit file, else the mounted ISO's config."""
    if explicit is not None:
        return [explicit]
    mount = find_iso_mount()
    return [mount / ISO_CONFIG_NAME] if mount is not None else []


STATE_CONFIG_NAME = "config.json"


def load(explicit: Optional[Path], state_dir: Optional[Path] = None) -> AgentConfig:
    """The config to run with.

    The source (``--config`` or the ISO) is the operator's word. The agent writes its own
    ``<state_dir>/config.json`` when it re-enrolls under a new identity (a clone); that file
    wins while it was derived from the source's current ``config_uuid``. A new source config
    (a new ISO) is new operator intent and wins over it.
    """
    sources = candidate_sources(explicit)
    if not sources:
        raise ConfigError(
            f"no config: pass --config FILE, or mount the ISO labelled {ISO_LABEL} "
            f"(it holds {ISO_CONFIG_NAME})"
        )
    source = load_file(sources[0])
    local_path = Path(state_dir or source.state_dir) / STATE_CONFIG_NAME
    if local_path.exists():
        try:
            local = load_file(local_path)
        except ConfigError:
            return source
        if local.source_config_uuid == source.config_uuid:
            return local
    return source


def write_state_config(config: AgentConfig) -> Path:
    """Persist a config the agent derived itself (atomically, root-only)."""
    path = Path(config.state_dir) / STATE_CONFIG_NAME
    atomic_write(path, (json.dumps(config.to_json(), indent=2) + "\n").encode("utf-8"), 0o600)
    return path
