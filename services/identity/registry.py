"""The account import format (the institution's registry, JSON lines, one account each) and
its rules, shared by `clave accounts import` (which checks each line before sending it) and
identity (which checks it again: the command is what counts).

Each line travels as a signed operator command on `identity.commands`
(`ec.clave.operator.account_import.v1`); its answers and initial key sealed for identity
(`ImportSecrets`, IMPORT_KEYS). Identity hashes the answers and forwards the initial key sealed
for the password service. There is no other way into identity's accounts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.identity import domain
from shared.crypto import SealError, SecretBox, constant_time_equal


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


class ImportSecrets(BaseModel):
    """What an import command carries sealed for identity (IMPORT_KEYS): the answers and the
    initial key, bound to the command and the ID they were sealed for, so a sealed blob copied
    into another command (another citizen) does not open there."""

    model_config = ConfigDict(extra="forbid")

    command_id: str
    national_id: str
    answers: dict[str, str]
    password: str | None = None


def seal_secrets(box: SecretBox, secrets: ImportSecrets) -> str:
    # Its own key list (IMPORT_KEYS), and the binding is in the payload: checked by open_secrets.
    return box.seal_bytes(secrets.model_dump_json().encode())


def open_secrets(box: SecretBox, sealed: str, command_id: str, national_id: str) -> ImportSecrets:
    """The sealed secrets of one import command; ValueError when they do not open with our
    keys, are not what an import seals, or were sealed for another command or ID."""
    try:
        secrets = ImportSecrets.model_validate_json(box.open_bytes(sealed))
    except (SealError, ValidationError, ValueError):
        raise ValueError("sealed secrets do not open with IMPORT_KEYS") from None
    if not (
        constant_time_equal(secrets.command_id, command_id) and constant_time_equal(secrets.national_id, national_id)
    ):
        raise ValueError("sealed secrets were sealed for another command")
    return secrets
