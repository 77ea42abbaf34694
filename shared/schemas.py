"""Payload (`data`) models of every event type: the schemas of the topic contract.

Validation here is about shape only (types, lengths, enumerations). Business
rules (is this cédula valid? does this answer match?) live in each service's
domain. Unknown fields are rejected so a typo in a producer is loud.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.topics import EventType


class Payload(BaseModel):
    """Portal input and operator commands: unknown fields are refused (a typo is loud)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class InternalPayload(Payload):
    """Events between Clave's services: a newer producer may add optional fields before every
    consumer is upgraded (rolling deploys), so unknown fields are ignored, never fatal."""

    model_config = ConfigDict(extra="ignore", frozen=True)


RequestId = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
# A secret the portal sealed to Clave's public key (shared/portal_input.py): base64url of HPKE's
# enc || ciphertext.
Sealed = Field(default=None, min_length=1, max_length=8192, pattern=r"^[A-Za-z0-9_-]+={0,2}$")
MAX_ANSWERS = 16


def ip_text(value: str) -> str:
    """An IP address in its canonical text. The error never quotes the input (ipaddress's own
    does): validation messages reach the DLQ's unsealed `clave-dlq-detail` header and logs,
    and a portal that misfiles a field would put a secret there."""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("not an IPv4 or IPv6 address") from None


def check_answers(value: dict[str, str]) -> dict[str, str]:
    """The bounds of a set of security answers (plain, or opened from `sealed_answers`)."""
    if len(value) > MAX_ANSWERS:
        raise ValueError(f"at most {MAX_ANSWERS} answers")
    for key, answer in value.items():
        if not 1 <= len(key) <= 64 or len(answer) > 256:
            raise ValueError("answer keys must be 1-64 characters and answers at most 256")
    return value


AccountId = Field(min_length=1, max_length=64)
Locale = Literal["es", "en"]


# ---- portal-facing ---------------------------------------------------------------------------


