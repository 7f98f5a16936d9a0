from typing import Any

import pytest

from guestbus.wire.messages import (
    MAX_DEADLINE_MS,
    ErrorMsg,
    EventMsg,
    Message,
    MessageError,
    RequestMsg,
    ResponseMsg,
    parse_message,
    valid_id,
    valid_method,
)


@pytest.mark.parametrize("value", ["a", "a1f3-1", "A.b:c_d-9", "x" * 64])
def test_valid_ids(value: str) -> None:
    assert valid_id(value)


@pytest.mark.parametrize("value", ["", "x" * 65, "a b", "a/b", "é", "a\n", 7, None, ["a"]])
def test_invalid_ids(value: object) -> None:
    assert not valid_id(value)


@pytest.mark.parametrize("value", ["ping", "guest.exec", "fs_freeze-2", "a" * 64])
def test_valid_methods(value: str) -> None:
    assert valid_method(value)


@pytest.mark.parametrize("value", ["", "Ping", "a" * 65, "a:b", "a b", "ping\n", 1, None])
def test_invalid_methods(value: object) -> None:
    assert not valid_method(value)


def test_parse_each_kind_and_back() -> None:
    cases: list[tuple[dict[str, Any], Message]] = [
        (
            {"kind": "req", "id": "r1", "method": "ping", "params": {"a": 1}, "deadline_ms": 50},
            RequestMsg("r1", "ping", {"a": 1}, 50),
        ),
        ({"kind": "res", "id": "r1", "result": {}}, ResponseMsg("r1", {})),
        (
            {"kind": "err", "id": "r1", "error": {"code": "timeout", "message": "late"}},
            ErrorMsg("r1", "timeout", "late"),
        ),
        (
            {
                "kind": "err",
                "id": "r1",
                "error": {"code": "x", "message": "", "details": {"k": [1]}},
            },
            ErrorMsg("r1", "x", "", {"k": [1]}),
        ),
        ({"kind": "evt", "method": "boot", "params": {}}, EventMsg("boot", {})),
    ]
    for obj, msg in cases:
        assert parse_message(obj) == msg
        assert msg.to_dict() == obj


def test_unknown_fields_are_ignored() -> None:
    obj = {"kind": "evt", "method": "boot", "params": {}, "future": 1}
    assert parse_message(obj) == EventMsg("boot", {})


def test_null_details_is_no_details() -> None:
    obj = {"kind": "err", "id": "r", "error": {"code": "c", "message": "m", "details": None}}
    assert parse_message(obj) == ErrorMsg("r", "c", "m", None)


@pytest.mark.parametrize(
    "change",
    [
        {"method": "Bad Method"},
        {"method": None},
        {"params": []},
        {"params": None},
        {"deadline_ms": 0},
        {"deadline_ms": -5},
        {"deadline_ms": 1.5},
        {"deadline_ms": True},
        {"deadline_ms": "5000"},
        {"deadline_ms": MAX_DEADLINE_MS + 1},
    ],
)
def test_bad_request_with_readable_id_names_it(change: dict[str, Any]) -> None:
    obj = {"kind": "req", "id": "r-9", "method": "ping", "params": {}, "deadline_ms": 5000}
    obj.update(change)
    with pytest.raises(MessageError) as info:
        parse_message(obj)
    assert info.value.request_id == "r-9"
    method = obj["method"]
    assert info.value.method == (method if valid_method(method) else None)


@pytest.mark.parametrize(
    "obj",
    [
        {},
        {"kind": "nope"},
        {"kind": 1},
        {"kind": "req", "id": "bad id", "method": "ping", "params": {}, "deadline_ms": 1},
        {"kind": "req", "method": "ping", "params": {}, "deadline_ms": 1},
        {"kind": "res", "id": "r"},
        {"kind": "res", "id": "r", "result": [1]},
        {"kind": "res", "id": "", "result": {}},
        {"kind": "err", "id": "r"},
        {"kind": "err", "id": "r", "error": "boom"},
        {"kind": "err", "id": "r", "error": {"code": "", "message": "m"}},
        {"kind": "err", "id": "r", "error": {"code": "c"}},
        {"kind": "err", "id": "r", "error": {"code": "c", "message": "m", "details": [1]}},
        {"kind": "evt", "method": "Boot", "params": {}},
        {"kind": "evt", "method": "boot"},
    ],
)
def test_bad_messages(obj: dict[str, Any]) -> None:
    with pytest.raises(MessageError) as info:
        parse_message(obj)
    assert info.value.request_id is None
    assert isinstance(info.value, ValueError)
