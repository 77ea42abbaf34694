"""The audit chain's keys: each producer's Ed25519 signing key, and the public keys that
verifiers accept.

Signing (`AUDIT_SIGNING_KEY`): the path of the service's private key, a PEM file
(PKCS#8, unencrypted: what `clave audit keygen` or `openssl genpkey -algorithm ed25519`
writes), readable by that service alone. Empty means the development key, which is
public in this file; production refuses it.

Verifying (`AUDIT_PUBLIC_KEYS`): a JSON file, or a folder of `*.json` files, each holding
one entry or a list of entries

    {"producer": "identity", "public_key": "<base64 of the raw 32-byte key>",
     "not_before": "2026-01-01T00:00:00Z", "not_after": null}

(`kid`, when present, must match the key). A producer may have several keys (rotation);
an event is accepted only under the key its `kid` names, and only if the event's time
lies within that key's validity. Nothing here is secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

KID_HEX = 16
# Development only: every process without AUDIT_SIGNING_KEY would sign with this one.
DEV_SIGNING_SEED = hashlib.sha256(b"clave development audit signing key - public, never for production").digest()


class AuditKeyError(ValueError):
    """A signing or public key setting that cannot be used (the message names the file)."""


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def kid_of(key: Ed25519PublicKey) -> str:
    """Key id: the first 16 hex digits of SHA-256 of the raw public key."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:KID_HEX]


def dev_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(DEV_SIGNING_SEED)


def is_dev_key(key: Ed25519PrivateKey) -> bool:
    return raw_public(key.public_key()) == raw_public(dev_signing_key().public_key())


def load_signing_key(setting: str) -> Ed25519PrivateKey:
    """AUDIT_SIGNING_KEY: a PEM file path; empty: the (public) development key."""
    if not setting.strip():
        return dev_signing_key()
    return read_ed25519_private(Path(setting.strip()), AuditKeyError)


def read_ed25519_private(path: Path, error: type[Exception]) -> Ed25519PrivateKey:
    """An Ed25519 private key file (PEM, PKCS#8, unencrypted); problems raise `error`, naming
    the file, never its content. Shared by the audit signing keys and the operators' keys."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise error(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise error(f"{path} is not an Ed25519 key")
    return key


def signing_key_problems(setting: str) -> list[str]:
    """Why AUDIT_SIGNING_KEY is unfit for production (never prints key material)."""
    if not setting.strip():
        return ["not set (the development signing key is public in the source code)"]
    try:
        key = load_signing_key(setting)
    except AuditKeyError as exc:
        return [str(exc)]
    if is_dev_key(key):
        return ["a development key (public in the source code)"]
    return []


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# ---- public keys ---------------------------------------------------------------------------


class PublicKeyEntry(BaseModel):
    """One accepted key of one producer, as written in AUDIT_PUBLIC_KEYS."""

    model_config = ConfigDict(extra="forbid")

    producer: str
    public_key: str
    kid: str | None = None
    not_before: datetime | None = None
    not_after: datetime | None = None

    @field_validator("not_before", "not_after")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("needs a time zone (e.g. 2026-01-01T00:00:00Z)")
        return value

    @classmethod
    def of(
        cls, producer: str, key: Ed25519PublicKey, not_before: datetime | None = None, not_after: datetime | None = None
    ) -> PublicKeyEntry:
        return cls(
            producer=producer,
            public_key=base64.b64encode(raw_public(key)).decode(),
            kid=kid_of(key),
            not_before=not_before,
            not_after=not_after,
        )


@dataclass(frozen=True)
class PublicKey:
    producer: str
    kid: str
    key: Ed25519PublicKey
    not_before: datetime | None
    not_after: datetime | None
    source: str = ""  # the file it was read from

    def valid_at(self, when: datetime) -> bool:
        return (self.not_before is None or when >= self.not_before) and (
            self.not_after is None or when < self.not_after
        )

    def validity(self) -> str:
        start = self.not_before.isoformat() if self.not_before else "the beginning"
        end = self.not_after.isoformat() if self.not_after else "no end"
        return f"{start} to {end}"


def _public_key(entry: PublicKeyEntry, where: str) -> PublicKey:
    try:
        raw = base64.b64decode(entry.public_key, validate=True)
        key = Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise AuditKeyError(f"{where}: public_key of {entry.producer!r} is not base64 of a raw Ed25519 key") from None
    kid = kid_of(key)
    if entry.kid is not None and entry.kid != kid:
        raise AuditKeyError(f"{where}: kid {entry.kid} of {entry.producer!r} does not match its key ({kid})")
    return PublicKey(entry.producer, kid, key, entry.not_before, entry.not_after, where)


def _entries(path: Path) -> list[PublicKey]:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AuditKeyError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
    except ValueError:
        raise AuditKeyError(f"{path}: not JSON") from None
    items = doc if isinstance(doc, list) else [doc]
    keys = []
    for n, item in enumerate(items, start=1):
        where = f"{path} entry {n}" if isinstance(doc, list) else str(path)
        try:
            entry = PublicKeyEntry.model_validate(item)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "entry"
            raise AuditKeyError(f"{where}: {field}: {first['msg']}") from None
        keys.append(_public_key(entry, where))
    return keys


class KeyRing:
    """Every public key verifiers accept, by (producer, kid)."""

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys: dict[tuple[str, str], PublicKey] = {}
        for key in keys:
            other = self._keys.get((key.producer, key.kid))
            if other is not None:
                raise AuditKeyError(
                    f"{key.source}: key {key.kid} of {key.producer!r} is listed twice (also {other.source})"
                )
            self._keys[(key.producer, key.kid)] = key

    @classmethod
    def load(cls, location: str) -> KeyRing:
        """AUDIT_PUBLIC_KEYS: one JSON file, or a folder whose `*.json` files are read."""
        if not location.strip():
            raise AuditKeyError("not set: no producer's signature can be checked")
        path = Path(location.strip())
        if path.is_dir():
            files = sorted(path.glob("*.json"))
            if not files:
                raise AuditKeyError(f"{path}: no *.json public key files")
        elif path.exists():
            files = [path]
        else:
            raise AuditKeyError(f"{path}: no such file or folder")
        return cls(key for file in files for key in _entries(file))

    def get(self, producer: str, kid: str) -> PublicKey | None:
        return self._keys.get((producer, kid))

    def knows(self, producer: str) -> bool:
        return any(p == producer for p, _ in self._keys)

    def producers(self) -> set[str]:
        return {p for p, _ in self._keys}

    def __len__(self) -> int:
        return len(self._keys)


class LiveKeyRing:
    """A key ring that can be re-read while a service runs: a new producer key (a rotation)
    is published as a file first; the first event signed with it makes the reader look
    again (at most every `min_interval` seconds, so forged key ids cannot make it spin)."""

    def __init__(self, location: str, min_interval: float = 5.0) -> None:
        self.location = location
        self.min_interval = min_interval
        self.ring = KeyRing.load(location) if location.strip() else KeyRing()
        self._loaded_at = time.monotonic()

    def reload(self) -> bool:
        """Read the keys again if allowed now; True when they were read again."""
        if not self.location.strip() or time.monotonic() - self._loaded_at < self.min_interval:
            return False
        self._loaded_at = time.monotonic()
        try:
            self.ring = KeyRing.load(self.location)
        except AuditKeyError:
            return False  # keep the last good ring; the caller counts the break
        return True
