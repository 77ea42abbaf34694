"""Credential-check rules (services/password/domain.py over shared/throttle.py): the answer for
an unknown ID equals a wrong key's, and throttling stops guessing without letting a stranger
lock the owner out."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from services.password.domain import KeyDecision, KeyFacts, KeyRecord, LoginReason, decide_key, needs_key_check
from services.password.settings import PasswordSettings
from shared.throttle import Gate, ThrottleLimits, ThrottleState, failure_effect, gate

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LIMITS = ThrottleLimits()


def ago(**kwargs: float) -> datetime:
    return NOW - timedelta(**kwargs)


def check(facts: KeyFacts) -> KeyDecision:
    """As the handler runs it: hash only when asked to (a right key unless the test says)."""
    if needs_key_check(facts, LIMITS, NOW) and facts.key_matches is None:
        facts = replace(facts, key_matches=True)
    return decide_key(facts, LIMITS, NOW)


def known(key_right: bool = True, **state: object) -> KeyFacts:
    return KeyFacts(id_valid=True, throttle=ThrottleState(**state), has_key=True, key_matches=key_right)  # type: ignore[arg-type]


WRONG = KeyRecord(principal_failure=True, block_failure=True, address_failure=True)


def test_right_key_is_valid_and_forgets_the_blocks_wrong_keys() -> None:
    d = check(known(block_failures=(ago(minutes=1),)))
    assert d.valid and d.reasons == ()
    assert d.record == KeyRecord(clear_block=True)
    assert not d.rehash


def test_right_key_with_an_outdated_hash_is_rehashed() -> None:
    d = check(replace(known(), outdated=True))
    assert d.valid and d.rehash


def test_wrong_key_counts_everywhere() -> None:
    d = check(known(key_right=False))
    assert not d.valid and d.reasons == (LoginReason.KEY_INVALID,)
    assert d.record == WRONG and not d.rehash


@pytest.mark.parametrize("matches", [True, False])
def test_unknown_id_answers_and_counts_as_a_wrong_key(matches: bool) -> None:
    # No key stored (no account, or none yet): checked against the decoy, never valid.
    unknown = KeyFacts(id_valid=True, throttle=ThrottleState(), has_key=False, key_matches=matches)
    assert check(unknown) == check(known(key_right=False))


def test_unknown_id_is_hashed_like_a_known_one() -> None:
    unknown = KeyFacts(id_valid=True, throttle=ThrottleState(), has_key=False)
    assert needs_key_check(unknown, LIMITS, NOW) and needs_key_check(replace(unknown, has_key=True), LIMITS, NOW)


def test_invalid_id_is_refused_before_hashing_and_counted_for_the_address() -> None:
    facts = KeyFacts(id_valid=False, throttle=ThrottleState())
    assert not needs_key_check(facts, LIMITS, NOW)
    d = decide_key(facts, LIMITS, NOW)
    assert d.reasons == (LoginReason.ID_INVALID,) and d.record == KeyRecord(address_failure=True)


def test_address_over_its_limit_is_refused_before_hashing_and_not_counted_again() -> None:
    full = tuple(ago(seconds=i) for i in range(LIMITS.address_max_failures))
    facts = KeyFacts(id_valid=True, throttle=ThrottleState(address_failures=full), has_key=True)
    assert not needs_key_check(facts, LIMITS, NOW)
    d = decide_key(facts, LIMITS, NOW)
    assert d.reasons == (LoginReason.THROTTLED,) and d.record == KeyRecord()


def test_fifth_wrong_key_from_a_block_locks_that_block_out() -> None:
    four = tuple(ago(minutes=i + 1) for i in range(LIMITS.block_max_failures - 1))
    d = check(known(key_right=False, block_failures=four))
    assert d.locked and d.record.lock_until == NOW + LIMITS.block_lock
    old = tuple(ago(minutes=20 + i) for i in range(LIMITS.block_max_failures - 1))  # outside the window
    assert not check(known(key_right=False, block_failures=old)).locked


@pytest.mark.parametrize("key_right", [True, False])
def test_a_locked_block_is_refused_whatever_the_key(key_right: bool) -> None:
    # The same answer for the right and a wrong key: throttling is no oracle for the key.
    d = check(known(key_right=key_right, locked_until=NOW + timedelta(minutes=5)))
    assert not d.valid and d.reasons == (LoginReason.THROTTLED,)
    assert d.record == KeyRecord(address_failure=True)


def test_a_locked_block_still_costs_the_hash() -> None:
    facts = KeyFacts(id_valid=True, throttle=ThrottleState(locked_until=NOW + timedelta(minutes=5)), has_key=True)
    assert needs_key_check(facts, LIMITS, NOW)  # equal timing with an open check


def test_stranger_locked_out_cannot_stop_the_owner_from_another_block() -> None:
    # The attacker's block: five wrong keys, now locked. The account's counters carry them too.
    attacker = ThrottleState(
        principal_failures=tuple(ago(minutes=i) for i in range(5)),
        block_failures=tuple(ago(minutes=i) for i in range(5)),
        locked_until=NOW + LIMITS.block_lock,
    )
    assert check(known(key_right=True, **vars(attacker))).reasons == (LoginReason.THROTTLED,)
    # The owner, at home: the same account, another block with no failures.
    owner = replace(attacker, block_failures=(), locked_until=None)
    assert check(KeyFacts(id_valid=True, throttle=owner, has_key=True, key_matches=True)).valid


def test_many_blocks_slow_the_account_but_each_blocks_first_try_is_evaluated() -> None:
    slowed = tuple(ago(minutes=i) for i in range(LIMITS.account_max_failures))
    # The owner from a block that has not failed this interval: evaluated, gets in.
    owner = ThrottleState(principal_failures=slowed)
    assert gate(owner, LIMITS, NOW) is Gate.OPEN
    assert check(KeyFacts(id_valid=True, throttle=owner, has_key=True, key_matches=True)).valid
    # An attacker's block that failed once this interval: refused without evaluation.
    attacker = ThrottleState(principal_failures=slowed, block_failures=(ago(minutes=30),))
    assert gate(attacker, LIMITS, NOW) is Gate.SLOWED
    assert check(KeyFacts(id_valid=True, throttle=attacker, has_key=True, key_matches=True)).reasons == (
        LoginReason.THROTTLED,
    )
    # ...and evaluated again once the interval has passed.
    later = ThrottleState(principal_failures=slowed, block_failures=(ago(minutes=61),))
    assert gate(later, LIMITS, NOW) is Gate.OPEN


def test_the_owner_logging_in_again_is_not_slowed_by_their_own_success() -> None:
    # Slowed mode counts a block's wrong keys, not its attempts: a second login is evaluated.
    slowed = tuple(ago(minutes=i) for i in range(LIMITS.account_max_failures))
    owner_again = ThrottleState(principal_failures=slowed)  # their block has no failures (cleared on success)
    assert check(KeyFacts(id_valid=True, throttle=owner_again, has_key=True, key_matches=True)).valid


def test_the_failure_that_reaches_the_account_cap_is_audited_once() -> None:
    nineteen = tuple(ago(minutes=i) for i in range(LIMITS.account_max_failures - 1))
    assert check(known(key_right=False, principal_failures=nineteen)).slowed
    twenty = tuple(ago(minutes=i) for i in range(LIMITS.account_max_failures))
    assert not failure_effect(ThrottleState(principal_failures=twenty), LIMITS, NOW).slows


def test_settings_fill_the_limits() -> None:
    limits = PasswordSettings(login_block_max_failures=3, login_slowed_interval_s=60).login_limits()
    assert limits.block_max_failures == 3 and limits.slowed_interval == timedelta(seconds=60)
    assert limits.keep() > max(limits.block_max_failures, limits.account_max_failures, limits.address_max_failures)
