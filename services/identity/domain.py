"""Identity rules: who may recover a key. Pure functions and state, no I/O.

The handler loads the facts of one request (the account, its counters, the hash results)
and calls `decide_request` once; the decision says everything that follows: the outcome,
the events to emit, and what to record (failures, locks, mails, notices, rehashes).

The request-stage reasons are stable codes; they reach the audit log only,
never the portal (which always sees `accepted`).

Lockout (see README, Security): failures count per principal (an account, or an ID with no
account) and per (principal, address block). Five failures from one block in 15 minutes
lock that block out of that account for 30 minutes; the owner answering right from another
address is not affected. Twenty failures in 24 hours across all blocks put the account in
slowed mode: each block then gets one evaluated attempt an hour. Lock notices have their
own quota, so a stranger can neither flood the owner's mailbox nor use up its recovery mails.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

import phonenumbers
from email_validator import EmailNotValidError, validate_email

# Shared with the password service's credential checks (re-exported: identity's callers use them here).
from shared.crypto import constant_time_equal
from shared.national_id import InvalidId, normalize_cedula, normalize_national_id
from shared.throttle import address_block, address_block_or_none, within

__all__ = ["InvalidId", "address_block", "address_block_or_none", "normalize_national_id"]


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


class OutcomeReason:
    """Why a request was answered `rejected` rather than `accepted` on recovery.outcomes (public,
    unlike `Reason`): about the request itself, never about the account it names."""

    DUPLICATE_REQUEST = Reason.DUPLICATE_REQUEST  # the same request_id again: the first answer stands
    # The request could not be processed at all (its dead letter says why): answered from the
    # record's bytes alone, before any lookup, so alike for a known and an unknown ID.
    REQUEST_INVALID = "request_invalid"


# Failures that count towards the lockout (a guess at the citizen's secrets).
COUNTED_FAILURES = {Reason.ANSWERS_WRONG, Reason.EMAIL_MISMATCH, Reason.REPRESENTATIVE_MISMATCH}


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
        # Constant time: the address on file is one of the things a requester must know.
        return constant_time_equal(normalize_email(typed).casefold(), normalize_email(registered).casefold())
    except ValueError:
        return False


def mask_email(address: str) -> str:
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}"


# Numbers written without a country code are read as Ecuadorian (the portal's citizens).
PHONE_REGION = "EC"


def normalize_phone(raw: str) -> str:
    """A phone number as E.164 (`+593991234567`), checked with libphonenumber's metadata
    (length and number ranges of its country). Raises ValueError."""
    try:
        number = phonenumbers.parse(raw, PHONE_REGION)
    except phonenumbers.NumberParseException:
        raise ValueError("invalid phone number: not a phone number") from None
    if not phonenumbers.is_valid_number(number):
        raise ValueError("invalid phone number: not a valid number for its country")
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def mask_phone(number: str) -> str:
    return f"{number[:4]}***{number[-2:]}"


@dataclass(frozen=True)
class Contact:
    """The contact data an account keeps: the registered e-mail (recoveries go there), an
    optional backup e-mail (a recovery may go there when the citizen types it) and phone."""

    email: str
    backup_email: str | None = None
    phone: str | None = None


class ContactReason:
    """Why a contact change was refused (`account.contact_results`, `rejected`)."""

    EMAIL_INVALID = "email_invalid"
    BACKUP_EMAIL_INVALID = "backup_email_invalid"
    PHONE_INVALID = "phone_invalid"
    BACKUP_SAME_AS_EMAIL = "backup_same_as_email"
    NOTHING_TO_CHANGE = "nothing_to_change"
    ACCOUNT_UNKNOWN = "account_unknown"


CLEAR = ""  # a change to "" removes the backup e-mail or the phone


def new_contact(current: Contact, email: str | None, backup_email: str | None, phone: str | None) -> Contact:
    """The contact data after a change (None: keep; "": remove an optional one), normalised.
    Raises ContactRefused with every reason that applies."""
    reasons = []
    result = {"email": current.email, "backup_email": current.backup_email, "phone": current.phone}
    for name, value, reason, normalize in (
        ("email", email, ContactReason.EMAIL_INVALID, normalize_email),
        ("backup_email", backup_email, ContactReason.BACKUP_EMAIL_INVALID, normalize_email),
        ("phone", phone, ContactReason.PHONE_INVALID, normalize_phone),
    ):
        if value is None:
            continue
        if value == CLEAR and name != "email":
            result[name] = None
            continue
        try:
            result[name] = normalize(value)
        except ValueError:
            reasons.append(reason)
    if not reasons and result["backup_email"] and same_mailbox(result["backup_email"], result["email"] or ""):
        reasons.append(ContactReason.BACKUP_SAME_AS_EMAIL)
    changed = Contact(result["email"] or current.email, result["backup_email"], result["phone"])
    if not reasons and changed == current:
        reasons.append(ContactReason.NOTHING_TO_CHANGE)
    if reasons:
        raise ContactRefused(tuple(reasons))
    return changed


class ContactRefused(ValueError):
    def __init__(self, reasons: tuple[str, ...]) -> None:
        super().__init__(", ".join(reasons))
        self.reasons = reasons


def old_addresses(before: Contact) -> tuple[str, ...]:
    """Every address on file before a change: each is told (a stolen key cannot quietly move
    the recovery mailbox). Distinct, the primary first."""
    found = [before.email] + ([before.backup_email] if before.backup_email else [])
    return tuple(dict.fromkeys(found))


def changed_fields(before: Contact, after: Contact) -> list[tuple[str, str]]:
    """(field, new value masked; "" when removed) for each field that changed."""
    out = []
    for name, mask in (("email", mask_email), ("backup_email", mask_email), ("phone", mask_phone)):
        old, new = getattr(before, name), getattr(after, name)
        if old != new:
            out.append((name, mask(new) if new else ""))
    return out


def recovery_address(typed: str, account: Account) -> str | None:
    """Where a verified recovery goes: the registered address, or the backup address when that
    is what the citizen typed. None when the typed address is neither."""
    if same_mailbox(typed, account.email):
        return account.email
    if account.backup_email and same_mailbox(typed, account.backup_email):
        return account.backup_email
    return None


# ---- limits and counters ---------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Every number of the lockout and rate limits (IdentitySettings.limits() fills it)."""

    block_max_failures: int = 5  # from one address block against one account...
    block_window: timedelta = timedelta(minutes=15)  # ...within this window...
    block_lock: timedelta = timedelta(minutes=30)  # ...lock that block out of that account
    account_max_failures: int = 20  # across all blocks...
    account_window: timedelta = timedelta(hours=24)  # ...within this window: slowed mode
    slowed_interval: timedelta = timedelta(hours=1)  # slowed: one evaluated attempt per block per interval
    address_max_failures: int = 30  # failed requests from one address block...
    address_window: timedelta = timedelta(minutes=15)  # ...within this window: rate-limited
    mails_per_hour: int = 3  # recovery mails per account (mailbox-flood protection)
    notices_max: int = 1  # lock notices per account...
    notice_window: timedelta = timedelta(hours=6)  # ...within this window

    def keep(self) -> int:
        """How many timestamps a counter must keep to apply these limits."""
        return max(
            self.block_max_failures,
            self.account_max_failures,
            self.address_max_failures,
            self.mails_per_hour,
            self.notices_max,
        )

    def retention(self) -> timedelta:
        """How long a counter must outlive its last change."""
        return max(
            self.block_window,
            self.block_lock,
            self.account_window,
            self.slowed_interval,
            self.address_window,
            timedelta(hours=1),
            self.notice_window,
        )


