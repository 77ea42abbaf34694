"""Identity rules: national IDs, answer normalisation, e-mail matching, lockout and decide()."""

from __future__ import annotations

import unicodedata
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from stdnum.ec import ci

from services.identity.domain import (
    COUNTED_FAILURES,
    Account,
    Decision,
    Evidence,
    InvalidId,
    LockoutPolicy,
    MailboxLimit,
    Reason,
    decide,
    mask_email,
    normalize_answer,
    normalize_cedula,
    normalize_national_id,
    same_mailbox,
)

NOW = datetime(2025, 3, 9, 12, 0, tzinfo=UTC)
PROVINCES = [f"{p:02d}" for p in range(1, 25)] + ["30"]


def cedula_check_digit(first9: str) -> str:
    """The one last digit that makes a valid cédula (stdnum has no calc_check_digit for ec.ci)."""
    calc = getattr(ci, "calc_check_digit", None)
    if calc is not None:
        return str(calc(first9))
    valid = [d for d in "0123456789" if ci.is_valid(first9 + d)]
    assert len(valid) == 1, (first9, valid)
    return valid[0]


@st.composite
def cedulas(draw: st.DrawFn) -> str:
    province = draw(st.sampled_from(PROVINCES))
    third = draw(st.sampled_from("012345"))
    rest = draw(st.text(alphabet="0123456789", min_size=6, max_size=6))
    first9 = province + third + rest
    return first9 + cedula_check_digit(first9)


@st.composite
def with_separators(draw: st.DrawFn, number: str) -> str:
    """The number as a person might type it: spaces and dashes between digits, spaces around."""
    out = []
    for ch in number:
        out.append(ch)
        out.append(draw(st.sampled_from(["", "", " ", "-", " - ", "  "])))
    lead = draw(st.sampled_from(["", " ", "  "]))
    return lead + "".join(out)


def typed(number_strategy: st.SearchStrategy[str]) -> st.SearchStrategy[tuple[str, str]]:
    return number_strategy.flatmap(lambda n: with_separators(n).map(lambda t: (n, t)))


# ------------------------------------------------------------------ cédula


@given(typed(cedulas()))
def test_valid_cedula_accepted_as_typed(pair: tuple[str, str]) -> None:
    number, as_typed = pair
    assert normalize_national_id("affiliate", as_typed) == number
    assert normalize_cedula(as_typed) == number


@given(cedulas(), st.integers(min_value=1, max_value=9))
def test_cedula_with_any_other_check_digit_rejected(number: str, delta: int) -> None:
    wrong = number[:-1] + str((int(number[-1]) + delta) % 10)
    with pytest.raises(InvalidId):
        normalize_national_id("affiliate", wrong)


@given(cedulas())
def test_cedula_with_other_province_digits_is_not_blindly_accepted(number: str) -> None:
    # Provinces outside 01-24/30/50 are never valid, whatever the check digit.
    for province in ("00", "25", "29", "31", "99"):
        first9 = province + number[2:9]
        for d in "0123456789":
            with pytest.raises(InvalidId):
                normalize_national_id("affiliate", first9 + d)


@given(cedulas(), st.sampled_from("789"))
def test_cedula_third_digit_above_six_rejected(number: str, third: str) -> None:
    first9 = number[:2] + third + number[3:9]
    for d in "0123456789":
        with pytest.raises(InvalidId):
            normalize_cedula(first9 + d)


@given(cedulas(), st.integers(min_value=1, max_value=4))
def test_cedula_wrong_length_rejected(number: str, cut: int) -> None:
    with pytest.raises(InvalidId):
        normalize_cedula(number[:-cut])
    with pytest.raises(InvalidId):
        normalize_cedula(number + number[:cut])


@pytest.mark.parametrize("raw", ["", "   ", "17.10034065", "17100340a5", "1710034065x", "abcdefghij"])
def test_cedula_garbage_rejected(raw: str) -> None:
    with pytest.raises(InvalidId):
        normalize_cedula(raw)


