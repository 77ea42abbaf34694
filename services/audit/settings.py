"""The audit read model's settings, and the auditor's (`clave audit ...`).

Both verify the producers' signatures with public keys alone (AUDIT_PUBLIC_KEYS). The
old shared HMAC key (AUDIT_HMAC_KEY) is optional: only events sealed before signatures
need it, and without it they are reported as unverifiable, never as verified.
"""

from __future__ import annotations

from typing import ClassVar

from shared.auditkeys import AuditKeyError, KeyRing
from shared.settings import DEV_AUDIT_KEY, PlatformSettings


class AuditSettings(PlatformSettings):
    audit_public_keys: str = ""  # a JSON file or folder of producers' public keys (shared/auditkeys.py)
    audit_hmac_key: str = ""  # legacy: verifies HMAC-sealed events of a log from before signatures

    def legacy_hmac_key(self) -> str | None:
        """The key legacy events are checked with. In development, the old development key, so
        a local log from before signatures still verifies; in production, only if given."""
        if self.audit_hmac_key.strip():
            return self.audit_hmac_key.strip()
        return None if self.production else DEV_AUDIT_KEY

    def hmac_keys(self) -> dict[str, str]:
        # Optional: checked (not a development key, 32 random bytes) only when given.
        extra = {"AUDIT_HMAC_KEY": self.audit_hmac_key} if self.audit_hmac_key.strip() else {}
        return {**super().hmac_keys(), **extra}

    def public_key_problems(self) -> list[str]:
        try:
            ring = KeyRing.load(self.audit_public_keys)
        except AuditKeyError as exc:
            return [f"AUDIT_PUBLIC_KEYS: {exc}"]
        return [] if len(ring) else ["AUDIT_PUBLIC_KEYS: no public key in it"]

    def problems(self) -> list[str]:
        return super().problems() + self.public_key_problems()


class AuditorSettings(AuditSettings):
    """An auditor's command line: reads audit.events (and the read model's recorded heads)
    and checks it with public keys. It holds no secret: it signs nothing and dead-letters
    nothing, so neither AUDIT_SIGNING_KEY nor DLQ_KEYS is loaded or asked for."""

    signs_audit: ClassVar[bool] = False

    def fernet_keys(self) -> dict[str, str]:
        return {}
