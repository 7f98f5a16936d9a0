"""The four message shapes a frame carries, checked once on the way in and on the way out.

Receivers ignore fields they do not know, so a newer peer can add some; they refuse
anything whose known fields have the wrong type, so handlers only ever see valid values.
"""

import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

REQUEST = "req"
RESPONSE = "res"
ERROR = "err"
EVENT = "evt"

MAX_DEADLINE_MS = 2**31 - 1  # about 24.8 days; fits a signed 32-bit int in any peer

_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_METHOD = re.compile(r"[a-z0-9_.-]{1,64}")


class MessageError(ValueError):
    """A JSON object that is not a valid message.

    ``request_id`` is set when it is a request whose id could still be read: the sender is
    waiting on that id, so it deserves a ``bad_request`` answer rather than silence.
    """

    def __init__(
        self, detail: str, request_id: Optional[str] = None, method: Optional[str] = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.request_id = request_id
        self.method = method


def valid_id(value: object) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def valid_method(value: object) -> bool:
    return isinstance(value, str) and _METHOD.fullmatch(value) is not None


def _check_id(value: object) -> None:
    if not valid_id(value):
        raise MessageError(f"id must be 1-64 chars of [A-Za-z0-9._:-], got {value!r}")


def _check_method(value: object) -> None:
    if not valid_method(value):
        raise MessageError(f"method must be 1-64 chars of [a-z0-9_.-], got {value!r}")


def _check_object(name: str, value: object) -> None:
    if not isinstance(value, dict):
        raise MessageError(f"{name} must be a JSON object, got {type(value).__name__}")


@dataclass(frozen=True)
class RequestMsg:
    id: str
    method: str
    params: Dict[str, Any]
    deadline_ms: int

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_method(self.method)
        _check_object("params", self.params)
        d = self.deadline_ms
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_DEADLINE_MS:
            raise MessageError(f"deadline_ms must be an integer in 1..{MAX_DEADLINE_MS}, got {d!r}")

    def to_dict(self) -> Dict[str, Any]:
        return {
            "kind": REQUEST,
            "id": self.id,
            "method": self.method,
            "params": self.params,
            "deadline_ms": self.deadline_ms,
        }


@dataclass(frozen=True)
class ResponseMsg:
    id: str
    result: Dict[str, Any]

    def __post_init__(self) -> None:
        _check_id(self.id)
        _check_object("result", self.result)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": RESPONSE, "id": self.id, "result": self.result}


@dataclass(frozen=True)
class ErrorMsg:
    id: str
    code: str
    message: str
    details: Optional[Dict[str, Any]] = None

    def __post_init__(self) -> None:
        _check_id(self.id)
        if not isinstance(self.code, str) or not self.code:
            raise MessageError("error.code must be a non-empty string")
        if not isinstance(self.message, str):
            raise MessageError("error.message must be a string")
        if self.details is not None:
            _check_object("error.details", self.details)

    def to_dict(self) -> Dict[str, Any]:
        error: Dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details is not None:
            error["details"] = self.details
        return {"kind": ERROR, "id": self.id, "error": error}


@dataclass(frozen=True)
class EventMsg:
    method: str
    params: Dict[str, Any]

    def __post_init__(self) -> None:
        _check_method(self.method)
        _check_object("params", self.params)

    def to_dict(self) -> Dict[str, Any]:
        return {"kind": EVENT, "method": self.method, "params": self.params}


Message = Union[RequestMsg, ResponseMsg, ErrorMsg, EventMsg]


def _get(obj: Dict[str, Any], name: str) -> Any:
    return obj.get(name)


def parse_message(obj: Dict[str, Any]) -> Message:
    """The typed message in a decoded frame, or MessageError saying what is wrong."""
    kind = _get(obj, "kind")
    if kind == REQUEST:
        rid = _get(obj, "id")
        _check_id(rid)
        method = _get(obj, "method")
        try:
            return RequestMsg(rid, method, _get(obj, "params"), _get(obj, "deadline_ms"))
        except MessageError as exc:
            raise MessageError(
                exc.detail, request_id=rid, method=method if valid_method(method) else None
            ) from None
    if kind == RESPONSE:
        return ResponseMsg(_get(obj, "id"), _get(obj, "result"))
    if kind == ERROR:
        error = _get(obj, "error")
        _check_object("error", error)
        return ErrorMsg(
            _get(obj, "id"), _get(error, "code"), _get(error, "message"), _get(error, "details")
        )
    if kind == EVENT:
        return EventMsg(_get(obj, "method"), _get(obj, "params"))
    raise MessageError(f"unknown kind {kind!r}")