def test_known_cedula() -> None:
    assert normalize_cedula("171003406-5") == "1710034065"
    with pytest.raises(InvalidId):
        normalize_cedula("1710034066")


def test_invalid_id_is_a_value_error_without_traceback_chain() -> None:
    with pytest.raises(InvalidId) as info:
        normalize_cedula("123")
    assert isinstance(info.value, ValueError)
    assert info.value.__cause__ is None


# ------------------------------------------------------------------ RUC (employer)


@pytest.mark.parametrize("raw", ["1790011674001", "1790011674-001", "17 9001 1674 001", "1792060346-001"])
def test_known_juridical_ruc_accepted(raw: str) -> None:
    assert normalize_national_id("employer", raw) == raw.replace(" ", "").replace("-", "")


def test_juridical_ruc_other_check_digit_rejected() -> None:
    number = "1790011674001"
    for d in "0123456789":
        if d != number[9]:
            with pytest.raises(InvalidId):
                normalize_national_id("employer", number[:9] + d + number[10:])


@given(typed(cedulas().map(lambda c: c + "001")))
def test_natural_person_ruc_accepted(pair: tuple[str, str]) -> None:
    number, as_typed = pair
    assert normalize_national_id("employer", as_typed) == number


@given(cedulas(), st.integers(min_value=1, max_value=9))
def test_natural_person_ruc_with_wrong_cedula_check_digit_rejected(cedula: str, delta: int) -> None:
    wrong = cedula[:-1] + str((int(cedula[-1]) + delta) % 10) + "001"
    with pytest.raises(InvalidId):
        normalize_national_id("employer", wrong)


@given(cedulas())
def test_ruc_establishment_000_rejected(cedula: str) -> None:
    with pytest.raises(InvalidId):
        normalize_national_id("employer", cedula + "000")


@given(cedulas())
def test_profiles_do_not_accept_each_others_lengths(cedula: str) -> None:
    with pytest.raises(InvalidId):
        normalize_national_id("employer", cedula)
    with pytest.raises(InvalidId):
        normalize_national_id("affiliate", cedula + "001")


@pytest.mark.parametrize("raw", ["179001167400", "17900116740011", "", "1790011674OO1"])
def test_ruc_wrong_length_or_format_rejected(raw: str) -> None:
    with pytest.raises(InvalidId):
        normalize_national_id("employer", raw)


# ------------------------------------------------------------------ answers

SPANISH_LETTERS = "abcdefghijklmnopqrstuvwxyzáéíóúüñ"
ACCENTED = {"a": "á", "e": "é", "i": "í", "o": "ó", "u": "ú", "n": "ñ"}
plain_words = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=10), min_size=1, max_size=5
)
spanish_words = st.lists(
    st.text(alphabet=SPANISH_LETTERS + "0123456789-", min_size=1, max_size=10), min_size=1, max_size=5
)
spaces = st.text(alphabet=" \t\n\u00a0", min_size=1, max_size=3)


@given(spanish_words)
def test_answer_case_insensitive(words: list[str]) -> None:
    text = " ".join(words)
    assert normalize_answer(text.upper()) == normalize_answer(text)
    assert normalize_answer(text.title()) == normalize_answer(text)


@given(plain_words, st.data())
def test_answer_accent_insensitive(words: list[str], data: st.DataObject) -> None:
    text = " ".join(words)
    accented = "".join(ACCENTED[c] if c in ACCENTED and data.draw(st.booleans()) else c for c in text)
    assert normalize_answer(accented) == normalize_answer(text)
    # Precomposed and decomposed spellings look the same to the citizen.
    assert normalize_answer(unicodedata.normalize("NFD", accented)) == normalize_answer(text)


@given(spanish_words, st.data())
def test_answer_whitespace_insensitive(words: list[str], data: st.DataObject) -> None:
    canonical = " ".join(words)
    gaps = [data.draw(spaces) for _ in range(len(words) - 1)]
    messy = data.draw(st.sampled_from(["", " ", "\t"])) + words[0]
    for gap, word in zip(gaps, words[1:], strict=True):
        messy += gap + word
    messy += data.draw(st.sampled_from(["", " ", "\n"]))
    assert normalize_answer(messy) == normalize_answer(canonical)


