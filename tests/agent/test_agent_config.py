"""Agent config: every problem names its field (stdlib only: also runs on Python 3.9)."""

import json
import os
from pathlib import Path
from typing import Dict

import pytest

from guestbus_agent.config import (
    ConfigError,
    find_iso_mount,
    load,
    load_file,
    parse_config,
)

VALID = {
    "vm_uuid": "5B0C1E2A-1111-4222-8333-944455556666",
    "config_uuid": "cfg-1",
    "gateway_host": "10.0.0.10",
}


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(dict(VALID))
    assert cfg.vm_uuid == VALID["vm_uuid"].lower()
    assert cfg.gateway_port == 2074
    assert cfg.serial_device == "/dev/ttyS1"
    assert cfg.serial_failure_limit == 3
    assert cfg.heartbeat_failure_limit == 20
    assert cfg.allowed_commands == (
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
    assert cfg.state_dir == "/var/lib/guestbus" and cfg.ip_fallback is True
    assert cfg.freeze_deadline == 60 and cfg.freeze_script_timeout == 30
    assert cfg.freeze_exclude == () and cfg.ssr is True
    assert cfg.restore_dir == "/mnt/guestbus-restore"


def test_snapshot_fields_round_trip() -> None:
    data: Dict[str, object] = dict(VALID)
    data.update(
        freeze_deadline=20,
        freeze_script_timeout=5.5,
        freeze_exclude=["/srv/scratch", "/var/tmp"],
        ssr=False,
        restore_dir="/restore/",
    )
    cfg = parse_config(data)
    assert cfg.freeze_deadline == 20.0 and cfg.freeze_script_timeout == 5.5
    assert cfg.freeze_exclude == ("/srv/scratch", "/var/tmp") and cfg.ssr is False
    assert cfg.restore_dir == "/restore"
    assert parse_config(cfg.to_json()) == cfg


@pytest.mark.parametrize("field", ["vm_uuid", "config_uuid", "gateway_host"])
def test_missing_required_field_is_named(field: str) -> None:
    data = dict(VALID)
    del data[field]
    with pytest.raises(ConfigError, match=f"missing required field '{field}'"):
        parse_config(data, "cfg.json")


@pytest.mark.parametrize(
    "field,value",
    [
        ("vm_uuid", "not-a-uuid"),
        ("gateway_port", 70000),
        ("gateway_port", "2074"),
        ("heartbeat_interval", 0),
        ("heartbeat_interval", True),
        ("serial_failure_limit", 1.5),
        ("serial_device", "ttyS1"),
        ("allowed_commands", ["ping", "rm -rf"]),
        ("allowed_commands", "ping"),
        ("freeze_deadline", 0.5),
        ("freeze_deadline", 601),
        ("freeze_script_timeout", "30"),
        ("freeze_exclude", "/srv"),
        ("freeze_exclude", ["relative"]),
        ("ssr", "yes"),
        ("restore_dir", "mnt"),
        ("restore_dir", "/"),
    ],
)
def test_invalid_field_is_named(field: str, value: object) -> None:
    data: Dict[str, object] = dict(VALID)
    data[field] = value
    with pytest.raises(ConfigError) as err:
        parse_config(data, "cfg.json")
    assert f"'{field}'" in str(err.value)
    assert str(err.value).startswith("cfg.json:")


def test_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_file(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_file(bad)


def test_iso_is_found_by_label(tmp_path: Path) -> None:
    # A fake /dev/disk/by-label and mount table: the label link resolves to the device,
    # and the device is mounted (with an escaped space in its mount point).
    dev = tmp_path / "sr0"
    dev.write_text("")
    by_label = tmp_path / "by-label"
    by_label.mkdir()
    os.symlink(str(dev), str(by_label / "GUESTBUS"))
    mnt = tmp_path / "media cd"
    mnt.mkdir()
    (mnt / "config.json").write_text(json.dumps(VALID))
    mounts = tmp_path / "mounts"
    escaped = str(mnt).replace(" ", "\\040")
    mounts.write_text(f"proc /proc proc rw 0 0\n{dev} {escaped} iso9660 ro 0 0\n")
    found = find_iso_mount("GUESTBUS", str(by_label), str(mounts))
    assert found == mnt
    assert find_iso_mount("OTHER", str(by_label), str(mounts)) is None


def test_load_without_any_source_explains_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    import guestbus_agent.config as config

    monkeypatch.setattr(config, "find_iso_mount", lambda *a, **k: None)
    with pytest.raises(ConfigError, match="--config FILE, or mount the ISO labelled GUESTBUS"):
        load(None)
