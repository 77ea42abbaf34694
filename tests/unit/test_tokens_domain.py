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
    KILL,
    MOVES,
    RELEASE,
    RESERVE,
    REVOKE,
    SPEND,
    Lifetimes,
    NewToken,
    Reason,
    Redemption,
    State,
    TokenView,
    code_hash,
    decoy,
    expiries,
    forgiven_code_failures,
    issue,
    new_secrets,
    redeem_by_code,
    redeem_by_token,
    settle_key_changed,
    settle_key_refused,
    settle_timeout,
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
        request_id="req-1",
        account_id="acc-1",
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


# ------------------------------------------------------------------ link bound to its request


def test_link_answers_only_for_its_own_request() -> None:
    assert redeem_by_token(view(), NOW, "req-1").ok
    # Another request_id with a real token: invalid (all resets of a token stay on its partition).
    assert redeem_by_token(view(), NOW, "req-2") == Redemption(False, Reason.TOKEN_INVALID)
    assert redeem_by_token(view(state=State.SPENT), NOW, "req-2").reason == Reason.TOKEN_INVALID


# ------------------------------------------------------------------ per-account code limit

ACCOUNT_LIMIT = 10


def by_code(tok: TokenView, guess: str, failures: int) -> Redemption:
    return redeem_by_code(tok, guess, NOW, KEY, MAX, failures, ACCOUNT_LIMIT)


def test_account_limit_refuses_even_the_right_code_without_counting_or_killing() -> None:
    r = by_code(view(), CODE, ACCOUNT_LIMIT)
    assert r == Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    assert not r.count_wrong_code and not r.kill
    # The link is untouched: using it is the way out.
    assert redeem_by_token(view(), NOW, "req-1").ok


def test_account_limit_below_it_the_right_code_works() -> None:
    assert by_code(view(), CODE, ACCOUNT_LIMIT - 1).ok


def test_wrong_code_that_reaches_the_account_limit_says_exceeded_but_keeps_the_link() -> None:
    r = by_code(view(), "999999", ACCOUNT_LIMIT - 1)
    assert r == Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED, count_wrong_code=True, kill=False)
    r = by_code(view(), "999999", ACCOUNT_LIMIT - 2)
    assert r == Redemption(False, Reason.TOKEN_INVALID, count_wrong_code=True, kill=False)


def test_account_limit_across_tokens() -> None:
    """Replay: two tokens of one account, 5 + 5 wrong codes; the third token's right code is refused."""
    failures = 0
    reasons = []
    for token_id in ("tok-a", "tok-b"):
        tok = view(token_id=token_id, code_hash=code_hash(KEY, token_id, CODE))
        for _ in range(MAX):
            r = by_code(tok, "999999", failures)
            reasons.append(r.reason)
            failures += r.count_wrong_code
            tok = replace(tok, code_attempts=tok.code_attempts + 1, state=State.DEAD if r.kill else tok.state)
    assert failures == 2 * MAX == ACCOUNT_LIMIT
    assert reasons[-1] == Reason.CODE_ATTEMPTS_EXCEEDED
    third = view(token_id="tok-c", code_hash=code_hash(KEY, "tok-c", CODE))
    assert by_code(third, CODE, failures).reason == Reason.CODE_ATTEMPTS_EXCEEDED


def test_token_states_answer_before_the_account_limit() -> None:
    assert by_code(view(state=State.SPENT), CODE, 99).reason == Reason.TOKEN_USED
    assert by_code(view(state=State.REVOKED), CODE, 99).reason == Reason.TOKEN_INVALID
    tok = view()
    assert by_code(tok, CODE, 99) == Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    assert redeem_by_code(tok, CODE, tok.code_expires_at, KEY, MAX, 99, ACCOUNT_LIMIT).reason == Reason.TOKEN_EXPIRED


@given(st.integers(min_value=0, max_value=4), st.integers(min_value=0, max_value=15), st.booleans())
def test_account_limit_property(attempts: int, failures: int, right: bool) -> None:
    r = by_code(view(code_attempts=attempts), CODE if right else "999999", failures)
    if failures >= ACCOUNT_LIMIT:
        assert r == Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    elif right:
        assert r.ok
    else:
        assert r.count_wrong_code and r.kill == (attempts + 1 >= MAX)
        exceeded = attempts + 1 >= MAX or failures + 1 >= ACCOUNT_LIMIT
        assert r.reason == (Reason.CODE_ATTEMPTS_EXCEEDED if exceeded else Reason.TOKEN_INVALID)


