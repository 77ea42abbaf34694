"""Token rules: secrets, hashes and every redemption path (link and code)."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.tokens.domain import (
    Reason,
    Redemption,
    State,
    TokenView,
    code_hash,
    expiries,
    new_secrets,
    redeem_by_code,
    redeem_by_token,
    token_hash,
)

NOW = datetime(2025, 3, 9, 12, 0, tzinfo=UTC)
KEY = "code-hmac-key-for-tests"
MAX = 5
CODE = "042917"


def view(**kw: object) -> TokenView:
    link_exp, code_exp = expiries(NOW, 30 * 60, 10 * 60)
    base = TokenView(
        token_id="tok-1",
        state=State.LIVE,
        link_expires_at=link_exp,
        code_expires_at=code_exp,
        code_hash=code_hash(KEY, "tok-1", CODE),
        code_attempts=0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# ------------------------------------------------------------------ secrets


def test_token_has_at_least_256_bits() -> None:
    s = new_secrets()
    assert len(s.token) == 43
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", s.token)
    raw = base64.urlsafe_b64decode(s.token + "=")
    assert len(raw) * 8 >= 256


def test_code_is_six_ascii_digits() -> None:
    for _ in range(200):
        assert re.fullmatch(r"[0-9]{6}", new_secrets().code)


def test_many_draws_are_distinct() -> None:
    draws = [new_secrets() for _ in range(2000)]
    assert len({d.token for d in draws}) == len(draws)
    # 2000 codes out of a million: collisions are possible but the set must be large.
    assert len({d.code for d in draws}) > 1900
    # Leading zeros are kept (codes are not ints): some of 2000 start with "0".
    assert any(d.code.startswith("0") for d in draws)


def test_token_hash_is_sha256_hex_and_distinguishes_tokens() -> None:
    a, b = new_secrets().token, new_secrets().token
    assert re.fullmatch(r"[0-9a-f]{64}", token_hash(a))
    assert token_hash(a) == token_hash(a)
    assert token_hash(a) != token_hash(b)
    assert a not in token_hash(a)


def test_code_hash_bound_to_token_id_and_key() -> None:
    h = code_hash(KEY, "tok-1", CODE)
    assert h == code_hash(KEY, "tok-1", CODE)
    assert h != code_hash(KEY, "tok-2", CODE)
    assert h != code_hash("other-key", "tok-1", CODE)
    assert h != code_hash(KEY, "tok-1", "042918")
    # Not a bare hash of the code: the key matters, so the million codes cannot be tabulated.
    assert h != token_hash(CODE)


def test_expiries() -> None:
    link, code = expiries(NOW, 1800, 600)
    assert link - NOW == timedelta(minutes=30)
    assert code - NOW == timedelta(minutes=10)


# ------------------------------------------------------------------ redeem by link


def test_token_live_and_fresh_redeems() -> None:
    assert redeem_by_token(view(), NOW) == Redemption(True)


def test_token_unknown_is_invalid() -> None:
    assert redeem_by_token(None, NOW) == Redemption(False, Reason.TOKEN_INVALID)


@pytest.mark.parametrize(
    ("state", "reason"),
    [
        (State.REVOKED, Reason.TOKEN_INVALID),
        (State.DEAD, Reason.TOKEN_INVALID),
        (State.SPENT, Reason.TOKEN_USED),
        (State.RESERVED, Reason.TOKEN_USED),
    ],
)
def test_token_states(state: str, reason: str) -> None:
    r = redeem_by_token(view(state=state), NOW)
    assert r == Redemption(False, reason)
    assert not r.count_wrong_code and not r.kill


def test_token_expiry_boundary() -> None:
    tok = view()
    just_before = tok.link_expires_at - timedelta(microseconds=1)
    assert redeem_by_token(tok, just_before).ok
    assert redeem_by_token(tok, tok.link_expires_at) == Redemption(False, Reason.TOKEN_EXPIRED)
    assert redeem_by_token(tok, tok.link_expires_at + timedelta(days=1)).reason == Reason.TOKEN_EXPIRED


def test_link_outlives_code() -> None:
    # Between the code's expiry (10 min) and the link's (30 min), only the link works.
    tok = view()
    t = tok.code_expires_at + timedelta(minutes=1)
    assert redeem_by_token(tok, t).ok
    assert redeem_by_code(tok, CODE, t, KEY, MAX) == Redemption(False, Reason.TOKEN_EXPIRED)


def test_used_token_reports_used_even_when_expired() -> None:
    late = NOW + timedelta(hours=2)
    assert redeem_by_token(view(state=State.SPENT), late).reason == Reason.TOKEN_USED


# ------------------------------------------------------------------ redeem by code


def test_code_right_redeems() -> None:
    assert redeem_by_code(view(), CODE, NOW, KEY, MAX) == Redemption(True)


def test_code_unknown_token_invalid() -> None:
    assert redeem_by_code(None, CODE, NOW, KEY, MAX) == Redemption(False, Reason.TOKEN_INVALID)


def test_code_revoked_invalid() -> None:
    r = redeem_by_code(view(state=State.REVOKED), CODE, NOW, KEY, MAX)
    assert r == Redemption(False, Reason.TOKEN_INVALID)


def test_code_dead_token_attempts_exceeded_even_with_right_code() -> None:
    r = redeem_by_code(view(state=State.DEAD), CODE, NOW, KEY, MAX)
    assert r == Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    assert not r.count_wrong_code


def test_code_attempts_exhausted_refuses_right_code() -> None:
    r = redeem_by_code(view(code_attempts=MAX), CODE, NOW, KEY, MAX)
    assert r == Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)


@pytest.mark.parametrize("state", [State.SPENT, State.RESERVED])
def test_code_used(state: str) -> None:
    assert redeem_by_code(view(state=state), CODE, NOW, KEY, MAX) == Redemption(False, Reason.TOKEN_USED)


def test_code_expiry_boundary() -> None:
    tok = view()
    assert redeem_by_code(tok, CODE, tok.code_expires_at - timedelta(microseconds=1), KEY, MAX).ok
    r = redeem_by_code(tok, CODE, tok.code_expires_at, KEY, MAX)
    assert r == Redemption(False, Reason.TOKEN_EXPIRED)


def test_expired_code_guess_is_not_counted() -> None:
    tok = view()
    r = redeem_by_code(tok, "000000", tok.code_expires_at, KEY, MAX)
    assert r.reason == Reason.TOKEN_EXPIRED
    assert not r.count_wrong_code and not r.kill


def test_code_of_another_token_is_wrong() -> None:
    other = view(token_id="tok-2")  # same code_hash as tok-1 but a different id
    r = redeem_by_code(other, CODE, NOW, KEY, MAX)
    assert not r.ok and r.count_wrong_code


def test_code_checked_with_the_server_key() -> None:
    r = redeem_by_code(view(), CODE, NOW, "a-different-key", MAX)
    assert not r.ok and r.count_wrong_code


def test_wrong_code_counts_and_kills_on_last_allowed_attempt() -> None:
    """Replay the handler: count each wrong code, kill the token on the last allowed one."""
    tok = view()
    results = []
    for _ in range(MAX):
        r = redeem_by_code(tok, "999999", NOW, KEY, MAX)
        results.append(r)
        assert r.count_wrong_code
        tok = replace(tok, code_attempts=tok.code_attempts + 1, state=State.DEAD if r.kill else tok.state)
    assert [r.reason for r in results] == [Reason.TOKEN_INVALID] * (MAX - 1) + [Reason.CODE_ATTEMPTS_EXCEEDED]
    assert [r.kill for r in results] == [False] * (MAX - 1) + [True]
    assert tok.state == State.DEAD
    # The right code is now refused, and so is the link of the dead token.
    assert redeem_by_code(tok, CODE, NOW, KEY, MAX).reason == Reason.CODE_ATTEMPTS_EXCEEDED
    assert redeem_by_token(tok, NOW).reason == Reason.TOKEN_INVALID


def test_right_code_on_last_attempt_still_works() -> None:
    assert redeem_by_code(view(code_attempts=MAX - 1), CODE, NOW, KEY, MAX).ok


@given(
    st.integers(min_value=1, max_value=10),
    st.integers(min_value=0, max_value=12),
    st.text(alphabet="0123456789", min_size=6, max_size=6),
)
def test_code_attempt_limit_property(max_attempts: int, attempts: int, guess: str) -> None:
    r = redeem_by_code(view(code_attempts=attempts), guess, NOW, KEY, max_attempts)
    if attempts >= max_attempts:
        assert r == Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    elif guess == CODE:
        assert r.ok
    else:
        assert r.count_wrong_code
        assert r.kill == (attempts + 1 == max_attempts)
        assert r.reason == (Reason.CODE_ATTEMPTS_EXCEEDED if r.kill else Reason.TOKEN_INVALID)
