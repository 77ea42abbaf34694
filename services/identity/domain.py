"""Identity rules: who may recover a key. Pure functions and state, no I/O.

The request-stage reasons are stable codes; they reach the audit log only,
never the portal (which always sees `accepted`).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from email_validator import EmailNotValidError, validate_email
from stdnum.ec import ci, ruc
from stdnum.exceptions import ValidationError as StdnumError


class Reason:
    ID_INVALID = "id_invalid"
    ACCOUNT_UNKNOWN = "account_unknown"
    ANSWERS_WRONG = "answers_wrong"
    EMAIL_MISMATCH = "email_mismatch"
    REPRESENTATIVE_MISMATCH = "representative_mismatch"
    CAPTCHA_MISSING = "captcha_missing"
    LOCKED = "locked"
    RATE_LIMITED = "rate_limited"
    DUPLICATE_REQUEST = "duplicate_request"


# Failures that count towards the account lockout (a guess at the citizen's secrets).
COUNTED_FAILURES = {Reason.ANSWERS_WRONG, Reason.EMAIL_MISMATCH, Reason.REPRESENTATIVE_MISMATCH}


class InvalidId(ValueError):
    pass


def normalize_national_id(profile: str, raw: str) -> str:
    """Cédula (affiliate, 10 digits) or RUC (employer, 13 digits), as people type them."""
    module = ci if profile == "affiliate" else ruc
    try:
        return str(module.validate(raw))  # compact() drops spaces and dashes first
    except StdnumError as exc:
        raise InvalidId(str(exc)) from None


def normalize_cedula(raw: str) -> str:
    return normalize_national_id("affiliate", raw)


def normalize_answer(text: str) -> str:
    """Case, accents and spacing do not matter: 'Ándrade ' == 'andrade'."""
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(c for c in decomposed if not unicodedata.combining(c))
    return re.sub(r"\s+", " ", stripped).strip().casefold()


def normalize_email(address: str) -> str:
    """Syntax-checked, IDNA/Unicode-normalised address (domain lower-cased)."""
    try:
        return str(validate_email(address, check_deliverability=False).normalized)
    except EmailNotValidError as exc:
        raise ValueError(f"invalid e-mail address: {exc}") from None


def same_mailbox(typed: str, registered: str) -> bool:
    """Compare ignoring case entirely: providers treat local parts case-insensitively in
    practice, and a citizen typing 'Maria.Perez@' for 'maria.perez@' is not a wrong guess."""
    try:
        return normalize_email(typed).casefold() == normalize_email(registered).casefold()
    except ValueError:
        return False


def mask_email(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


@dataclass(frozen=True)
class LockoutPolicy:
    max_failures: int = 5
    window: timedelta = timedelta(minutes=15)
    duration: timedelta = timedelta(minutes=30)

    def recent(self, failures: list[datetime], now: datetime) -> list[datetime]:
        return [t for t in failures if t > now - self.window]

    def locks_after(self, failures: list[datetime], now: datetime) -> bool:
        """Would one more failure now lock the account?"""
        return len(self.recent(failures, now)) + 1 >= self.max_failures


@dataclass(frozen=True)
class MailboxLimit:
    """At most `per_hour` recovery e-mails per account per hour (mailbox-flood protection)."""

    per_hour: int = 3

    def allows(self, sent_at: list[datetime], now: datetime) -> bool:
        return len([t for t in sent_at if t > now - timedelta(hours=1)]) < self.per_hour


@dataclass
class Account:
    account_id: str
    national_id: str
    profile: str
    name: str
    email: str
    locale: str
    answer_hashes: dict[str, str]
    representative_id: str | None = None
    failures: list[datetime] = field(default_factory=list)
    locked_until: datetime | None = None
    mails_sent: list[datetime] = field(default_factory=list)

    def is_locked(self, now: datetime) -> bool:
        return self.locked_until is not None and self.locked_until > now


@dataclass(frozen=True)
class Evidence:
    """What the handler established for one request (hash checks done off-loop)."""

    captcha_passed: bool
    id_valid: bool
    account: Account | None
    answers_ok: bool
    email_ok: bool
    representative_ok: bool
    ip_rate_limited: bool


@dataclass(frozen=True)
class Decision:
    verified: bool
    reasons: list[str]
    count_failure: bool = False
    lock: bool = False
    send_locked_notice: bool = False


def decide(ev: Evidence, now: datetime, lockout: LockoutPolicy, mailbox: MailboxLimit) -> Decision:
    """The verdict on one recovery request. Order matters only for which reasons are
    reported; every branch has already paid the same hashing cost (see handlers)."""
    if ev.ip_rate_limited:
        return Decision(False, [Reason.RATE_LIMITED])
    if not ev.captcha_passed:
        return Decision(False, [Reason.CAPTCHA_MISSING])
    if not ev.id_valid:
        return Decision(False, [Reason.ID_INVALID])
    account = ev.account
    if account is None:
        return Decision(False, [Reason.ACCOUNT_UNKNOWN])
    if account.is_locked(now):
        # Tell the real owner why nothing came, within the mailbox limit.
        return Decision(False, [Reason.LOCKED], send_locked_notice=mailbox.allows(account.mails_sent, now))
    reasons = []
    if not ev.answers_ok:
        reasons.append(Reason.ANSWERS_WRONG)
    if not ev.email_ok:
        reasons.append(Reason.EMAIL_MISMATCH)
    if not ev.representative_ok:
        reasons.append(Reason.REPRESENTATIVE_MISMATCH)
    if reasons:
        lock = lockout.locks_after(account.failures, now)
        return Decision(False, reasons, count_failure=True, lock=lock, send_locked_notice=lock)
    if not mailbox.allows(account.mails_sent, now):
        return Decision(False, [Reason.RATE_LIMITED])
    return Decision(True, [])
