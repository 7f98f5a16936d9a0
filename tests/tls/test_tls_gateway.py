"""The TLS gateway's mutual-TLS matrix, with raw clients and certificates the test chose.

Accepted: a certificate the cluster CA issued, naming one VM. Refused, each counted by reason
in ``guestbus_gateway_refused_total`` and logged: no client certificate, another CA, an
expired certificate, a revoked one (also: a live link is closed the moment its certificate is
revoked). A valid certificate of VM A cannot speak for VM B (``identity_mismatch``).
"""

from __future__ import annotations

import logging

import pytest

from guestbus.wire.aio import RemoteError

from ..support.waiting import wait_until
from ._support import (
    GATEWAY_LOGGER,
    GATEWAY_NAME,
    TlsStack,
    attempt_refused,
    foreign_ca_client_cert,
    host_command,
    new_vm,
    utcnow,
)
from .conftest import StackFactory

pytestmark = pytest.mark.timeout(60)

ROUTER_LOGGER = "guestbus.rpc-router"


@pytest.fixture(scope="module")
async def stack(make_stack: StackFactory) -> TlsStack:
    return await make_stack(bridge=False)


async def expect_refusal(
    stack: TlsStack, caplog: pytest.LogCaptureFixture, reason: str, seen: str
) -> None:
    """The refusal of one client is counted under ``reason`` and logged with the reason."""
    await wait_until(
        lambda: stack.refused(reason) >= 1, 5, f"a refusal counted as {reason} (client: {seen})"
    )
    await wait_until(
        lambda: any(
            r.name == GATEWAY_LOGGER and r.levelno == logging.WARNING and "refused" in r.message
            for r in caplog.records
        ),
        5,
        "the refusal in the gateway's log",
    )


async def test_valid_certificate_is_accepted_and_registered_at_the_gateway(
    stack: TlsStack,
) -> None:
    vm = new_vm()
    cert = await stack.issue(vm)
    before = {r: stack.refused(r) for r in ("no_certificate", "foreign_ca", "expired", "revoked")}
    client = await stack.connect(cert)
    try:
        ack = await client.hello(vm)
        assert ack["vm"] == vm
        assert ack["link"] == "ip"
        assert ack["host"] == GATEWAY_NAME
        assert ack["identity_matches"] is True
        beat = await client.heartbeat(vm)
        assert beat["seq"] == 1
        # A hello without a claim is fine too: the certificate says who this is.
        assert (await client.heartbeat(None))["seq"] == 2
        records = await stack.wait_registered([vm], "ip", host=GATEWAY_NAME)
        assert records[vm].hostname == "raw-tls-client"
        assert records[vm].last_heartbeat is not None
        # The link is live both ways: the gateway serves host → guest commands for it.
        ping = await host_command(stack.bus, vm, "ping")
        assert ping.ok and ping.result == {"pong": True, "by": "raw-tls-client"}
        assert client.served == ["ping"]
        assert not client.closed
    finally:
        await client.close()
    assert {r: stack.refused(r) for r in before} == before, "nothing was refused"
    # The gateway reports the link down when the client leaves.
    await stack.wait_registered([vm], "down")


async def test_client_without_certificate_is_refused(
    stack: TlsStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, GATEWAY_LOGGER)
    before = stack.refused("no_certificate")
    seen = await attempt_refused(stack, None, new_vm())
    await expect_refusal(stack, caplog, "no_certificate", seen)
    assert stack.refused("no_certificate") == before + 1


@pytest.mark.parametrize("ca_name", ["another CA", "guestbus cluster CA"])
async def test_certificate_of_another_ca_is_refused(
    stack: TlsStack, caplog: pytest.LogCaptureFixture, ca_name: str
) -> None:
    """Another CA, also one that took the cluster CA's name (the chain then fails on the
    signature rather than on a missing issuer): both are ``foreign_ca``."""
    caplog.set_level(logging.WARNING, GATEWAY_LOGGER)
    vm = new_vm()
    before = stack.refused("foreign_ca")
    seen = await attempt_refused(stack, foreign_ca_client_cert(vm, ca_name), vm)
    await expect_refusal(stack, caplog, "foreign_ca", seen)
    assert stack.refused("foreign_ca") == before + 1
    assert vm not in await stack.records()