@dataclass(frozen=True)
class PrincipalState:
    """One account (or one ID with no account), across all addresses."""

    rev: int = 0  # bumped by every write: the store applies a decision only to the state it saw
    failures: tuple[datetime, ...] = ()
    mails: tuple[datetime, ...] = ()
    notices: tuple[datetime, ...] = ()


@dataclass(frozen=True)
class BlockState:
    """One principal as seen from one address block."""

    failures: tuple[datetime, ...] = ()
    locked_until: datetime | None = None
    last_attempt: datetime | None = None  # the last evaluated attempt (slowed mode)


@dataclass(frozen=True)
class AddressState:
    """One address block, across all principals."""

    failures: tuple[datetime, ...] = ()


@dataclass(frozen=True)
class Counters:
    principal: PrincipalState = PrincipalState()
    block: BlockState = BlockState()
    address: AddressState = AddressState()


def slowed(principal: PrincipalState, limits: Limits, now: datetime) -> bool:
    return within(principal.failures, now, limits.account_window) >= limits.account_max_failures


def block_locked(block: BlockState, now: datetime) -> bool:
    return block.locked_until is not None and block.locked_until > now


def mailbox_allows(principal: PrincipalState, limits: Limits, now: datetime) -> bool:
    return within(principal.mails, now, timedelta(hours=1)) < limits.mails_per_hour


def notice_allowed(principal: PrincipalState, limits: Limits, now: datetime) -> bool:
    return within(principal.notices, now, limits.notice_window) < limits.notices_max


# ---- facts and decisions ---------------------------------------------------------------------


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
    backup_email: str | None = None
    phone: str | None = None

    @property
    def contact(self) -> Contact:
        return Contact(self.email, self.backup_email, self.phone)


