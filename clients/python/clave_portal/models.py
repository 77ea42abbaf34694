"""What Clave answers, as the portal reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class Outcome:
    """An answer on `recovery.outcomes`. A request is always `accepted` (whatever the account:
    no enumeration), or `rejected` with `duplicate_request` for a repeated request_id. A reset is
    `completed` (the key was changed) or `rejected` with every reason; after a rejection the same
    link works again unless a reason says otherwise (see the reason table)."""

    request_id: str
    stage: str  # "request" or "reset"
    status: str  # "accepted", "completed" or "rejected"
    reasons: tuple[str, ...] = ()
    event_id: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Outcome:
        data = event["data"]
        return cls(data["request_id"], data["stage"], data["status"], tuple(data.get("reasons", ())), event["id"])


@dataclass(frozen=True)
class LoginResult:
    """An answer on `login.results`: `valid`, or `invalid` with a reason (`key_invalid` alike
    for a wrong key and an unknown ID; `id_invalid`, `throttled`, `check_invalid`)."""

    check_id: str
    valid: bool
    reasons: tuple[str, ...] = ()
    event_id: str = ""

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> LoginResult:
        data = event["data"]
        return cls(data["check_id"], data["status"] == "valid", tuple(data.get("reasons", ())), event["id"])


@dataclass(frozen=True)
class KeyChange:
    """A citizen's key changed (`account.key_changed`): end their other sessions."""

    national_id: str  # normalised: digits only
    changed_at: datetime
    cause: str  # "recovery" or "initial"
    request_id: str | None = None
    event_id: str = field(default="", compare=False)

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> KeyChange:
        data = event["data"]
        changed = datetime.fromisoformat(str(data["changed_at"]).replace("Z", "+00:00"))
        return cls(data["national_id"], changed, data["cause"], data.get("request_id"), event["id"])


@dataclass(frozen=True)
class ContactResult:
    """An answer on `account.contact_results`: `updated` (every address on file before was told,
    live recovery links were revoked), or `rejected` with its reasons (`key_invalid` alike for a
    wrong key and an unknown ID; `throttled`; `email_invalid`, `phone_invalid`...): nothing changed."""

    update_id: str
    updated: bool
    reasons: tuple[str, ...] = ()
    event_id: str = ""

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> ContactResult:
        data = event["data"]
        return cls(data["update_id"], data["status"] == "updated", tuple(data.get("reasons", ())), event["id"])
