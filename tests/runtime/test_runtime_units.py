"""Settings, logs and errors without a server."""

from __future__ import annotations

import io
import json
import logging

import pytest
from prometheus_client import CollectorRegistry, Counter

from guestbus.contract import HEADER_ERROR_CODE
from guestbus.runtime import BusError, ServiceSettings, check_reply, load_settings
from guestbus.runtime.errors import MICRO_ERROR_CODE_HEADER, MICRO_ERROR_HEADER
from guestbus.runtime.logs import setup_logging
from guestbus.runtime.metrics import Children


def test_settings_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("GUESTBUS_"):
            monkeypatch.delenv(key)
    s = load_settings(ServiceSettings)
    assert s.nats_url == "nats://127.0.0.1:4222"
    assert (s.http_host, s.http_port) == ("0.0.0.0", 8080)
    assert (s.log_level, s.js_replicas, s.event_loop) == ("INFO", 1, "uvloop")


def test_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTBUS_LOG_LEVEL", "debug")
    monkeypatch.setenv("GUESTBUS_NATS_PASSWORD", "s3cret")
    monkeypatch.setenv("GUESTBUS_HTTP_PORT", "0")
    monkeypatch.setenv("GUESTBUS_EVENT_LOOP", "asyncio")
    s = load_settings(ServiceSettings)
    assert s.log_level == "DEBUG"
    assert s.nats_password is not None and s.nats_password.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(s)
    assert s.http_port == 0 and s.event_loop == "asyncio"


def test_settings_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("GUESTBUS_HTTP_PORT", "abc")
    monkeypatch.setenv("GUESTBUS_JS_REPLICAS", "9")
    monkeypatch.setenv("GUESTBUS_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit) as info:
        load_settings(ServiceSettings)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "GUESTBUS_HTTP_PORT: Input should be a valid integer, unable to parse string" in err
    assert "(got 'abc')" in err
    assert "GUESTBUS_JS_REPLICAS: Input should be less than or equal to 5 (got '9')" in err
    assert "GUESTBUS_EVENT_LOOP:" in err


def test_json_logs() -> None:
    out = io.StringIO()
    log = setup_logging("svc", "DEBUG", stream=out)
    log.info("hello %s", "world", extra={"vm": "abc", "n": 3, "service": "spoof"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    logging.getLogger().handlers.clear()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "hello world" and first["level"] == "INFO"
    assert first["logger"] == "guestbus.svc" and first["service"] == "svc"
    assert first["vm"] == "abc" and first["n"] == 3 and first["extra_service"] == "spoof"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exc"]


def test_bus_error_round_trip() -> None:
    err = BusError("no_active_link", "VM has no link;\nstart its agent", 409, {"vm": "x"})
    headers = err.headers()
    assert headers[MICRO_ERROR_CODE_HEADER] == "409"
    assert headers[MICRO_ERROR_HEADER] == "VM has no link; start its agent"
    assert headers[HEADER_ERROR_CODE] == "no_active_link"
    back = BusError.from_reply(headers, err.to_bytes())
    assert back is not None
    assert (back.code, back.status, back.details) == ("no_active_link", 409, {"vm": "x"})
    assert check_reply({}, b"ok") == b"ok"
    assert BusError.from_reply(None, b"") is None


def test_metric_children_are_looked_up_once_per_label_set() -> None:
    registry = CollectorRegistry()
    counter = Counter("gb_test_total", "test", ["method", "outcome"], registry=registry)
    of = Children(counter)
    assert of("ping", "ok") is of("ping", "ok")
    assert of("ping", "ok") is not of("ping", "timeout")
    of("ping", "ok").inc()
    of("ping", "ok").inc()
    of("ping", "timeout").inc()
    value = registry.get_sample_value
    assert value("gb_test_total", {"method": "ping", "outcome": "ok"}) == 2
    assert value("gb_test_total", {"method": "ping", "outcome": "timeout"}) == 1
