"""Operator command signatures: every command on `identity.commands` is signed with its
operator's own Ed25519 key (one key pair per operator; the private key is a PEM file that
only the operator holds, e.g. on a hardware-backed workstation), and identity verifies it
against its registry of operator public keys (`identity.operator_keys`, written by `admin`).

What is signed: the event type and every field of the command's `data` except `signature`,
as canonical JSON (sorted keys, no spaces), after a fixed domain prefix. So a signature
cannot be moved to another command type (an `unlock` signature is no `update-email`), nor
to another account, e-mail, command id or time. Identity verifies the bytes as they arrived
(the event's `data`), never a re-serialisation of them.

The key id (`key_id`) is the first 16 hex digits of SHA-256 of the raw public key, as for
the audit keys (shared/auditkeys.py).
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.audit import canonical
from shared.auditkeys import kid_of, raw_public, read_ed25519_private

DOMAIN = b"clave operator command v1\n"
SIGNATURE_FIELD = "signature"


class OperatorKeyError(ValueError):
    """A key file or public key that cannot be used (the message names the file, never key bytes)."""


def signing_bytes(event_type: str, data: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in data.items() if k != SIGNATURE_FIELD}
    return DOMAIN + canonical({"type": event_type, "data": unsigned})


def sign(key: Ed25519PrivateKey, event_type: str, data: dict[str, Any]) -> str:
    return base64.b64encode(key.sign(signing_bytes(event_type, data))).decode()


def verify(public_key: Ed25519PublicKey, event_type: str, data: dict[str, Any]) -> bool:
    """True when `data[signature]` is the key's signature of this command; never raises."""
    signature = data.get(SIGNATURE_FIELD)
    if not isinstance(signature, str):
        return False
    try:
        raw = base64.b64decode(signature, validate=True)
        public_key.verify(raw, signing_bytes(event_type, data))
    except (binascii.Error, ValueError, InvalidSignature):
        return False
    return True


def public_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(raw_public(key)).decode()


def public_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise OperatorKeyError("not the base64 of a raw 32-byte Ed25519 public key") from None


def key_id(key: Ed25519PublicKey) -> str:
    return kid_of(key)


def load_private(path: str | Path) -> Ed25519PrivateKey:
    """An operator's private key file (PEM, PKCS#8, unencrypted)."""
    return read_ed25519_private(Path(path), OperatorKeyError)


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
