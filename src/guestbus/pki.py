"""X.509 helpers shared by the host services (cert-authority, the TLS gateway, iso-builder).

Host side only (Python 3.11+, ``cryptography``). What lives here:

- identities: :func:`spiffe_id` builds ``spiffe://<trust-domain>/vm/<uuid>``,
  :func:`vm_from_certificate` reads it back from a certificate (exactly one URI SAN, else a
  clear :class:`IdentityError`), :func:`csr_identity` reads what a CSR asks for;
- CSRs: :func:`make_csr` (a VM client CSR), :func:`make_server_csr` (a gateway server CSR),
  :func:`parse_csr` (load + signature check + key policy, raising :class:`CsrError`);
- keys: :func:`generate_key`, :func:`check_key` (EC P-256/P-384, RSA 2048-8192);
- PEM: ``load_pem_*`` wrappers that raise :class:`PemError` with a readable message,
  :func:`cert_pem`, :func:`csr_pem`, :func:`key_pem`;
- fingerprints and serials: :func:`fingerprint`, :func:`serial_hex`, :func:`parse_serial`;
- durations: :func:`parse_duration` (``30d``, ``12h``, ``90m``) and :func:`format_duration`.

See docs/pki.md for the CA that issues these certificates.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import NameOID

SPIFFE_SCHEME: Final = "spiffe"
VM_PATH: Final = "vm"
"""First path segment of a VM identity: ``spiffe://<td>/vm/<uuid>``."""
SERVER_PATH: Final = "server"
"""First path segment of a server identity: ``spiffe://<td>/server/<name>``."""
DEFAULT_TRUST_DOMAIN: Final = "guestbus.local"

RSA_MIN_BITS: Final = 2048
RSA_MAX_BITS: Final = 8192
EC_CURVES: Final = ("secp256r1", "secp384r1")
"""Curves accepted in CSRs (P-256, P-384)."""
MAX_PEM_BYTES: Final = 16384
"""Upper bound for a CSR or certificate in PEM accepted from a caller."""

