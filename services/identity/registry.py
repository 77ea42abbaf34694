"""Importing accounts from the institution's registry (JSON lines, one account each).

Used by `clave accounts import`. Answers are normalised and hashed on the way
in; the initial key travels sealed to the password service (which owns
credentials) through the outbox. Idempotent: the same national ID updates the
account, never duplicates it. Bad lines are reported by number; the rest go on.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pymongo.asynchronous.client_session import AsyncClientSession

from services.identity import domain
from services.identity.settings import IdentitySettings
from services.identity.store import ACCOUNTS, AccountStore
from shared.audit import audit_event
from shared.crypto import Purpose, SecretBox, initial_key_context, keyed_hash
from shared.envelope import describe_errors, new_event
from shared.hashing import SecretHasher
from shared.schemas import AccountRegistered, AuditRecord
from shared.store import Outgoing
from shared.topics import IDENTITY_ACCOUNT_REGISTERED, EventType

SOURCE = "/clave/identity"


class AccountRecord(BaseModel):
    """One line of the import file (the public account import format, see README)."""

    model_config = ConfigDict(extra="forbid")

    national_id: str = Field(min_length=1, max_length=32)
    profile: Literal["affiliate", "employer"]
    name: str = Field(min_length=1, max_length=200)
    email: str = Field(min_length=3, max_length=254)
    locale: Literal["es", "en"] = "es"
    answers: dict[str, str]
    representative_id: str | None = None
    password: str | None = Field(default=None, min_length=1, max_length=256)
    # Added: optional contact data (a recovery may go to the backup address the citizen types).
    backup_email: str | None = Field(default=None, min_length=3, max_length=254)
    phone: str | None = Field(default=None, min_length=1, max_length=32)

    @model_validator(mode="after")
    def _employer_has_representative(self) -> AccountRecord:
        if self.profile == "employer" and not self.representative_id:
            raise ValueError("an employer needs representative_id (the legal representative's cédula)")
        return self


@dataclass
class ImportReport:
    created: int = 0
    updated: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)


def validate_record(record: AccountRecord, questions: list[str]) -> dict[str, Any]:
    """Normalise a record; raise ValueError with a message fit for the operator."""
    try:
        national_id = domain.normalize_national_id(record.profile, record.national_id)
    except domain.InvalidId as exc:
        raise ValueError(f"national_id: {exc}") from None
    representative = None
    if record.profile == "employer":
        try:
            representative = domain.normalize_cedula(record.representative_id or "")
        except domain.InvalidId as exc:
            raise ValueError(f"representative_id: {exc}") from None
    missing = [q for q in questions if not record.answers.get(q, "").strip()]
    if missing:
        raise ValueError(f"answers: missing {', '.join(missing)}")
    if len(record.answers) < 3:
        raise ValueError("answers: at least 3 security questions are required")
    email = domain.normalize_email(record.email)
    contact = {}
    if record.backup_email is not None:
        try:
            contact["backup_email"] = domain.normalize_email(record.backup_email)
        except ValueError as exc:
            raise ValueError(f"backup_email: {exc}") from None
        if domain.same_mailbox(contact["backup_email"], email):
            raise ValueError("backup_email: the same address as email")
    if record.phone is not None:
        try:
            contact["phone"] = domain.normalize_phone(record.phone)
        except ValueError as exc:
            raise ValueError(f"phone: {exc}") from None
    return {"national_id": national_id, "representative_id": representative, "email": email, "contact": contact}


async def import_accounts(
    store: AccountStore,
    hasher: SecretHasher,
    settings: IdentitySettings,
    lines: Iterable[str],
    operator_id: str,
) -> ImportReport:
    report = ImportReport()
    questions = settings.question_ids()
    password_box = SecretBox(settings.password_keys)
    command_id = str(uuid.uuid4())
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = AccountRecord.model_validate(json.loads(line))
            clean = validate_record(record, questions)
        except json.JSONDecodeError as exc:
            report.errors.append((number, f"not JSON ({exc.msg})"))
            continue
        except ValidationError as exc:
            report.errors.append((number, describe_errors(exc)))
            continue
        except ValueError as exc:
            report.errors.append((number, str(exc)))
            continue
        hashes = {q: await hasher.hash(domain.normalize_answer(a)) for q, a in sorted(record.answers.items())}
        existing = await store.raw_by_national_id(clean["national_id"])
        account_id = existing["_id"] if existing else uuid.uuid4().hex
        registry_fields = {
            "national_id": clean["national_id"],
            "profile": record.profile,
            "representative_id": clean["representative_id"],
            "name": record.name,
            "email": clean["email"],
            "locale": record.locale,
            "answer_hashes": hashes,
            "updated_at": datetime.now(UTC),
            # Only what the line gives: a backup e-mail or phone the citizen set is not erased.
            **clean["contact"],
        }
        # Every line tells the password service the account's login name (its national ID; a
        # re-import backfills it), and a new account's initial key, sealed for it (bound to it).
        initial_key = record.password if existing is None else None
        sealed_key = (
            None
            if initial_key is None
            else password_box.seal(
                {"password": initial_key},
                purpose=Purpose.INITIAL_KEY,
                context=initial_key_context(account_id=account_id),
            )
        )
        event = new_event(
            type=EventType.ACCOUNT_REGISTERED,
            source=SOURCE,
            correlationid=command_id,
            data=AccountRegistered(
                account_id=account_id, national_id=clean["national_id"], sealed_initial_key=sealed_key
            ).model_dump(mode="json", exclude_none=True),
        )
        outgoing: list[Outgoing] = [Outgoing(IDENTITY_ACCOUNT_REGISTERED, account_id, event)]
        action = "account_updated" if existing else "account_imported"
        outgoing.append(
            audit_event(
                AuditRecord(
                    service="identity",
                    action=action,
                    outcome="success",
                    actor=operator_id,
                    account_id=account_id,
                    subject_ref=keyed_hash(settings.pseudonym_key, clean["national_id"]),
                    details={"profile": record.profile, "line": number},
                ),
                correlationid=command_id,
                causationid=None,
                source=SOURCE,
            )
        )

        async def writes(
            s: AsyncClientSession, account_id: str = account_id, fields: dict[str, Any] = registry_fields
        ) -> None:
            await store.db[ACCOUNTS].update_one(
                {"_id": account_id},
                {
                    "$set": fields,
                    "$setOnInsert": {"created_at": datetime.now(UTC)},
                },
                upsert=True,
                session=s,
            )

        await store.commit(consumer=None, event_id=None, writes=writes, outgoing=outgoing)
        if existing:
            report.updated += 1
        else:
            report.created += 1
    return report
