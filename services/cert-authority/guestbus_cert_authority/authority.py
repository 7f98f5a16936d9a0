"""The CA's cryptography, without I/O: create the CA, sign VM / server certificates and CRLs.

Everything here is synchronous and deterministic given its inputs (serials and times are
passed in), so the service, the tests and the benchmark use the same code.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guestbus import pki

CA_COMMON_NAME = "guestbus cluster CA"
BACKDATE = timedelta(seconds=60)
"""NotBefore of issued certificates lies this far in the past (clock skew between hosts)."""


class CaKeyMismatch(ValueError):
    """The CA certificate does not belong to the CA key."""


@dataclass(frozen=True)
class CaMaterial:
    """The loaded CA: certificate, key and what is derived from them once."""

    cert: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    cert_pem: str = field(init=False)
    fingerprint: str = field(init=False)
    ca_id: str = field(init=False)
    aki: x509.AuthorityKeyIdentifier = field(init=False)

    def __post_init__(self) -> None:
        if not same_public_key(self.cert.public_key(), self.key):
            raise CaKeyMismatch("the CA certificate was not issued for the CA private key")
        fp = pki.fingerprint(self.cert)
        try:
            ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
        object.__setattr__(self, "cert_pem", pki.cert_pem(self.cert))
        object.__setattr__(self, "fingerprint", fp)
        object.__setattr__(self, "ca_id", fp[:16])
        object.__setattr__(self, "aki", aki)

    @property
    def subject(self) -> x509.Name:
        return self.cert.subject


def same_public_key(
    public: CertificatePublicKeyTypes, key: CertificateIssuerPrivateKeyTypes
) -> bool:
    return pki.spki_sha256(public) == pki.spki_sha256(key.public_key())


def generate_ca_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _hash_for(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def build_ca_certificate(
    key: CertificateIssuerPrivateKeyTypes, now: datetime, lifetime: timedelta
) -> x509.Certificate:
    """The self-signed cluster CA: CN "guestbus cluster CA", basicConstraints CA (path
    length 0), keyUsage keyCertSign + cRLSign, SKI = AKI."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    public = key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
    )
    return builder.sign(key, _hash_for(key))


def check_ca_certificate(cert: x509.Certificate) -> None:
    """Raise ``ValueError`` unless ``cert`` can act as a CA."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise ValueError("the CA certificate has no basicConstraints extension") from None
    if not bc.ca:
        raise ValueError("the CA certificate is not a CA (basicConstraints CA:FALSE)")


def _key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf(
    ca: CaMaterial,
    public_key: CertificatePublicKeyTypes,
    subject_cn: str,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    if not isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise ValueError(f"cannot certify a {pki.describe_key(public_key)} key")
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
        .issuer_name(ca.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(ca.aki, critical=False)
    )


def build_vm_certificate(
    ca: CaMaterial,
    public_key: CertificatePublicKeyTypes,
    vm: str,
    trust_domain: str,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A VM client certificate: CN = uuid, exactly one URI SAN
    ``spiffe://<td>/vm/<uuid>``, keyUsage digitalSignature, EKU clientAuth, SKI/AKI."""
    vm = pki.check_vm(vm)
    builder = (
        _leaf(ca, public_key, vm, serial, not_before, not_after)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(pki.spiffe_id(trust_domain, vm))]
            ),
            critical=False,
        )
        .add_extension(_key_usage(key_encipherment=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return builder.sign(ca.key, _hash_for(ca.key))


def build_server_certificate(
    ca: CaMaterial,
    public_key: CertificatePublicKeyTypes,
    name: str,
    dns: Sequence[str],
    ips: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    trust_domain: str,
    serial: int,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """A TLS server certificate: CN = ``name``, SANs = DNS names, IPs and
    ``spiffe://<td>/server/<name>``, keyUsage digitalSignature (+ keyEncipherment for RSA),
    EKU serverAuth."""
    general: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    general += [x509.IPAddress(i) for i in ips]
    general.append(x509.UniformResourceIdentifier(pki.server_spiffe_id(trust_domain, name)))
    builder = (
        _leaf(ca, public_key, name, serial, not_before, not_after)
        .add_extension(x509.SubjectAlternativeName(general), critical=False)
        .add_extension(
            _key_usage(key_encipherment=isinstance(public_key, rsa.RSAPublicKey)), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return builder.sign(ca.key, _hash_for(ca.key))


@dataclass(frozen=True)
class Revoked:
    serial: int
    revoked_at: datetime
    reason: x509.ReasonFlags | None


def build_crl(
    ca: CaMaterial,
    revoked: Sequence[Revoked],
    number: int,
    this_update: datetime,
    next_update: datetime,
) -> x509.CertificateRevocationList:
    """A CRL with CRL number ``number`` and AKI; an entry's reasonCode is omitted for
    ``unspecified`` (RFC 5280 §5.3.1)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(this_update)
        .next_update(next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(ca.aki, critical=False)
    )
    for entry in revoked:
        rb = (
            x509.RevokedCertificateBuilder()
            .serial_number(entry.serial)
            .revocation_date(entry.revoked_at)
        )
        if entry.reason is not None and entry.reason is not x509.ReasonFlags.unspecified:
            rb = rb.add_extension(x509.CRLReason(entry.reason), critical=False)
        builder = builder.add_revoked_certificate(rb.build())
    return builder.sign(ca.key, _hash_for(ca.key))
