"""Signing DR changes for agents (the agent's side is ``guestbus_agent.dr.verify``).

The payload is JSON text, signed as it is (no canonicalisation: the agent verifies the very
bytes it then parses). The signed bytes are :data:`DR_SIGNATURE_CONTEXT` followed by the
payload, so a DR signature can never be taken for a signature of anything else.
"""

from __future__ import annotations

import base64
import hashlib
import time

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from guestbus.contract import (
    DR_SIGNATURE_CONTEXT,
    DrChangePayload,
    DrNetworkChange,
    DrRunKind,
    DrScriptChange,
    DrSignedChange,
)

BACKDATE = 300.0
"""``not_before`` lies this far before the signing time: guest clocks that run a little
behind still accept a fresh change (as certificates are backdated)."""


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the key's DER SubjectPublicKeyInfo."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def load_private(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the DR signing key is not an Ed25519 private key")
    return key


class Signer:
    def __init__(self, key: Ed25519PrivateKey, validity: float = 900.0) -> None:
        self.key = key
        self.validity = validity
        self.key_id = key_id(key.public_key())

    def sign(self, payload: DrChangePayload) -> DrSignedChange:
        text = payload.model_dump_json(exclude_none=True)
        signature = self.key.sign(DR_SIGNATURE_CONTEXT + text.encode("utf-8"))
        return DrSignedChange(
            payload=text, signature=base64.b64encode(signature).decode("ascii"), key_id=self.key_id
        )

    def payload(
        self,
        *,
        run: str,
        plan: str,
        kind: DrRunKind,
        vm: str,
        network: DrNetworkChange | None = None,
        script: DrScriptChange | None = None,
        now: float | None = None,
    ) -> DrChangePayload:
        issued = time.time() if now is None else now
        return DrChangePayload(
            type="network" if network is not None else "script",
            run=run,
            plan=plan,
            kind=kind,
            vm=vm,
            issued_at=round(issued, 3),
            not_before=round(issued - BACKDATE, 3),
            not_after=round(issued + self.validity, 3),
            network=network,
            script=script,
        )
