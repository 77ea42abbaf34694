"""Operators are people with keys: the signature scheme (shared/operator_keys.py), identity's
checks of a signed command, the approval rules of an e-mail change and the import's sealed
secrets (services/identity/operator_domain.py, registry.py). Pure: no broker, no store."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.identity import operator_domain as od
from services.identity.registry import ImportSecrets, open_secrets, seal_secrets
from shared import operator_keys
from shared.crypto import SecretBox
from shared.envelope import DeadLetterReason as R
from shared.settings import DEV_IMPORT_KEY
from shared.topics import EventType

NOW = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
TTL = timedelta(minutes=5)
UPDATE = EventType.OPERATOR_EMAIL_UPDATE


def registered(operator: str, key: Ed25519PrivateKey, revoked: bool = False) -> od.RegisteredKey:
    public = key.public_key()
    return od.RegisteredKey(operator_keys.key_id(public), operator, operator_keys.public_b64(public), revoked)


def signed(key: Ed25519PrivateKey, event_type: str = UPDATE, at: datetime = NOW, **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "command_id": "c1",
        "operator_id": "op-1",
        "reason": "case 4411",
        "national_id": "1710034065",
        "new_email": "new@example.org",
        "issued_at": at.isoformat(),
        "key_id": operator_keys.key_id(key.public_key()),
        "signature": None,
        **fields,
    }
    data["signature"] = operator_keys.sign(key, event_type, data)
    return data


def check(data: dict[str, Any], keys: list[od.RegisteredKey], event_type: str = UPDATE, **kw: Any) -> str | None:
    refusal = od.check_signed(
        event_type, data, keys, seen_before=kw.get("seen", False), now=kw.get("now", NOW), ttl=TTL
    )
    return refusal.reason if refusal else None


KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def test_a_command_signed_by_its_operators_registered_key_is_accepted() -> None:
    assert check(signed(KEY), [registered("op-1", KEY)]) is None


def test_unsigned_commands_are_refused() -> None:
    for missing in ("signature", "key_id", "issued_at"):
        data = signed(KEY)
        data[missing] = None
        assert check(data, [registered("op-1", KEY)]) == R.SIGNATURE_MISSING


@pytest.mark.parametrize(
    "field,value",
    [("new_email", "attacker@example.org"), ("national_id", "0926687856"), ("command_id", "c2"),
     ("issued_at", (NOW + timedelta(seconds=1)).isoformat()), ("reason", "another case")],
)  # fmt: skip
def test_any_altered_field_breaks_the_signature(field: str, value: str) -> None:
    data = signed(KEY)
    data[field] = value
    assert check(data, [registered("op-1", KEY)]) == R.SIGNATURE_INVALID


def test_a_signature_does_not_move_to_another_command_type() -> None:
    data = signed(KEY, EventType.OPERATOR_UNLOCK)
    assert check(data, [registered("op-1", KEY)], EventType.OPERATOR_EMAIL_UPDATE) == R.SIGNATURE_INVALID


def test_a_forged_signature_with_another_key_is_refused() -> None:
    forged = signed(OTHER, key_id=operator_keys.key_id(KEY.public_key()))  # claims op-1's key id
    assert check(forged, [registered("op-1", KEY)]) == R.SIGNATURE_INVALID


def test_unknown_operators_and_keys_are_refused() -> None:
    assert check(signed(KEY), []) == R.OPERATOR_UNKNOWN
    assert check(signed(OTHER), [registered("op-1", KEY)]) == R.OPERATOR_UNKNOWN  # an unregistered key
    # op-2's own key does not sign for op-1.
    assert check(signed(OTHER), [registered("op-1", KEY), registered("op-2", OTHER)]) == R.OPERATOR_UNKNOWN
    assert check(signed(KEY), [registered("op-1", KEY, revoked=True)]) == R.OPERATOR_UNKNOWN


def test_expired_and_future_commands_are_refused() -> None:
    keys = [registered("op-1", KEY)]
    assert check(signed(KEY, at=NOW - TTL), keys) is None
    assert check(signed(KEY, at=NOW - TTL - timedelta(seconds=1)), keys) == R.COMMAND_EXPIRED
    assert check(signed(KEY, at=NOW + od.CLOCK_SKEW + timedelta(seconds=1)), keys) == R.COMMAND_EXPIRED
    assert check(signed(KEY, at=NOW.replace(tzinfo=None)), keys) == R.COMMAND_EXPIRED


def test_a_command_seen_before_is_a_replay_but_only_once_its_signature_holds() -> None:
    keys = [registered("op-1", KEY)]
    assert check(signed(KEY), keys, seen=True) == R.COMMAND_REPLAYED
    data = signed(KEY)
    data["signature"] = operator_keys.sign(OTHER, UPDATE, data)
    assert check(data, keys, seen=True) == R.SIGNATURE_INVALID


def test_verification_reads_the_data_as_it_arrived() -> None:
    """The signature covers the JSON as sent: a re-serialisation must not be needed to verify."""
    import json

    data = json.loads(json.dumps(signed(KEY)))
    assert check(data, [registered("op-1", KEY)]) is None


# ---- e-mail changes ----------------------------------------------------------------------------


def request(pending: od.EmailChange | None = None, current: str = "old@example.org") -> od.EmailChange | str:
    return od.request_email_change("c1", "acc", current, "new@example.org", "op-1", pending, NOW, timedelta(hours=24))


def test_a_change_is_a_request_that_waits_for_the_cooling_off() -> None:
    change = request()
    assert isinstance(change, od.EmailChange)
    assert change.status == od.ChangeStatus.PENDING and change.not_before == NOW + timedelta(hours=24)
    assert not od.is_due(change, NOW + timedelta(days=30))  # never without an approval


def test_no_change_to_the_same_address_and_one_pending_change_per_account() -> None:
    assert request(current="NEW@example.org") == od.CommandReason.EMAIL_UNCHANGED
    pending = request()
    assert isinstance(pending, od.EmailChange)
    assert request(pending) == od.CommandReason.CHANGE_PENDING


def test_the_approver_must_be_a_second_operator() -> None:
    change = request()
    assert isinstance(change, od.EmailChange)
    assert od.approve(change, "op-1", NOW) == od.CommandReason.APPROVER_IS_REQUESTER
    assert od.approve(None, "op-2", NOW) == od.CommandReason.CHANGE_UNKNOWN
    approved = od.approve(change, "op-2", NOW + timedelta(hours=1))
    assert isinstance(approved, od.EmailChange) and approved.approved_by == "op-2"
    assert od.approve(approved, "op-3", NOW) == od.CommandReason.CHANGE_NOT_PENDING


def test_an_approved_change_takes_effect_after_the_cooling_off_or_at_a_late_approval() -> None:
    change = request()
    assert isinstance(change, od.EmailChange)
    early = od.approve(change, "op-2", NOW + timedelta(hours=1))
    assert isinstance(early, od.EmailChange)
    assert od.effective_at(early) == NOW + timedelta(hours=24)
    assert not od.is_due(early, NOW + timedelta(hours=23, minutes=59))
    assert od.is_due(early, NOW + timedelta(hours=24))
    late = od.approve(change, "op-2", NOW + timedelta(hours=30))
    assert isinstance(late, od.EmailChange)
    assert od.effective_at(late) == NOW + timedelta(hours=30)


def approved_change() -> od.EmailChange:
    change = request()
    assert isinstance(change, od.EmailChange)
    approved = od.approve(change, "op-2", NOW + timedelta(hours=1))
    assert isinstance(approved, od.EmailChange)
    return approved


@pytest.mark.parametrize("who", ["op-1", "op-2", "op-3"])  # the requester, the approver, anyone else
def test_any_operator_may_cancel_a_requested_or_approved_change(who: str) -> None:
    requested = request()
    assert isinstance(requested, od.EmailChange)
    for change in (requested, approved_change()):
        cancelled = od.cancel(change, who, NOW + timedelta(hours=2))
        assert isinstance(cancelled, od.EmailChange)
        assert cancelled.status == od.ChangeStatus.CANCELLED
        assert (cancelled.cancelled_by, cancelled.cancelled_at) == (who, NOW + timedelta(hours=2))
        assert (cancelled.change_id, cancelled.new_email, cancelled.requested_by) == (
            change.change_id, change.new_email, change.requested_by,
        )  # fmt: skip


def test_a_cancelled_change_never_takes_effect_nor_can_be_approved() -> None:
    cancelled = od.cancel(approved_change(), "op-3", NOW + timedelta(hours=2))
    assert isinstance(cancelled, od.EmailChange)
    assert od.effective_at(cancelled) == NOW + timedelta(hours=24)  # it was due then...
    assert not od.is_due(cancelled, NOW + timedelta(days=365))  # ...and is never due now
    assert od.approve(cancelled, "op-4", NOW) == od.CommandReason.CHANGE_NOT_PENDING
    # It no longer blocks a new request for the account (the store looks up pending ones only).
    assert isinstance(request(None), od.EmailChange)


def test_a_change_is_cancellable_until_applied_even_past_its_effective_time() -> None:
    """Due but not yet applied: nothing took effect, so it can still be stopped (the applier
    only applies a change still approved)."""
    due = approved_change()
    assert od.is_due(due, NOW + timedelta(hours=25))
    cancelled = od.cancel(due, "op-1", NOW + timedelta(hours=25))
    assert isinstance(cancelled, od.EmailChange) and cancelled.status == od.ChangeStatus.CANCELLED


def test_cancelling_an_unknown_applied_or_cancelled_change_is_refused_with_its_reason() -> None:
    assert od.cancel(None, "op-1", NOW) == od.CommandReason.CHANGE_UNKNOWN
    applied = replace(approved_change(), status=od.ChangeStatus.APPLIED)
    assert od.cancel(applied, "op-1", NOW) == od.CommandReason.CHANGE_APPLIED
    cancelled = od.cancel(approved_change(), "op-1", NOW)
    assert isinstance(cancelled, od.EmailChange)
    assert od.cancel(cancelled, "op-2", NOW) == od.CommandReason.CHANGE_CANCELLED


def test_a_cancellation_is_signed_and_checked_like_every_command() -> None:
    cancel_type = EventType.OPERATOR_CANCEL
    data = signed(KEY, cancel_type, cancels="c1", national_id=None, new_email=None)
    assert check(data, [registered("op-1", KEY)], cancel_type) is None
    assert check({**data, "cancels": "c2"}, [registered("op-1", KEY)], cancel_type) == R.SIGNATURE_INVALID
    # A signed approval of the same change is not a cancellation: the type is signed too.
    approval = signed(KEY, EventType.OPERATOR_APPROVE, cancels="c1", national_id=None, new_email=None)
    assert check(approval, [registered("op-1", KEY)], cancel_type) == R.SIGNATURE_INVALID


async def test_the_applier_never_applies_a_cancelled_change() -> None:
    """The sweep checks the rule too (besides its query and the store's conditional write): a
    cancelled change handed to it is neither read further nor committed."""
    from services.identity.commands import EmailChangeApplier

    class NoStore:
        async def by_id(self, account_id: str) -> None:
            raise AssertionError("a cancelled change must not be looked at")

        async def commit(self, **_: Any) -> None:
            raise AssertionError("a cancelled change must not be applied")

    due_then_cancelled = od.cancel(replace(approved_change(), not_before=NOW - timedelta(days=1)), "op-1", NOW)
    assert isinstance(due_then_cancelled, od.EmailChange)
    applier = EmailChangeApplier(NoStore(), on_outbox=lambda: None)  # type: ignore[arg-type]
    assert await applier.apply(due_then_cancelled) is False


def test_import_names_the_changed_fields() -> None:
    current = {"profile": "affiliate", "name": "María", "locale": "es", "representative_id": None}
    assert od.changed_fields(current, dict(current), answers_same=True) == []
    assert od.changed_fields(current, {**current, "name": "María P."}, answers_same=False) == ["name", "answers"]


# ---- the import's sealed secrets ---------------------------------------------------------------


def test_import_secrets_open_only_for_the_command_and_id_they_were_sealed_for() -> None:
    box = SecretBox(DEV_IMPORT_KEY)
    sealed = seal_secrets(box, ImportSecrets(command_id="c1", national_id="1710034065", answers={"q": "a"}))
    assert open_secrets(box, sealed, "c1", "1710034065").answers == {"q": "a"}
    with pytest.raises(ValueError, match="another command"):
        open_secrets(box, sealed, "c2", "1710034065")
    with pytest.raises(ValueError, match="another command"):
        open_secrets(box, sealed, "c1", "0926687856")
    with pytest.raises(ValueError, match="IMPORT_KEYS"):
        open_secrets(SecretBox("ZGV2LW5vdGlmaWVyLWtleS1ub3QtZm9yLXByb2QtMDE="), sealed, "c1", "1710034065")


# ---- no operator path chooses or sees a key ----------------------------------------------------

SECRET_WORDS = ("password", "token", "code", "secret", "link", "key")
# The operator's own key id and signature, and the import's sealed blob (the registry's initial
# key, sealed for identity, never shown back) are the only names that may hold such a word.
ALLOWED = {"key_id", "signature", "sealed_secrets", "legacy_key", "command_id", "command"}


def test_no_operator_path_chooses_or_sees_a_key() -> None:
    """No field of an operator command or of its result, and no option of an `accounts` command,
    carries a citizen's key, link or code: the operator can neither choose one nor read one."""
    import typer.main

    from clave.cli import accounts
    from shared.schemas import AccountImport, CommandResult, OperatorApproval, OperatorCommand

    for model in (OperatorCommand, OperatorApproval, AccountImport, CommandResult):
        risky = {f for f in model.model_fields if any(w in f for w in SECRET_WORDS)} - ALLOWED
        assert not risky, f"{model.__name__}: {risky}"
    group = typer.main.get_group(accounts)
    for name, cmd in group.commands.items():
        options = {p.name for p in cmd.params if p.name}
        risky = {o for o in options if any(w in o for w in SECRET_WORDS)} - {"key_file", "legacy_keys"}
        assert not risky, f"clave accounts {name}: {risky}"


def test_a_key_id_names_one_key_of_one_operator_for_ever() -> None:
    new = registered("op-1", KEY)
    assert od.registration_problem(None, new) is None
    assert od.registration_problem(new, new) == "already_registered"
    moved = od.RegisteredKey(new.key_id, "op-2", new.public_key)  # the same key for another operator
    assert od.registration_problem(new, moved) == "key_id_taken"
    other = registered("op-1", OTHER)
    assert od.registration_problem(None, od.RegisteredKey(new.key_id, "op-1", other.public_key)) == "key_id_mismatch"
    assert od.registration_problem(None, od.RegisteredKey(new.key_id, "op-1", "not base64!")) == "public_key_invalid"
