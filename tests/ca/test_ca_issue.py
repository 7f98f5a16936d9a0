"""Issuing VM and server certificates through the bus: real nats-server, real verification."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from nats.aio.msg import Msg
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from guestbus import pki
from guestbus.contract import CertEvent, CertReply
from guestbus.runtime import BusError

from ._support import CaEnv, ec_key, load, new_vm, service_of, vm_csr

DAY = 86400


def near(when: datetime, expected: datetime, slack: float = 5.0) -> bool:
    return abs((when - expected).total_seconds()) <= slack


async def test_vm_certificate_verifies_and_carries_exactly_one_identity(ca: CaEnv) -> None:
    vm = new_vm()
    before = datetime.now(UTC)
    reply = CertReply.model_validate(await ca.issue(vm))
    cert, ca_cert = load(reply.certificate), load(reply.ca)

    cert.verify_directly_issued_by(ca_cert)  # signature, issuer name, algorithm
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == vm
    assert pki.uri_sans(cert) == [f"spiffe://guestbus.local/vm/{vm}"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 1  # nothing but the URI SAN
    assert pki.vm_from_certificate(cert, "guestbus.local") == vm
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    # NotBefore backdated 60 s, default lifetime 90 days
    assert near(cert.not_valid_before_utc, before - timedelta(seconds=60))
    assert near(cert.not_valid_after_utc, before + timedelta(days=90))
    assert reply.not_after == cert.not_valid_after_utc
    assert cert.serial_number.bit_length() > 64
    assert reply.serial == pki.serial_hex(cert)
    assert reply.renewal_of is None
    # the CA: EC P-256, CA:TRUE, keyCertSign + cRLSign, 10 years
    assert isinstance(ca_cert.public_key(), ec.EllipticCurvePublicKey)
    assert ca_cert.subject.rfc4514_string() == "CN=guestbus cluster CA"
    assert ca_cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_ku = ca_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ca_ku.key_cert_sign and ca_ku.crl_sign
    life = ca_cert.not_valid_after_utc - ca_cert.not_valid_before_utc
    assert timedelta(days=3650) <= life <= timedelta(days=3654)


async def test_lifetime_can_be_shortened_never_lengthened(ca: CaEnv) -> None:
    now = datetime.now(UTC)
    short = load((await ca.issue(lifetime_seconds=60))["certificate"])
    assert near(short.not_valid_after_utc, now + timedelta(seconds=60))
    capped = load((await ca.issue(lifetime_seconds=400 * DAY))["certificate"])
    assert near(capped.not_valid_after_utc, now + timedelta(days=90))


async def test_rsa_and_p384_keys_are_accepted(ca: CaEnv) -> None:
    for key in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())):
        vm = new_vm()
        reply = await ca.issue(vm, csr=vm_csr(vm, key))
        cert = load(reply["certificate"])
        assert pki.spki_sha256(cert.public_key()) == pki.spki_sha256(key.public_key())


async def test_stamped_vm_must_match_the_request_and_the_csr(ca: CaEnv) -> None:
    vm, other = new_vm(), new_vm()
    ok = await ca.issue(vm, stamped_vm=vm, csr=vm_csr(vm, trust_domain="guestbus.local"))
    assert load(ok["certificate"]).serial_number
    cases = [
        {"vm": other, "stamped_vm": vm, "csr": vm_csr(other)},  # asks for another VM
        {"vm": vm, "stamped_vm": vm, "csr": vm_csr(other)},  # CSR CN names another VM
        {"vm": vm, "csr": vm_csr(other)},  # not stamped: the CSR still must agree
        {  # CSR's URI SAN in another trust domain
            "vm": vm,
            "stamped_vm": vm,
            "csr": vm_csr(vm, trust_domain="evil.example"),
        },
    ]
    for body in cases:
        with pytest.raises(BusError) as err:
            await ca.call("issue", body)
        assert (err.value.code, err.value.status) == ("identity_mismatch", 403), body


def _tampered_csr(vm: str) -> str:
    der = pki.load_pem_csr(vm_csr(vm)).public_bytes(serialization.Encoding.DER)
    flipped = vm[:-1] + ("0" if vm[-1] != "0" else "1")
    bad = der.replace(vm.encode(), flipped.encode())
    assert bad != der
    return x509.load_der_x509_csr(bad).public_bytes(serialization.Encoding.PEM).decode()


async def test_bad_csrs_are_refused_with_a_clear_message(ca: CaEnv) -> None:
    vm = new_vm()
    cases = {
        "garbage": ("not a csr at all", "not PEM"),
        "garbled PEM": (
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
            "cannot be parsed",
        ),
        "wrong signature": (_tampered_csr(vm), "signature does not verify"),
        "tiny RSA": (vm_csr(vm, rsa.generate_private_key(65537, 1024)), "1024 bits"),
        "ed25519": (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vm)]))
            .sign(ed25519.Ed25519PrivateKey.generate(), None)
            .public_bytes(serialization.Encoding.PEM)
            .decode(),
            "accepted keys are EC P-256, EC P-384",
        ),
    }
    for label, (csr, words) in cases.items():
        with pytest.raises(BusError) as err:
            await ca.call("issue", {"csr": csr, "vm": vm})
        assert err.value.code == "bad_csr", label
        assert err.value.status == 400
        assert words in err.value.message, (label, err.value.message)
    with pytest.raises(BusError) as err:
        await ca.call("issue", {"csr": vm_csr(vm), "vm": "not a uuid!"})
    assert err.value.code == "bad_request"


async def test_server_certificate_has_sans_and_server_auth(ca: CaEnv) -> None:
    key = ec_key(1)
    csr = pki.make_server_csr(key, ["gw.cluster.local"], ["10.0.0.5"]).decode()
    now = datetime.now(UTC)
    reply = await ca.call(
        "server",
        {"csr": csr, "name": "gateway-1", "dns": ["gw.cluster.local", "gw"], "ips": ["10.0.0.5"]},
    )
    cert = load(reply["certificate"])
    cert.verify_directly_issued_by(load(reply["ca"]))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gw.cluster.local", "gw"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert near(cert.not_valid_after_utc, now + timedelta(days=30))
    with pytest.raises(pki.IdentityError):
        pki.vm_from_certificate(cert)  # a server certificate names no VM
    with pytest.raises(BusError) as err:
        await ca.call("server", {"csr": csr, "name": "gw", "dns": [], "ips": []})
    assert err.value.code == "bad_request"
    with pytest.raises(BusError) as err:
        await ca.call("server", {"csr": csr, "name": "gw", "ips": ["10.0.0.256"]})
    assert "not an IP address" in err.value.message


async def test_renewal_links_to_the_current_certificate_which_stays_valid(ca: CaEnv) -> None:
    vm = new_vm()
    events: list[CertEvent] = []

    async def collect(msg: Msg) -> None:
        events.append(CertEvent.model_validate_json(msg.data))

    sub = await ca.nc.subscribe(f"gb.evt.cert.{vm}", cb=collect)
    first = await ca.issue(vm)
    second = await ca.call("renew", {"csr": vm_csr(vm, ec_key(2)), "vm": vm, "stamped_vm": vm})
    assert second["renewal_of"] == first["serial"]
    assert second["serial"] != first["serial"]
    old = await ca.call("get", {"serial": first["serial"]})
    assert old["record"]["state"] == "valid"
    new = await ca.call("get", {"serial": second["serial"]})
    assert new["record"]["renewal_of"] == first["serial"]
    assert new["certificate"] == second["certificate"]
    await _wait(lambda: len(events) >= 2)
    assert [e.action.value for e in events] == ["issued", "renewed"]
    assert events[1].renewal_of == first["serial"]
    await sub.unsubscribe()
    # a renewal with nothing valid to renew still issues, unlinked
    lone_vm = new_vm()
    lone = await ca.call("renew", {"csr": vm_csr(lone_vm), "vm": lone_vm})
    assert lone["renewal_of"] is None


async def _wait(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_serials_are_unique_and_recorded_across_500_issues(ca: CaEnv) -> None:
    vm = new_vm()
    sem = asyncio.Semaphore(64)

    async def one() -> str:
        async with sem:
            return str((await ca.issue(vm))["serial"])

    serials = await asyncio.gather(*(one() for _ in range(500)))
    assert len(set(serials)) == 500
    listed = await ca.call("list", {"vm": vm, "limit": 2000})
    assert listed["total"] == 500
    assert {c["serial"] for c in listed["certificates"]} == set(serials)


async def test_metrics_are_exported(ca: CaEnv) -> None:
    await ca.issue(lifetime_seconds=3 * DAY)
    host = ca.hosts[0]
    await service_of(host).maintain()
    text = generate_latest(host.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("guestbus_certificates", (("kind", "vm"), ("state", "valid")))] >= 1
    assert samples[("guestbus_certificates_expiring", (("within", "7d"),))] >= 1
    soonest = samples[("guestbus_certificates_soonest_expiry_timestamp_seconds", ())]
    assert soonest <= (datetime.now(UTC) + timedelta(days=3, seconds=5)).timestamp()
    assert samples[("guestbus_certificates_issued_total", (("kind", "vm"),))] >= 1
    assert ("guestbus_certificate_issue_duration_seconds_count", (("kind", "vm"),)) in samples
    assert ("guestbus_crl_number", ()) in samples
    assert ("guestbus_ca_not_after_timestamp_seconds", ()) in samples
    refused = [k for k in samples if k[0] == "guestbus_certificate_requests_refused_total"]
    assert refused  # earlier tests were refused


async def test_info_describes_the_ca(ca: CaEnv) -> None:
    info = await ca.call("info")
    cert = load(info["certificate"])
    assert info["fingerprint"] == pki.fingerprint(cert)
    assert info["subject"] == "CN=guestbus cluster CA"
    assert info["trust_domain"] == "guestbus.local"
    assert info["vm_cert_lifetime_seconds"] == 90 * DAY
    assert info["server_cert_lifetime_seconds"] == 30 * DAY
    assert info["counts"]["valid"] >= 1
    assert json.loads(json.dumps(info))  # plain JSON
