"""What goes on a VM's ISO, as a pure function of its inputs (so images are reproducible)."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import guestbus_agent
from guestbus.contract import AgentConfigFile, IsoKind
from guestbus_agent import layout

from .media import IsoEntry
from .wheelhouse import Wheelhouse

AGENT_DIR = Path(guestbus_agent.__file__).parent
CONFIG_NAMESPACE = uuid.UUID("6f1c2a52-8d3e-4c55-9a0e-6b1f0c9a2e11")
"""uuid5 namespace of configuration uuids: the same config and certificate, the same uuid."""


@dataclass(frozen=True)
class VmMaterial:
    """Everything VM-specific on an ISO."""

    config: AgentConfigFile
    name: str | None
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    dr_public_pem: bytes


def config_uuid(config: AgentConfigFile, cert_pem: bytes) -> str:
    """Derived from the config's content and the certificate it comes with."""
    body = config.model_dump(mode="json", exclude={"config_uuid"})
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(cert_pem).hexdigest()
    return str(uuid.uuid5(CONFIG_NAMESPACE, canonical + "\n" + digest))


def config_json(config: AgentConfigFile) -> bytes:
    return (json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True) + "\n").encode()


def _readme(material: VmMaterial, kind: IsoKind, wheelhouse: Wheelhouse | None) -> bytes:
    cfg = material.config
    lines = [
        "guestbus agent media",
        "====================",
        "",
        f"VM:            {cfg.vm_uuid}" + (f" ({material.name})" if material.name else ""),
        f"Kind:          {kind.value}",
        f"Configuration: {cfg.config_uuid} (serial {cfg.config_serial})",
        f"Gateway:       {cfg.gateway_host}:{cfg.gateway_port} (TLS, the IP fallback)",
        f"Serial device: {cfg.serial_device}",
    ]
    if wheelhouse is not None:
        lines.append(f"Agent:         {wheelhouse.agent_version} (wheelhouse {wheelhouse.id})")
    lines += [
        "",
        "Install or upgrade (as root, Python 3.9 or newer with the venv module):",
        "",
        "    sh /path/to/this/media/install.sh",
        "",
        f"The agent goes into its own virtualenv under {layout.PREFIX}, offline, from the",
        f"{layout.ISO_WHEELS}/ directory; its config goes to {layout.CONFIG_PATH}, its",
        f"certificate and key to {layout.STATE_DIR}/tls, and the {layout.UNIT_NAME} unit is",
        "enabled and started. Running it again is harmless; an upgrade keeps the VM's identity.",
        "Remove it with: sh install.sh --uninstall  (add --purge to remove the identity too).",
        "",
    ]
    if kind is IsoKind.CONFIG_ONLY:
        lines += [
            "This is a config-only ISO: it refreshes an installed agent. The agent takes a",
            "newer configuration (higher serial) from media labelled GUESTBUS when it starts;",
            f"restart it (systemctl restart {layout.UNIT_NAME}) or run install.sh.",
            "",
        ]
    lines += [
        "Files: config.json (agent config), ca.pem (cluster CA), client.crt / client.key (this",
        "VM's certificate and key: keep it secret), dr-verify.pem (verifies signed DR network",
        "changes), install.sh / install.py (installer), guestbus-agent.service (systemd unit).",
        "",
    ]
    return "\n".join(lines).encode()


AGENT_FILES = {
    layout.ISO_INSTALLER: ("install.py", 0o755),
    layout.ISO_INSTALL_SH: ("install.sh", 0o755),
    layout.ISO_UNIT: ("systemd/" + layout.UNIT_NAME, 0o644),
}
"""ISO name → (file in the agent package, mode): what every ISO carries from the agent."""


class ContentError(Exception):
    pass


def load_agent_files() -> dict[str, bytes]:
    """Read once at start: a broken installation fails the service, not each build."""
    files: dict[str, bytes] = {}
    for iso_name, (relative, _) in AGENT_FILES.items():
        path = AGENT_DIR / relative
        try:
            files[iso_name] = path.read_bytes()
        except OSError as exc:
            raise ContentError(
                f"the agent package lacks {relative} ({exc.strerror or exc}); reinstall guestbus"
            ) from None
    return files


def iso_entries(
    material: VmMaterial,
    kind: IsoKind,
    wheelhouse: Wheelhouse | None,
    agent_files: dict[str, bytes],
) -> list[IsoEntry]:
    """The files of one VM's ISO."""
    if kind is IsoKind.FULL and wheelhouse is None:
        raise ValueError("a full ISO needs the wheelhouse")
    entries = [
        IsoEntry(layout.ISO_CONFIG, config_json(material.config), 0o644),
        IsoEntry(layout.ISO_CA, material.ca_pem, 0o644),
        IsoEntry(layout.ISO_CERT, material.cert_pem, 0o644),
        IsoEntry(layout.ISO_KEY, material.key_pem, 0o600),
        IsoEntry(layout.ISO_DR_KEY, material.dr_public_pem, 0o644),
        IsoEntry(layout.ISO_README, _readme(material, kind, wheelhouse), 0o644),
    ]
    entries += [IsoEntry(name, agent_files[name], mode) for name, (_, mode) in AGENT_FILES.items()]
    if kind is IsoKind.FULL and wheelhouse is not None:
        entries += [
            IsoEntry(f"{layout.ISO_WHEELS}/{path.name}", path, 0o644) for path in wheelhouse.files
        ]
    return entries
