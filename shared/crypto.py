"""Sealing secrets for their one reader, keyed hashes and MACs.

A secret that must cross an internal topic (link token, code, new key) is
sealed with Fernet (AES-128-CBC + HMAC-SHA256) under the reader's keys, so a
dump or replay of the topic shows only ciphertext. Keys rotate: the first key
of the comma-separated list encrypts, every key decrypts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SealError(Exception):
    """The ciphertext was not made with any of our keys (or was altered)."""


class SecretBox:
    def __init__(self, keys: str) -> None:
        fernets = [Fernet(k.strip().encode()) for k in keys.split(",") if k.strip()]
        if not fernets:
            raise ValueError("at least one key is required")
        self._fernet = MultiFernet(fernets)

    def seal(self, payload: dict[str, Any]) -> str:
        return self._fernet.encrypt(json.dumps(payload, separators=(",", ":")).encode()).decode()

    def open(self, sealed: str) -> dict[str, Any]:
        try:
            value = json.loads(self._fernet.decrypt(sealed.encode()))
        except (InvalidToken, ValueError):
            raise SealError("cannot open sealed payload") from None
        if not isinstance(value, dict):
            raise SealError("sealed payload is not an object")
        return value

    def seal_bytes(self, payload: bytes) -> str:
        return self._fernet.encrypt(payload).decode()

    def open_bytes(self, sealed: str) -> bytes:
        try:
            return self._fernet.decrypt(sealed.encode())
        except InvalidToken:
            raise SealError("cannot open sealed payload") from None


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
