"""Typed bus errors: what a service raises, and what a caller gets back.

A handler raises :class:`BusError`; the runtime answers with the nats.micro error headers
(``Nats-Service-Error-Code`` = HTTP-like status, ``Nats-Service-Error`` = message), the
``GB-Error-Code`` header (the stable code) and a JSON :class:`guestbus.contract.ErrorBody`.
Callers turn such a reply back into a :class:`BusError` with :func:`check_reply`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from guestbus.contract import HEADER_ERROR_CODE, ErrorBody

M = TypeVar("M", bound=BaseModel)

#: nats.micro header carrying the error status (a number, as text).
MICRO_ERROR_CODE_HEADER = "Nats-Service-Error-Code"
#: nats.micro header carrying the human-readable error message.
MICRO_ERROR_HEADER = "Nats-Service-Error"

#: Code used for any unexpected exception in a handler.
INTERNAL = "internal"


def _header_safe(text: str, limit: int = 1024) -> str:
    """Header values may not contain CR/LF; keep them single-line and bounded."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class BusError(Exception):
    """An error a handler reports to its caller.

    ``code`` is stable and machine-readable (e.g. ``"no_active_link"``), ``message`` tells a
    person what went wrong and what to do, ``status`` follows HTTP conventions (4xx: the
    caller's fault, 5xx: ours), ``details`` is optional structured context.
    """

    def __init__(
        self,
        code: str,
        message: str,
        status: int = 400,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.details = details

    def __repr__(self) -> str:
        return f"BusError(code={self.code!r}, message={self.message!r}, status={self.status})"

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def to_body(self) -> ErrorBody:
        return ErrorBody(code=self.code, message=self.message, details=self.details)

    def to_bytes(self) -> bytes:
        return self.to_body().model_dump_json().encode()

    def headers(self) -> dict[str, str]:
        """The reply headers for this error."""
        return {
            MICRO_ERROR_CODE_HEADER: str(self.status),
            MICRO_ERROR_HEADER: _header_safe(self.message),
            HEADER_ERROR_CODE: _header_safe(self.code, 128),
        }

    @classmethod
    def from_reply(cls, headers: Mapping[str, str] | None, data: bytes) -> BusError | None:
        """Decode an error reply; ``None`` when the reply is not an error."""
        if not headers or (
            MICRO_ERROR_CODE_HEADER not in headers and HEADER_ERROR_CODE not in headers
        ):
            return None
        try:
            status = int(headers.get(MICRO_ERROR_CODE_HEADER, "500"))
        except ValueError:
            status = 500
        message = headers.get(MICRO_ERROR_HEADER, "")
        code = headers.get(HEADER_ERROR_CODE, "")
        details: dict[str, Any] | None = None
        if data:
            try:
                body = ErrorBody.model_validate(json.loads(data))
            except ValueError:
                pass
            else:
                code, message, details = body.code, body.message, body.details
        return cls(code or "error", message or "error", status, details)


def check_reply(headers: Mapping[str, str] | None, data: bytes) -> bytes:
    """Return ``data`` of a successful reply, or raise the :class:`BusError` it carries.

    Typical use: ``msg = await nc.request(...); body = check_reply(msg.headers, msg.data)``.
    """
    err = BusError.from_reply(headers, data)
    if err is not None:
        raise err
    return data


def parse_request(model: type[M], data: bytes) -> M:
    """Validate a request body as ``model``; a :class:`BusError` ``bad_request`` naming the
    first bad field otherwise (empty body = ``{}``)."""
    try:
        return model.model_validate_json(data or b"{}")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "payload"
        raise BusError(
            "bad_request",
            f"invalid {model.__name__} request: {where}: {first['msg']}",
            details={"errors": len(exc.errors())},
        ) from None