_TRUST_DOMAIN = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,253}[a-z0-9])?$")
_VM = re.compile(r"^[0-9a-f-]{8,64}$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DNS = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class PkiError(ValueError):
    """Base of the errors below; the message says what is wrong in words a person can act on."""


class PemError(PkiError):
    """Data that is not the PEM object it should be."""


class CsrError(PkiError):
    """A CSR that cannot be used: unparsable, bad signature, or a key outside the policy."""


class IdentityError(PkiError):
    """A certificate or CSR that does not carry exactly one acceptable identity."""


# --- identities ---------------------------------------------------------------------------


def check_trust_domain(trust_domain: str) -> str:
    """Return ``trust_domain`` (lower case) or raise :class:`PkiError`."""
    td = trust_domain.strip().lower()
    if not _TRUST_DOMAIN.match(td):
        raise PkiError(
            f"trust domain {trust_domain!r} is not valid: use lower-case letters, digits, "
            "dots, '-' and '_' (e.g. guestbus.local)"
        )
    return td


def check_vm(vm: str) -> str:
    """Return the VM uuid in lower case or raise :class:`PkiError`."""
    low = vm.strip().lower()
    if not _VM.match(low):
        raise PkiError(f"{vm!r} is not a VM uuid (hex digits and '-', 8 to 64 characters)")
    return low


def check_server_name(name: str) -> str:
    """A server certificate's name: one subject token (``[A-Za-z0-9_-]``, up to 64)."""
    if not _NAME.match(name):
        raise PkiError(f"server name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ -")
    return name


def spiffe_id(trust_domain: str, vm: str) -> str:
    """``spiffe://<trust-domain>/vm/<uuid>``: the one URI SAN of a VM's client certificate."""
    return f"{SPIFFE_SCHEME}://{check_trust_domain(trust_domain)}/{VM_PATH}/{check_vm(vm)}"


def server_spiffe_id(trust_domain: str, name: str) -> str:
    """``spiffe://<trust-domain>/server/<name>``: the URI SAN of a server certificate."""
    td = check_trust_domain(trust_domain)
    return f"{SPIFFE_SCHEME}://{td}/{SERVER_PATH}/{check_server_name(name)}"


def parse_spiffe_id(uri: str) -> tuple[str, list[str]]:
    """``spiffe://td/a/b`` → ``("td", ["a", "b"])``; :class:`IdentityError` otherwise."""
    prefix = f"{SPIFFE_SCHEME}://"
    if not uri.startswith(prefix):
        raise IdentityError(f"URI SAN {uri!r} is not a spiffe:// identity")
    rest = uri[len(prefix) :]
    td, sep, path = rest.partition("/")
    if not sep or not td or any(c in uri for c in "?#") or path.endswith("/"):
        raise IdentityError(f"URI SAN {uri!r} is not a valid spiffe id (spiffe://<td>/<path>)")
    segments = path.split("/")
    if any(not s or s in (".", "..") for s in segments):
        raise IdentityError(f"URI SAN {uri!r} has an empty or relative path segment")
    return td.lower(), segments


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """Every URI in the subjectAltName extension (empty without one)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def common_name(name: x509.Name) -> str | None:
    """The (first) CN of ``name``, or None."""
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def vm_from_certificate(cert: x509.Certificate, trust_domain: str | None = None) -> str:
    """The VM uuid a client certificate identifies.

    The certificate must carry exactly one URI SAN, ``spiffe://<trust-domain>/vm/<uuid>``
    (with ``trust_domain`` checked when given). Anything else raises :class:`IdentityError`.
    The caller still has to verify the chain: this only reads the identity.
    """
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise IdentityError(
            f"a VM certificate must carry exactly one URI SAN naming the VM; this one has "
            f"{len(uris)}" + (f" ({', '.join(uris)})" if uris else "")
        )
    return vm_from_spiffe_id(uris[0], trust_domain)


def vm_from_spiffe_id(uri: str, trust_domain: str | None = None) -> str:
    """The VM uuid in ``spiffe://<td>/vm/<uuid>``; :class:`IdentityError` otherwise."""
    td, segments = parse_spiffe_id(uri)
    if trust_domain is not None and td != check_trust_domain(trust_domain):
        raise IdentityError(
            f"identity {uri!r} belongs to trust domain {td!r}, not {trust_domain.lower()!r}"
        )
    if len(segments) != 2 or segments[0] != VM_PATH:
        raise IdentityError(f"identity {uri!r} does not name a VM (spiffe://<td>/vm/<uuid>)")
    try:
        return check_vm(segments[1])
    except PkiError as exc:
        raise IdentityError(f"identity {uri!r}: {exc}") from None


def csr_identity(csr: x509.CertificateSigningRequest) -> tuple[str | None, list[str]]:
    """What a CSR asks to be: its subject CN (or None) and its requested URI SANs."""
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))
    except x509.ExtensionNotFound:
        uris = []
    return common_name(csr.subject), uris


# --- keys ---------------------------------------------------------------------------------


def generate_key(kind: str = "ec-p256") -> CertificateIssuerPrivateKeyTypes:
    """A new private key: ``ec-p256`` (default), ``ec-p384``, ``rsa-2048``, ``rsa-3072``,
    ``rsa-4096``."""
    if kind == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("rsa-") and kind[4:].isdigit():
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[4:]))
    raise PkiError(f"unknown key kind {kind!r}: use ec-p256, ec-p384 or rsa-<bits>")


def describe_key(key: CertificatePublicKeyTypes | PrivateKeyTypes) -> str:
    """``EC P-256``, ``RSA 2048``, ``Ed25519``… for messages."""
    if isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey)):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"EC {names.get(key.curve.name, key.curve.name)}"
    if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)):
        return f"RSA {key.key_size}"
    return type(key).__name__.lstrip("_").removesuffix("PublicKey").removesuffix("PrivateKey")


