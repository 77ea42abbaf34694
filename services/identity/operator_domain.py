"""Operator rules: who may command identity, and when an e-mail change takes effect. Pure
functions and state, no I/O (the part of identity's domain that concerns operators).

- A command is accepted only when signed by a registered, unrevoked key of the operator it
  names, within its lifetime (`OPERATOR_COMMAND_TTL_S` after `issued_at`, and not from the
  future beyond `CLOCK_SKEW`), and never seen before (its `command_id`). Each refusal has its
  reason; the command is then audited and dead-lettered (shared/envelope.DeadLetterReason).
- An e-mail change (`update-email`, or an import line with another e-mail) is only a request:
  it takes effect once a second, different operator approved it AND the cooling-off period
  (`EMAIL_CHANGE_COOLING_OFF_S`, 24 h by default) since the request has passed. One change may
  be pending per account.
- Any registered operator (the requester too) may cancel a change until it is applied: a
  cancelled change never takes effect, and a new one may then be requested.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from shared import operator_keys
from shared.envelope import DeadLetterReason

CLOCK_SKEW = timedelta(seconds=30)  # an operator's clock may run this much ahead of identity's


class CommandReason:
    """Why identity refused an operator command it could verify (command results, audit)."""

    ID_INVALID = "id_invalid"
    ACCOUNT_UNKNOWN = "account_unknown"
    EMAIL_INVALID = "email_invalid"
    EMAIL_UNCHANGED = "email_unchanged"  # update-email to the address already registered
    CHANGE_PENDING = "email_change_pending"  # the account already has an e-mail change waiting
    CHANGE_UNKNOWN = "change_unknown"  # approve: no pending change with that id
    CHANGE_NOT_PENDING = "change_not_pending"  # approve: already approved, applied or cancelled
    CHANGE_APPLIED = "change_already_applied"  # cancel: the change already took effect
    CHANGE_CANCELLED = "change_already_cancelled"  # cancel: someone cancelled it before
    APPROVER_IS_REQUESTER = "approver_is_requester"  # approve: the second operator must be another
    RECORD_INVALID = "record_invalid"  # import: the record breaks a rule (its detail says which)
    RATE_LIMITED = "rate_limited"
    # contact-update with a new registered e-mail: that is update-email's (two operators, cooling-off)
    EMAIL_NEEDS_APPROVAL = "email_needs_approval"


@dataclass(frozen=True)
class RegisteredKey:
    """One operator public key in identity's registry."""

    key_id: str
    operator_id: str
    public_key: str  # base64 raw
    revoked: bool = False


@dataclass(frozen=True)
class Refusal:
    reason: str  # a DeadLetterReason
    detail: str  # for the dead letter and the audit: never an input value


def registration_problem(existing: RegisteredKey | None, new: RegisteredKey) -> str | None:
    """Why a key registration changes nothing (None: register it). A key id names one key of one
    operator for ever: re-registering the same key is a no-op, and a key id cannot be moved to
    another operator or key (it would let that operator sign as the first)."""
    try:
        public = operator_keys.public_from_b64(new.public_key)
    except operator_keys.OperatorKeyError:
        return "public_key_invalid"
    if operator_keys.key_id(public) != new.key_id:
        return "key_id_mismatch"
    if existing is None:
        return None
    if existing.operator_id == new.operator_id and existing.public_key == new.public_key:
        return "already_registered"
    return "key_id_taken"


def check_signed(
    event_type: str,
    data: Mapping[str, Any],
    keys: Iterable[RegisteredKey],
    *,
    seen_before: bool,
    now: datetime,
    ttl: timedelta,
) -> Refusal | None:
    """Is this command signed by a live registered key of the operator it names, in time, and
    new? The signature is checked before anything it covers (the time, the id) is trusted."""
    if not data.get("signature") or not data.get("key_id") or not data.get("issued_at"):
        missing = [f for f in ("signature", "key_id", "issued_at") if not data.get(f)]
        return Refusal(DeadLetterReason.SIGNATURE_MISSING, f"unsigned command: no {', '.join(missing)}")
    key = next((k for k in keys if k.key_id == data["key_id"]), None)
    if key is None or key.operator_id != data.get("operator_id"):
        return Refusal(DeadLetterReason.OPERATOR_UNKNOWN, "no registered key with this key_id for this operator")
    if key.revoked:
        return Refusal(DeadLetterReason.OPERATOR_UNKNOWN, "the operator's key was revoked")
    try:
        public = operator_keys.public_from_b64(key.public_key)
    except operator_keys.OperatorKeyError:
        return Refusal(DeadLetterReason.OPERATOR_UNKNOWN, "the registered key is unusable")
    if not operator_keys.verify(public, event_type, dict(data)):
        return Refusal(DeadLetterReason.SIGNATURE_INVALID, "the signature does not verify with the operator's key")
    issued = _time(data["issued_at"])
    if issued is None:
        return Refusal(DeadLetterReason.COMMAND_EXPIRED, "issued_at is not a time with a zone")
    if issued > now + CLOCK_SKEW:
        return Refusal(DeadLetterReason.COMMAND_EXPIRED, "issued in the future")
    if now - issued > ttl:
        return Refusal(DeadLetterReason.COMMAND_EXPIRED, f"older than {int(ttl.total_seconds())} s")
    if seen_before:
        return Refusal(DeadLetterReason.COMMAND_REPLAYED, "this command_id was already processed")
    return None


