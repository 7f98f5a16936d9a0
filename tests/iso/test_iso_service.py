"""iso-builder on a real nats-server with a real cert-authority: single and bulk builds,
what lands in the directory, the object store and the manifest KV, progress events, and
typed errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from nats.aio.msg import Msg

from guestbus import pki
from guestbus.contract import (
    DR_KEY_PRIVATE,
    DR_KEY_PUBLIC,
    KV_DR_KEYS,
    KV_ISO_MANIFESTS,
    OBJ_ISOS,
    IsoBuildReply,
    IsoManifest,
)
from guestbus.kvscan import kv_keys
from guestbus.runtime import BusError
from guestbus_iso_builder.wheelhouse import Wheelhouse

from ._support import IsoEnv, pycdlib_read, xorriso_extract


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IsoEnv]:
    environment = await IsoEnv(tmp_path_factory.mktemp("iso-env")).start()
    try:
        yield environment
    finally:
        await environment.close()


class Progress:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def on_msg(self, msg: Msg) -> None:
        self.events.append(json.loads(msg.data))


async def test_bulk_config_only_one_unknown_vm_fails_alone(env: IsoEnv) -> None:
    vms = await env.add_vms(199)
    unknown = str(uuid.uuid4())
    requested = [*vms[:100], unknown, *vms[100:]]
    progress = Progress()
    sub = await env.nc.subscribe("gb.evt.iso.bulk-test", cb=progress.on_msg)
    await env.nc.flush()
    reply = IsoBuildReply.model_validate(
        await env.call("build", {"vms": requested, "kind": "config-only", "job": "bulk-test"})
    )
    assert (reply.built, reply.failed) == (199, 1)
    assert [r.vm for r in reply.results] == requested  # one per VM, in request order
    bad = reply.results[100]
    assert not bad.ok and bad.error is not None
    assert bad.error.code == "unknown_vm" and unknown in bad.error.message
    # every VM reported progress, counting up to the total
    await asyncio.sleep(0.2)
    await sub.unsubscribe()
    per_vm = [e for e in progress.events if e.get("vm")]
    assert len(per_vm) == 200
    assert sorted(e["done"] for e in per_vm) == list(range(1, 201))
    assert {e["vm"] for e in per_vm if not e["ok"]} == {unknown}
    # directory, object store and manifests agree with each other
    files = sorted(p.name for p in env.out_dir.glob("*.iso"))
    assert files == sorted(f"{vm}.iso" for vm in vms)
    store = await env.js.object_store(OBJ_ISOS)
    kv = await env.js.key_value(KV_ISO_MANIFESTS)
    for result in reply.results[:3] + reply.results[-3:]:
        if not result.ok:
            continue
        m = result.manifest
        assert m is not None and m.kind.value == "config-only"
        data = (env.out_dir / f"{m.vm}.iso").read_bytes()
        assert hashlib.sha256(data).hexdigest() == m.sha256 and len(data) == m.size
        assert (env.out_dir / f"{m.vm}.iso").stat().st_mode & 0o777 == 0o600
        assert m.object is not None
        assert (await store.get(m.object)).data == data
        stored = IsoManifest.model_validate_json((await kv.get(m.vm)).value or b"")
        assert stored.sha256 == m.sha256 and stored.name == m.name
    assert len(await kv_keys(kv)) == 199


async def test_an_iso_carries_a_fresh_ca_signed_identity_for_its_vm(
    env: IsoEnv, tmp_path: Path
) -> None:
    (vm,) = await env.add_vms(1)
    reply = await env.call("build", {"vms": [vm], "kind": "config-only"})
    manifest = IsoManifest.model_validate(reply["results"][0]["manifest"])
    out = xorriso_extract(env.out_dir / f"{vm}.iso", tmp_path / "x")
    cert = pki.load_pem_certificate((out / "client.crt").read_bytes())
    ca = pki.load_pem_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "client.key").read_bytes(), None)
    cert.verify_directly_issued_by(ca)
    assert pki.vm_from_certificate(cert) == vm
    assert pki.serial_hex(cert) == manifest.cert_serial
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    config = json.loads((out / "config.json").read_text())
    assert config["vm_uuid"] == vm and config["config_uuid"] == manifest.config_uuid
    assert config["gateway_host"] == "gw.example.test"
    # the CA recorded the certificate under the VM
    msg = await env.nc.request("gb.ca.list", json.dumps({"vm": vm}).encode(), timeout=5)
    serials = [c["serial"] for c in json.loads(msg.data)["certificates"]]
    assert manifest.cert_serial in serials


async def test_rebuilding_raises_the_configuration_serial(env: IsoEnv) -> None:
    (vm,) = await env.add_vms(1)
    first = await env.call("build", {"vms": [vm], "kind": "config-only"})
    second = await env.call("build", {"vms": [vm], "kind": "config-only"})
    m1 = IsoManifest.model_validate(first["results"][0]["manifest"])
    m2 = IsoManifest.model_validate(second["results"][0]["manifest"])
    assert (m1.config_serial, m2.config_serial) == (1, 2)
    assert m1.config_uuid != m2.config_uuid and m1.cert_serial != m2.cert_serial
    listed = await env.call("list", {"vms": [vm]})
    assert [m["config_serial"] for m in listed["manifests"]] == [2]
    got = await env.call("get", {"vm": vm})
    assert got["sha256"] == m2.sha256


async def test_every_iso_carries_the_one_dr_verify_key(env: IsoEnv, tmp_path: Path) -> None:
    vms = await env.add_vms(2)
    await env.call("build", {"vms": vms, "kind": "config-only"})
    info = await env.call("info", {})
    kv = await env.js.key_value(KV_DR_KEYS)
    public = (await kv.get(DR_KEY_PUBLIC)).value or b""
    private = (await kv.get(DR_KEY_PRIVATE)).value or b""
    assert info["dr_public_key"].encode() == public
    signer = serialization.load_pem_private_key(private, None)
    assert (
        signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        == public
    )
    for vm in vms:
        data, mode = pycdlib_read(env.out_dir / f"{vm}.iso", "/dr-verify.pem")
        assert data == public and mode & 0o777 == 0o644


async def test_a_full_iso_has_the_wheelhouse(env: IsoEnv, wheelhouse: Wheelhouse) -> None:
    (vm,) = await env.add_vms(1)
    reply = await env.call("build", {"vms": [vm], "kind": "full"}, timeout=600)
    manifest = IsoManifest.model_validate(reply["results"][0]["manifest"])
    assert manifest.kind.value == "full" and manifest.wheelhouse == wheelhouse.id
    assert manifest.agent_version == wheelhouse.agent_version
    for f in wheelhouse.files:
        data, _ = pycdlib_read(env.out_dir / f"{vm}.iso", f"/wheels/{f.name}")
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(f.read_bytes()).hexdigest()
    info = await env.call("info", {})
    assert info["wheelhouse"] == wheelhouse.id


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"vms": []}, "vms"),
        ({"vms": ["not-a-uuid!"]}, "vms"),
        ({"vms": [str(uuid.uuid4())] * 1001}, "vms"),
        ({"vms": [str(uuid.uuid4())], "kind": "everything"}, "kind"),
        ({"vms": [str(uuid.uuid4())], "job": "a.b"}, "job"),
    ],
    ids=["empty", "bad-uuid", "too-many", "bad-kind", "bad-job"],
)
async def test_bad_requests_get_a_typed_error(
    env: IsoEnv, body: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(BusError) as err:
        await env.call("build", body)
    assert err.value.code == "bad_request" and fragment in err.value.message


async def test_get_for_a_vm_without_an_iso_is_not_found(env: IsoEnv) -> None:
    with pytest.raises(BusError) as err:
        await env.call("get", {"vm": str(uuid.uuid4())})
    assert err.value.code == "not_found"


async def test_without_a_ca_each_vm_fails_with_a_retryable_reason(env: IsoEnv) -> None:
    vms = await env.add_vms(3)
    assert env.ca_host is not None
    await env.ca_host.stop()
    env.hosts.remove(env.ca_host)
    try:
        reply = await env.call("build", {"vms": vms, "kind": "config-only"})
    finally:
        env.ca_host = None
    assert reply["built"] == 0 and reply["failed"] == 3
    assert {r["error"]["code"] for r in reply["results"]} == {"ca_unavailable"}
    assert not any((env.out_dir / f"{vm}.iso").exists() for vm in vms)
