"""Sealing secrets for their one reader, bound to what they are for; keyed hashes and MACs.

A secret that must cross an internal topic (link token and code, a new or initial key)
is sealed with Fernet (AES-128-CBC + HMAC-SHA256, a timestamp inside) under the reader's
keys, so a dump or replay of the topic shows only ciphertext. Keys rotate: the first key
of the comma-separated list encrypts, every key decrypts.

A sealed secret is bound to its context: inside the ciphertext, with the secret, are a
purpose label (what kind of secret it is) and the identifiers of the one event it was
made for (token, account, request, recipient). The reader states the purpose and context
it expects, from the event that carries the blob, and a blob made for another purpose,
token, account, request or address does not open (`SealMismatch`): a sealed value copied
into a forged event is worth nothing. The reader also gives a lifetime, checked against
Fernet's own timestamp (`SealExpired`), so an old blob cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class Purpose(StrEnum):
    """What a sealed secret is for: a blob of one kind never opens as another."""

    RECOVERY_SECRETS = "clave.recovery_secrets.v1"  # link token and code, tokens -> notifier
    NEW_KEY = "clave.new_key.v1"  # a citizen's new key, tokens -> password
    INITIAL_KEY = "clave.initial_key.v1"  # an imported account's first key, identity -> password


class SealError(Exception):
    """The ciphertext was not made with any of our keys (or was altered)."""


class SealMismatch(SealError):
    """Authentic, but made for another purpose or another event (token, account, ...)."""


class SealExpired(SealError):
    """Authentic and for this event, but older than its lifetime (or dated in the future)."""


def recipient_hash(email: str) -> str:
    """The address a sealed link and code are bound to (a hash: the blob need not carry it)."""
    return sha256_hex(email)


def recovery_secrets_context(*, token_id: str, account_id: str, request_id: str, email: str) -> dict[str, str]:
    return {
        "token_id": token_id,
        "account_id": account_id,
        "request_id": request_id,
        "recipient": recipient_hash(email),
    }


def new_key_context(*, token_id: str, account_id: str, request_id: str) -> dict[str, str]:
    return {"token_id": token_id, "account_id": account_id, "request_id": request_id}


def initial_key_context(*, account_id: str) -> dict[str, str]:
    return {"account_id": account_id}


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class SecretBox:
    def __init__(self, keys: str) -> None:
        fernets = [Fernet(k.strip().encode()) for k in keys.split(",") if k.strip()]
        if not fernets:
            raise ValueError("at least one key is required")
        self._fernet = MultiFernet(fernets)

    def seal(
        self, payload: dict[str, Any], *, purpose: Purpose, context: Mapping[str, str], at: int | None = None
    ) -> str:
        """Seal `payload` for one use: `purpose`, and the event identified by `context`.
        `at` (Unix seconds) dates it otherwise than now: only tests need that."""
        body = _canonical({"purpose": str(purpose), "context": dict(context), "data": payload})
        if at is None:
            return self._fernet.encrypt(body).decode()
        return self._fernet.encrypt_at_time(body, at).decode()

    def open(self, sealed: str, *, purpose: Purpose, context: Mapping[str, str], ttl_s: int | None) -> dict[str, Any]:
        """The payload, if `sealed` is ours, for `purpose` and `context`, and (unless `ttl_s` is
        None) at most `ttl_s` seconds old. Raises SealError, SealMismatch or SealExpired."""
        plain = self._decrypt(sealed)
        try:
            body = json.loads(plain)
        except ValueError:
            raise SealError("sealed payload is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
            raise SealError("sealed payload is not an object")
        if body.get("purpose") != str(purpose):
            raise SealMismatch("sealed for another purpose")
        bound = body.get("context")
        if not isinstance(bound, dict) or bound.keys() != context.keys():
            raise SealMismatch("sealed for another kind of event")
        # Names only, never values: the detail goes into DLQ headers and logs.
        differ = sorted(k for k in context if not hmac.compare_digest(_canonical(bound[k]), _canonical(context[k])))
        if differ:
            raise SealMismatch(f"sealed for another {', '.join(differ)}")
        if ttl_s is not None:
            self._check_lifetime(sealed, ttl_s)
        data: dict[str, Any] = body["data"]
        return data

    def _decrypt(self, sealed: str) -> bytes:
        try:
            return self._fernet.decrypt(sealed.encode())
        except (InvalidToken, ValueError):
            raise SealError("cannot open sealed payload") from None

    def _check_lifetime(self, sealed: str, ttl_s: int) -> None:
        # Fernet's own check (its timestamp, and at most 60 s of clock skew into the future);
        # the token is known to be authentic here, so a refusal can only mean its age.
        try:
            self._fernet.decrypt(sealed.encode(), ttl=ttl_s)
        except InvalidToken:
            raise SealExpired(f"sealed more than {ttl_s} s ago (or dated in the future)") from None

    def seal_bytes(self, payload: bytes) -> str:
        return self._fernet.encrypt(payload).decode()

    def open_bytes(self, sealed: str) -> bytes:
        return self._decrypt(sealed)


def keyed_hash(key: str, value: str) -> str:
    """Pseudonym for a personal value (e.g. a national ID): stable, not reversible without the key."""
    return hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def sha256_hex(value: bytes | str) -> str:
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()


def mac(key: str, message: bytes) -> str:
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())