@given(plain_words, plain_words)
def test_answer_different_words_stay_different(a: list[str], b: list[str]) -> None:
    assume(" ".join(a) != " ".join(b))
    assert normalize_answer(" ".join(a)) != normalize_answer(" ".join(b))


@given(st.text(max_size=40))
def test_answer_normalisation_idempotent(text: str) -> None:
    once = normalize_answer(text)
    assert normalize_answer(once) == once
    assert once == once.strip()
    assert "  " not in once


@pytest.mark.parametrize(
    ("typed_answer", "stored"),
    [
        ("Ándrade ", "andrade"),
        ("  PÉREZ   de la  Peña", "perez de la pena"),
        ("1984-03-09", "1984-03-09"),
        ("V4443V4442", "v4443v4442"),
        ("Müller", "muller"),
    ],
)
def test_answer_examples(typed_answer: str, stored: str) -> None:
    assert normalize_answer(typed_answer) == normalize_answer(stored)


def test_answer_does_not_ignore_punctuation_or_digits() -> None:
    assert normalize_answer("1984-03-09") != normalize_answer("1984-03-08")
    assert normalize_answer("andrade") != normalize_answer("andrades")


# ------------------------------------------------------------------ e-mail


@pytest.mark.parametrize(
    ("typed_email", "registered"),
    [
        ("maria.perez@example.org", "maria.perez@example.org"),
        ("Maria.Perez@Example.ORG", "maria.perez@example.org"),
        ("maria.perez@EXAMPLE.org", "MARIA.PEREZ@example.org"),
    ],
)
def test_same_mailbox_ignores_case(typed_email: str, registered: str) -> None:
    assert same_mailbox(typed_email, registered)
    assert same_mailbox(registered, typed_email)


@pytest.mark.parametrize(
    ("typed_email", "registered"),
    [
        ("maria.perez@example.org", "maria.perez@example.com"),
        ("maria.perez@example.org", "mariaperez@example.org"),
        ("maria.perez+x@example.org", "maria.perez@example.org"),
        ("not-an-email", "not-an-email"),
        ("", ""),
        ("maria.perez@example.org", "not-an-email"),
    ],
)
def test_same_mailbox_rejects_different_or_invalid(typed_email: str, registered: str) -> None:
    assert not same_mailbox(typed_email, registered)


def test_same_mailbox_idn_domain() -> None:
    assert same_mailbox("juan@ÑANDÚ.example", "juan@ñandú.example")


@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._", min_size=1, max_size=20),
    st.sampled_from(["example.org", "correo.gob.ec", "mail.example.com"]),
)
def test_mask_email_keeps_only_first_char_and_domain(local: str, domain: str) -> None:
    masked = mask_email(f"{local}@{domain}")
    assert masked == f"{local[0]}***@{domain}"
    if len(local) > 1:
        assert local not in masked.split("@")[0]


def test_mask_email_edge_cases() -> None:
    assert mask_email("a@x.org") == "a***@x.org"
    assert mask_email("@x.org") == "***@x.org"


# ------------------------------------------------------------------ lockout policy


def test_lockout_recent_respects_window_boundary() -> None:
    policy = LockoutPolicy(window=timedelta(minutes=15))
    edge = NOW - timedelta(minutes=15)
    inside = edge + timedelta(microseconds=1)
    assert policy.recent([edge, inside, NOW], NOW) == [inside, NOW]


@given(st.integers(min_value=1, max_value=10), st.lists(st.integers(0, 3600), max_size=15))
def test_locks_after_counts_failures_in_window_plus_this_one(max_failures: int, ages: list[int]) -> None:
    policy = LockoutPolicy(max_failures=max_failures, window=timedelta(minutes=15))
    failures = [NOW - timedelta(seconds=a) for a in ages]
    in_window = sum(1 for a in ages if a < 15 * 60)
    assert policy.locks_after(failures, NOW) == (in_window + 1 >= max_failures)


