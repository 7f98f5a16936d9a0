"""Per-service NATS credentials for the embedded default (``guestbus up``).

``guestbus up`` makes a fresh random password for every user it needs (one per service it
runs, plus ``operator`` for itself and the CLI) on every start. The broker's configuration
holds only the permission set (:func:`guestbus.permissions.nats_conf`) with the passwords
referenced from its environment, so no password is ever written into a configuration file.
Each service gets its own user and password through ``GUESTBUS_NATS_USER`` /
``GUESTBUS_NATS_PASSWORD``. The operator's credentials are written, mode 0600, to
``<state-dir>/operator.json`` for the CLI (``guestbus vms`` and friends read it from
``./.guestbus/operator.json`` or ``$GUESTBUS_OPERATOR_FILE`` when no credentials are set),
and removed when ``up`` stops.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guestbus import permissions

OPERATOR_FILE_NAME = "operator.json"
ENV_OPERATOR_FILE = "GUESTBUS_OPERATOR_FILE"
DEFAULT_OPERATOR_FILE = Path(".guestbus") / OPERATOR_FILE_NAME


@dataclass(frozen=True)
class EmbeddedAuth:
    """Users and their passwords for one run of the embedded broker."""

    passwords: dict[str, str]

    @classmethod
    def generate(cls, roles: Iterable[str]) -> EmbeddedAuth:
        names = list(dict.fromkeys([permissions.OPERATOR, *roles]))
        for name in names:
            permissions.role(name)  # KeyError naming the known roles
        return cls({name: permissions.generate_password() for name in names})

    def config_text(self) -> str:
        """The broker's ``authorization`` block (no secrets in it)."""
        return permissions.nats_conf(self.passwords)

    def server_env(self) -> dict[str, str]:
        """What the broker's process environment needs: the referenced passwords."""
        return {permissions.password_env(r): pw for r, pw in self.passwords.items()}

    def client_env(self, role: str) -> dict[str, str]:
        """``GUESTBUS_NATS_*`` for a service running as ``role``."""
        return {
            "GUESTBUS_NATS_USER": role,
            "GUESTBUS_NATS_PASSWORD": self.passwords[role],
            "GUESTBUS_NATS_INBOX_PREFIX": permissions.inbox_prefix(role),
        }

    def write_operator_file(self, path: Path, url: str) -> None:
        """``{"url", "user", "password", "inbox_prefix"}``, created with mode 0600."""
        data = {
            "url": url,
            "user": permissions.OPERATOR,
            "password": self.passwords[permissions.OPERATOR],
            "inbox_prefix": permissions.inbox_prefix(permissions.OPERATOR),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)


def operator_file() -> Path:
    """Where the CLI looks for the embedded cluster's operator credentials."""
    return Path(os.environ.get(ENV_OPERATOR_FILE) or DEFAULT_OPERATOR_FILE)


def read_operator_file(path: Path | None = None) -> dict[str, Any] | None:
    """The operator credentials ``guestbus up`` wrote, or None when there are none."""
    path = path or operator_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not data.get("user") or not data.get("password"):
        return None
    return data
