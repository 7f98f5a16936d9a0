"""First start and every start: the CA passphrase, and loading (or once creating) the CA.

Rules (docs/pki.md):

- The passphrase comes from ``GUESTBUS_CA_PASSPHRASE`` or ``GUESTBUS_CA_PASSPHRASE_FILE``;
  with neither, the embedded default keeps a generated one in ``<state_dir>/ca-passphrase``
  (mode 0600), generated only when this replica creates the CA.
- The CA is created only when the bucket holds neither ``ca.key`` nor ``ca.cert``; both are
  written with ``create``, so replicas racing on an empty bucket end with ONE CA (the losers
  load the winner's).
- A CA key that cannot be decrypted, a certificate without its key, or a certificate that
  does not match the key stop the service with :class:`CaStartupError` — never a new CA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from guestbus import pki
from guestbus.contract import CERTS_KEY_CA_CERT, CERTS_KEY_CA_KEY, KV_CERTS

from .authority import (
    CaKeyMismatch,
    CaMaterial,
    build_ca_certificate,
    check_ca_certificate,
    generate_ca_key,
)
from .settings import CaSettings
from .store import CertStore

PASSPHRASE_FILE = "ca-passphrase"
CA_PEM_FILE = "ca.pem"
CRL_PEM_FILE = "crl.pem"
CERT_WAIT = 5.0
"""How long a replica that lost the key race waits for the winner's certificate."""
ENV_PASSPHRASE = "GUESTBUS_CA_PASSPHRASE"
ENV_PASSPHRASE_FILE = "GUESTBUS_CA_PASSPHRASE_FILE"


CaKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CaStartupError(Exception):
    """The CA cannot start safely; the message says what to fix. Not retried."""


@dataclass
class PassphraseSource:
    """Where the passphrase comes from; ``value`` is None until generated (default only)."""

    value: bytes | None
    source: str
    generated_path: Path | None = None
    """Set for the embedded default: where a generated passphrase is (or would be) kept."""
    generated_now: bool = False


def _read_secret_file(path: Path, what: str) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CaStartupError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    value = raw.rstrip(b"\r\n")
    if not value:
        raise CaStartupError(f"{what}: {path} is empty")
    return value


def resolve_passphrase(settings: CaSettings, log: logging.Logger) -> PassphraseSource:
    """The configured passphrase, or the embedded default's file (maybe not generated yet)."""
    if settings.ca_passphrase is not None:
        value = settings.ca_passphrase.get_secret_value().encode()
        if not value:
            raise CaStartupError(f"{ENV_PASSPHRASE} is set but empty")
        return PassphraseSource(value, ENV_PASSPHRASE)
    if settings.ca_passphrase_file:
        path = Path(settings.ca_passphrase_file)
        value = _read_secret_file(path, ENV_PASSPHRASE_FILE)
        return PassphraseSource(value, f"{ENV_PASSPHRASE_FILE} ({path})")
    path = settings.state_dir / PASSPHRASE_FILE
    source = (
        f"the generated passphrase in {path} "
        f"(neither {ENV_PASSPHRASE} nor {ENV_PASSPHRASE_FILE} is set)"
    )
    if path.exists():
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("%s is readable by group/others (mode %o); tightening to 0600", path, mode)
            with contextlib.suppress(OSError):
                path.chmod(0o600)
        return PassphraseSource(
            _read_secret_file(path, "CA passphrase file"), source, generated_path=path
        )
    return PassphraseSource(None, source, generated_path=path)


def generate_passphrase(source: PassphraseSource, log: logging.Logger) -> bytes:
    """Create the embedded default's passphrase file (mode 0600) unless another process on
    this state directory just did; returns the passphrase in the file."""
    assert source.generated_path is not None
    path = source.generated_path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    value = secrets.token_urlsafe(32).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # atomic "create if absent", complete content
        source.generated_now = True
        log.warning(
            "generated a CA passphrase in %s (mode 0600); keep it with the cluster's secrets: "
            "the CA key in KV %s cannot be used without it. Replicas on other machines need "
            "the same passphrase: set %s or %s there",
            path,
            KV_CERTS,
            ENV_PASSPHRASE,
            ENV_PASSPHRASE_FILE,
        )
    except FileExistsError:
        value = _read_secret_file(path, "CA passphrase file")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    source.value = value
    return value


def _fatal_decrypt(source: PassphraseSource, detail: str) -> CaStartupError:
    return CaStartupError(
        f"cannot decrypt the cluster CA private key (KV {KV_CERTS}, key {CERTS_KEY_CA_KEY}) "
        f"with {source.source}: {detail}. Set {ENV_PASSPHRASE} or {ENV_PASSPHRASE_FILE} to "
        "the passphrase the CA was created with. The service will not create a new CA while "
        "one exists."
    )


