"""schemas/ is generated from the contract models; drift fails here (and in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema

from guestbus import contract, schemas

ROOT = Path(__file__).resolve().parents[2]


def test_schema_directory_matches_models() -> None:
    assert schemas.drift(ROOT / "schemas") == []


def test_drift_is_detected(tmp_path: Path) -> None:
    schemas.write(tmp_path)
    assert schemas.drift(tmp_path) == []
    (tmp_path / "hello.json").write_text("{}\n")
    (tmp_path / "stale.json").write_text("{}\n")
    problems = schemas.drift(tmp_path)
    assert any("out of date" in p and "hello.json" in p for p in problems)
    assert any("not generated" in p and "stale.json" in p for p in problems)


def test_real_messages_validate_against_the_published_schemas() -> None:
    hello = contract.Hello(protocol=1, agent_version="0.1.0", capabilities=["cmd:ping"])
    event = contract.LinkEvent(
        vm="5b0c1e2a-1111-4222-8333-944455556666",
        state=contract.LinkState.UP,
        link=contract.LinkKind.SERIAL,
        host="h1",
    )
    for name, message in (("hello", hello), ("link-event", event)):
        schema = json.loads((ROOT / "schemas" / f"{name}.json").read_text())
        jsonschema.validate(json.loads(message.model_dump_json()), schema)


def test_subjects_refuse_tokens_that_would_change_routing() -> None:
    assert contract.guest_subject("abc", "ping") == "gb.guest.abc.ping"
    for bad in ("a.b", "a b", "*", ">", ""):
        try:
            contract.rpc_subject(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} accepted as a subject token")
