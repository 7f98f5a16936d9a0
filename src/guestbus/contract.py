"""The bus contract: every message on the bus, its subjects and headers. (stub, being written)"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

HEADER_ERROR_CODE = "GB-Error-Code"


class ErrorBody(BaseModel):
    """A typed error: a stable ``code`` for programs and a ``message`` a person can act on."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Stable machine-readable error code, e.g. `no_active_link`.")
    message: str = Field(description="What went wrong and what to do about it.")
    details: dict[str, Any] | None = Field(default=None, description="Optional structured context.")
