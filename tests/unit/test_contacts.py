"""Contact data (services/identity/domain.py) and identity's handling of it: phone numbers as
E.164, the rules of a change, a recovery to the backup address the citizen typed, and the
contact update that the password service authorised (over the in-memory store of
test_identity_handlers)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.identity import domain
from services.identity.domain import Contact, ContactReason, ContactRefused
from services.identity.handlers import IdentityHandlers
from services.identity.registry import AccountRecord, validate_record
from services.identity.store import StaleContact
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.schemas import ContactUpdateAuthorized, ContactUpdateRequested
from shared.topics import (
    CONTACT_RESULTS,
    IDENTITY_CONTACT_CHANGED,
    IDENTITY_VERIFIED,
    EventType,
)
from tests.memory import Thunk
from tests.unit.test_identity_handlers import ANSWERS, SETTINGS, MemoryStore, context, request, staged

PRIMARY = "maria.perez@example.org"
BACKUP = "maria.respaldo@example.net"


@pytest.fixture
def store() -> MemoryStore:
    hasher = SecretHasher(SETTINGS)
    yield MemoryStore(hasher)  # type: ignore[misc]
    hasher.close()


@pytest.fixture
def handlers(store: MemoryStore) -> IdentityHandlers:
    hasher = SecretHasher(SETTINGS)
    yield IdentityHandlers(store, hasher, SETTINGS, ServiceMetrics("identity"))  # type: ignore[arg-type, misc]
    hasher.close()


# ------------------------------------------------------------------ rules


@pytest.mark.parametrize(
    ("typed", "e164"),
    [("+593 99 123 4567", "+593991234567"), ("099-123-4567", "+593991234567"), ("+1 202 555 0143", "+12025550143")],
)
def test_phone_numbers_are_stored_as_e164(typed: str, e164: str) -> None:
    assert domain.normalize_phone(typed) == e164


@pytest.mark.parametrize("bad", ["", "12", "+593 12", "not a phone", "+999 123456789", "0991234567890123"])
def test_invalid_phone_numbers_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid phone number"):
        domain.normalize_phone(bad)


def test_a_change_normalises_each_field_and_keeps_what_it_does_not_name() -> None:
    before = Contact(PRIMARY, None, None)
    after = domain.new_contact(before, None, "Maria.Respaldo@EXAMPLE.net", "0991234567")
    assert after == Contact(PRIMARY, "Maria.Respaldo@example.net", "+593991234567")
    assert domain.changed_fields(before, after) == [("backup_email", "M***@example.net"), ("phone", "+593***67")]
    removed = domain.new_contact(after, None, "", "")
    assert removed == Contact(PRIMARY, None, None)
    assert domain.changed_fields(after, removed) == [("backup_email", ""), ("phone", "")]


def test_a_change_is_refused_with_every_reason() -> None:
    before = Contact(PRIMARY, BACKUP, "+593991234567")
    with pytest.raises(ContactRefused) as refused:
        domain.new_contact(before, "not-an-address", "also bad", "+593 12")
    assert refused.value.reasons == (
        ContactReason.EMAIL_INVALID,
        ContactReason.BACKUP_EMAIL_INVALID,
        ContactReason.PHONE_INVALID,
    )
    with pytest.raises(ContactRefused) as same:
        domain.new_contact(before, None, PRIMARY.upper(), None)
    assert same.value.reasons == (ContactReason.BACKUP_SAME_AS_EMAIL,)
    with pytest.raises(ContactRefused) as nothing:
        domain.new_contact(before, PRIMARY, None, "+593 99 123 4567")
    assert nothing.value.reasons == (ContactReason.NOTHING_TO_CHANGE,)
    with pytest.raises(ContactRefused):
        domain.new_contact(before, "", None, None)  # the registered address cannot be removed


def test_every_old_address_is_told() -> None:
    assert domain.old_addresses(Contact(PRIMARY, BACKUP)) == (PRIMARY, BACKUP)
    assert domain.old_addresses(Contact(PRIMARY)) == (PRIMARY,)


def test_a_recovery_goes_to_the_address_typed_when_it_is_on_file(store: MemoryStore) -> None:
    account = store.account
    assert domain.recovery_address(PRIMARY.upper(), account) == PRIMARY
    assert domain.recovery_address(BACKUP, account) is None  # no backup on file
    account.backup_email = BACKUP
    assert domain.recovery_address(BACKUP.upper(), account) == BACKUP
    assert domain.recovery_address(PRIMARY, account) == PRIMARY
    assert domain.recovery_address("otro@example.org", account) is None


def test_the_import_takes_backup_email_and_phone() -> None:
    record = {
        "national_id": "1710034065",
        "profile": "affiliate",
        "name": "María",
        "email": PRIMARY,
        "answers": dict(ANSWERS),
    }
    clean = validate_record(AccountRecord.model_validate({**record, "backup_email": BACKUP, "phone": "0991234567"}), [])
    assert clean["contact"] == {"backup_email": BACKUP, "phone": "+593991234567"}
    assert validate_record(AccountRecord.model_validate(record), [])["contact"] == {}  # kept as they are
    for bad, message in (({"phone": "12"}, "phone"), ({"backup_email": PRIMARY}, "backup_email: the same")):
        with pytest.raises(ValueError, match=message):
            validate_record(AccountRecord.model_validate({**record, **bad}), [])


def test_the_contact_update_schema_needs_one_key_and_one_change() -> None:
    base = {"update_id": "u-1", "national_id": "1710034065", "phone": "0991234567", "client_ip": "10.0.0.1"}
    ContactUpdateRequested.model_validate({**base, "key": "Clave2026"})
    ContactUpdateRequested.model_validate({**base, "sealed_key": "QUJD"})
    for wrong in ({}, {"key": "k", "sealed_key": "QUJD"}, {"key": "k", "phone": None}):
        with pytest.raises(ValueError):
            ContactUpdateRequested.model_validate({**base, **wrong})


# ------------------------------------------------------------------ handlers


@pytest.fixture
def with_backup(store: MemoryStore) -> MemoryStore:
    store.account.backup_email = BACKUP

    def set_contact(account_id: str, contact: Contact, seen: Contact) -> Thunk:
        """Staged as the real intent operation: applied (or found stale) at commit."""

        async def apply() -> None:
            if store.account.contact != seen:
                raise StaleContact(account_id)
            store.account.email, store.account.backup_email, store.account.phone = (
                contact.email,
                contact.backup_email,
                contact.phone,
            )

        return apply

    store.set_contact = set_contact  # type: ignore[attr-defined]
    return store


async def test_a_recovery_typed_with_the_backup_goes_there_and_names_the_primary(
    handlers: IdentityHandlers, with_backup: MemoryStore
) -> None:
    req = request(email=BACKUP.upper())
    await handlers.recovery_requested(context(with_backup, req.model_dump()), req)
    (verified,) = [e["data"] for t, _, e in staged(with_backup) if t == IDENTITY_VERIFIED]
    assert verified["recipient"]["email"] == BACKUP
    assert verified["primary_recipient"]["email"] == PRIMARY
    (audit,) = [e["data"] for t, _, e in staged(with_backup) if t == "audit.events"]
    assert audit["details"]["mail_to"] == "backup" and BACKUP not in json.dumps(audit)
    # Typed the registered address: mail goes there, nobody else is told.
    req = request(request_id="req-2", email=PRIMARY)
    await handlers.recovery_requested(context(with_backup, req.model_dump()), req)
    (verified,) = [e["data"] for t, _, e in staged(with_backup) if t == IDENTITY_VERIFIED]
    assert verified["recipient"]["email"] == PRIMARY and verified.get("primary_recipient") is None


def authorized(**kw: Any) -> ContactUpdateAuthorized:
    return ContactUpdateAuthorized.model_validate({"update_id": "u-1", "account_id": "acc-1", **kw})


async def apply(handlers: IdentityHandlers, store: MemoryStore, evt: ContactUpdateAuthorized) -> dict[str, Any]:
    ctx = context(store, evt.model_dump(), EventType.CONTACT_AUTHORIZED)
    await handlers.contact_authorized(ctx, evt)
    if not ctx.committed:
        await ctx.commit()
    return {t: e["data"] for t, _, e in staged(store)}


async def test_an_authorised_update_is_applied_and_every_old_address_told(
    handlers: IdentityHandlers, with_backup: MemoryStore
) -> None:
    out = await apply(handlers, with_backup, authorized(email="nueva@example.org", phone="+593 99 123 4567"))
    assert out[CONTACT_RESULTS] == {"update_id": "u-1", "status": "updated", "reasons": []}
    changed = out[IDENTITY_CONTACT_CHANGED]
    assert [r["email"] for r in changed["old_recipients"]] == [PRIMARY, BACKUP]
    assert changed["changes"] == [
        {"field": "email", "masked": "n***@example.org"},
        {"field": "phone", "masked": "+593***67"},
    ]
    assert changed["actor"] == "citizen" and changed["change_id"] == "u-1"
    assert with_backup.account.contact == Contact("nueva@example.org", BACKUP, "+593991234567")
    assert "nueva@example.org" not in json.dumps(out["audit.events"])


async def test_an_invalid_update_is_rejected_and_changes_nothing(
    handlers: IdentityHandlers, with_backup: MemoryStore
) -> None:
    out = await apply(handlers, with_backup, authorized(backup_email=PRIMARY, phone="12"))
    assert out[CONTACT_RESULTS] == {
        "update_id": "u-1",
        "status": "rejected",
        "reasons": [ContactReason.PHONE_INVALID],
    }
    assert IDENTITY_CONTACT_CHANGED not in out
    assert with_backup.account.contact == Contact(PRIMARY, BACKUP, None)


async def test_an_update_racing_another_is_decided_again_on_what_it_left(
    handlers: IdentityHandlers, with_backup: MemoryStore
) -> None:
    real = with_backup.set_contact  # type: ignore[attr-defined]
    raced = []

    def racing(account_id: str, contact: Contact, seen: Contact) -> Thunk:
        if not raced:  # someone else's change lands between our read and our write
            raced.append(True)
            with_backup.account.phone = "+12025550143"
        return real(account_id, contact, seen)

    with_backup.set_contact = racing  # type: ignore[attr-defined]
    out = await apply(handlers, with_backup, authorized(backup_email=""))
    assert out[CONTACT_RESULTS]["status"] == "updated"
    assert with_backup.account.contact == Contact(PRIMARY, None, "+12025550143")
    assert len(with_backup.commits) == 1


def test_the_change_notice_says_what_changed_in_the_citizens_language() -> None:
    from services.notifier.domain import describe_changes

    changes = [("email", "n***@example.org"), ("phone", "")]
    assert describe_changes(changes, "es") == "correo principal n***@example.org; teléfono eliminado"
    assert describe_changes(changes, "en") == "primary e-mail n***@example.org; phone removed"
