"""Service settings from the environment (``GUESTBUS_*``).

Every service reads :class:`ServiceSettings` (or a subclass adding its own fields) through
:func:`load_settings`, which turns a validation error into a short message naming each bad
environment variable and exits with status 2 — never a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BeforeValidator,
    Field,
    SecretBytes,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

ENV_PREFIX = "GUESTBUS_"

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
EventLoop = Literal["uvloop", "asyncio"]


def split_commas(value: Any) -> Any:
    """``"a, b,,c"`` → ``["a", "b", "c"]``; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode, BeforeValidator(split_commas)]
"""A list setting given as one comma-separated environment variable."""


class ServiceSettings(BaseSettings):
    """Settings shared by every host service. Subclass to add a service's own fields."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        case_sensitive=False,
        validate_default=True,
    )

    nats_url: str = Field(
        default="nats://127.0.0.1:4222",
        description="NATS server URL(s); several separated by commas.",
    )
    nats_user: str | None = Field(default=None, description="NATS user name.")
    nats_password: SecretStr | None = Field(default=None, description="NATS password.")
    nats_creds: Path | None = Field(
        default=None, description="NATS credentials file (JWT + nkey seed)."
    )
    nats_inbox_prefix: str | None = Field(
        default=None,
        description="Prefix of this client's reply inboxes; default _INBOX.<service name>, "
        "which is what the generated NATS permissions allow (guestbus.permissions).",
    )
    nats_tls_ca: Path | None = Field(
        default=None, description="CA bundle to verify the NATS server's TLS certificate."
    )
    http_host: str = Field(default="0.0.0.0", description="Address of the health/metrics server.")
    http_port: int = Field(
        default=8080, ge=0, le=65535, description="Port of the health/metrics server; 0 = off."
    )
    log_level: LogLevel = Field(default="INFO", description="DEBUG, INFO, WARNING or ERROR.")
    state_dir: Path = Field(
        default=Path(".guestbus"), description="Directory for local, rebuildable state."
    )
    js_replicas: int = Field(
        default=1, ge=1, le=5, description="JetStream replicas for streams and buckets."
    )
    event_loop: EventLoop = Field(default="uvloop", description="uvloop or asyncio.")
    shutdown_timeout: float = Field(
        default=25.0,
        gt=0,
        description="Seconds a graceful shutdown may take before the service gives up waiting.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return _normalise(value, str.upper, get_args(LogLevel))

    @field_validator("event_loop", mode="before")
    @classmethod
    def _lower_loop(cls, value: Any) -> Any:
        return _normalise(value, str.lower, get_args(EventLoop))


def _normalise(value: Any, case: Callable[[str], str], allowed: tuple[str, ...]) -> Any:
    """Case-insensitive choice; the error shows the value as the user typed it."""
    if not isinstance(value, str):
        return value
    norm = case(value.strip())
    if norm not in allowed:
        choices = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise PydanticCustomError(
            "literal_error", "Input should be {choices}", {"choices": choices}
        )
    return norm


S = TypeVar("S", bound=ServiceSettings)


def _env_name(cls: type[BaseSettings], loc: tuple[int | str, ...]) -> str:
    if not loc:
        return f"{ENV_PREFIX}*"
    head = loc[0]
    field = cls.model_fields.get(str(head))
    if field is not None and isinstance(field.validation_alias, str):
        name = field.validation_alias.upper()
    elif field is not None and isinstance(field.alias, str) and field.alias != str(head):
        name = field.alias.upper()
    else:
        prefix = str(cls.model_config.get("env_prefix") or "")
        name = f"{prefix}{head}".upper()
    rest = ".".join(str(part) for part in loc[1:])
    return f"{name} ({rest})" if rest else name


def _is_secret(cls: type[BaseSettings], loc: tuple[int | str, ...]) -> bool:
    if not loc:
        return False
    field = cls.model_fields.get(str(loc[0]))
    if field is None:
        return False
    candidates = get_args(field.annotation) or (field.annotation,)
    return any(isinstance(c, type) and issubclass(c, (SecretStr, SecretBytes)) for c in candidates)


def format_validation_error(cls: type[BaseSettings], err: ValidationError) -> str:
    """One line per problem: ``GUESTBUS_HTTP_PORT: Input should be ... (got 'abc')``."""
    lines = []
    for item in err.errors(include_url=False):
        loc = tuple(item.get("loc", ()))
        line = f"{_env_name(cls, loc)}: {item.get('msg', 'invalid value')}"
        if item.get("type") != "missing" and "input" in item:
            shown = "'***'" if _is_secret(cls, loc) else repr(item["input"])
            if len(shown) > 80:
                shown = shown[:77] + "..."
            line += f" (got {shown})"
        lines.append(line)
    return "\n".join(lines)


def load_settings(cls: type[S]) -> S:
    """Read ``cls`` from the environment; on bad input print why to stderr and exit 2."""
    prog = Path(sys.argv[0]).name.removesuffix(".py") if sys.argv and sys.argv[0] else ""
    prog = prog or "guestbus"
    try:
        return cls()
    except ValidationError as err:
        detail = format_validation_error(cls, err)
    except SettingsError as err:
        # e.g. a complex field whose value is not valid JSON
        detail = str(err)
    sys.stderr.write(f"{prog}: invalid configuration:\n")
    for line in detail.splitlines():
        sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()
    raise SystemExit(2)
