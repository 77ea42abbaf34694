"""The seam for sealed input: every payload the client sends passes through its `InputSealer`
before it is wrapped in an event. `PlainInput` (the default) sends the fields as typed, which
Clave accepts with `PORTAL_INPUT=any` (development). `HpkeSealer` (production: Clave runs with
`PORTAL_INPUT=sealed`) replaces the secret fields (`answers`, `new_password`, `key`) with their
sealed forms (`sealed_answers`, `sealed_new_password`, `sealed_key`) for Clave's public key.

The scheme (the contract's, docs/asyncapi.yaml): HPKE (RFC 9180) base mode, single shot, suite
DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305, from `cryptography`; a sealed
field is base64url(enc || ciphertext); the HPKE `info` is
`clave-portal-input/v1|<topic>|<field>|<id>` (`<id>`: the record's request_id, check_id or
update_id), so a sealed value opens only in its own field of its own record."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any, Protocol

from clave_portal import events as ev

INFO_PREFIX = "clave-portal-input/v1"
# Event type -> (topic, the field naming the record, the secret fields it may carry).
SECRET_FIELDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    ev.RECOVERY_REQUESTED: (ev.RECOVERY_REQUESTS, "request_id", ("answers",)),
    ev.RESET_SUBMITTED: (ev.RECOVERY_RESETS, "request_id", ("new_password",)),
    ev.LOGIN_CHECK_REQUESTED: (ev.LOGIN_CHECKS, "check_id", ("key",)),
    ev.CONTACT_UPDATE_REQUESTED: (ev.CONTACT_UPDATES, "update_id", ("key",)),
}


class InputSealer(Protocol):
    def seal(self, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """`data` as it should travel: its secret fields sealed (a new dict; never mutate)."""
        ...


class PlainInput:
    """No sealing: the secret fields travel as typed (development, `PORTAL_INPUT=any`)."""

    def seal(self, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        return dict(data)


class HpkeSealer:
    """Seals every secret field to Clave's public key (an X25519 key, PEM)."""

    def __init__(self, public_key_pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
        from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

        key = serialization.load_pem_public_key(public_key_pem)
        if not isinstance(key, X25519PublicKey):
            raise ValueError("Clave's sealing key must be an X25519 public key")
        self._key = key
        self._suite = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)

    @classmethod
    def from_file(cls, path: str | Path) -> HpkeSealer:
        """The public key Clave publishes (locally: var/portal/sealing-public.pem)."""
        return cls(Path(path).read_bytes())

    def seal(self, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        out = dict(data)
        spec = SECRET_FIELDS.get(event_type)
        if spec is None:
            return out
        topic, id_field, fields = spec
        for field in fields:
            if field not in out:
                continue
            value = out.pop(field)
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
            info = f"{INFO_PREFIX}|{topic}|{field}|{out[id_field]}".encode()
            sealed = self._suite.encrypt(text.encode(), self._key, info)
            out[f"sealed_{field}"] = base64.urlsafe_b64encode(sealed).decode().rstrip("=")
        return out