@dataclass(frozen=True)
class AnswerChecks:
    """The argon2 results: each configured question's typed answer against the stored hash
    (a decoy hash when there is none, so every request pays the same)."""

    verified: Mapping[str, bool]
    answered: frozenset[str]  # the questions the request answered at all
    outdated: frozenset[str] = frozenset()  # stored hashes made with older argon2 parameters


@dataclass(frozen=True)
class RequestFacts:
    """Everything the handler knows about one recovery request before the verdict."""

    seen_before: bool  # this request_id was already handled
    profile: str
    captcha_passed: bool
    national_id: str | None  # normalised; None when the ID fails its check digits
    account: Account | None  # the account with that ID, if any
    typed_email: str
    typed_representative: str | None
    counters: Counters
    answers: AnswerChecks | None = None  # None: not hashed (a cheap check refused the request)


class Emit(StrEnum):
    ACCEPTED = "accepted"  # recovery.outcomes: the portal's answer, the same on every path
    VERIFIED = "verified"  # identity.verified: tokens issue a real link and code
    DECLINED = "declined"  # identity.declined: tokens keep a decoy that answers as a real one
    LOCK_NOTICE = "lock_notice"  # identity.locked: the owner is told
    DUPLICATE = "duplicate"  # recovery.outcomes: `rejected` / `duplicate_request` (the first copy was answered)


class Audit(StrEnum):
    LOCKED = "account_locked"  # a block was locked out of the account
    SLOWED = "account_slowed"  # the account reached its cap: slowed mode


@dataclass(frozen=True)
class Record:
    """What to store. Every counter is written on every path (equal cost); these say how."""

    request: bool = False  # remember the request_id (duplicates)
    principal_failure: bool = False
    block_failure: bool = False
    address_failure: bool = False
    attempt: bool = False  # an evaluated attempt from this block (slowed mode)
    lock_until: datetime | None = None  # lock the block until then
    mail: bool = False  # a recovery mail (counts towards the mailbox limit)
    notice: bool = False  # a lock notice (its own quota)
    rehash: frozenset[str] = frozenset()  # questions whose answers get a fresh hash


@dataclass(frozen=True)
class Decision:
    verified: bool
    reasons: tuple[str, ...]
    account: Account | None = None  # the account the request is about, if it named one
    emit: tuple[Emit, ...] = ()
    record: Record | None = field(default_factory=Record)  # None: store nothing at all
    audits: tuple[Audit, ...] = ()
    locked_until: datetime | None = None  # the block's lock, for the notice
    mail_to: str | None = None  # verified: the address the recovery goes to (registered or backup)

    @property
    def to_backup(self) -> bool:
        """The recovery goes to the backup address the citizen typed: the registered one is told."""
        return self.account is not None and self.mail_to is not None and self.mail_to != self.account.email


def cheap_refusal(facts: RequestFacts, limits: Limits, now: datetime) -> str | None:
    """The checks on the requester's own input, made before any hashing: skipping the work
    for them tells the requester nothing they did not send (or, for the address, already
    know). A duplicate is refused here too."""
    if facts.seen_before:
        return Reason.DUPLICATE_REQUEST
    if within(facts.counters.address.failures, now, limits.address_window) >= limits.address_max_failures:
        return Reason.RATE_LIMITED
    if not facts.captcha_passed:
        return Reason.CAPTCHA_MISSING
    if facts.national_id is None:
        return Reason.ID_INVALID
    return None


def needs_answer_checks(facts: RequestFacts, limits: Limits, now: datetime) -> bool:
    """Whether the decision will need the argon2 results. Every path past the cheap checks
    hashes (unknown ID, locked, slowed...), so their timing cannot tell them apart."""
    return facts.answers is None and cheap_refusal(facts, limits, now) is None


def decide_request(facts: RequestFacts, limits: Limits, now: datetime) -> Decision:
    """The whole verdict on one recovery request."""
    cheap = cheap_refusal(facts, limits, now)
    if cheap == Reason.DUPLICATE_REQUEST:
        # The first copy had its effect: nothing more, but the portal hears why (it may be waiting).
        return Decision(False, (cheap,), emit=(Emit.DUPLICATE,), record=None)
    decision = _verdict(facts, cheap, limits, now)
    return replace(decision, record=replace(decision.record or Record(), request=True))


