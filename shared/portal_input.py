"""Sealed portal input: secrets the portal seals to Clave's public key before publishing.

The portal may send the security answers (`sealed_answers`), a new key
(`sealed_new_password`) and the login key (`sealed_key`) sealed instead of in the clear, so
the portal input topics, their DLQs and any copy of them hold only ciphertext. The reading
service opens them: identity the answers, tokens the new key, password the login key.

The scheme is HPKE (RFC 9180), base mode, single shot, suite DHKEM(X25519, HKDF-SHA256),
HKDF-SHA256, ChaCha20-Poly1305, from `cryptography` (already a pinned dependency: no new
library, and HPKE has implementations for every language a portal may be written in).
A sealed field is `base64url(enc || ciphertext)` (padding optional). The HPKE `info` binds
each ciphertext to its place: `clave-portal-input/v1|<topic>|<field>|<id>`, where `<id>` is
the record's `request_id` (requests, resets), `check_id` (login) or `update_id` (contact
updates): a sealed value copied into another field or another record does not open.

`PORTAL_INPUT=sealed` (production's default) refuses the plaintext fields; `any`
(development's default) takes either. Refusals are `BadInput`s with their own reasons, so
the record goes to the DLQ and the handler answers the portal as it expects.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.hpke import AEAD, KDF, KEM, Suite

from shared.envelope import BadInput, DeadLetterReason
from shared.schemas import check_answers

SUITE = Suite(KEM.X25519, KDF.HKDF_SHA256, AEAD.CHACHA20_POLY1305)
INFO_PREFIX = "clave-portal-input/v1"
SEALED_MAX_CHARS = 8192  # schema bound of a sealed field (a sealed answer set stays far below)

Mode = Literal["sealed", "any"]


class InputReason:
    """The portal's outcome reasons for refused portal input."""

    PLAINTEXT_REFUSED = "plaintext_refused"  # PORTAL_INPUT=sealed and a secret came in the clear
    SEALED_INVALID = "sealed_invalid"  # a sealed field that does not open (wrong key, context, bytes)