class RecoveryRequested(Payload):
    request_id: str = RequestId
    profile: Literal["affiliate", "employer"]
    national_id: str = Field(min_length=1, max_length=32)
    representative_id: str | None = Field(default=None, max_length=32)
    email: str = Field(min_length=3, max_length=254)
    # Exactly one of `answers` and `sealed_answers` (added: the answers sealed to Clave's key).
    answers: dict[str, str] | None = Field(default=None, max_length=MAX_ANSWERS)
    captcha_passed: bool
    locale: Locale = "es"
    client_ip: str = Field(max_length=45)
    sealed_answers: str | None = Sealed

    @field_validator("answers")
    @classmethod
    def _answer_sizes(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        return None if value is None else check_answers(value)

    @field_validator("client_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return ip_text(value)

    @model_validator(mode="after")
    def _one_form(self) -> RecoveryRequested:
        if (self.answers is None) == (self.sealed_answers is None):
            raise ValueError("give exactly one of answers or sealed_answers")
        return self


class ResetSubmitted(Payload):
    request_id: str = RequestId
    token: str | None = Field(default=None, min_length=1, max_length=128)
    code: str | None = Field(default=None, pattern=r"^[0-9]{6}$")
    # Exactly one of `new_password` and `sealed_new_password` (added: sealed to Clave's key).
    new_password: str | None = Field(default=None, min_length=1, max_length=256)
    # Optional (added): the citizen's address, so wrong codes count per address block too.
    client_ip: str | None = Field(default=None, max_length=45)
    sealed_new_password: str | None = Sealed

    @field_validator("client_ip")
    @classmethod
    def _ip(cls, value: str | None) -> str | None:
        return None if value is None else ip_text(value)

    @model_validator(mode="after")
    def _one_secret(self) -> ResetSubmitted:
        if (self.token is None) == (self.code is None):
            raise ValueError("give exactly one of token or code")
        if (self.new_password is None) == (self.sealed_new_password is None):
            raise ValueError("give exactly one of new_password or sealed_new_password")
        return self


class ContactUpdateRequested(Payload):
    """A citizen, logged in, changes their contact data; the current key comes with it (checked
    as a login is). Each of `email`, `backup_email`, `phone` is optional: absent keeps it, ""
    removes the backup e-mail or the phone."""

    update_id: str = RequestId
    national_id: str = Field(min_length=1, max_length=32)
    # Exactly one of `key` and `sealed_key`.
    key: str | None = Field(default=None, min_length=1, max_length=256)
    sealed_key: str | None = Sealed
    email: str | None = Field(default=None, min_length=3, max_length=254)
    backup_email: str | None = Field(default=None, max_length=254)
    phone: str | None = Field(default=None, max_length=32)
    client_ip: str = Field(max_length=45)  # wrong keys are throttled per address block, as logins

    @field_validator("client_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return ip_text(value)

    @model_validator(mode="after")
    def _key_and_change(self) -> ContactUpdateRequested:
        if (self.key is None) == (self.sealed_key is None):
            raise ValueError("give exactly one of key or sealed_key")
        if self.email is None and self.backup_email is None and self.phone is None:
            raise ValueError("give at least one of email, backup_email, phone")
        return self


class ContactResult(InternalPayload):
    """Clave's answer to a contact update (`account.contact_results`, keyed by `update_id`)."""

    update_id: str = RequestId
    status: Literal["updated", "rejected"]
    reasons: list[str] = Field(default_factory=list)


class RecoveryOutcome(InternalPayload):
    request_id: str = RequestId
    stage: Literal["request", "reset"]
    status: Literal["accepted", "completed", "rejected"]
    reasons: list[str] = Field(default_factory=list)


class LoginCheckRequested(Payload):
    """The portal asks whether a key is the citizen's (login, or a change that needs the key)."""

    check_id: str = RequestId
    national_id: str = Field(min_length=1, max_length=32)
    # Exactly one of `key` and `sealed_key` (added: the key sealed to Clave's public key).
    key: str | None = Field(default=None, min_length=1, max_length=256)
    client_ip: str = Field(max_length=45)
    sealed_key: str | None = Sealed

    @field_validator("client_ip")
    @classmethod
    def _ip(cls, value: str) -> str:
        return ip_text(value)

    @model_validator(mode="after")
    def _one_key(self) -> LoginCheckRequested:
        if (self.key is None) == (self.sealed_key is None):
            raise ValueError("give exactly one of key or sealed_key")
        return self


class LoginResult(InternalPayload):
    check_id: str = RequestId
    status: Literal["valid", "invalid"]
    reasons: list[str] = Field(default_factory=list)
    # Added: the right key is a legacy one the import took against the key policy
    # (`--legacy-keys`); the portal has the citizen choose a new one. Only with `valid`.
    must_change: bool = False


class AccountKeyChanged(InternalPayload):
    """A citizen's key changed: the portal ends their other sessions."""

    national_id: str = Field(min_length=1, max_length=32)
    changed_at: datetime
    cause: Literal["recovery", "initial"]
    request_id: str | None = None  # the recovery that changed it (cause `recovery`)


# ---- identity --------------------------------------------------------------------------------


class Recipient(InternalPayload):
    """Where and how to write to a citizen (the registered address, never the typed one)."""

    email: str
    name: str
    locale: Locale


class IdentityVerified(InternalPayload):
    request_id: str = RequestId
    account_id: str = AccountId
    recipient: Recipient
    actor: str = "system"
    requested_at: datetime | None = None  # when the portal published the request (end-to-end latency)
    # Added: the recovery goes to the backup address (`recipient`); the registered address is
    # told that a recovery was sent elsewhere.
    primary_recipient: Recipient | None = None


class IdentityLocked(InternalPayload):
    request_id: str = RequestId
    account_id: str = AccountId
    recipient: Recipient
    locked_until: datetime


class IdentityDeclined(InternalPayload):
    """A request that was not verified (any reason but a duplicate). The tokens service keeps a
    decoy for it, so the code path answers exactly as for a real token: no oracle."""

    request_id: str = RequestId
    account_id: str | None = None  # the account, when the ID named one
    subject_ref: str  # keyed hash of the national ID (counts wrong codes when no account)
    client_ip: str | None = None
    requested_at: datetime | None = None


class EmailChanged(InternalPayload):
    command_id: str
    account_id: str = AccountId
    old_recipient: Recipient
    new_recipient: Recipient
    operator_id: str


class ContactChange(InternalPayload):
    field: Literal["email", "backup_email", "phone"]
    masked: str  # the new value, masked (m***@example.org, +593***67); "" when removed


class ContactChanged(InternalPayload):
    """An account's contact data changed (by its owner after a login, or by an operator):
    live recovery tokens are revoked, and every address on file before is told."""

    change_id: str  # the portal's update_id, or the operator command's id
    account_id: str = AccountId
    old_recipients: list[Recipient]
    changes: list[ContactChange]
    actor: str = "citizen"


class ContactUpdateAuthorized(InternalPayload):
    """The password service checked the citizen's key for a contact update: identity applies it."""

    update_id: str = RequestId
    account_id: str = AccountId
    email: str | None = None
    backup_email: str | None = None
    phone: str | None = None
    client_ip: str | None = None


class AccountRegistered(InternalPayload):
    """An account from the registry: its national ID (the login name; added) and, for a new
    account with one, its initial key sealed for the password service. A re-import sends the
    national ID again without a key (it backfills the login name; a key is never overwritten)."""

    account_id: str = AccountId
    sealed_initial_key: str | None = Field(
        default=None,
        description="A new account's initial key, sealed for the password service (PASSWORD_KEYS), bound to "
        "`account_id`; absent when the registry gave none or the account exists.",
    )
    national_id: str | None = Field(
        default=None, description="The account's national ID, normalised: its login name (credential checks)."
    )
    # Added: an import's explicit migration option took a key that breaks the key policy; the
    # password service stores it marked must-change instead of refusing it.
    legacy_key: bool = False


CommandId = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")
OperatorId = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
# Every operator command is signed (shared/operator_keys.py): the operator's key id, when it was
# signed, and the Ed25519 signature over the event type and every other field of `data`.
# Optional in the schema so that an unsigned command reaches identity and is refused there with
# its reason (`signature_missing`), audited, rather than as a bare schema error.
KeyId = Field(default=None, pattern=r"^[0-9a-f]{16}$")
Signature = Field(default=None, max_length=128)


class OperatorCommand(Payload):
    command_id: str = Field(min_length=1, max_length=64)
    operator_id: str = Field(min_length=1, max_length=64)
    reason: str = Field(min_length=3, max_length=500)
    national_id: str = Field(min_length=1, max_length=32)
    new_email: str | None = Field(default=None, max_length=254)
    # Added (contact_update): "" removes the backup e-mail or the phone.
    new_backup_email: str | None = Field(default=None, max_length=254)
    new_phone: str | None = Field(default=None, max_length=32)
    issued_at: datetime | None = None
    key_id: str | None = KeyId
    signature: str | None = Signature


class OperatorApproval(Payload):
    """A second operator approves a pending command (today: an e-mail change), by its id."""

    command_id: str = CommandId
    operator_id: str = OperatorId
    reason: str = Field(min_length=3, max_length=500)
    approves: str = CommandId
    issued_at: datetime | None = None
    key_id: str | None = KeyId
    signature: str | None = Signature


class OperatorCancel(Payload):
    """An operator cancels a pending e-mail change, by its id (the requesting command's id).
    Any registered operator may, the requester too; it never takes effect then."""

    command_id: str = CommandId
    operator_id: str = OperatorId
    reason: str = Field(min_length=3, max_length=500)
    cancels: str = CommandId
    issued_at: datetime | None = None
    key_id: str | None = KeyId
    signature: str | None = Signature


class AccountImport(Payload):
    """One line of the registry import, as a signed operator command. The answers and the
    initial key travel sealed for identity (IMPORT_KEYS), bound to this command and ID."""

    command_id: str = CommandId
    operator_id: str = OperatorId
    reason: str = Field(min_length=3, max_length=500)
    national_id: str = Field(min_length=1, max_length=32)
    profile: Literal["affiliate", "employer"]
    name: str = Field(min_length=1, max_length=200)
    email: str = Field(min_length=3, max_length=254)
    locale: Locale = "es"
    representative_id: str | None = Field(default=None, max_length=32)
    sealed_secrets: str = Field(min_length=1, max_length=8192)  # {"command_id", "national_id", "answers", "password"}
    legacy_key: bool = False  # the migration option: a key breaking the policy is taken, marked must-change
    # Added: optional contact data (not secret; validated by identity as the import format says).
    backup_email: str | None = Field(default=None, min_length=3, max_length=254)
    phone: str | None = Field(default=None, min_length=1, max_length=32)
    line: int | None = Field(default=None, ge=1)  # its line in the import file, for the operator's report
    issued_at: datetime | None = None
    key_id: str | None = KeyId
    signature: str | None = Signature


class OperatorKeyRegistered(Payload):
    """`admin` registers an operator's Ed25519 public key (identity.operator_keys)."""

    operator_id: str = OperatorId
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    public_key: str = Field(min_length=40, max_length=64)  # base64 of the raw 32-byte key
    reason: str = Field(min_length=3, max_length=500)
    registered_by: str = Field(min_length=1, max_length=64)  # the person acting as admin (audited)


class OperatorKeyRevoked(Payload):
    operator_id: str = OperatorId
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    reason: str = Field(min_length=3, max_length=500)
    revoked_by: str = Field(min_length=1, max_length=64)


class CommandResult(InternalPayload):
    """What became of an operator command (identity.command_results, read by the operator)."""

    command_id: str
    operator_id: str
    command: str  # the command's event type
    status: Literal["succeeded", "rejected", "pending", "applied"]
    reasons: list[str] = Field(default_factory=list)
    effect: str | None = None  # e.g. created, updated, unchanged, approved
    change_id: str | None = None  # the e-mail change this concerns (the requesting command's id)
    effective_at: datetime | None = None  # a pending e-mail change: the earliest time it takes effect
    line: int | None = None  # an import command's line
    detail: str | None = None  # a refused import line: which rule it breaks (never a value)


class EmailChangeRequested(InternalPayload):
    """An e-mail change was requested: both addresses are told before it takes effect."""

    change_id: str
    account_id: str = AccountId
    old_recipient: Recipient
    new_recipient: Recipient
    operator_id: str
    not_before: datetime  # the end of the cooling-off period; a second operator must approve too


class EmailChangeCancelled(InternalPayload):
    """A pending e-mail change was cancelled by an operator: both addresses are told it will not
    take effect (on identity.email_change_requested, after its request notice)."""

    change_id: str
    account_id: str = AccountId
    old_recipient: Recipient  # the registered address, which stays
    new_recipient: Recipient  # the proposed address, which will not be used
    operator_id: str  # who cancelled it


# ---- tokens ----------------------------------------------------------------------------------


class TokensIssued(InternalPayload):
    request_id: str = RequestId
    account_id: str = AccountId
    token_id: str
    recipient: Recipient
    link_expires_at: datetime
    code_expires_at: datetime
    sealed_secrets: str = Field(
        description="The link token and code, sealed for the notifier (NOTIFIER_KEYS), bound to `token_id`, "
        "`account_id`, `request_id` and the recipient's address."
    )
    requested_at: datetime | None = None
    primary_recipient: Recipient | None = None  # added: told that the recovery went to `recipient`


class TokensRedeemed(InternalPayload):
    request_id: str = RequestId
    account_id: str = AccountId
    token_id: str
    recipient: Recipient
    sealed_new_key: str = Field(
        description="The new key, sealed for the password service (PASSWORD_KEYS), bound to `token_id`, "
        "`account_id` and `request_id`."
    )
    submitted_at: datetime | None = None  # when the portal published the reset (end-to-end latency)


# ---- password --------------------------------------------------------------------------------


class CodeRejected(InternalPayload):
    """A wrong code was typed for a request: identity counts it towards the lockout."""

    request_id: str = RequestId
    account_id: str | None = None  # None for a decoy of an unknown ID
    subject_ref: str | None = None
    client_ip: str | None = None


class PasswordUpdated(InternalPayload):
    request_id: str = RequestId
    account_id: str = AccountId
    token_id: str
    recipient: Recipient
    changed_at: datetime


class PasswordRejected(InternalPayload):
    request_id: str = RequestId
    account_id: str = AccountId
    token_id: str
    reasons: list[str]


# ---- notifier --------------------------------------------------------------------------------


class NotificationResult(InternalPayload):
    notification_id: str
    kind: str
    account_id: str | None = None
    request_id: str | None = None
    attempts: int
    error: str | None = None


# ---- audit -----------------------------------------------------------------------------------


class AuditRecord(InternalPayload):
    """One audited state change. Never carries a secret; a national ID only as a keyed hash."""

    service: str
    action: str
    outcome: Literal["success", "rejected", "failed", "info"]
    actor: str = "system"
    account_id: str | None = None
    subject_ref: str | None = None  # keyed hash of a national ID when no account is known
    request_id: str | None = None
    reasons: list[str] = Field(default_factory=list)
    details: dict[str, str | int | float | bool | None] = Field(default_factory=dict)
    integrity: dict[str, str | int] | None = None  # added by the outbox relay: producer, seq, prev, kid, sig


SCHEMAS: dict[str, type[Payload]] = {
    EventType.RECOVERY_REQUESTED: RecoveryRequested,
    EventType.RESET_SUBMITTED: ResetSubmitted,
    EventType.RECOVERY_OUTCOME: RecoveryOutcome,
    EventType.IDENTITY_VERIFIED: IdentityVerified,
    EventType.IDENTITY_LOCKED: IdentityLocked,
    EventType.IDENTITY_EMAIL_CHANGED: EmailChanged,
    EventType.ACCOUNT_REGISTERED: AccountRegistered,
    EventType.IDENTITY_DECLINED: IdentityDeclined,
    EventType.OPERATOR_EMAIL_UPDATE: OperatorCommand,
    EventType.OPERATOR_UNLOCK: OperatorCommand,
    EventType.OPERATOR_SEND_RECOVERY: OperatorCommand,
    EventType.OPERATOR_CONTACT_UPDATE: OperatorCommand,
    EventType.CONTACT_UPDATE_REQUESTED: ContactUpdateRequested,
    EventType.CONTACT_RESULT: ContactResult,
    EventType.CONTACT_AUTHORIZED: ContactUpdateAuthorized,
    EventType.IDENTITY_CONTACT_CHANGED: ContactChanged,
    EventType.OPERATOR_APPROVE: OperatorApproval,
    EventType.OPERATOR_ACCOUNT_IMPORT: AccountImport,
    EventType.OPERATOR_KEY_REGISTERED: OperatorKeyRegistered,
    EventType.OPERATOR_KEY_REVOKED: OperatorKeyRevoked,
    EventType.OPERATOR_COMMAND_RESULT: CommandResult,
    EventType.IDENTITY_EMAIL_CHANGE_REQUESTED: EmailChangeRequested,
    EventType.OPERATOR_CANCEL: OperatorCancel,
    EventType.IDENTITY_EMAIL_CHANGE_CANCELLED: EmailChangeCancelled,
    EventType.TOKENS_ISSUED: TokensIssued,
    EventType.TOKENS_REDEEMED: TokensRedeemed,
    EventType.TOKENS_CODE_REJECTED: CodeRejected,
    EventType.PASSWORD_UPDATED: PasswordUpdated,
    EventType.PASSWORD_REJECTED: PasswordRejected,
    EventType.NOTIFIER_SENT: NotificationResult,
    EventType.NOTIFIER_FAILED: NotificationResult,
    EventType.AUDIT: AuditRecord,
    EventType.LOGIN_CHECK_REQUESTED: LoginCheckRequested,
    EventType.LOGIN_RESULT: LoginResult,
    EventType.ACCOUNT_KEY_CHANGED: AccountKeyChanged,
}