async def load_or_create_ca(
    store: CertStore, settings: CaSettings, log: logging.Logger
) -> CaMaterial:
    """Load the cluster CA from KV, creating it if (and only if) the bucket has none."""
    source = resolve_passphrase(settings, log)
    # The creator writes the key before the certificate, so read in the opposite order: a
    # certificate seen here means its key was already there (no false "key missing" while
    # another replica is half-way through creating the CA).
    cert_raw, _ = await store.get(CERTS_KEY_CA_CERT)
    key_raw, _ = await store.get(CERTS_KEY_CA_KEY)
    key: CaKey | None = None
    created = False
    if key_raw is None:
        if cert_raw is not None:
            raise CaStartupError(
                f"KV {KV_CERTS} holds a CA certificate ({CERTS_KEY_CA_CERT}) but no CA key "
                f"({CERTS_KEY_CA_KEY}); refusing to create a new CA over it. Restore the key "
                "or, to start over deliberately, delete both keys from the bucket."
            )
        passphrase = source.value or generate_passphrase(source, log)
        new_key = generate_ca_key()
        if await store.create(CERTS_KEY_CA_KEY, pki.key_pem(new_key, passphrase).encode()):
            key, created = new_key, True
            log.info("created a new cluster CA key (EC P-256) in KV %s", KV_CERTS)
        else:
            if source.generated_now and source.generated_path is not None:
                # another replica won with its own passphrase: ours protects nothing
                with contextlib.suppress(OSError):
                    source.generated_path.unlink()
                source.value = None
            key_raw, _ = await store.get(CERTS_KEY_CA_KEY)
            if key_raw is None:
                raise CaStartupError(
                    f"lost the race to create the CA key but {CERTS_KEY_CA_KEY} is not in KV "
                    f"{KV_CERTS}; retry"
                )
    if key is None:
        assert key_raw is not None
        if source.value is None:
            raise CaStartupError(
                f"the cluster CA key in KV {KV_CERTS} is encrypted and no passphrase is "
                f"available: set {ENV_PASSPHRASE} or {ENV_PASSPHRASE_FILE} (or restore "
                f"{source.generated_path}). The service will not create a new CA while one exists."
            )
        try:
            loaded = pki.load_pem_private_key(key_raw, source.value)
        except pki.PemError:
            raise _fatal_decrypt(source, "wrong passphrase or corrupt key") from None
        if not isinstance(loaded, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
            raise _fatal_decrypt(source, f"it is a {pki.describe_key(loaded)} key, not EC or RSA")
        key = loaded
    cert = await _ensure_certificate(store, settings, key, cert_raw, created, log)
    try:
        check_ca_certificate(cert)
        material = CaMaterial(cert=cert, key=key)
    except (CaKeyMismatch, ValueError) as exc:
        raise CaStartupError(
            f"the CA certificate in KV {KV_CERTS} ({CERTS_KEY_CA_CERT}) is unusable: {exc}"
        ) from None
    write_atomic(settings.state_dir / CA_PEM_FILE, material.cert_pem.encode(), 0o644)
    return material


async def _ensure_certificate(
    store: CertStore,
    settings: CaSettings,
    key: CaKey,
    cert_raw: bytes | None,
    created: bool,
    log: logging.Logger,
) -> x509.Certificate:
    if cert_raw is None and not created:
        # the winner of the key race writes the certificate right after: give it a moment
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CERT_WAIT
        while cert_raw is None and loop.time() < deadline:
            await asyncio.sleep(0.05)
            cert_raw, _ = await store.get(CERTS_KEY_CA_CERT)
    if cert_raw is None:
        # nobody wrote it (first start, or a creator that died after writing the key): any
        # holder of the key may; create() keeps the first
        now = datetime.now(UTC).replace(microsecond=0)
        cert = build_ca_certificate(key, now, timedelta(seconds=settings.ca_lifetime))
        if await store.create(CERTS_KEY_CA_CERT, pki.cert_pem(cert).encode()):
            log.info(
                "created the cluster CA certificate",
                extra={
                    "fingerprint": pki.fingerprint(cert),
                    "not_after": str(cert.not_valid_after_utc),
                },
            )
            return cert
        cert_raw, _ = await store.get(CERTS_KEY_CA_CERT)
        if cert_raw is None:  # pragma: no cover - deleted in between
            raise CaStartupError(f"{CERTS_KEY_CA_CERT} vanished from KV {KV_CERTS}; retry")
    try:
        return pki.load_pem_certificate(cert_raw)
    except pki.PemError as exc:
        raise CaStartupError(
            f"the CA certificate in KV {KV_CERTS} ({CERTS_KEY_CA_CERT}) is corrupt: {exc}"
        ) from None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``path`` via a temporary file and rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