def check_key(key: CertificatePublicKeyTypes) -> None:
    """Raise :class:`CsrError` unless ``key`` is EC P-256/P-384 or RSA 2048-8192 bits."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name in EC_CURVES:
            return
    elif isinstance(key, rsa.RSAPublicKey):
        if RSA_MIN_BITS <= key.key_size <= RSA_MAX_BITS:
            return
        raise CsrError(
            f"the CSR's RSA key has {key.key_size} bits; RSA keys must have "
            f"{RSA_MIN_BITS} to {RSA_MAX_BITS} bits"
        )
    raise CsrError(
        f"the CSR's key is {describe_key(key)}; accepted keys are EC P-256, EC P-384 and "
        f"RSA {RSA_MIN_BITS}-{RSA_MAX_BITS}"
    )


def _signature_hash(key: PrivateKeyTypes) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _signing_key(key: PrivateKeyTypes) -> CertificateIssuerPrivateKeyTypes:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise PkiError(f"cannot sign with a {describe_key(key)} key: use EC or RSA")
    return key


# --- CSRs ---------------------------------------------------------------------------------


def make_csr(key: PrivateKeyTypes, vm: str, trust_domain: str | None = None) -> bytes:
    """A PEM CSR for VM ``vm``: subject CN = the uuid; with ``trust_domain``, also the
    requested URI SAN ``spiffe://<td>/vm/<uuid>`` (the CA sets it either way)."""
    signer = _signing_key(key)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, check_vm(vm))])
    )
    if trust_domain is not None:
        san = x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(spiffe_id(trust_domain, vm))]
        )
        builder = builder.add_extension(san, critical=False)
    return builder.sign(signer, _signature_hash(signer)).public_bytes(serialization.Encoding.PEM)


def make_server_csr(
    key: PrivateKeyTypes,
    dns: Sequence[str] = (),
    ips: Sequence[str] = (),
    name: str | None = None,
) -> bytes:
    """A PEM CSR for a TLS server (the gateway): CN = ``name`` or the first DNS name,
    subjectAltName with ``dns`` and ``ips``."""
    signer = _signing_key(key)
    general: list[x509.GeneralName] = [x509.DNSName(check_dns_name(d)) for d in dns]
    general += [x509.IPAddress(parse_ip(i)) for i in ips]
    cn = name or (dns[0] if dns else (str(ips[0]) if ips else "guestbus-server"))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder.sign(signer, _signature_hash(signer)).public_bytes(serialization.Encoding.PEM)


def parse_csr(data: str | bytes) -> x509.CertificateSigningRequest:
    """Load a PEM CSR, verify its self-signature and check its key against the policy.

    Raises :class:`CsrError` with a message that says what is wrong.
    """
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_PEM_BYTES:
        raise CsrError(f"the CSR is {len(raw)} bytes; at most {MAX_PEM_BYTES} are accepted")
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in raw:
        raise CsrError("the CSR is not PEM: expected '-----BEGIN CERTIFICATE REQUEST-----'")
    try:
        csr = x509.load_pem_x509_csr(raw)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"the CSR cannot be parsed: {_short(exc)}") from None
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"the CSR's public key cannot be read: {_short(exc)}") from None
    check_key(key)
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise CsrError(f"the CSR's signature cannot be checked: {_short(exc)}") from None
    if not valid:
        raise CsrError(
            "the CSR's signature does not verify: it was not signed by the key it carries "
            "(corrupted or tampered with)"
        )
    return csr


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --- names ----------------------------------------------------------------------------------


def check_dns_name(name: str) -> str:
    """A DNS name for a server certificate (``*.`` wildcard allowed as the first label)."""
    if len(name) > 253 or not _DNS.match(name):
        raise PkiError(f"{name!r} is not a valid DNS name")
    return name.rstrip(".").lower()


def parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value.strip())
    except ValueError:
        raise PkiError(f"{value!r} is not an IP address") from None


# --- PEM ------------------------------------------------------------------------------------