def _verdict(facts: RequestFacts, cheap: str | None, limits: Limits, now: datetime) -> Decision:
    account = facts.account if facts.account is not None and facts.account.profile == facts.profile else None
    if cheap == Reason.RATE_LIMITED:
        return _declined(account, cheap)  # the address is already over its limit: not counted again
    if cheap is not None:
        return _declined(account, cheap, Record(address_failure=True))
    if account is None:
        # Counted like a known account's failure: the same writes, and guesses at IDs that
        # do not exist are on record too. Nothing to lock: there is no secret to guess.
        return _declined(None, Reason.ACCOUNT_UNKNOWN, _failure())
    principal, block = facts.counters.principal, facts.counters.block
    if block_locked(block, now):
        notice = notice_allowed(principal, limits, now)
        return _declined(
            account,
            Reason.LOCKED,
            Record(address_failure=True, notice=notice),
            notice=notice,
            locked_until=block.locked_until,
        )
    recently = block.last_attempt is not None and block.last_attempt > now - limits.slowed_interval
    if recently and slowed(principal, limits, now):
        # Refused without evaluation: one guess per block per interval, whatever it is.
        return _declined(account, Reason.RATE_LIMITED, Record(address_failure=True))
    assert facts.answers is not None, "the handler checks the answers when needs_answer_checks() says so"
    wrong = _wrong_secrets(facts, account, facts.answers)
    if wrong:
        return _failed(account, wrong, facts.counters, limits, now, attempt=True)
    if not mailbox_allows(principal, limits, now):
        # Right answers: the owner, most likely. Not a failure, and not the address's fault.
        return _declined(account, Reason.RATE_LIMITED, Record(attempt=True))
    rehash = facts.answers.outdated & frozenset(account.answer_hashes)
    return Decision(
        True,
        (),
        account,
        (Emit.ACCEPTED, Emit.VERIFIED),
        Record(attempt=True, mail=True, rehash=rehash),
        mail_to=recovery_address(facts.typed_email, account),
    )


def decide_code_rejected(
    account: Account | None, counters: Counters, has_block: bool, limits: Limits, now: datetime
) -> Decision:
    """A wrong code typed for a request (tokens.code_rejected): counted exactly like a failed
    request, per principal and, when the reset came with an address, per block. It is not an
    evaluated request, so it does not use the block's one attempt an hour in slowed mode."""
    if account is None:
        return Decision(False, (), None, (), _failure(block=has_block))
    return _failed(account, (), counters, limits, now, block=has_block, emit=())


def _wrong_secrets(facts: RequestFacts, account: Account, answers: AnswerChecks) -> tuple[str, ...]:
    questions = answers.verified.keys()
    answers_ok = (
        bool(questions)
        and all(answers.verified.values())
        and questions <= answers.answered
        and questions <= account.answer_hashes.keys()
    )
    wrong = []
    if not answers_ok:
        wrong.append(Reason.ANSWERS_WRONG)
    if recovery_address(facts.typed_email, account) is None:
        wrong.append(Reason.EMAIL_MISMATCH)
    if not representative_matches(account, facts.typed_representative):
        wrong.append(Reason.REPRESENTATIVE_MISMATCH)
    return tuple(wrong)


def representative_matches(account: Account, typed: str | None) -> bool:
    """An employer's request names its legal representative's cédula; others need none."""
    if account.profile != "employer":
        return True
    if typed is None or account.representative_id is None:
        return False
    try:
        return constant_time_equal(normalize_cedula(typed), account.representative_id)
    except InvalidId:
        return False


def _failure(*, block: bool = True) -> Record:
    return Record(principal_failure=True, block_failure=block, address_failure=block)


def _failed(
    account: Account,
    reasons: tuple[str, ...],
    counters: Counters,
    limits: Limits,
    now: datetime,
    *,
    block: bool = True,
    attempt: bool = False,
    emit: tuple[Emit, ...] = (Emit.ACCEPTED, Emit.DECLINED),
) -> Decision:
    """A counted failure: it may lock this block (and tell the owner) and may slow the account."""
    principal = counters.principal
    locks = block and within(counters.block.failures, now, limits.block_window) + 1 >= limits.block_max_failures
    lock_until = now + limits.block_lock if locks else None
    notice = locks and notice_allowed(principal, limits, now)
    audits = [Audit.LOCKED] if locks else []
    if within(principal.failures, now, limits.account_window) + 1 == limits.account_max_failures:
        audits.append(Audit.SLOWED)
    return Decision(
        False,
        reasons,
        account,
        emit + ((Emit.LOCK_NOTICE,) if notice else ()),
        Record(
            principal_failure=True,
            block_failure=block,
            address_failure=block,
            attempt=attempt,
            lock_until=lock_until,
            notice=notice,
        ),
        tuple(audits),
        lock_until,
    )


def _declined(
    account: Account | None,
    reason: str,
    record: Record | None = None,
    *,
    notice: bool = False,
    locked_until: datetime | None = None,
) -> Decision:
    emit = (Emit.ACCEPTED, Emit.DECLINED) + ((Emit.LOCK_NOTICE,) if notice else ())
    return Decision(False, (reason,), account, emit, record or Record(), locked_until=locked_until)
