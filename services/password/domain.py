"""Password rules: the configurable policy (policy.py), key history, and credential checks.

`KeyHistory` keeps the argon2id hashes of the current key and the ones before
it; a new key may not match any of the last `depth` (default 5, counting the
current one). Checking reuse needs the hasher, so it is done by the handler
with `history.hashes()`; this module only decides.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from services.password.policy import PasswordPolicy, Reason, normalize
from shared.national_id import InvalidId, normalize_any
from shared.throttle import Gate, ThrottleLimits, ThrottleState, address_limited, failure_effect, gate


def login_name(national_id: str) -> str | None:
    """The national ID a login names, normalised (a cédula or a RUC); None when it fails its
    check digits (then the check is counted against the ID as typed, and refused)."""
    try:
        return normalize_any(national_id)
    except InvalidId:
        return None


@dataclass
class KeyHistory:
    current: str | None = None
    previous: list[str] = field(default_factory=list)  # newest first

    def hashes(self, depth: int) -> list[str]:
        """The hashes a new key must not match: the current key and the depth-1 before it."""
        chain = ([self.current] if self.current else []) + self.previous
        return chain[:depth]

    def rotate(self, new_hash: str, depth: int) -> KeyHistory:
        kept = ([self.current] if self.current else []) + self.previous
        return KeyHistory(current=new_hash, previous=kept[: max(depth - 1, 0)])


def assess(policy: PasswordPolicy, candidate: str, reused: bool) -> list[str]:
    """Every reason the candidate is refused ([] means accept)."""
    reasons = policy.check(candidate)
    if reused:
        reasons.append(Reason.REUSED)
    return reasons


def hashable(candidate: str) -> str:
    """What is hashed and compared: NFKC, so the same key typed on another device matches."""
    return normalize(candidate)


# ---- credential checks (login.checks) ----------------------------------------------------------
#
# Is this the citizen's key? Protected as recovery requests are (shared/throttle.py): wrong keys
# count per account, per (account, address block) and per address block; a stranger failing
# from their own addresses locks only those out, and many addresses together only slow the
# account down (a block's first try per interval is still evaluated: the owner gets in). An ID
# with no account (or an account with no key yet) is checked against a decoy hash and counted
# the same way, so neither the answer nor its timing nor the store's writes tell it apart.


class LoginReason:
    """Why a credential check answered `invalid` (public: on `login.results`)."""

    KEY_INVALID = "key_invalid"  # a wrong key, an unknown ID or an account with no key yet: alike
    ID_INVALID = "id_invalid"  # the national ID fails its check digits (the portal's own input)
    THROTTLED = "throttled"  # too many wrong keys: the key was not considered
    CHECK_INVALID = "check_invalid"  # the check could not be read (its dead letter says why)


@dataclass(frozen=True)
class KeyFacts:
    """What the handler knows about one credential check before the verdict."""

    id_valid: bool  # the national ID passes its check digits
    throttle: ThrottleState
    has_key: bool = False  # an account with a stored key (else a decoy hash was used)
    key_matches: bool | None = None  # the argon2 result; None: not hashed (a cheap refusal)
    outdated: bool = False  # the stored hash was made with older argon2 parameters


@dataclass(frozen=True)
class KeyRecord:
    """What to count. The same counter writes happen on every path; these say which grow."""

    principal_failure: bool = False
    block_failure: bool = False
    address_failure: bool = False
    lock_until: datetime | None = None
    clear_block: bool = False  # a right key from this block forgets its wrong ones


@dataclass(frozen=True)
class KeyDecision:
    valid: bool
    reasons: tuple[str, ...] = ()
    record: KeyRecord = KeyRecord()
    rehash: bool = False  # store a fresh hash of the (right) key with today's parameters
    locked: bool = False  # this failure locked the block out (audited)
    slowed: bool = False  # this failure put the account in slowed mode (audited)


def cheap_key_refusal(facts: KeyFacts, limits: ThrottleLimits, now: datetime) -> str | None:
    """Refusals on the requester's own input, before any hashing: they tell nothing."""
    if address_limited(facts.throttle, limits, now):
        return LoginReason.THROTTLED
    if not facts.id_valid:
        return LoginReason.ID_INVALID
    return None


def needs_key_check(facts: KeyFacts, limits: ThrottleLimits, now: datetime) -> bool:
    """Whether the verdict needs the argon2 result. Every path past the cheap refusals hashes
    (locked and slowed included), so timing cannot tell them apart."""
    return facts.key_matches is None and cheap_key_refusal(facts, limits, now) is None


def decide_key(facts: KeyFacts, limits: ThrottleLimits, now: datetime) -> KeyDecision:
    """The whole verdict on one credential check."""
    cheap = cheap_key_refusal(facts, limits, now)
    if cheap == LoginReason.THROTTLED:
        return KeyDecision(False, (cheap,))  # the address is over its limit already: not counted again
    if cheap is not None:
        return KeyDecision(False, (cheap,), KeyRecord(address_failure=True))
    if gate(facts.throttle, limits, now) is not Gate.OPEN:
        # Locked out or slowed: refused whatever the key, so the answer is no oracle for it.
        return KeyDecision(False, (LoginReason.THROTTLED,), KeyRecord(address_failure=True))
    assert facts.key_matches is not None, "the handler hashes when needs_key_check() says so"
    if facts.has_key and facts.key_matches:
        return KeyDecision(True, (), KeyRecord(clear_block=True), rehash=facts.outdated)
    effect = failure_effect(facts.throttle, limits, now)
    return KeyDecision(
        False,
        (LoginReason.KEY_INVALID,),
        KeyRecord(principal_failure=True, block_failure=True, address_failure=True, lock_until=effect.lock_until),
        locked=effect.lock_until is not None,
        slowed=effect.slows,
    )