def test_guard_key_is_the_account_or_the_id_hash() -> None:
    assert view().guard_key == "acc-1"
    assert view(account_id=None, subject_ref="ref-1").guard_key == "ref-1"


# ------------------------------------------------------------------ issuing and decoys

TTL = Lifetimes(1800, 600)


def test_issue_binds_hashes_to_the_drawn_secrets() -> None:
    tok, drawn = issue(request_id="req-1", account_id="acc-1", recipient={}, now=NOW, ttl=TTL, code_key=KEY)
    assert tok.token_hash == token_hash(drawn.token)
    assert tok.code_hash == code_hash(KEY, tok.token_id, drawn.code)
    assert not tok.decoy and tok.account_id == "acc-1"
    assert (tok.link_expires_at, tok.code_expires_at) == expiries(NOW, 1800, 600)


def as_view(tok: NewToken) -> TokenView:
    return TokenView(
        token_id=tok.token_id,
        state=State.LIVE,
        link_expires_at=tok.link_expires_at,
        code_expires_at=tok.code_expires_at,
        code_hash=tok.code_hash,
        code_attempts=0,
        request_id=tok.request_id,
        account_id=tok.account_id,
        subject_ref=tok.subject_ref,
        decoy=tok.decoy,
    )


def test_decoy_has_real_shapes_and_lifetimes_but_no_secret_anyone_holds() -> None:
    real, _ = issue(request_id="req-1", account_id="acc-1", recipient={}, now=NOW, ttl=TTL, code_key=KEY)
    fake = decoy(request_id="req-2", account_id=None, subject_ref="ref-9", now=NOW, ttl=TTL, code_key=KEY)
    assert fake.decoy and fake.recipient is None and fake.subject_ref == "ref-9"
    assert (fake.link_expires_at, fake.code_expires_at) == (real.link_expires_at, real.code_expires_at)
    assert re.fullmatch(r"[0-9a-f]{64}", fake.token_hash) and re.fullmatch(r"[0-9a-f]{64}", fake.code_hash)
    assert len(fake.token_id) == len(real.token_id)
    # Not keyed with the server's code key: no code matches, not even for the server.
    fake_view = as_view(fake)
    assert not any(redeem_by_code(fake_view, f"{n:06d}", NOW, KEY, 10**7).ok for n in range(0, 1_000_000, 997))
    again = decoy(request_id="req-2", account_id=None, subject_ref="ref-9", now=NOW, ttl=TTL, code_key=KEY)
    assert fake.code_hash != again.code_hash


def test_decoy_answers_a_sequence_of_codes_exactly_as_a_real_token() -> None:
    real, drawn = issue(request_id="req-1", account_id="acc-1", recipient={}, now=NOW, ttl=TTL, code_key=KEY)
    fake = decoy(request_id="req-2", account_id="acc-2", subject_ref="ref-2", now=NOW, ttl=TTL, code_key=KEY)
    wrong = f"{(int(drawn.code) + 1) % 1_000_000:06d}"
    answers = {}
    for name, tok in (("real", as_view(real)), ("decoy", as_view(fake))):
        seen, failures = [], 0
        for _ in range(MAX + 2):
            r = redeem_by_code(tok, wrong, NOW, KEY, MAX, failures, ACCOUNT_LIMIT)
            seen.append(r)
            if r.count_wrong_code:
                failures += 1
                tok = replace(tok, code_attempts=tok.code_attempts + 1, state=State.DEAD if r.kill else tok.state)
        late = redeem_by_code(tok, wrong, tok.code_expires_at, KEY, MAX, failures, ACCOUNT_LIMIT)
        fresh = replace(tok, state=State.LIVE, code_attempts=0)
        expired = redeem_by_code(fresh, wrong, real.code_expires_at, KEY, MAX, 0, ACCOUNT_LIMIT)
        answers[name] = (seen, late, expired)
    assert answers["real"] == answers["decoy"]
    assert [r.reason for r in answers["real"][0]] == [Reason.TOKEN_INVALID] * (MAX - 1) + [
        Reason.CODE_ATTEMPTS_EXCEEDED
    ] * 3
    assert answers["real"][2].reason == Reason.TOKEN_EXPIRED