def test_locks_after_fifth_failure_by_default() -> None:
    policy = LockoutPolicy()
    failures: list[datetime] = []
    for n in range(1, 6):
        locks = policy.locks_after(failures, NOW)
        assert locks == (n == 5), n
        failures.append(NOW - timedelta(seconds=10 * (6 - n)))


# ------------------------------------------------------------------ mailbox limit


def test_mailbox_limit_per_hour() -> None:
    limit = MailboxLimit(per_hour=3)
    assert limit.allows([], NOW)
    two = [NOW - timedelta(minutes=5), NOW - timedelta(minutes=50)]
    assert limit.allows(two, NOW)
    three = [*two, NOW - timedelta(minutes=59)]
    assert not limit.allows(three, NOW)
    # One of them exactly an hour old no longer counts.
    aged = [*two, NOW - timedelta(hours=1)]
    assert limit.allows(aged, NOW)


@given(st.integers(min_value=1, max_value=6), st.lists(st.integers(0, 7200), max_size=10))
def test_mailbox_limit_property(per_hour: int, ages: list[int]) -> None:
    sent = [NOW - timedelta(seconds=a) for a in ages]
    within = sum(1 for a in ages if a < 3600)
    assert MailboxLimit(per_hour).allows(sent, NOW) == (within < per_hour)


# ------------------------------------------------------------------ decide()

LOCKOUT = LockoutPolicy()
MAILBOX = MailboxLimit()


