"""What Clave answers, as the portal reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, cast

Stage = Literal["request", "reset"]
Status = Literal["accepted", "completed", "rejected"]
Profile = Literal["affiliate", "employer"]
Locale = Literal["es", "en"]


class Reason:
    """The reason codes the portal may see (docs/asyncapi.yaml: `RequestOutcomeReason`,
    `ResetReason`, `LoginReason`, `ContactResultReason`), those a portal acts on by name.
    Stable codes, only ever added to: show an unknown one as a generic failure."""

    # A request, `rejected` (else it is always `accepted`, whatever the account).
    DUPLICATE_REQUEST = "duplicate_request"  # the same request_id again: the first answer stands
    REQUEST_INVALID = "request_invalid"  # Clave could not process it (a field missing or malformed)
    # Either stage: a secret refused for how it came.
    PLAINTEXT_REFUSED = "plaintext_refused"  # in the clear while Clave wants it sealed
    SEALED_INVALID = "sealed_invalid"  # sealed, but not to Clave's key for this record
    # A reset, `rejected` (the password policy's `password_*` codes besides).
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    CODE_ATTEMPTS_EXCEEDED = "code_attempts_exceeded"
    RESET_INVALID = "reset_invalid"  # Clave could not process it: the link works as before
    # A login or the key check of a contact update, `invalid`.
    KEY_INVALID = "key_invalid"  # alike for a wrong key and an unknown ID
    ID_INVALID = "id_invalid"
    THROTTLED = "throttled"
    CHECK_INVALID = "check_invalid"

    # Nothing was done with the input: the portal sent something Clave cannot process (a bug on
    # the portal's side, or a field the citizen typed that the portal did not check).
    INPUT_REFUSED = frozenset({REQUEST_INVALID, RESET_INVALID, CHECK_INVALID, PLAINTEXT_REFUSED, SEALED_INVALID})


@dataclass(frozen=True)
class Outcome:
    """An answer on `recovery.outcomes`. A request is `accepted` (whatever the account: no
    enumeration), or `rejected` with `duplicate_request` for a repeated request_id, or with
    `request_invalid` when Clave could not process it at all (the same whatever the ID). A reset
    is `completed` (the key was changed) or `rejected` with every reason; after a rejection the
    same link works again unless a reason says otherwise (see the reason table)."""

    request_id: str
    stage: Stage
    status: Status
    reasons: tuple[str, ...] = ()
    event_id: str = ""

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def accepted(self) -> bool:
        """A request Clave took: the citizen should check their e-mail."""
        return self.status == "accepted"

    @property
    def invalid(self) -> bool:
        """Clave could not process the input at all (`Reason.INPUT_REFUSED`): nothing was done."""
        return self.status == "rejected" and any(r in Reason.INPUT_REFUSED for r in self.reasons)

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> Outcome:
        data = event["data"]
        return cls(
            data["request_id"],
            cast(Stage, data["stage"]),
            cast(Status, data["status"]),
            tuple(data.get("reasons", ())),
            event["id"],
        )


@dataclass(frozen=True)
class LoginResult:
    """An answer on `login.results`: `valid`, or `invalid` with a reason (`key_invalid` alike
    for a wrong key and an unknown ID; `id_invalid`, `throttled`, `check_invalid`; `plaintext_refused`
    or `sealed_invalid` for how the key came)."""

    check_id: str
    valid: bool
    reasons: tuple[str, ...] = ()
    event_id: str = ""
    # The key is right but one the import took against the key policy: have it changed.
    must_change: bool = False

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> LoginResult:
        data = event["data"]
        valid = data["status"] == "valid"
        return cls(
            data["check_id"],
            valid,
            tuple(data.get("reasons", ())),
            event["id"],
            must_change=valid and bool(data.get("must_change", False)),
        )


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