def _time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return parsed if parsed.tzinfo is not None else None


# ---- e-mail changes ----------------------------------------------------------------------------


class ChangeStatus:
    PENDING = "pending"  # requested, waiting for a second operator
    APPROVED = "approved"  # approved, waiting for the end of the cooling-off period
    APPLIED = "applied"
    CANCELLED = "cancelled"  # by an operator before it was applied: it never takes effect


@dataclass(frozen=True)
class EmailChange:
    change_id: str  # the requesting command's id
    account_id: str
    new_email: str
    requested_by: str
    requested_at: datetime
    not_before: datetime  # requested_at + cooling-off
    status: str = ChangeStatus.PENDING
    approved_by: str | None = None
    approved_at: datetime | None = None
    cancelled_by: str | None = None
    cancelled_at: datetime | None = None


def request_email_change(
    change_id: str,
    account_id: str,
    current_email: str,
    new_email: str,
    operator_id: str,
    pending: EmailChange | None,
    now: datetime,
    cooling_off: timedelta,
) -> EmailChange | str:
    """A new pending change, or why not (a reason code)."""
    if new_email.casefold() == current_email.casefold():
        return CommandReason.EMAIL_UNCHANGED
    if pending is not None:
        return CommandReason.CHANGE_PENDING
    return EmailChange(change_id, account_id, new_email, operator_id, now, now + cooling_off)


def approve(change: EmailChange | None, approver: str, now: datetime) -> EmailChange | str:
    """The change approved by `approver`, or why not. The approver must be another operator
    than the one who asked: one person alone can never redirect a citizen's mail."""
    if change is None:
        return CommandReason.CHANGE_UNKNOWN
    if change.status != ChangeStatus.PENDING:
        return CommandReason.CHANGE_NOT_PENDING
    if approver == change.requested_by:
        return CommandReason.APPROVER_IS_REQUESTER
    return replace(change, status=ChangeStatus.APPROVED, approved_by=approver, approved_at=now)


def cancel(change: EmailChange | None, operator: str, now: datetime) -> EmailChange | str:
    """The change cancelled by `operator`, or why not. Any registered operator may cancel, the
    requester included: stopping a change needs no second person, only applying one does. A
    change is cancellable until it is applied, even past its effective time: until the applier
    stored the new address, nothing took effect."""
    if change is None:
        return CommandReason.CHANGE_UNKNOWN
    if change.status == ChangeStatus.APPLIED:
        return CommandReason.CHANGE_APPLIED
    if change.status == ChangeStatus.CANCELLED:
        return CommandReason.CHANGE_CANCELLED
    return replace(change, status=ChangeStatus.CANCELLED, cancelled_by=operator, cancelled_at=now)


def effective_at(change: EmailChange) -> datetime:
    """When an approved change takes effect: the end of the cooling-off, or the approval if later."""
    return max(change.not_before, change.approved_at or change.not_before)


def is_due(change: EmailChange, now: datetime) -> bool:
    return change.status == ChangeStatus.APPROVED and effective_at(change) <= now


# ---- the import --------------------------------------------------------------------------------


def changed_fields(current: Mapping[str, Any], incoming: Mapping[str, Any], answers_same: bool) -> list[str]:
    """The account fields an import line changes (the e-mail apart: it needs an approval).
    Both mappings hold normalised values."""
    fields = [f for f in ("profile", "name", "locale", "representative_id") if current.get(f) != incoming.get(f)]
    if not answers_same:
        fields.append("answers")
    return fields