def account(**kw: object) -> Account:
    base = Account(
        account_id="acc-1",
        national_id="1710034065",
        profile="affiliate",
        name="María Pérez",
        email="maria.perez@example.org",
        locale="es",
        answer_hashes={"birth_date": "h"},
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def evidence(**kw: object) -> Evidence:
    base = Evidence(
        captcha_passed=True,
        id_valid=True,
        account=account(),
        answers_ok=True,
        email_ok=True,
        representative_ok=True,
        ip_rate_limited=False,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def run(ev: Evidence) -> Decision:
    return decide(ev, NOW, LOCKOUT, MAILBOX)


def test_decide_verified() -> None:
    d = run(evidence())
    assert d == Decision(True, [])
    assert not d.count_failure and not d.lock and not d.send_locked_notice


def test_decide_ip_rate_limited_wins_over_everything() -> None:
    d = run(evidence(ip_rate_limited=True, captcha_passed=False, id_valid=False, account=None, answers_ok=False))
    assert d == Decision(False, [Reason.RATE_LIMITED])


def test_decide_captcha_missing() -> None:
    d = run(evidence(captcha_passed=False, answers_ok=False))
    assert d == Decision(False, [Reason.CAPTCHA_MISSING])


def test_decide_id_invalid() -> None:
    assert run(evidence(id_valid=False, account=None)) == Decision(False, [Reason.ID_INVALID])


def test_decide_account_unknown() -> None:
    d = run(evidence(account=None, answers_ok=False, email_ok=False))
    assert d == Decision(False, [Reason.ACCOUNT_UNKNOWN])
    assert not d.count_failure


@pytest.mark.parametrize(
    ("field", "reason"),
    [
        ("answers_ok", Reason.ANSWERS_WRONG),
        ("email_ok", Reason.EMAIL_MISMATCH),
        ("representative_ok", Reason.REPRESENTATIVE_MISMATCH),
    ],
)
def test_decide_single_counted_failure(field: str, reason: str) -> None:
    d = run(evidence(**{field: False}))
    assert not d.verified
    assert d.reasons == [reason]
    assert reason in COUNTED_FAILURES
    assert d.count_failure
    assert not d.lock and not d.send_locked_notice


@given(st.booleans(), st.booleans(), st.booleans())
def test_decide_reports_every_wrong_secret_at_once(answers: bool, email: bool, rep: bool) -> None:
    d = run(evidence(answers_ok=answers, email_ok=email, representative_ok=rep))
    expected = [
        r
        for ok, r in [
            (answers, Reason.ANSWERS_WRONG),
            (email, Reason.EMAIL_MISMATCH),
            (rep, Reason.REPRESENTATIVE_MISMATCH),
        ]
        if not ok
    ]
    assert d.reasons == expected
    assert d.verified == (not expected)
    assert d.count_failure == bool(expected)


def test_decide_locked_account_reports_only_locked_and_counts_nothing() -> None:
    acc = account(locked_until=NOW + timedelta(minutes=1))
    d = run(evidence(account=acc, answers_ok=False, email_ok=False))
    assert d.reasons == [Reason.LOCKED]
    assert not d.verified and not d.count_failure and not d.lock
    # Even correct answers do not get through a lock.
    assert run(evidence(account=acc)).reasons == [Reason.LOCKED]


def test_decide_locked_notice_within_mailbox_limit() -> None:
    acc = account(locked_until=NOW + timedelta(minutes=10))
    assert run(evidence(account=acc)).send_locked_notice
    full = account(locked_until=NOW + timedelta(minutes=10), mails_sent=[NOW - timedelta(minutes=m) for m in (1, 2, 3)])
    d = run(evidence(account=full))
    assert d.reasons == [Reason.LOCKED]
    assert not d.send_locked_notice


def test_decide_lock_expiry_boundary() -> None:
    expired = account(locked_until=NOW)
    assert run(evidence(account=expired)) == Decision(True, [])
    still = account(locked_until=NOW + timedelta(microseconds=1))
    assert run(evidence(account=still)).reasons == [Reason.LOCKED]


def test_decide_lock_on_nth_failure_and_notice() -> None:
    four = [NOW - timedelta(minutes=m) for m in (1, 2, 3, 4)]
    d = run(evidence(account=account(failures=four), answers_ok=False))
    assert d.reasons == [Reason.ANSWERS_WRONG]
    assert d.count_failure and d.lock and d.send_locked_notice
    three = four[:3]
    d = run(evidence(account=account(failures=three), email_ok=False))
    assert d.count_failure and not d.lock and not d.send_locked_notice


def test_decide_old_failures_do_not_lock() -> None:
    old = [NOW - timedelta(minutes=20 + m) for m in range(10)]
    d = run(evidence(account=account(failures=old), answers_ok=False))
    assert d.count_failure and not d.lock


def test_decide_mailbox_limit_turns_success_into_rate_limited() -> None:
    full = account(mails_sent=[NOW - timedelta(minutes=m) for m in (5, 15, 45)])
    d = run(evidence(account=full))
    assert d == Decision(False, [Reason.RATE_LIMITED])
    assert not d.count_failure
    # A wrong guess on a flooded mailbox is still a counted failure, not "rate limited".
    d = run(evidence(account=full, answers_ok=False))
    assert d.reasons == [Reason.ANSWERS_WRONG] and d.count_failure


def test_lockout_simulation_against_handler_rules() -> None:
    """Replay what the handler does with each decision: lock at the 5th failure within the
    window, refuse during the lock, accept once the lock has expired."""
    acc = account()
    t = NOW
    outcomes = []
    for _ in range(6):
        d = decide(evidence(account=acc, answers_ok=False), t, LOCKOUT, MAILBOX)
        outcomes.append((d.reasons, d.lock))
        if d.count_failure:
            acc = replace(
                acc, failures=[*acc.failures, t], locked_until=t + LOCKOUT.duration if d.lock else acc.locked_until
            )
        t += timedelta(minutes=1)
    assert [lock for _, lock in outcomes] == [False, False, False, False, True, False]
    assert outcomes[5][0] == [Reason.LOCKED]
    assert acc.locked_until is not None
    after = acc.locked_until + timedelta(seconds=1)
    assert decide(evidence(account=acc), after, LOCKOUT, MAILBOX) == Decision(True, [])