async def test_expired_certificate_is_refused(
    stack: TlsStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, GATEWAY_LOGGER)
    vm = new_vm()
    cert = await stack.issue(vm, lifetime=1)
    assert cert.not_after is not None
    not_after = cert.not_after
    # X.509 times have one-second resolution: wait until not_after is really past.
    await wait_until(lambda: utcnow() > not_after, 5, "the certificate to expire", 0.1)
    before = stack.refused("expired")
    seen = await attempt_refused(stack, cert, vm)
    await expect_refusal(stack, caplog, "expired", seen)
    assert stack.refused("expired") == before + 1
    assert any("expired" in r.message for r in caplog.records if r.name == GATEWAY_LOGGER)
    assert vm not in await stack.records()


async def test_revoked_certificate_is_refused_and_a_live_link_is_closed(
    stack: TlsStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, GATEWAY_LOGGER)
    # Revoked before connecting: refused at the handshake.
    vm = new_vm()
    cert = await stack.issue(vm)
    assert (await stack.revoke(cert.serial))["revoked"] == [cert.serial]
    before = stack.refused("revoked")
    seen = await attempt_refused(stack, cert, vm)
    await expect_refusal(stack, caplog, "revoked", seen)
    assert stack.refused("revoked") == before + 1
    assert vm not in await stack.records()

    # Revoked while the link is up: the gateway closes it at once.
    live_vm = new_vm()
    live = await stack.issue(live_vm)
    client = await stack.connect(live)
    try:
        await client.hello(live_vm)
        await client.heartbeat(live_vm)
        await stack.wait_registered([live_vm], "ip", host=GATEWAY_NAME)
        assert not client.closed
        await stack.revoke(live.serial)
        await wait_until(lambda: client.closed, 5, "the gateway to close the revoked link")
        assert stack.refused("revoked") == before + 2
        assert any(
            "revoked" in r.message and live.serial in r.message
            for r in caplog.records
            if r.name == GATEWAY_LOGGER
        )
    finally:
        await client.close()
    await stack.wait_registered([live_vm], "down")
    # And it cannot come back.
    await attempt_refused(stack, live, live_vm)
    await wait_until(lambda: stack.refused("revoked") == before + 3, 5, "the third refusal")


async def test_certificate_of_vm_a_cannot_speak_for_vm_b(
    stack: TlsStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, ROUTER_LOGGER)
    vm_a, vm_b = new_vm(), new_vm()
    cert_a, cert_b = await stack.issue(vm_a), await stack.issue(vm_b)
    # VM B is registered over its own link first (hello only: nothing changes it after).
    client_b = await stack.connect(cert_b)
    await client_b.hello(vm_b)
    b_before = (await stack.wait_registered([vm_b], "ip", host=GATEWAY_NAME))[vm_b]
    hello_refusals = stack.router_metric("guestbus_identity_refusals_total", method="hello")
    beat_refusals = stack.router_metric("guestbus_identity_refusals_total", method="heartbeat")

    client_a = await stack.connect(cert_a)
    try:
        # A hello claiming B over A's certificate.
        with pytest.raises(RemoteError) as hello_err:
            await client_a.hello(vm_b)
        assert hello_err.value.code == "identity_mismatch"
        assert vm_a in hello_err.value.message
        # A proper hello, then a heartbeat claiming B.
        assert (await client_a.hello(vm_a))["vm"] == vm_a
        with pytest.raises(RemoteError) as beat_err:
            await client_a.heartbeat(vm_b)
        assert beat_err.value.code == "identity_mismatch"
        # A's own link is unharmed by the refused claims.
        assert (await client_a.heartbeat(vm_a))["seq"] == 2
    finally:
        await client_a.close()
    assert (
        stack.router_metric("guestbus_identity_refusals_total", method="hello")
        == hello_refusals + 1
    )
    assert (
        stack.router_metric("guestbus_identity_refusals_total", method="heartbeat")
        == beat_refusals + 1
    )
    # Let every heartbeat write that the router queued land before looking.
    await wait_until(lambda: not stack.router._beat_tasks, 5, "the registry writes")
    records = await stack.records()
    assert records[vm_b] == b_before, "VM B's registry entry was changed by VM A's claims"
    assert records[vm_a].uuid == vm_a
    await client_b.close()
    claims = [
        r.message
        for r in caplog.records
        if r.name == ROUTER_LOGGER and "claims VM" in r.message and vm_b in r.message
    ]
    assert len(claims) == 2, claims  # the hello and the heartbeat, each logged
