"""Settings of the cert-authority (``GUESTBUS_*`` environment variables, see docs/pki.md)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from guestbus import pki
from guestbus.runtime import ServiceSettings

DAY = 86400
COMPAT_LIFETIME = 1000 * DAY
"""The reference system's client-certificate lifetime (``GUESTBUS_CERT_COMPAT_1000_DAYS``)."""


def _duration(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return int(pki.parse_duration(value))
        except pki.PkiError as exc:
            raise PydanticCustomError("duration", str(exc)) from None
    return value


class CaSettings(ServiceSettings):
    """Durations accept seconds or ``30d`` / ``12h`` / ``90m`` forms."""

    trust_domain: str = Field(
        default=pki.DEFAULT_TRUST_DOMAIN,
        description="SPIFFE trust domain of VM identities: spiffe://<trust-domain>/vm/<uuid>.",
    )
    ca_passphrase: SecretStr | None = Field(
        default=None, description="Passphrase that encrypts the CA private key in KV."
    )
    ca_passphrase_file: str | None = Field(
        default=None, description="File holding the CA passphrase (a mounted secret)."
    )
    vm_cert_lifetime: int = Field(
        default=90 * DAY, ge=60, description="Maximum (and default) VM certificate lifetime (s)."
    )
    cert_compat_1000_days: bool = Field(
        default=False,
        description="VM certificates last 1000 days, like the reference system (overrides "
        "GUESTBUS_VM_CERT_LIFETIME).",
    )
    server_cert_lifetime: int = Field(
        default=30 * DAY, ge=60, description="Maximum (and default) server certificate lifetime."
    )
    ca_lifetime: int = Field(
        default=3652 * DAY, ge=DAY, description="Lifetime of a newly created cluster CA (s)."
    )
    crl_lifetime: int = Field(
        default=DAY, ge=60, description="CRL validity (nextUpdate - thisUpdate), seconds."
    )
    ca_scan_interval: float = Field(
        default=60.0,
        gt=0,
        description="How often the certificate view (metrics) is refreshed and the CRL checked.",
    )
    cert_retention: int = Field(
        default=30 * DAY,
        ge=0,
        description="Records of certificates expired longer than this are purged; 0 keeps them.",
    )
    ca_concurrency: int = Field(
        default=64, ge=1, le=4096, description="Signing requests handled at once per replica."
    )

    _normalise_durations = field_validator(
        "vm_cert_lifetime",
        "server_cert_lifetime",
        "ca_lifetime",
        "crl_lifetime",
        "cert_retention",
        mode="before",
    )(_duration)

    @field_validator("ca_scan_interval", mode="before")
    @classmethod
    def _scan_duration(cls, value: Any) -> Any:
        return _duration(value)

    @field_validator("trust_domain")
    @classmethod
    def _trust_domain(cls, value: str) -> str:
        try:
            return pki.check_trust_domain(value)
        except pki.PkiError as exc:
            raise PydanticCustomError("trust_domain", str(exc)) from None

    @model_validator(mode="after")
    def _one_passphrase_source(self) -> CaSettings:
        if self.ca_passphrase is not None and self.ca_passphrase_file:
            raise ValueError("set GUESTBUS_CA_PASSPHRASE or GUESTBUS_CA_PASSPHRASE_FILE, not both")
        return self

    @property
    def max_vm_lifetime(self) -> int:
        """The effective maximum VM certificate lifetime in seconds."""
        return COMPAT_LIFETIME if self.cert_compat_1000_days else self.vm_cert_lifetime