def _raw(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


def load_pem_certificate(data: str | bytes) -> x509.Certificate:
    """The first certificate in ``data``; :class:`PemError` when there is none."""
    certs = load_pem_certificates(data)
    if not certs:
        raise PemError("no PEM certificate found (expected '-----BEGIN CERTIFICATE-----')")
    return certs[0]


def load_pem_certificates(data: str | bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (possibly none)."""
    raw = _raw(data)
    if b"-----BEGIN CERTIFICATE-----" not in raw:
        return []
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise PemError(f"bad PEM certificate: {_short(exc)}") from None


def load_pem_csr(data: str | bytes) -> x509.CertificateSigningRequest:
    """A PEM CSR without any policy check (see :func:`parse_csr` for that)."""
    try:
        return x509.load_pem_x509_csr(_raw(data))
    except ValueError as exc:
        raise PemError(f"bad PEM CSR: {_short(exc)}") from None


def load_pem_crl(data: str | bytes) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(_raw(data))
    except ValueError as exc:
        raise PemError(f"bad PEM CRL: {_short(exc)}") from None


def load_pem_private_key(
    data: str | bytes, passphrase: str | bytes | None = None
) -> PrivateKeyTypes:
    """A PEM private key, decrypted with ``passphrase`` when given.

    A wrong passphrase, a missing one for an encrypted key, or corrupt data raise
    :class:`PemError`.
    """
    password = passphrase.encode() if isinstance(passphrase, str) else passphrase
    try:
        return serialization.load_pem_private_key(_raw(data), password=password)
    except TypeError as exc:
        raise PemError(f"cannot load the private key: {_short(exc)}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise PemError(
            f"cannot load the private key (wrong passphrase or corrupt data): {_short(exc)}"
        ) from None


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def csr_pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def crl_pem(crl: x509.CertificateRevocationList) -> str:
    return crl.public_bytes(serialization.Encoding.PEM).decode("ascii")


def key_pem(key: PrivateKeyTypes, passphrase: str | bytes | None = None) -> str:
    """PKCS#8 PEM; encrypted (``BestAvailableEncryption``) when ``passphrase`` is given."""
    encryption: serialization.KeySerializationEncryption
    if passphrase:
        password = passphrase.encode() if isinstance(passphrase, str) else passphrase
        encryption = serialization.BestAvailableEncryption(password)
    else:
        encryption = serialization.NoEncryption()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ).decode("ascii")


# --- fingerprints and serials ---------------------------------------------------------------


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lower-case hex without separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def fingerprint_colons(cert_or_hex: x509.Certificate | str) -> str:
    """``AB:CD:…`` form (as ``openssl x509 -fingerprint -sha256`` prints it)."""
    digest = fingerprint(cert_or_hex) if isinstance(cert_or_hex, x509.Certificate) else cert_or_hex
    up = digest.replace(":", "").upper()
    return ":".join(up[i : i + 2] for i in range(0, len(up), 2))


def spki_sha256(key: CertificatePublicKeyTypes) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo (hex): pins a key across certificates."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def serial_hex(value: int | x509.Certificate) -> str:
    """A serial number as canonical lower-case hex (no leading zeros, no separators)."""
    number = value.serial_number if isinstance(value, x509.Certificate) else value
    return format(number, "x")


def parse_serial(text: str) -> int:
    """``"0A:1b:…"``, ``"0x0a1b"`` or ``"a1b"`` → int; :class:`PkiError` otherwise."""
    cleaned = text.strip().lower().replace(":", "").removeprefix("0x")
    if not cleaned or len(cleaned) > 40 or any(c not in "0123456789abcdef" for c in cleaned):
        raise PkiError(f"{text!r} is not a certificate serial (hex, up to 20 bytes)")
    return int(cleaned, 16)


def canonical_serial(text: str) -> str:
    """Any accepted spelling of a serial → the canonical hex used in keys and replies."""
    return serial_hex(parse_serial(text))


# --- durations and time ------------------------------------------------------------------------


def parse_duration(text: str | float) -> float:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"2w"`` or a number of seconds → seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise PkiError(f"a duration cannot be negative (got {text})")
        return float(text)
    m = _DURATION.match(str(text))
    if not m:
        raise PkiError(
            f"{text!r} is not a duration: use a number with s, m, h, d or w (e.g. 30d, 12h, 90m)"
        )
    return float(m.group(1)) * _UNITS[m.group(2).lower()]


def format_duration(seconds: float) -> str:
    """Seconds → a short human form: ``45s``, ``12m``, ``5h``, ``29d``; negative → ``-5h``."""
    sign = "-" if seconds < 0 else ""
    s = abs(seconds)
    if s < 120:
        return f"{sign}{s:.0f}s"
    if s < 2 * 3600:
        return f"{sign}{s / 60:.0f}m"
    if s < 2 * 86400:
        return f"{sign}{s / 3600:.0f}h"
    return f"{sign}{s / 86400:.0f}d"


def not_after(cert: x509.Certificate) -> datetime:
    return cert.not_valid_after_utc


def not_before(cert: x509.Certificate) -> datetime:
    return cert.not_valid_before_utc


def utcnow() -> datetime:
    return datetime.now(UTC)


def names_of(values: Iterable[x509.GeneralName]) -> list[str]:
    """General names as text (DNS names, IPs, URIs) for display."""
    out: list[str] = []
    for v in values:
        out.append(str(v.value))
    return out
