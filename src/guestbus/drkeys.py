"""The DR signing key pair: Ed25519, kept in KV ``gb_dr_keys``.

dr-orchestrator signs network changes with the private key; every VM's ISO carries the
public key so its agent can verify them. Whichever service needs the pair first creates it
(iso-builder usually, before any DR plan exists); replicas racing to create it agree through
create-only writes, so there is only ever one pair. The private key is written first: a
public key in KV always has its private half stored.
"""

from __future__ import annotations

import asyncio

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from guestbus.contract import DR_KEY_PRIVATE, DR_KEY_PUBLIC, KV_DR_KEYS


class DrKeyError(Exception):
    pass


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_public(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise DrKeyError("the DR verify key is not an Ed25519 public key")
    return key


async def _get(kv: KeyValue, key: str) -> bytes | None:
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None
    return entry.value or None


async def ensure_public_key(kv: KeyValue, wait: float = 10.0) -> bytes:
    """The public key (PEM), creating the pair if there is none yet."""
    existing = await _get(kv, DR_KEY_PUBLIC)
    if existing is not None:
        load_public(existing)
        return existing
    # Create-only, without reading the private key first: only dr-orchestrator may read it
    # (NATS permissions), so whoever else creates the pair never sees it again.
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        await kv.create(DR_KEY_PRIVATE, private)
    except KeyWrongLastSequenceError:
        pass  # another replica won; its public key follows
    else:
        pem = public_pem(key)
        await kv.put(DR_KEY_PUBLIC, pem)
        return pem
    # The private key exists: its creator is about to store the public key.
    deadline = asyncio.get_running_loop().time() + wait
    while asyncio.get_running_loop().time() < deadline:
        existing = await _get(kv, DR_KEY_PUBLIC)
        if existing is not None:
            load_public(existing)
            return existing
        await asyncio.sleep(0.05)
    raise DrKeyError(
        f"KV {KV_DR_KEYS} has a DR private key but no "
        "public key; the service that created it stopped half-way: restore the pair or delete "
        "the private key to make a new one (agents then need new ISOs)"
    )
