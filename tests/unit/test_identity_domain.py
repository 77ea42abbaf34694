"""Identity rules: national IDs, answer normalisation, e-mail matching, client addresses, the
lockout and the request decision."""

from __future__ import annotations

import ipaddress
import unicodedata
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from pydantic import ValidationError
from stdnum.ec import ci

from services.identity.domain import (
    COUNTED_FAILURES,
    Account,
    AddressState,
    AnswerChecks,
    Audit,
    BlockState,
    Counters,
    Decision,
    Emit,
    InvalidId,
    Limits,
    PrincipalState,
    Reason,
    Record,
    RequestFacts,
    address_block,
    address_block_or_none,
    cheap_refusal,
    decide_code_rejected,
    decide_request,
    mask_email,
    needs_answer_checks,
    normalize_answer,
    normalize_cedula,
    normalize_national_id,
    representative_matches,
    same_mailbox,
    slowed,
    within,
)
from services.identity.settings import IdentitySettings
from shared.crypto import constant_time_equal
from shared.schemas import RecoveryRequested

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


# ------------------------------------------------------------------ client addresses


@pytest.mark.parametrize(
    ("raw", "block"),
    [
        ("203.0.113.7", "203.0.113.7"),
        ("::ffff:203.0.113.7", "203.0.113.7"),  # IPv4-mapped, dotted
        ("::ffff:cb00:7107", "203.0.113.7"),  # IPv4-mapped, hex
        ("::FFFF:203.0.113.7", "203.0.113.7"),
        ("0:0:0:0:0:ffff:cb00:7107", "203.0.113.7"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("2001:DB8:1:2::abcd", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),  # the zone names an interface, not another host
        ("fe80::1%25", "fe80::/64"),
        ("::1", "::/64"),
    ],
)
def test_address_block(raw: str, block: str) -> None:
    assert address_block(raw) == block


@pytest.mark.parametrize(
    "raw", ["", "not-an-ip", "203.0.113", "203.0.113.7/32", "203.0.113.256", "2001:db8::/64", "1.2.3.4%eth0", "::g"]
)
def test_address_block_refuses_what_is_not_an_address(raw: str) -> None:
    with pytest.raises(ValueError):
        address_block(raw)
    assert address_block_or_none(raw) is None


def test_address_block_or_none_passes_none() -> None:
    assert address_block_or_none(None) is None
    assert address_block_or_none("::ffff:10.0.0.1") == "10.0.0.1"


# Prefix 0 holds ::ffff:0:0/96, the IPv4-mapped addresses: tested apart below.
@given(st.integers(1, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_every_address_of_a_64_is_one_block(prefix: int, a: int, b: int) -> None:
    first = ipaddress.IPv6Address((prefix << 64) | a)
    second = ipaddress.IPv6Address((prefix << 64) | b)
    assert address_block(str(first)) == address_block(str(second))
    assert address_block(str(first)) == str(ipaddress.IPv6Network(((prefix << 64), 64)))


@given(st.integers(1, 2**64 - 2), st.integers(0, 2**64 - 1))
def test_neighbouring_64s_are_different_blocks(prefix: int, host: int) -> None:
    one = ipaddress.IPv6Address((prefix << 64) | host)
    other = ipaddress.IPv6Address(((prefix + 1) << 64) | host)
    assert address_block(str(one)) != address_block(str(other))


@given(st.integers(0, 2**32 - 1))
def test_ipv4_is_per_address_and_its_mapped_form_folds_to_it(n: int) -> None:
    v4 = ipaddress.IPv4Address(n)
    assert address_block(str(v4)) == str(v4)
    assert address_block(f"::ffff:{v4}") == str(v4)
    assert address_block(str(ipaddress.IPv6Address(0xFFFF00000000 | n))) == str(v4)
    assert address_block(str(ipaddress.IPv4Address(n ^ 1))) != str(v4)


def request_payload(client_ip: str) -> dict[str, object]:
    return {
        "request_id": "req-1",
        "profile": "affiliate",
        "national_id": "1710034065",
        "email": "maria.perez@example.org",
        "answers": {"birth_date": "1984-03-09"},
        "captcha_passed": True,
        "client_ip": client_ip,
    }


@pytest.mark.parametrize("ip", ["203.0.113.7", "::ffff:203.0.113.7", "fe80::1%eth0", "2001:db8::1", "::1"])
def test_portal_client_ip_accepts_every_address_form(ip: str) -> None:
    req = RecoveryRequested.model_validate(request_payload(ip))
    assert address_block(req.client_ip) == address_block(ip)


@pytest.mark.parametrize("ip", ["", "localhost", "203.0.113.7, 10.0.0.1", "203.0.113.0/24", "1.2.3.4%eth0", "x" * 46])
def test_portal_client_ip_must_be_an_address(ip: str) -> None:
    with pytest.raises(ValidationError):
        RecoveryRequested.model_validate(request_payload(ip))


# ------------------------------------------------------------------ limits


def test_within_counts_the_window_without_its_start() -> None:
    window = timedelta(minutes=15)
    edge = NOW - window
    assert within([edge, edge + timedelta(microseconds=1), NOW], NOW, window) == 2


@given(st.lists(st.integers(0, 7200), max_size=40), st.integers(1, 7200))
def test_within_property(ages: list[int], seconds: int) -> None:
    times = [NOW - timedelta(seconds=a) for a in ages]
    assert within(times, NOW, timedelta(seconds=seconds)) == sum(1 for a in ages if a < seconds)


def test_limits_keep_and_retention_cover_every_rule() -> None:
    limits = Limits()
    assert limits.keep() >= max(limits.account_max_failures, limits.address_max_failures, limits.block_max_failures)
    assert limits.retention() >= max(limits.account_window, limits.notice_window, limits.block_lock)
    assert LIMITS == Limits()  # the defaults the README states


def test_settings_build_the_limits() -> None:
    s = IdentitySettings(
        lockout_max_failures=4,
        lockout_window_s=60,
        lockout_duration_s=120,
        account_max_failures=9,
        account_failure_window_s=3600,
        slowed_attempt_interval_s=600,
        ip_max_requests=7,
        ip_window_s=30,
        recovery_mails_per_hour=2,
        lock_notices_max=3,
        lock_notice_window_s=900,
    )
    assert s.limits() == Limits(
        block_max_failures=4,
        block_window=timedelta(seconds=60),
        block_lock=timedelta(seconds=120),
        account_max_failures=9,
        account_window=timedelta(hours=1),
        slowed_interval=timedelta(minutes=10),
        address_max_failures=7,
        address_window=timedelta(seconds=30),
        mails_per_hour=2,
        notices_max=3,
        notice_window=timedelta(minutes=15),
    )
    assert IdentitySettings().limits() == Limits()


@pytest.mark.parametrize("name", ["lockout_max_failures", "account_max_failures", "lock_notices_max", "ip_window_s"])
def test_settings_refuse_zero_limits(name: str) -> None:
    with pytest.raises(ValidationError):
        IdentitySettings(**{name: 0})  # type: ignore[arg-type]


# ------------------------------------------------------------------ decide_request()

LIMITS = Limits()
QUESTIONS = ("birth_date", "fingerprint_code", "mother_surname")


def account(**kw: object) -> Account:
    base = Account(
        account_id="acc-1",
        national_id="1710034065",
        profile="affiliate",
        name="María Pérez",
        email="maria.perez@example.org",
        locale="es",
        answer_hashes={q: "h" for q in QUESTIONS},
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def checks(wrong: tuple[str, ...] = (), missing: tuple[str, ...] = (), outdated: tuple[str, ...] = ()) -> AnswerChecks:
    return AnswerChecks(
        verified={q: q not in wrong and q not in missing for q in QUESTIONS},
        answered=frozenset(q for q in QUESTIONS if q not in missing),
        outdated=frozenset(outdated),
    )


def facts(**kw: object) -> RequestFacts:
    base = RequestFacts(
        seen_before=False,
        profile="affiliate",
        captcha_passed=True,
        national_id="1710034065",
        account=account(),
        typed_email="Maria.Perez@example.org",
        typed_representative=None,
        counters=Counters(),
        answers=checks(),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def ago(**kw: float) -> datetime:
    return NOW - timedelta(**kw)


def run(f: RequestFacts) -> Decision:
    return decide_request(f, LIMITS, NOW)


DECLINED = (Emit.ACCEPTED, Emit.DECLINED)


def test_verified() -> None:
    d = run(facts())
    assert d.verified and d.reasons == ()
    assert d.emit == (Emit.ACCEPTED, Emit.VERIFIED)
    assert d.account == account()
    assert d.record == Record(request=True, attempt=True, mail=True)
    assert d.audits == ()


def test_verified_rehashes_only_outdated_answers() -> None:
    d = run(facts(answers=checks(outdated=("birth_date",))))
    assert d.verified and d.record is not None and d.record.rehash == {"birth_date"}


def test_duplicate_request_does_nothing_but_answer_why() -> None:
    d = run(facts(seen_before=True, captcha_passed=False, answers=None))
    assert d.reasons == (Reason.DUPLICATE_REQUEST,)
    assert d.emit == (Emit.DUPLICATE,) and d.record is None and not d.verified


def test_address_over_its_limit_is_rate_limited_and_not_counted_again() -> None:
    full = Counters(address=AddressState(tuple(ago(seconds=i) for i in range(LIMITS.address_max_failures))))
    d = run(facts(counters=full, captcha_passed=False, national_id=None, account=None, answers=None))
    assert d.reasons == (Reason.RATE_LIMITED,)
    assert d.emit == DECLINED
    assert d.record == Record(request=True)


def test_old_address_failures_do_not_count() -> None:
    old = Counters(address=AddressState(tuple(ago(minutes=16) for _ in range(50))))
    assert run(facts(counters=old)).verified


def test_captcha_missing_counts_against_the_address_only() -> None:
    d = run(facts(captcha_passed=False, answers=None))
    assert d.reasons == (Reason.CAPTCHA_MISSING,)
    assert d.emit == DECLINED
    assert d.record == Record(request=True, address_failure=True)
    assert d.account == account()  # the decoy's wrong codes still count against the account


def test_id_invalid() -> None:
    d = run(facts(national_id=None, account=None, answers=None))
    assert d.reasons == (Reason.ID_INVALID,)
    assert d.emit == DECLINED
    assert d.record == Record(request=True, address_failure=True)


def test_account_unknown_is_counted_like_a_failure() -> None:
    d = run(facts(account=None, answers=checks(wrong=QUESTIONS)))
    assert d.reasons == (Reason.ACCOUNT_UNKNOWN,)
    assert d.emit == DECLINED and d.account is None
    assert d.record == Record(request=True, principal_failure=True, block_failure=True, address_failure=True)
    assert d.audits == ()


def test_profile_mismatch_is_account_unknown() -> None:
    d = run(facts(profile="employer"))
    assert d.reasons == (Reason.ACCOUNT_UNKNOWN,) and d.account is None


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"answers": checks(wrong=("mother_surname",))}, Reason.ANSWERS_WRONG),
        ({"answers": checks(missing=("birth_date",))}, Reason.ANSWERS_WRONG),
        ({"account": account(answer_hashes={"birth_date": "h", "fingerprint_code": "h"})}, Reason.ANSWERS_WRONG),
        ({"typed_email": "maria.perez@example.com"}, Reason.EMAIL_MISMATCH),
        ({"typed_email": "not an address"}, Reason.EMAIL_MISMATCH),
        (
            {"profile": "employer", "account": account(profile="employer", representative_id="1710034065")},
            Reason.REPRESENTATIVE_MISMATCH,
        ),
    ],
)
def test_single_counted_failure(overrides: dict[str, object], reason: str) -> None:
    d = run(facts(**overrides))
    assert not d.verified
    assert d.reasons == (reason,)
    assert reason in COUNTED_FAILURES
    assert d.emit == DECLINED
    assert d.record == Record(
        request=True, principal_failure=True, block_failure=True, address_failure=True, attempt=True
    )


def test_answers_with_no_questions_are_never_right() -> None:
    d = run(facts(answers=AnswerChecks(verified={}, answered=frozenset())))
    assert d.reasons == (Reason.ANSWERS_WRONG,)


@pytest.mark.parametrize(("typed", "ok"), [("1710034065", True), ("171003406-5", True), (None, False), ("x", False)])
def test_representative_check(typed: str | None, ok: bool) -> None:
    employer = account(profile="employer", national_id="1790011674001", representative_id="1710034065")
    d = run(facts(profile="employer", account=employer, typed_representative=typed))
    assert d.verified == ok
    assert representative_matches(employer, typed) == ok
    assert representative_matches(account(), None)  # an affiliate names no representative


@given(st.booleans(), st.booleans(), st.booleans())
def test_every_wrong_secret_is_reported_at_once(answers: bool, email: bool, rep: bool) -> None:
    employer = account(profile="employer", representative_id="1710034065")
    d = run(
        facts(
            profile="employer",
            account=employer,
            answers=checks() if answers else checks(wrong=("birth_date",)),
            typed_email=employer.email if email else "other@example.org",
            typed_representative="1710034065" if rep else "0926687856",
        )
    )
    expected = tuple(
        r
        for ok, r in [
            (answers, Reason.ANSWERS_WRONG),
            (email, Reason.EMAIL_MISMATCH),
            (rep, Reason.REPRESENTATIVE_MISMATCH),
        ]
        if not ok
    )
    assert d.reasons == expected
    assert d.verified == (not expected)
    assert d.record is not None and d.record.principal_failure == bool(expected)


def test_fifth_failure_from_a_block_locks_it_and_tells_the_owner() -> None:
    four = Counters(block=BlockState(failures=tuple(ago(minutes=m) for m in (1, 2, 3, 4))))
    d = run(facts(counters=four, answers=checks(wrong=("birth_date",))))
    assert d.reasons == (Reason.ANSWERS_WRONG,)
    assert d.audits == (Audit.LOCKED,)
    assert d.emit == (*DECLINED, Emit.LOCK_NOTICE)
    assert d.locked_until == NOW + LIMITS.block_lock
    assert d.record is not None and d.record.lock_until == NOW + LIMITS.block_lock and d.record.notice
    three = Counters(block=BlockState(failures=tuple(ago(minutes=m) for m in (1, 2, 3))))
    d = run(facts(counters=three, typed_email="x@example.org"))
    assert d.audits == () and d.emit == DECLINED and d.record is not None and d.record.lock_until is None


def test_old_block_failures_do_not_lock() -> None:
    old = Counters(block=BlockState(failures=tuple(ago(minutes=16 + m) for m in range(10))))
    d = run(facts(counters=old, answers=checks(wrong=QUESTIONS)))
    assert d.audits == () and d.record is not None and d.record.lock_until is None


def test_lock_notice_has_its_own_quota() -> None:
    four = BlockState(failures=tuple(ago(minutes=m) for m in (1, 2, 3, 4)))
    told = PrincipalState(notices=(ago(hours=5),))
    d = run(facts(counters=Counters(told, four), answers=checks(wrong=QUESTIONS)))
    assert d.audits == (Audit.LOCKED,) and Emit.LOCK_NOTICE not in d.emit
    assert d.record is not None and not d.record.notice and not d.record.mail
    # Six hours on, the owner may be told again; the recovery-mail quota plays no part.
    long_ago = PrincipalState(notices=(ago(hours=6),), mails=tuple(ago(minutes=m) for m in (1, 2, 3)))
    d = run(facts(counters=Counters(long_ago, four), answers=checks(wrong=QUESTIONS)))
    assert Emit.LOCK_NOTICE in d.emit


def test_locked_block_refuses_even_right_answers_and_counts_no_failure() -> None:
    locked = Counters(block=BlockState(locked_until=NOW + timedelta(minutes=1)))
    d = run(facts(counters=locked))
    assert d.reasons == (Reason.LOCKED,)
    assert d.emit == (*DECLINED, Emit.LOCK_NOTICE)
    assert d.locked_until == NOW + timedelta(minutes=1)
    assert d.record == Record(request=True, address_failure=True, notice=True)
    told = Counters(PrincipalState(notices=(ago(minutes=5),)), locked.block)
    d = run(facts(counters=told, answers=checks(wrong=QUESTIONS)))
    assert d.reasons == (Reason.LOCKED,) and d.emit == DECLINED


def test_lock_expiry_boundary() -> None:
    assert run(facts(counters=Counters(block=BlockState(locked_until=NOW)))).verified
    still = Counters(block=BlockState(locked_until=NOW + timedelta(microseconds=1)))
    assert run(facts(counters=still)).reasons == (Reason.LOCKED,)


def slowed_principal() -> PrincipalState:
    return PrincipalState(failures=tuple(ago(minutes=30 * i + 1) for i in range(LIMITS.account_max_failures)))


def test_slowed_account_refuses_a_second_attempt_from_a_block_within_the_hour() -> None:
    recent = Counters(slowed_principal(), BlockState(last_attempt=ago(minutes=59)))
    d = run(facts(counters=recent))
    assert d.reasons == (Reason.RATE_LIMITED,)
    assert d.emit == DECLINED
    assert d.record == Record(request=True, address_failure=True)  # not evaluated: no failure, no attempt


def test_slowed_account_evaluates_a_fresh_block_and_an_hour_old_one() -> None:
    for block in (BlockState(), BlockState(last_attempt=ago(hours=1))):
        d = run(facts(counters=Counters(slowed_principal(), block)))
        assert d.verified, block
        d = run(facts(counters=Counters(slowed_principal(), block), answers=checks(wrong=QUESTIONS)))
        assert d.reasons == (Reason.ANSWERS_WRONG,) and d.record is not None and d.record.attempt


def test_unslowed_account_lets_a_block_try_again_at_once() -> None:
    almost = PrincipalState(failures=slowed_principal().failures[1:])
    d = run(facts(counters=Counters(almost, BlockState(last_attempt=ago(seconds=1)))))
    assert d.verified


def test_reaching_the_account_cap_is_audited_once() -> None:
    almost = PrincipalState(failures=slowed_principal().failures[1:])
    d = run(facts(counters=Counters(almost), answers=checks(wrong=QUESTIONS)))
    assert d.audits == (Audit.SLOWED,)
    d = run(facts(counters=Counters(slowed_principal()), answers=checks(wrong=QUESTIONS)))
    assert d.audits == ()


def test_mailbox_limit_turns_success_into_rate_limited_without_a_failure() -> None:
    full = Counters(PrincipalState(mails=tuple(ago(minutes=m) for m in (5, 15, 45))))
    d = run(facts(counters=full))
    assert d.reasons == (Reason.RATE_LIMITED,) and d.emit == DECLINED
    assert d.record == Record(request=True, attempt=True)
    # A wrong guess on a flooded mailbox is still a counted failure, not "rate limited".
    d = run(facts(counters=full, answers=checks(wrong=("birth_date",))))
    assert d.reasons == (Reason.ANSWERS_WRONG,) and d.record is not None and d.record.principal_failure
    aged = Counters(PrincipalState(mails=(ago(minutes=5), ago(minutes=15), ago(hours=1))))
    assert run(facts(counters=aged)).verified


@pytest.mark.parametrize(
    ("overrides", "hashes"),
    [
        ({"seen_before": True}, False),
        ({"captcha_passed": False}, False),
        ({"national_id": None, "account": None}, False),
        ({"counters": Counters(address=AddressState((NOW,) * 30))}, False),
        ({}, True),
        ({"account": None}, True),
        ({"counters": Counters(block=BlockState(locked_until=NOW + timedelta(minutes=5)))}, True),
        ({"counters": Counters(slowed_principal(), BlockState(last_attempt=NOW))}, True),
        ({"counters": Counters(PrincipalState(mails=(NOW,) * 3))}, True),
    ],
)
def test_cheap_checks_skip_hashing_and_nothing_else_does(overrides: dict[str, object], hashes: bool) -> None:
    f = facts(answers=None, **overrides)
    assert needs_answer_checks(f, LIMITS, NOW) == hashes
    assert (cheap_refusal(f, LIMITS, NOW) is None) == hashes
    assert not needs_answer_checks(replace(f, answers=checks()), LIMITS, NOW)  # already hashed


def test_every_refusal_but_a_duplicate_declines_and_the_portal_always_hears_accepted() -> None:
    cases = [
        facts(captcha_passed=False),
        facts(national_id=None, account=None),
        facts(account=None),
        facts(answers=checks(wrong=QUESTIONS)),
        facts(typed_email="x@example.org"),
        facts(counters=Counters(block=BlockState(locked_until=NOW + timedelta(minutes=5)))),
        facts(counters=Counters(slowed_principal(), BlockState(last_attempt=NOW))),
        facts(counters=Counters(PrincipalState(mails=(NOW,) * 3))),
        facts(counters=Counters(address=AddressState((NOW,) * 30))),
    ]
    reasons = set()
    for f in cases:
        d = run(f)
        assert not d.verified
        assert d.emit[:2] == DECLINED and Emit.VERIFIED not in d.emit
        assert d.record is not None and d.record.request and not d.record.mail
        reasons.update(d.reasons)
    assert reasons == {
        Reason.CAPTCHA_MISSING,
        Reason.ID_INVALID,
        Reason.ACCOUNT_UNKNOWN,
        Reason.ANSWERS_WRONG,
        Reason.EMAIL_MISMATCH,
        Reason.LOCKED,
        Reason.RATE_LIMITED,
    }


# ------------------------------------------------------------------ decide_code_rejected()


def test_wrong_code_counts_per_account_and_block() -> None:
    d = decide_code_rejected(account(), Counters(), True, LIMITS, NOW)
    assert d.reasons == () and d.emit == () and d.audits == ()
    assert d.record == Record(principal_failure=True, block_failure=True, address_failure=True)


def test_wrong_code_without_an_address_counts_per_account_only() -> None:
    four = Counters(block=BlockState(failures=(NOW,) * 4))
    d = decide_code_rejected(account(), four, False, LIMITS, NOW)
    assert d.record == Record(principal_failure=True)
    assert d.audits == ()


def test_fifth_wrong_code_from_a_block_locks_it() -> None:
    four = Counters(block=BlockState(failures=(NOW,) * 4))
    d = decide_code_rejected(account(), four, True, LIMITS, NOW)
    assert d.audits == (Audit.LOCKED,) and d.emit == (Emit.LOCK_NOTICE,)
    assert d.record is not None and d.record.lock_until == NOW + LIMITS.block_lock and not d.record.attempt


def test_wrong_code_for_an_unknown_id_is_a_subject_failure() -> None:
    d = decide_code_rejected(None, Counters(block=BlockState(failures=(NOW,) * 4)), True, LIMITS, NOW)
    assert d.account is None and d.emit == () and d.audits == ()
    assert d.record == Record(principal_failure=True, block_failure=True, address_failure=True)


# ------------------------------------------------------------------ the lockout, played out


class Counted:
    """The store's counters in memory, updated from each decision's Record as the store does."""

    def __init__(self, limits: Limits = LIMITS) -> None:
        self.limits = limits
        self.principal = PrincipalState()
        self.blocks: dict[str, BlockState] = {}
        self.addresses: dict[str, AddressState] = {}
        self.mails: list[tuple[datetime, str]] = []

    def counters(self, block: str) -> Counters:
        return Counters(self.principal, self.blocks.get(block, BlockState()), self.addresses.get(block, AddressState()))

    def apply(self, block: str, record: Record, now: datetime) -> None:
        keep = self.limits.keep() + 1

        def push(times: tuple[datetime, ...], on: bool) -> tuple[datetime, ...]:
            return (*times, now)[-keep:] if on else times

        p = self.principal
        self.principal = PrincipalState(
            p.rev + 1,
            push(p.failures, record.principal_failure),
            push(p.mails, record.mail),
            push(p.notices, record.notice),
        )
        b = self.blocks.get(block, BlockState())
        self.blocks[block] = BlockState(
            push(b.failures, record.block_failure),
            record.lock_until or b.locked_until,
            now if record.attempt else b.last_attempt,
        )
        a = self.addresses.get(block, AddressState())
        self.addresses[block] = AddressState(push(a.failures, record.address_failure))

    def request(self, block: str, now: datetime, *, right: bool) -> Decision:
        f = facts(counters=self.counters(block), answers=checks() if right else checks(wrong=QUESTIONS))
        d = decide_request(f, self.limits, now)
        assert d.record is not None
        self.apply(block, d.record, now)
        if Emit.VERIFIED in d.emit:
            self.mails.append((now, "recovery"))
        if Emit.LOCK_NOTICE in d.emit:
            self.mails.append((now, "lock_notice"))
        return d


def test_a_stranger_cannot_stop_the_owner() -> None:
    """Someone who knows the cédula fails from their own address as fast as they like; the
    owner, answering right from home, still gets every recovery mail the quota allows."""
    world = Counted()
    t = NOW
    reasons = []
    for _ in range(40):
        reasons.append(world.request("stranger", t, right=False).reasons)
        t += timedelta(seconds=5)
    assert reasons[: LIMITS.block_max_failures] == [(Reason.ANSWERS_WRONG,)] * LIMITS.block_max_failures
    # Locked out, until the address's own limit of failed requests makes it rate-limited.
    cap = LIMITS.address_max_failures
    assert set(reasons[LIMITS.block_max_failures : cap]) == {(Reason.LOCKED,)}
    assert set(reasons[cap:]) == {(Reason.RATE_LIMITED,)}
    for _ in range(LIMITS.mails_per_hour):
        assert world.request("home", t, right=True).verified
        t += timedelta(minutes=1)
    assert [kind for _, kind in world.mails] == ["lock_notice"] + ["recovery"] * LIMITS.mails_per_hour


def test_a_stranger_with_many_blocks_slows_the_account_but_the_owner_gets_through_within_the_hour() -> None:
    world = Counted()
    t = NOW
    # Four blocks, five failures each: each block is locked and the account reaches its cap.
    for block in ("s1", "s2", "s3", "s4"):
        for _ in range(LIMITS.block_max_failures):
            world.request(block, t, right=False)
            t += timedelta(seconds=10)
    assert slowed(world.principal, LIMITS, t)
    # A fifth block gets one evaluated guess, then waits an hour.
    assert world.request("s5", t, right=False).reasons == (Reason.ANSWERS_WRONG,)
    assert world.request("s5", t + timedelta(seconds=1), right=True).reasons == (Reason.RATE_LIMITED,)
    # The owner, from an address that has not tried this hour, is evaluated and mailed.
    assert world.request("home", t + timedelta(minutes=2), right=True).verified
    notices = [kind for _, kind in world.mails if kind == "lock_notice"]
    assert len(notices) == 1  # four locks, one notice: the owner's mailbox is not flooded


@given(
    st.lists(
        st.tuples(st.integers(0, 30), st.integers(1, 600)),  # (block, seconds since the previous attempt)
        min_size=1,
        max_size=300,
    )
)
def test_brute_force_stays_capped(attempts: list[tuple[int, int]]) -> None:
    """Whatever the pattern, guesses evaluated per block after the cap are at most one an
    hour, the guesses in the first day are bounded, and lock notices are one per six hours."""
    world = Counted()
    t = NOW
    evaluated: list[tuple[datetime, str, bool]] = []  # when, block, account slowed at the time
    for block_no, gap in attempts:
        t += timedelta(seconds=gap)
        block = f"b{block_no}"
        was_slowed = slowed(world.principal, LIMITS, t)
        d = world.request(block, t, right=False)
        if d.reasons == (Reason.ANSWERS_WRONG,):
            evaluated.append((t, block, was_slowed))
    for when, block, was_slowed in evaluated:
        if was_slowed:
            others = [w for w, b, _ in evaluated if b == block and when - LIMITS.slowed_interval < w < when]
            assert others == [], (block, when)
    blocks = {b for _, b, _ in evaluated}
    days = (t - NOW) / timedelta(days=1) + 1
    assert len(evaluated) <= (LIMITS.account_max_failures + len(blocks) * 24) * days
    notice_times = [w for w, kind in world.mails if kind == "lock_notice"]
    for earlier, later in zip(notice_times, notice_times[1:], strict=False):
        assert later - earlier >= LIMITS.notice_window
    assert not [kind for _, kind in world.mails if kind == "recovery"]


# ------------------------------------------------------------------ where a verified recovery goes


def test_a_recovery_typed_to_the_backup_address_goes_there_and_says_so() -> None:
    owner = account(backup_email="maria.backup@example.org")
    backup = decide_request(facts(account=owner, typed_email="Maria.Backup@example.org"), LIMITS, NOW)
    registered = decide_request(facts(account=owner, typed_email="maria.perez@example.org"), LIMITS, NOW)
    assert backup.verified and backup.mail_to == "maria.backup@example.org" and backup.to_backup
    assert registered.verified and registered.mail_to == owner.email and not registered.to_backup
    assert not Decision(verified=False, reasons=(Reason.ID_INVALID,)).to_backup


def test_the_address_and_the_representative_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both are things a requester must know: an early-exit == would time how much of the
    # address on file (or the representative's cédula) a guess got right.
    import services.identity.domain as identity_domain

    compared: list[tuple[str, str]] = []

    def spy(a: str, b: str) -> bool:
        compared.append((a, b))
        return constant_time_equal(a, b)

    monkeypatch.setattr(identity_domain, "constant_time_equal", spy)
    assert same_mailbox("Ana@Example.org", "ana@example.org")
    employer = account(profile="employer", national_id="1790011674001", representative_id="1710034065")
    assert not representative_matches(employer, "0926687856")
    assert compared == [("ana@example.org", "ana@example.org"), ("0926687856", "1710034065")]
