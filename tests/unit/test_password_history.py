"""Key history depth semantics and the combined assessment of a candidate key."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.password.domain import KeyHistory, assess, hashable
from services.password.policy import Reason, nist_policy, seed_policy

SEED = seed_policy()


def history_of(keys: list[str], depth: int) -> KeyHistory:
    """What the password service keeps after setting `keys` in order (first = initial key)."""
    history = KeyHistory()
    for k in keys:
        history = history.rotate(k, depth)
    return history


def test_empty_history() -> None:
    assert KeyHistory().hashes(5) == []


def test_initial_key_only() -> None:
    h = history_of(["h1"], 5)
    assert h.current == "h1" and h.previous == []
    assert h.hashes(5) == ["h1"]


def test_last_five_including_current() -> None:
    h = history_of([f"h{i}" for i in range(1, 8)], 5)
    assert h.current == "h7"
    assert h.hashes(5) == ["h7", "h6", "h5", "h4", "h3"]
    # The sixth key back may be used again.
    assert "h2" not in h.hashes(5)


def test_history_storage_is_bounded() -> None:
    h = history_of([f"h{i}" for i in range(100)], 5)
    assert len(h.previous) == 4


@given(st.lists(st.text(min_size=1, max_size=4), max_size=20), st.integers(min_value=1, max_value=8))
def test_hashes_are_the_last_depth_keys_newest_first(keys: list[str], depth: int) -> None:
    h = history_of(keys, depth)
    assert h.hashes(depth) == list(reversed(keys))[:depth]
    assert h.current == (keys[-1] if keys else None)


def test_rotate_does_not_mutate_the_old_history() -> None:
    old = history_of(["h1", "h2"], 5)
    new = old.rotate("h3", 5)
    assert old.hashes(5) == ["h2", "h1"]
    assert new.hashes(5) == ["h3", "h2", "h1"]
    assert new.previous is not old.previous


def test_depth_one_remembers_only_the_current_key() -> None:
    h = history_of(["h1", "h2", "h3"], 1)
    assert h.previous == []
    assert h.hashes(1) == ["h3"]


def test_depth_zero_disables_the_check() -> None:
    h = history_of(["h1", "h2"], 0)
    assert h.hashes(0) == []
    assert h.current == "h2"  # the current key itself is still kept


def test_hashes_never_returns_more_than_depth() -> None:
    h = history_of([f"h{i}" for i in range(10)], 8)
    assert h.hashes(3) == ["h9", "h8", "h7"]


# ------------------------------------------------------------------ assess


def test_assess_accepts_good_fresh_key() -> None:
    assert assess(SEED, "Nueva2025", reused=False) == []


def test_assess_reused_key() -> None:
    assert assess(SEED, "Nueva2025", reused=True) == [Reason.REUSED]


def test_assess_reports_policy_reasons_and_reuse_together_in_order() -> None:
    reasons = assess(SEED, "xqz", reused=True)
    assert reasons == [Reason.TOO_SHORT, Reason.NEEDS_LETTER_AND_DIGIT, Reason.REUSED]


@pytest.mark.parametrize("reused", [False, True])
def test_assess_with_nist_policy(reused: bool) -> None:
    policy = nist_policy(blocklist=["password1234567890"])
    reasons = assess(policy, "PASSWORD1234567890", reused=reused)
    assert Reason.BLOCKLISTED in reasons
    assert (Reason.REUSED in reasons) == reused


def test_assess_does_not_accumulate_between_calls() -> None:
    assess(SEED, "xqz", reused=True)
    assert assess(SEED, "xqz", reused=False) == [Reason.TOO_SHORT, Reason.NEEDS_LETTER_AND_DIGIT]


# ------------------------------------------------------------------ hashable


def test_hashable_makes_equivalent_spellings_equal() -> None:
    composed = "Contraseña2025"
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert hashable(composed) == hashable(decomposed)
    assert hashable("Ａｂｃ１２３") == "Abc123"  # full-width keyboard
    assert hashable("Abc123") != hashable("abc123")  # case still matters
