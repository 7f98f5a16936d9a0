"""Revocation, the CRL (parsed with cryptography), events, and list / get filters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from cryptography import x509
from nats.aio.msg import Msg

from guestbus import pki
from guestbus.contract import CertEvent, CrlEvent
from guestbus.runtime import BusError

from ._support import CaEnv, load, new_vm, service_of


async def _next(queue: asyncio.Queue[Msg], timeout: float = 5.0) -> Msg:
    return await asyncio.wait_for(queue.get(), timeout)


async def test_revoke_by_serial_signs_publishes_and_writes_the_crl(ca: CaEnv) -> None:
    vm = new_vm()
    issued = await ca.issue(vm)
    keep = await ca.issue(vm)
    crl_events: asyncio.Queue[Msg] = asyncio.Queue()
    cert_events: asyncio.Queue[Msg] = asyncio.Queue()
    sub1 = await ca.nc.subscribe("gb.evt.crl.*", cb=crl_events.put)
    sub2 = await ca.nc.subscribe(f"gb.evt.cert.{vm}", cb=cert_events.put)
    before = (await ca.call("crl"))["number"]

    result = await ca.call(
        "revoke", {"serial": issued["serial"], "reason": "keyCompromise", "comment": "leaked"}
    )
    assert result["revoked"] == [issued["serial"]]
    assert result["crl_number"] == before + 1

    reply = await ca.call("crl")
    crl = pki.load_pem_crl(reply["crl"])
    ca_cert = load(issued["ca"])
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca_cert.subject
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == reply["number"] == before + 1
    entry = crl.get_revoked_certificate_by_serial_number(pki.parse_serial(issued["serial"]))
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(pki.parse_serial(keep["serial"])) is None
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert 86000 < (crl.next_update_utc - crl.last_update_utc).total_seconds() <= 86400
    assert [e["serial"] for e in reply["revoked"]] == [issued["serial"]]

    state_dir = ca.hosts[0].settings.state_dir
    assert (state_dir / "crl.pem").read_text() == reply["crl"]
    assert pki.load_pem_certificate((state_dir / "ca.pem").read_text()) == ca_cert

    event = CrlEvent.model_validate_json((await _next(crl_events)).data)
    assert event.number == before + 1 and event.revoked_count == 1
    assert pki.load_pem_crl(event.crl) == crl
    audit = CertEvent.model_validate_json((await _next(cert_events)).data)
    assert (audit.action.value, audit.serial, audit.reason) == (
        "revoked",
        issued["serial"],
        "keyCompromise",
    )
    record = (await ca.call("get", {"serial": issued["serial"]}))["record"]
    assert record["state"] == "revoked"
    assert record["comment"] == "leaked"
    # revoking again changes nothing and signs no CRL
    again = await ca.call("revoke", {"serial": issued["serial"], "reason": "superseded"})
    assert again["revoked"] == [] and again["already_revoked"] == [issued["serial"]]
    assert again["crl_number"] == before + 1
    await sub1.unsubscribe()
    await sub2.unsubscribe()


async def test_revoke_by_vm_revokes_every_valid_certificate(ca: CaEnv) -> None:
    vm, other = new_vm(), new_vm()
    serials = {(await ca.issue(vm))["serial"] for _ in range(3)}
    untouched = (await ca.issue(other))["serial"]
    result = await ca.call("revoke", {"vm": vm, "reason": "cessationOfOperation"})
    assert set(result["revoked"]) == serials
    crl = pki.load_pem_crl((await ca.call("crl"))["crl"])
    listed = {pki.serial_hex(r.serial_number) for r in crl}
    assert serials <= listed and untouched not in listed
    for entry in crl:
        if pki.serial_hex(entry.serial_number) in serials:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
            assert reason is x509.ReasonFlags.cessation_of_operation
    nothing = await ca.call("revoke", {"vm": vm, "reason": "unspecified"})
    assert nothing["revoked"] == []


async def test_revoke_refuses_bad_requests(ca: CaEnv) -> None:
    serial = (await ca.issue())["serial"]
    cases = [
        ({"serial": serial, "reason": "becauseISaidSo"}, "bad_request"),
        ({"reason": "unspecified"}, "bad_request"),
        ({"serial": serial, "vm": new_vm(), "reason": "unspecified"}, "bad_request"),
        ({"serial": "abc123", "reason": "unspecified"}, "not_found"),
        ({"vm": new_vm(), "reason": "unspecified"}, "not_found"),
    ]
    for body, code in cases:
        with pytest.raises(BusError) as err:
            await ca.call("revoke", body)
        assert err.value.code == code, body
    with pytest.raises(BusError) as err:
        await ca.call("get", {"serial": "0123"})
    assert (err.value.code, err.value.status) == ("not_found", 404)


async def test_unspecified_reason_has_no_reason_code_in_the_crl(ca: CaEnv) -> None:
    serial = (await ca.issue())["serial"]
    await ca.call("revoke", {"serial": serial})  # reason defaults to unspecified
    crl = pki.load_pem_crl((await ca.call("crl"))["crl"])
    entry = crl.get_revoked_certificate_by_serial_number(pki.parse_serial(serial))
    assert entry is not None
    with pytest.raises(x509.ExtensionNotFound):
        entry.extensions.get_extension_for_class(x509.CRLReason)


async def test_list_filters(ca: CaEnv) -> None:
    vm = new_vm()
    long_lived = (await ca.issue(vm))["serial"]
    short = (await ca.issue(vm, lifetime_seconds=120))["serial"]
    revoked = (await ca.issue(vm))["serial"]
    expiring_reply = await ca.issue(vm, lifetime_seconds=1)
    expiring = expiring_reply["serial"]
    await ca.call("revoke", {"serial": revoked, "reason": "superseded"})
    # wait until `expiring` is past its not_after (certificate times have 1 s resolution)
    not_after = datetime.fromisoformat(expiring_reply["not_after"])
    await asyncio.sleep(max(0.0, (not_after - datetime.now(UTC)).total_seconds()) + 0.2)

    async def serials(**filters: object) -> list[str]:
        reply = await ca.call("list", {"vm": vm, **filters})
        return [c["serial"] for c in reply["certificates"]]

    assert set(await serials()) == {long_lived, short, revoked, expiring}
    assert await serials(expiring_within_seconds=3600) == [short]
    assert await serials(state="revoked") == [revoked]
    assert await serials(state="expired") == [expiring]
    assert set(await serials(state="valid")) == {long_lived, short}
    assert await serials(kind="server") == []
    everything = await ca.call("list", {"state": "revoked"})
    assert revoked in {c["serial"] for c in everything["certificates"]}
    assert all(c["state"] == "revoked" for c in everything["certificates"])
    page = await ca.call("list", {"vm": vm, "limit": 2})
    assert page["total"] == 4 and page["truncated"] and len(page["certificates"]) == 2
    # soonest expiry first
    afters = [c["not_after"] for c in (await ca.call("list", {"vm": vm}))["certificates"]]
    assert afters == sorted(afters)
    got = await ca.call("get", {"serial": expiring.upper()})
    assert got["record"]["state"] == "expired"


async def test_crl_is_resigned_when_half_its_life_is_gone(ca: CaEnv) -> None:
    svc = service_of(ca.hosts[0])
    current = (await ca.call("crl"))["number"]
    assert svc.crl is not None
    # pretend the CRL is older than it is: maintenance re-signs it, once
    stale = svc.crl.model_copy(update={"next_update": datetime.now(UTC)})
    await svc.store.write_crl(stale, (await svc.store.get_crl())[1])
    await svc.maintain()
    await svc.maintain()
    assert (await ca.call("crl"))["number"] == current + 1
