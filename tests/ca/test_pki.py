"""guestbus.pki: identities, CSRs, PEM, serials and durations (no bus needed)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from guestbus import pki
from guestbus_cert_authority.authority import (
    CaMaterial,
    build_ca_certificate,
    build_vm_certificate,
    generate_ca_key,
)

VM = "5b0c1e2a-1111-4222-8333-944455556666"
NOW = datetime.now(UTC).replace(microsecond=0)


def _ca() -> CaMaterial:
    key = generate_ca_key()
    return CaMaterial(cert=build_ca_certificate(key, NOW, timedelta(days=10)), key=key)


CA = _ca()


def _cert_with_uris(*uris: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, VM)]))
        .issuer_name(CA.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(CA.key, hashes.SHA256())


def test_spiffe_id_round_trips_through_a_certificate() -> None:
    assert pki.spiffe_id("Guestbus.Local", VM.upper()) == f"spiffe://guestbus.local/vm/{VM}"
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_vm_certificate(
        CA, key.public_key(), VM, "guestbus.local", 12345, NOW, NOW + timedelta(days=1)
    )
    assert pki.vm_from_certificate(cert) == VM
    assert pki.vm_from_certificate(cert, "guestbus.local") == VM


@pytest.mark.parametrize(
    ("uris", "words"),
    [
        ((), "exactly one URI SAN"),
        ((f"spiffe://guestbus.local/vm/{VM}", f"spiffe://guestbus.local/vm/{VM}"), "has 2"),
        ((f"spiffe://other.example/vm/{VM}",), "trust domain 'other.example'"),
        ((f"spiffe://guestbus.local/server/{VM}",), "does not name a VM"),
        (("spiffe://guestbus.local/vm/not_a_uuid",), "not a VM uuid"),
        ((f"https://guestbus.local/vm/{VM}",), "not a spiffe:// identity"),
        ((f"spiffe://guestbus.local/vm/{VM}/extra",), "does not name a VM"),
        (("spiffe://guestbus.local/vm/../x",), "relative path segment"),
    ],
)
def test_vm_from_certificate_refuses_anything_but_one_vm_identity(
    uris: tuple[str, ...], words: str
) -> None:
    with pytest.raises(pki.IdentityError, match=words.replace("(", r"\(")):
        pki.vm_from_certificate(_cert_with_uris(*uris), "guestbus.local")


def test_csrs_carry_what_callers_ask_for() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = pki.parse_csr(pki.make_csr(key, VM, "guestbus.local"))
    assert pki.csr_identity(csr) == (VM, [f"spiffe://guestbus.local/vm/{VM}"])
    assert pki.csr_identity(pki.parse_csr(pki.make_csr(key, VM))) == (VM, [])
    server = pki.parse_csr(pki.make_server_csr(key, ["gw.example"], ["10.1.2.3", "::1"]))
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v.value) for v in san] == ["gw.example", "10.1.2.3", "::1"]
    with pytest.raises(pki.PkiError):
        pki.make_server_csr(key, ["bad name!"])
    with pytest.raises(pki.PkiError):
        pki.make_csr(key, "no")


def test_pem_helpers_and_fingerprints() -> None:
    pem = pki.cert_pem(CA.cert)
    assert pki.load_pem_certificate(pem) == CA.cert
    assert pki.load_pem_certificates(pem + pem) == [CA.cert, CA.cert]
    with pytest.raises(pki.PemError):
        pki.load_pem_certificate("nothing here")
    encrypted = pki.key_pem(CA.key, "s3cret")
    assert encrypted.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(pki.PemError, match="wrong passphrase"):
        pki.load_pem_private_key(encrypted, "nope")
    with pytest.raises(pki.PemError):
        pki.load_pem_private_key(encrypted)
    assert pki.load_pem_private_key(encrypted, b"s3cret").public_key() == CA.key.public_key()
    fp = pki.fingerprint(CA.cert)
    assert len(fp) == 64 and fp == CA.cert.fingerprint(hashes.SHA256()).hex()
    assert pki.fingerprint_colons(fp).count(":") == 31
    assert CA.ca_id == fp[:16]


@given(st.integers(min_value=1, max_value=(1 << 159) - 1))
def test_serials_round_trip(number: int) -> None:
    text = pki.serial_hex(number)
    assert pki.parse_serial(text) == number
    assert pki.parse_serial("0x" + text.upper()) == number
    padded = text.rjust(len(text) + len(text) % 2, "0")
    colons = ":".join(padded[i : i + 2] for i in range(0, len(padded), 2))
    assert pki.canonical_serial(colons) == text


def test_durations() -> None:
    assert pki.parse_duration("30d") == 30 * 86400
    assert pki.parse_duration("12h") == 43200
    assert pki.parse_duration("90m") == 5400
    assert pki.parse_duration("45") == 45
    assert pki.parse_duration("2w") == 14 * 86400
    for bad in ("", "ten days", "5y", "-3d"):
        with pytest.raises(pki.PkiError):
            pki.parse_duration(bad)
    assert pki.format_duration(29.4 * 86400) == "29d"
    assert pki.format_duration(-7200) == "-2h"
    assert pki.format_duration(90) == "90s"


def test_key_policy() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    pki.check_key(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(pki.CsrError, match="EC P-521"):
        pki.check_key(ec.generate_private_key(ec.SECP521R1()).public_key())
    with pytest.raises(pki.CsrError, match="1024 bits"):
        pki.check_key(rsa.generate_private_key(65537, 1024).public_key())