class InputRefused(BadInput):
    """Portal input refused for how its secrets came: dead-lettered (`reason`), and the
    handler answers the portal with `portal_reason`."""

    def __init__(self, reason: str, portal_reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.portal_reason = portal_reason


def _unopenable(detail: str) -> InputRefused:
    return InputRefused(DeadLetterReason.UNDECRYPTABLE, InputReason.SEALED_INVALID, detail)


def context_info(topic: str, field: str, ref: str) -> bytes:
    """The HPKE `info` of one sealed field: which topic, which field, which record."""
    return f"{INFO_PREFIX}|{topic}|{field}|{ref}".encode()


def seal(public_key: X25519PublicKey, plaintext: bytes, *, topic: str, field: str, ref: str) -> str:
    """What the portal does (the client library has its own copy of these few lines)."""
    ciphertext = SUITE.encrypt(plaintext, public_key, context_info(topic, field, ref))
    return base64.urlsafe_b64encode(ciphertext).decode().rstrip("=")


def seal_text(public_key: X25519PublicKey, text: str, *, topic: str, field: str, ref: str) -> str:
    return seal(public_key, text.encode(), topic=topic, field=field, ref=ref)


def seal_answers(public_key: X25519PublicKey, answers: dict[str, str], *, topic: str, ref: str) -> str:
    plaintext = json.dumps(answers, ensure_ascii=False, separators=(",", ":")).encode()
    return seal(public_key, plaintext, topic=topic, field="answers", ref=ref)


def load_private_key(path: str) -> X25519PrivateKey:
    """An X25519 private key from a PEM file (PKCS#8, unencrypted). Raises ValueError."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ValueError(f"cannot read the file ({exc.__class__.__name__})") from None
    except (ValueError, TypeError):
        raise ValueError("not an unencrypted PEM private key") from None
    if not isinstance(key, X25519PrivateKey):
        raise ValueError("not an X25519 key")
    return key


def load_public_key(path: str) -> X25519PublicKey:
    """The public key the portal seals to, from its PEM file (SubjectPublicKeyInfo)."""
    key = serialization.load_pem_public_key(Path(path).read_bytes())
    if not isinstance(key, X25519PublicKey):
        raise ValueError("not an X25519 public key")
    return key


def private_pem(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_key_pair(private: Path, public: Path) -> list[Path]:
    """Clave's sealing key pair, made once: the private key (0600, for the services that open
    portal input) and the public key the portal seals to (0644, not secret). A kept private
    key gets its public file again if that is missing. Returns the files written."""
    written = []
    if private.exists():
        key = load_private_key(str(private))
    else:
        key = X25519PrivateKey.generate()
        private.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        private.touch(mode=0o600)
        private.write_bytes(private_pem(key))
        written.append(private)
    if not public.exists():
        public.parent.mkdir(parents=True, exist_ok=True)
        public.write_bytes(public_pem(key.public_key()))
        public.chmod(0o644)
        written.append(public)
    return written


def key_paths(setting: str) -> list[str]:
    return [p.strip() for p in setting.split(",") if p.strip()]


def sealing_key_problems(setting: str) -> list[str]:
    """Why PORTAL_SEALING_KEY is unfit: missing, unreadable, or not an X25519 private key."""
    paths = key_paths(setting)
    if not paths:
        return ["not set: sealed portal input cannot be opened"]
    found = []
    for position, path in enumerate(paths, start=1):
        prefix = f"key {position} of {len(paths)}: " if len(paths) > 1 else ""
        try:
            load_private_key(path)
        except ValueError as exc:
            found.append(prefix + str(exc))
    return found


def check_opened_answers(answers: dict[str, str]) -> dict[str, str]:
    """Opened answers meet the bounds the schema sets on plain ones (or are refused)."""
    try:
        return check_answers(answers)
    except ValueError as exc:
        raise _unopenable(f"sealed_answers: {exc}") from None


class PortalInput:
    """Reads the secret fields of portal input under the configured mode.

    `PORTAL_SEALING_KEY` is a PEM file path, or several comma-separated during a rotation
    (every key is tried: publish the new public key, then drop the old private key once the
    portal's in-flight records, kept one hour, are past)."""

    def __init__(self, mode: Mode, sealing_key: str) -> None:
        self.mode = mode
        self.keys = [load_private_key(p) for p in key_paths(sealing_key)]

    def secret(self, plain: str | None, sealed: str | None, *, topic: str, field: str, ref: str) -> str:
        """The secret as typed, from whichever form came (the schema ensures exactly one)."""
        if sealed is not None:
            try:
                return self.open(sealed, topic=topic, field=field, ref=ref).decode()
            except UnicodeDecodeError:
                raise _unopenable(f"sealed_{field}: not UTF-8 text") from None
        if plain is None:
            raise BadInput(DeadLetterReason.SCHEMA_INVALID, f"{field}: missing")
        self.check_plain(field)
        return plain

    def answers(self, plain: dict[str, str] | None, sealed: str | None, *, topic: str, ref: str) -> dict[str, str]:
        """The security answers (a JSON object of question id -> answer when sealed)."""
        if sealed is None:
            if plain is None:
                raise BadInput(DeadLetterReason.SCHEMA_INVALID, "answers: missing")
            self.check_plain("answers")
            return plain
        try:
            value = json.loads(self.open(sealed, topic=topic, field="answers", ref=ref))
        except ValueError:
            raise _unopenable("sealed_answers: not a JSON object") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise _unopenable("sealed_answers: not an object of strings")
        return value

    def check_plain(self, field: str) -> None:
        if self.mode == "sealed":
            raise InputRefused(
                DeadLetterReason.PLAINTEXT_REFUSED,
                InputReason.PLAINTEXT_REFUSED,
                f"{field} in the clear; PORTAL_INPUT=sealed needs sealed_{field}",
            )

    def open(self, sealed: str, *, topic: str, field: str, ref: str) -> bytes:
        try:
            ciphertext = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        except (binascii.Error, ValueError):
            raise _unopenable(f"sealed_{field}: not base64url") from None
        info = context_info(topic, field, ref)
        for key in self.keys:
            try:
                return SUITE.decrypt(ciphertext, key, info)
            except Exception:  # noqa: BLE001, S112 - wrong key, context or bytes: try the next key
                continue
        raise _unopenable(f"sealed_{field}: does not open with PORTAL_SEALING_KEY for this record")
