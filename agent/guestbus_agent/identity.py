"""The agent's identity on disk: key, certificate and CA bundle, and when to renew.

Keys are made in the guest and never leave it. New files are written next to the old ones
and swapped in with ``os.replace`` (atomic), and the previous pair is kept as ``*.prev``
until the new one has worked once, so a failed renewal can never leave the agent without
a usable certificate. Runs on CPython 3.9+; needs ``cryptography`` (in the wheelhouse).
"""

import datetime
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from .files import atomic_write

CERT_NAME = "client.crt"
KEY_NAME = "client.key"
CA_NAME = "ca.pem"


class IdentityError(Exception):
    pass


def _crypto() -> "object":
    try:
        import cryptography
    except ImportError:  # pragma: no cover - the wheelhouse ships it
        raise IdentityError(
            "the 'cryptography' package is missing: certificates (IP fallback, renewal, "
            "re-enrollment) are unavailable; reinstall the agent from its ISO"
        ) from None
    return cryptography


@dataclass(frozen=True)
class CertInfo:
    vm: str
    serial: str
    not_before: datetime.datetime
    not_after: datetime.datetime

    @property
    def lifetime(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    def expired(self, now: Optional[datetime.datetime] = None) -> bool:
        return (now or utcnow()) >= self.not_after


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def renew_at(info: CertInfo, rng: Optional[random.Random] = None) -> datetime.datetime:
    """2/3 of the lifetime plus up to 5 % of it as jitter, so a fleet does not renew at once."""
    rng = rng or random.Random()
    offset = info.lifetime * (2.0 / 3.0) + rng.uniform(0, info.lifetime * 0.05)
    return info.not_before + datetime.timedelta(seconds=offset)


class Identity:
    """The files under ``<state_dir>/tls``."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "tls"

    @property
    def cert_path(self) -> Path:
        return self.dir / CERT_NAME

    @property
    def key_path(self) -> Path:
        return self.dir / KEY_NAME

    @property
    def ca_path(self) -> Path:
        return self.dir / CA_NAME

    def present(self) -> bool:
        return self.cert_path.exists() and self.key_path.exists() and self.ca_path.exists()

    def info(self) -> Optional[CertInfo]:
        if not self.cert_path.exists():
            return None
        return cert_info(self.cert_path.read_bytes())

    def new_key_and_csr(self, vm: str) -> Tuple[bytes, bytes]:
        """A fresh EC P-256 key (PEM, unencrypted: it is protected by file mode) and a CSR."""
        _crypto()
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vm)]))
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return key_pem, csr.public_bytes(serialization.Encoding.PEM)

    def install(self, key_pem: bytes, cert_pem: bytes, ca_pem: bytes) -> CertInfo:
        """Swap in a new key and certificate; the previous ones stay as ``*.prev``."""
        info = cert_info(cert_pem)
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(str(self.dir), 0o700)
        for path in (self.cert_path, self.key_path):
            if path.exists():
                prev = path.with_name(path.name + ".prev")
                os.replace(str(path), str(prev))
        atomic_write(self.key_path, key_pem, 0o600)
        atomic_write(self.cert_path, cert_pem, 0o644)
        atomic_write(self.ca_path, ca_pem, 0o644)
        return info

    def confirm(self) -> None:
        """The new certificate worked once: drop the previous pair."""
        for name in (CERT_NAME, KEY_NAME):
            prev = self.dir / (name + ".prev")
            if prev.exists():
                prev.unlink()

    def rollback(self) -> bool:
        """Go back to the previous pair (the new one did not work); True if there was one."""
        prev_cert = self.dir / (CERT_NAME + ".prev")
        prev_key = self.dir / (KEY_NAME + ".prev")
        if not (prev_cert.exists() and prev_key.exists()):
            return False
        os.replace(str(prev_cert), str(self.cert_path))
        os.replace(str(prev_key), str(self.key_path))
        return True


def cert_info(pem: bytes) -> CertInfo:
    _crypto()
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate: {exc}") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    vm = str(cns[0].value) if cns else ""
    return CertInfo(
        vm=vm,
        serial=format(cert.serial_number, "x"),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )
