"""The CA's lifecycle: first start, concurrent replicas, restarts, passphrases, settings."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from guestbus import pki
from guestbus.contract import KV_CERTS
from guestbus.runtime import ServiceHost
from guestbus_cert_authority.bootstrap import CaStartupError
from guestbus_cert_authority.service import CertAuthority
from guestbus_cert_authority.settings import CaSettings

from ._support import PASSPHRASE, CaEnv, load, service_of

MakeEnv = Callable[..., Awaitable[CaEnv]]


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
    env.update(extra, PYTHONUNBUFFERED="1")
    return env


async def test_two_replicas_starting_on_an_empty_bucket_end_with_one_ca(
    make_env: MakeEnv,
) -> None:
    env = await make_env()
    hosts = [ServiceHost(CertAuthority(), env.settings()) for _ in range(3)]
    env.hosts.extend(hosts)
    await asyncio.gather(*(h.start() for h in hosts))
    fingerprints = {service_of(h).ca.fingerprint for h in hosts}
    assert len(fingerprints) == 1
    kv = await env.js.key_value(KV_CERTS)
    assert len(await kv.history("ca.key")) == 1
    assert len(await kv.history("ca.cert")) == 1
    info = await env.call("info")
    assert info["fingerprint"] in fingerprints
    # every replica signs with the same CA
    for _ in range(6):
        load((await env.issue())["certificate"]).verify_directly_issued_by(
            load(info["certificate"])
        )


async def test_restart_keeps_the_ca_and_the_key_is_encrypted(make_env: MakeEnv) -> None:
    env = await make_env()
    state = env.tmp / "state"
    host = await env.host(state_dir=state)
    first = service_of(host).ca.fingerprint
    issued = await env.issue()
    await env.stop_host(host)
    host = await env.host(state_dir=state)
    assert service_of(host).ca.fingerprint == first
    assert pki.fingerprint(pki.load_pem_certificate((state / "ca.pem").read_text())) == first
    assert (await env.call("get", {"serial": issued["serial"]}))["record"]["state"] == "valid"
    kv = await env.js.key_value(KV_CERTS)
    key_pem = (await kv.get("ca.key")).value or b""
    assert key_pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(pki.PemError):
        pki.load_pem_private_key(key_pem, "not the passphrase")
    assert pki.load_pem_private_key(key_pem, PASSPHRASE)


async def test_a_service_that_finds_no_bucket_provisions_it(make_env: MakeEnv) -> None:
    env = await make_env(provisioned=False)
    await env.host()
    status = await (await env.js.key_value(KV_CERTS)).status()
    assert status.bucket == KV_CERTS
    assert (await env.issue())["serial"]


async def test_generated_passphrase_is_private_and_reused(make_env: MakeEnv) -> None:
    env = await make_env()
    state = env.tmp / "default"
    host = await env.host(state_dir=state, ca_passphrase=None)
    secret = state / "ca-passphrase"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    value = secret.read_text().strip()
    assert len(value) >= 32
    fingerprint = service_of(host).ca.fingerprint
    await env.stop_host(host)
    host = await env.host(state_dir=state, ca_passphrase=None)
    assert service_of(host).ca.fingerprint == fingerprint
    assert secret.read_text().strip() == value
    # a replica elsewhere without the passphrase refuses to start (and creates nothing)
    with pytest.raises(CaStartupError, match="GUESTBUS_CA_PASSPHRASE"):
        await env.host(state_dir=env.tmp / "elsewhere", ca_passphrase=None)
    assert not (env.tmp / "elsewhere" / "ca-passphrase").exists()


async def test_wrong_passphrase_stops_the_process_with_a_clear_message(
    make_env: MakeEnv, tmp_path: Path
) -> None:
    env = await make_env()
    await env.stop_host(await env.host())  # the CA exists, made with PASSPHRASE
    secret = tmp_path / "secret"
    secret.write_text("not-the-passphrase\n")
    base = {
        "GUESTBUS_NATS_URL": env.url,
        "GUESTBUS_HTTP_PORT": "0",
        "GUESTBUS_STATE_DIR": str(tmp_path / "state"),
        "GUESTBUS_EVENT_LOOP": "asyncio",
    }
    for setting, extra in (
        ("GUESTBUS_CA_PASSPHRASE", {"GUESTBUS_CA_PASSPHRASE": "wrong"}),
        ("GUESTBUS_CA_PASSPHRASE_FILE", {"GUESTBUS_CA_PASSPHRASE_FILE": str(secret)}),
    ):
        proc = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "guestbus_cert_authority.main"],
            env=_env({**base, **extra}),
            capture_output=True,
            text=True,
            timeout=30,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2, out
        assert "Traceback" not in out
        assert setting in proc.stderr
        assert "cannot decrypt the cluster CA private key" in proc.stderr
    kv = await env.js.key_value(KV_CERTS)
    assert len(await kv.history("ca.key")) == 1  # never a new CA


async def test_certificate_without_key_is_refused(make_env: MakeEnv) -> None:
    env = await make_env()
    await env.stop_host(await env.host())
    kv = await env.js.key_value(KV_CERTS)
    await kv.purge("ca.key")
    with pytest.raises(CaStartupError, match="no CA key"):
        await env.host()


async def test_compat_1000_days_and_configured_lifetime(make_env: MakeEnv) -> None:
    env = await make_env()
    host = await env.host(cert_compat_1000_days=True)
    now = datetime.now(UTC)
    cert = load((await env.issue())["certificate"])
    assert abs(cert.not_valid_after_utc - (now + timedelta(days=1000))) < timedelta(seconds=5)
    shorter = load((await env.issue(lifetime_seconds=3600))["certificate"])
    assert abs(shorter.not_valid_after_utc - (now + timedelta(hours=1))) < timedelta(seconds=5)
    assert (await env.call("info"))["compat_1000_days"] is True
    await env.stop_host(host)
    await env.host(vm_cert_lifetime="7d")
    cert = load((await env.issue())["certificate"])
    assert abs(cert.not_valid_after_utc - (now + timedelta(days=7))) < timedelta(seconds=5)


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GUESTBUS_VM_CERT_LIFETIME", "30d")
    monkeypatch.setenv("GUESTBUS_CRL_LIFETIME", "12h")
    monkeypatch.setenv("GUESTBUS_TRUST_DOMAIN", "Prod.Example")
    s = CaSettings()
    assert (s.vm_cert_lifetime, s.crl_lifetime, s.max_vm_lifetime) == (30 * 86400, 43200, 2592000)
    assert s.trust_domain == "prod.example"
    monkeypatch.setenv("GUESTBUS_CERT_COMPAT_1000_DAYS", "true")
    assert CaSettings().max_vm_lifetime == 1000 * 86400
    monkeypatch.setenv("GUESTBUS_CA_PASSPHRASE", "x")
    monkeypatch.setenv("GUESTBUS_CA_PASSPHRASE_FILE", "/nonexistent")
    with pytest.raises(ValueError, match="not both"):
        CaSettings()


def test_bad_settings_exit_2_naming_the_variable(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "guestbus_cert_authority.main"],
        env=_env({"GUESTBUS_VM_CERT_LIFETIME": "forever", "GUESTBUS_HTTP_PORT": "0"}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "GUESTBUS_VM_CERT_LIFETIME" in proc.stderr and "Traceback" not in proc.stderr


async def test_concurrent_revocations_on_two_replicas_all_reach_the_crl(
    make_env: MakeEnv,
) -> None:
    env = await make_env()
    await asyncio.gather(env.host(), env.host())
    serials = [(await env.issue())["serial"] for _ in range(12)]
    replies = await asyncio.gather(
        *(env.call("revoke", {"serial": s, "reason": "superseded"}) for s in serials)
    )
    assert sorted(s for r in replies for s in r["revoked"]) == sorted(serials)
    crl = await env.call("crl")
    listed = {pki.serial_hex(e.serial_number) for e in pki.load_pem_crl(crl["crl"])}
    assert listed == set(serials)
    assert crl["number"] == 1 + len(serials)  # one CRL per revocation, numbers never reused
    # both replicas converge on the newest CRL file
    files = [host.settings.state_dir / "crl.pem" for host in env.hosts]
    await _eventually(lambda: all(f.read_text() == crl["crl"] for f in files))


async def _eventually(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