# ------------------------------------------------------------------ the state machine

EDGES = {
    (State.LIVE, State.RESERVED),
    (State.RESERVED, State.LIVE),
    (State.LIVE, State.SPENT),
    (State.RESERVED, State.SPENT),
    (State.REVOKED, State.SPENT),
    (State.DEAD, State.SPENT),
    (State.LIVE, State.REVOKED),
    (State.RESERVED, State.REVOKED),
    (State.LIVE, State.DEAD),
}


def test_the_state_machine_has_exactly_these_edges() -> None:
    assert {(src, m.target) for m in MOVES for src in m.sources} == EDGES


def test_revoked_and_dead_never_come_back_to_live() -> None:
    back_to_live = [m for m in MOVES if m.target == State.LIVE]
    assert back_to_live == [RELEASE]
    assert not RELEASE.allows(State.REVOKED) and not RELEASE.allows(State.DEAD)
    assert REVOKE.allows(State.RESERVED)  # a reservation is revoked too
    assert RESERVE.sources == {State.LIVE} and KILL.sources == {State.LIVE}
    assert not any(m.allows(State.SPENT) for m in MOVES)  # spent is final


@pytest.mark.parametrize(
    ("state", "move", "note"),
    [
        (State.RESERVED, SPEND, None),
        (State.REVOKED, SPEND, "revoked_while_reserved"),
        (State.DEAD, SPEND, "dead_while_reserved"),
        (State.LIVE, SPEND, "live_while_reserved"),
        (State.SPENT, None, "already_spent"),
        (None, None, "token_unknown"),
    ],
)
def test_a_key_change_always_stands_and_spends_the_token(state: str | None, move: object, note: str | None) -> None:
    s = settle_key_changed(state)
    assert s.move is move and s.status == "completed" and s.note == note and s.reasons == ()


def test_refused_key_releases_a_reservation() -> None:
    s = settle_key_refused(State.RESERVED, ["password_too_short"])
    assert s.move is RELEASE and s.status == "rejected" and s.reasons == ("password_too_short",)


@pytest.mark.parametrize("state", [State.REVOKED, State.DEAD, None])
def test_refused_key_on_a_revoked_token_never_releases_it(state: str | None) -> None:
    s = settle_key_refused(state, ["password_blocklisted"])
    assert s.move is None
    assert s.reasons == (Reason.TOKEN_INVALID,)
    assert s.action == "token_release_refused"


def test_refused_key_after_the_timeout_already_released_it() -> None:
    s = settle_key_refused(State.LIVE, ["password_reused"])
    assert s.move is None and s.reasons == ("password_reused",)


def test_refused_key_on_a_spent_token_says_used() -> None:
    assert settle_key_refused(State.SPENT, ["password_reused"]).reasons == (Reason.TOKEN_USED,)


@pytest.mark.parametrize("state", [State.RESERVED, State.LIVE, State.REVOKED])
def test_password_service_says_used_spends_it(state: str) -> None:
    s = settle_key_refused(state, [Reason.TOKEN_USED])
    assert s.move is SPEND and s.reasons == (Reason.TOKEN_USED,)


def test_timeout_releases_only_a_reservation() -> None:
    assert settle_timeout(State.RESERVED) is RELEASE
    for state in (State.REVOKED, State.LIVE, State.SPENT, State.DEAD):
        assert settle_timeout(state) is None


# ---- a key change by link forgives the wrong codes ------------------------------------------


@pytest.mark.parametrize(
    ("token", "forgiven"),
    [
        (None, None),
        (view(state=State.RESERVED, reserved_by="token"), "acc-1"),
        (view(state=State.RESERVED, reserved_by="code"), None),
        (view(state=State.RESERVED, reserved_by="token", account_id=None, subject_ref="s-1"), "s-1"),
        (view(state=State.RESERVED, reserved_by="token", account_id=None), None),
    ],
)
def test_only_a_key_change_by_link_forgives_the_wrong_codes(token: TokenView | None, forgiven: str | None) -> None:
    assert forgiven_code_failures(token) == forgiven
