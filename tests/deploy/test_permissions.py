"""Least privilege, on a real nats-server with the generated permission set.

Every service connects as its own user (``guestbus.permissions``) and does its whole job —
links, enrollment, host commands, ISOs in the object store, revocation, the IP fallback —
while the server logs no permission violation. Then each role tries something outside its
permissions and the server refuses it (and logs it), while the same connection can still do
what it is allowed to do.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import nats
import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from guestbus import permissions
from guestbus.contract import (
    KV_VMS,
    OBJ_ISOS,
    CertListReply,
    DrRunState,
    DrVmState,
    IsoBuildReply,
    LinkKind,
    RevokeReply,
    iso_object_name,
)
from guestbus.credentials import EmbeddedAuth
from guestbus.registry import Registry
from guestbus.runtime import check_reply

from ..support.waiting import wait_until
from ._stack import DR_SUBNET, SecureStack

pytestmark = pytest.mark.timeout(120)


async def call(stack: SecureStack, subject: str, body: Any, timeout: float = 10.0) -> bytes:
    msg = await stack.operator.request(subject, json.dumps(body).encode(), timeout=timeout)
    return check_reply(msg.headers, msg.data)


async def links(stack: SecureStack) -> dict[str, LinkKind]:
    registry = Registry(await stack.operator.jetstream().key_value(KV_VMS))
    return {r.uuid: r.link for r in await registry.all()}


async def ping(stack: SecureStack, vm: str) -> dict[str, Any]:
    result = json.loads(await call(stack, f"gb.guest.{vm}.ping", {}, timeout=5))
    assert isinstance(result, dict)
    return result


async def test_every_service_does_its_job_as_its_own_user(stack: SecureStack) -> None:
    mark = stack.mark()
    vms = [vm.uuid for vm in await stack.lab.add_vms(2)]
    await stack.lab.wait_active(2, timeout=30)

    # the registry: rpc-router writes it, the operator reads it with a KV watch
    async def all_serial() -> bool:
        now = await links(stack)
        return all(now.get(vm) is LinkKind.SERIAL for vm in vms)

    await wait_until(all_serial, 20, "both VMs registered with a serial link")

    # enrollment over serial: the router asked the CA for the agents' certificates
    async def enrolled() -> bool:
        raw = await call(stack, "gb.ca.list", {"kind": "vm"})
        return {c.vm for c in CertListReply.model_validate_json(raw).certificates} >= set(vms)

    await wait_until(enrolled, 20, "both agents enrolled")

    # host → guest commands, served by the serial-bridge
    for vm in vms:
        assert (await ping(stack, vm))["pong"] is True

    # nats.micro discovery: every service answers $SRV.PING with its own user
    inbox = stack.operator.new_inbox()
    names: list[str] = []

    async def on_pong(msg: Any) -> None:
        names.append(json.loads(msg.data)["name"])

    sub = await stack.operator.subscribe(inbox, cb=on_pong)
    await stack.operator.publish("$SRV.PING", b"", reply=inbox)
    await wait_until(lambda: set(names) >= set(stack.hosts), 5, "$SRV.PING answers")
    await sub.unsubscribe()

    # ISOs: the builder reads the registry, asks the CA, writes files, manifests and the
    # object store; the operator downloads one from the object store
    reply = IsoBuildReply.model_validate_json(
        await call(stack, "gb.iso.build", {"vms": vms, "kind": "config-only"}, timeout=30)
    )
    assert all(r.ok for r in reply.results), reply.results
    store = await stack.operator.jetstream().object_store(OBJ_ISOS)
    first = reply.results[0].manifest
    assert first is not None
    image = await store.get(iso_object_name(vms[0]))
    assert image.data is not None and hashlib.sha256(image.data).hexdigest() == first.sha256

    # revocation: records by compare-and-set, a new CRL, events on gb.evt.cert / gb.evt.crl
    revoked = RevokeReply.model_validate_json(
        await call(stack, "gb.ca.revoke", {"vm": vms[1], "reason": "superseded"})
    )
    assert revoked.revoked and revoked.crl_number >= 1

    # the IP fallback: without the serial-bridge the agents reach rpc-router's TLS gateway,
    # which is a link terminator too (forwards their RPCs, serves their commands)
    await stack.stop_service("serial-bridge")

    async def ip_link() -> bool:
        return (await links(stack)).get(vms[0]) is LinkKind.IP

    await wait_until(ip_link, 30, "the IP fallback link")
    assert (await ping(stack, vms[0]))["pong"] is True

    # and back to serial when the bridge returns
    await stack.restart_bridge()
    await wait_until(all_serial, 30, "both VMs back on serial")

    assert stack.violations(mark) == [], "\n".join(stack.violations(mark))
    assert [e for e in stack.client_errors if "permission" in e.lower()] == []


async def test_a_dr_run_drives_agents_as_dr_orchestrator(stack: SecureStack) -> None:
    """dr-orchestrator signs with the private key only it may read, sends dr_apply through
    the link terminator and records per-VM status in KV, under its own user."""
    mark = stack.mark()
    (vm,) = [v.uuid for v in await stack.lab.add_vms(1)]
    await stack.lab.wait_active(timeout=30)
    plan = {
        "name": "deploy-bubble",
        "mappings": [{"source": DR_SUBNET, "target": "192.168.0.0/16"}],
        "test_mappings": [{"source": DR_SUBNET, "target": "192.168.0.0/16"}],
        "groups": [[vm]],
        "timeouts": {"link": 20, "apply": 10, "script": 5, "gateway": 2},
        "script": False,
    }
    await call(stack, "gb.dr.plan.put", {"plan": plan})
    run = json.loads(
        await call(stack, "gb.dr.run.start", {"plan": "deploy-bubble", "kind": "test"})
    )
    state: dict[str, Any] = {}

    async def finished() -> bool:
        state.update(json.loads(await call(stack, "gb.dr.run.get", {"run": run["id"]})))
        return bool(state["run"]["state"] != DrRunState.RUNNING.value)

    await wait_until(finished, 30, "the DR run to finish")
    assert state["run"]["state"] == DrRunState.SUCCEEDED.value, state
    assert [v["state"] for v in state["vms"]] == [DrVmState.APPLIED.value]
    assert stack.violations(mark) == [], "\n".join(stack.violations(mark))


DENIED: list[tuple[str, str, str, str]] = [
    # (role, action, subject, why it must be refused)
    ("serial-bridge", "request", "gb.ca.issue", "only rpc-router and iso-builder ask the CA"),
    ("serial-bridge", "subscribe", "gb.rpc.hello", "guest RPCs are served by rpc-router"),
    ("serial-bridge", "request", "$JS.API.DIRECT.GET.KV_gb_certs.$KV.gb_certs.ca.key", "CA key"),
    ("serial-bridge", "subscribe", "_INBOX.dr-orchestrator.>", "another service's replies"),
    ("rpc-router", "request", "$JS.API.DIRECT.GET.KV_gb_certs.$KV.gb_certs.ca.key", "CA key"),
    ("rpc-router", "publish", "gb.evt.cert.x", "certificate events are the CA's"),
    ("rpc-router", "request", "$JS.API.CONSUMER.CREATE.KV_gb_certs", "no watch on the CA bucket"),
    (
        "iso-builder",
        "request",
        "$JS.API.DIRECT.GET.KV_gb_dr_keys.$KV.gb_dr_keys.signing.private",
        "only dr-orchestrator reads the DR private key",
    ),
    ("iso-builder", "publish", "gb.rpc.hello", "only link terminators speak for guests"),
    ("cert-authority", "request", "gb.guest.x.ping", "the CA never commands guests"),
    ("cert-authority", "publish", "$KV.gb_vms.x", "the registry is not the CA's"),
    ("dr-orchestrator", "request", "gb.ca.revoke", "DR does not revoke certificates"),
    ("dr-orchestrator", "request", "gb.guest.x.renew", "DR sends only its own commands"),
    ("dr-orchestrator", "publish", "gb.rpc.hello", "only link terminators speak for guests"),
    ("operator", "publish", "gb.rpc.hello", "an operator cannot impersonate a guest"),
    ("operator", "publish", "_INBOX.rpc-router.x", "nor answer a request meant for a service"),
    ("operator", "publish", "$KV.gb_vms.x", "nor edit the registry behind rpc-router"),
    (
        "operator",
        "request",
        "$JS.API.DIRECT.GET.KV_gb_dr_keys.$KV.gb_dr_keys.signing.private",
        "nor read the DR private key",
    ),
    ("provisioner", "request", "gb.ca.list", "the provisioner only provisions"),
    ("provisioner", "request", "$JS.API.STREAM.DELETE.KV_gb_vms", "and never deletes"),
]


@pytest.mark.parametrize(
    ("role", "action", "subject", "why"), DENIED, ids=[f"{d[0]}:{d[2]}" for d in DENIED]
)
async def test_a_subject_outside_the_permissions_is_denied(
    stack: SecureStack, role: str, action: str, subject: str, why: str
) -> None:
    errors: list[str] = []
    nc = await stack.client(role, errors)
    try:
        if action == "publish":
            await nc.publish(subject, b"{}")
            await nc.flush()
        elif action == "request":
            with pytest.raises((NatsTimeoutError, NoRespondersError)):
                await nc.request(subject, b"{}", timeout=0.5)
        else:
            await nc.subscribe(subject)
            await nc.flush()
        kind = "subscription" if action == "subscribe" else "publish"
        wanted = f'permissions violation for {kind} to "{subject.lower()}"'
        await wait_until(lambda: any(wanted in e.lower() for e in errors), 5, wanted)
        verb = "Subscription" if action == "subscribe" else "Publish"
        line = f'"$G/user:{role}" - {verb} Violation - Subject "{subject}"'
        await wait_until(lambda: any(line in v for v in stack.violations()), 5, line)
        # the same connection still does what it may (the denial is specific)
        stream = permissions.role(role).streams[0]
        info = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
        assert json.loads(info.data)["config"]["name"] == stream
    finally:
        await nc.close()


async def test_anonymous_and_wrong_password_are_refused(stack: SecureStack) -> None:
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(stack.broker.url, allow_reconnect=False, max_reconnect_attempts=0)
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(
            stack.broker.url,
            user="rpc-router",
            password=stack.passwords["serial-bridge"],
            allow_reconnect=False,
            max_reconnect_attempts=0,
        )


def test_guestbus_up_renders_the_same_permission_set() -> None:
    auth = EmbeddedAuth.generate(permissions.SERVICES)
    assert auth.config_text() == permissions.nats_conf(
        [permissions.OPERATOR, *permissions.SERVICES]
    )
    # no password in the configuration: they are referenced from the server's environment
    assert not any(pw in auth.config_text() for pw in auth.passwords.values())
    assert set(auth.server_env()) == {permissions.password_env(r) for r in auth.passwords}
    for pw in auth.passwords.values():
        assert permissions.check_password(pw) is None


@pytest.mark.parametrize(
    "value", ["123456789012345678", "5mb", "true", "short1", "-abcdefghijklmnopq"]
)
def test_passwords_nats_would_not_read_back_as_text_are_refused(value: str) -> None:
    assert permissions.check_password(value) is not None


def test_only_link_terminators_may_speak_for_guests() -> None:
    may_publish_rpc = {
        name
        for name, role in permissions.ROLES.items()
        if any(s.startswith("gb.rpc") for s in role.publish)
    }
    may_serve_guests = {
        name
        for name, role in permissions.ROLES.items()
        if role.service and any(s.startswith("gb.guest") for s in role.subscribe)
    }
    assert may_publish_rpc == {"serial-bridge", "rpc-router"}
    assert may_serve_guests == {"serial-bridge", "rpc-router"}
    # nobody but dr-orchestrator may read the DR private key; nobody but the CA the CA key
    for name, role in permissions.ROLES.items():
        reads = [s for s in role.publish if s.startswith("$JS.API.DIRECT.GET.KV_gb_dr_keys")]
        if name != "dr-orchestrator":
            assert all(s.endswith("signing.public") for s in reads), name
        ca = [s for s in role.publish if "KV_gb_certs" in s and "DIRECT.GET" in s]
        if name != "cert-authority":
            assert all(s.endswith(".cert.*") for s in ca), name


def guestbus_cli(stack: SecureStack, role: str, *args: str, **env: str) -> tuple[int, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("GUESTBUS_")}
    base.update(
        GUESTBUS_NATS_URL=stack.broker.url,
        GUESTBUS_NATS_USER=role,
        GUESTBUS_NATS_PASSWORD=stack.passwords[role],
        GUESTBUS_OPERATOR_FILE=os.devnull,
        **env,
    )
    result = subprocess.run(
        [sys.executable, "-m", "guestbus.cli.main", *args],
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


async def test_guestbus_provision_as_the_provisioner_honours_the_replica_setting(
    stack: SecureStack,
) -> None:
    mark = stack.mark()
    status, out = await asyncio.to_thread(guestbus_cli, stack, "provisioner", "provision")
    assert status == 0, out
    assert "replicas 1" in out and "kv gb_vms (unchanged)" in out
    # GUESTBUS_JS_REPLICAS reaches JetStream: a single server refuses 3 replicas
    status, out = await asyncio.to_thread(
        guestbus_cli, stack, "provisioner", "provision", GUESTBUS_JS_REPLICAS="3"
    )
    assert status == 1 and "replicas" in out.lower(), out
    # a service checks, with its own user, that what it needs exists (the chart's init step)
    status, out = await asyncio.to_thread(
        guestbus_cli, stack, "rpc-router", "provision", "--check", "rpc-router"
    )
    assert status == 0 and "streams of rpc-router exist" in out, out
    assert stack.violations(mark) == [], "\n".join(stack.violations(mark))
