"""Password policies: example tests per reason code, then properties."""

from __future__ import annotations

import string
import unicodedata

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from services.password.policy import (
    NistPolicy,
    PasswordPolicy,
    Reason,
    SeedPolicy,
    blocklist_key,
    nist_policy,
    policy_from_name,
    seed_policy,
    shipped_blocklist,
)

SEED = seed_policy()
NIST = nist_policy()

ALNUM = string.ascii_letters + string.digits


# ------------------------------------------------------------------ seed examples


@pytest.mark.parametrize("key", ["Inicial2024", "a1b2c3d4e5f6g7h", "ZZZZZ9", "Quito7Pichincha"])
def test_seed_accepts_ascii_letters_and_digits(key: str) -> None:
    assert SEED.check(key) == []


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("ab1", [Reason.TOO_SHORT]),
        ("", [Reason.TOO_SHORT, Reason.NEEDS_LETTER_AND_DIGIT]),
        ("abcdefgh12345678", [Reason.TOO_LONG]),
        ("abc 123", [Reason.NOT_ALPHANUMERIC]),
        ("abc-123", [Reason.NOT_ALPHANUMERIC]),
        ("qzxwvutr", [Reason.NEEDS_LETTER_AND_DIGIT]),
        ("90817263", [Reason.NEEDS_LETTER_AND_DIGIT]),
        ("abcdefgh", [Reason.NEEDS_LETTER_AND_DIGIT, Reason.BLOCKLISTED]),
        ("ab!", [Reason.TOO_SHORT, Reason.NOT_ALPHANUMERIC, Reason.NEEDS_LETTER_AND_DIGIT]),
        ("!!!!!!!!!!!!!!!!", [Reason.TOO_LONG, Reason.NOT_ALPHANUMERIC,
                              Reason.NEEDS_LETTER_AND_DIGIT]),
    ],
)
def test_seed_reports_every_reason(key: str, expected: list[str]) -> None:
    assert SEED.check(key) == expected


@pytest.mark.parametrize("key", ["contraseña1", "Año2024abc", "café123", "abc١٢٣", "abc12³"])
def test_seed_is_ascii_only(key: str) -> None:
    # ñ, accented letters and non-ASCII digits are refused on purpose (see policy.py).
    assert Reason.NOT_ALPHANUMERIC in SEED.check(key)


@pytest.mark.parametrize("key", ["abc123", "password1", "Iess2024", "PASSWORD1", "Qwerty123", "iess2024"])
def test_seed_refuses_blocklisted_keys(key: str) -> None:
    # They meet the composition rule, yet are the first keys an attacker tries (issue 8).
    assert SEED.check(key) == [Reason.BLOCKLISTED]


def test_seed_lists_blocklisted_with_every_other_reason() -> None:
    # "password" is on the list and also lacks a digit; "123456" lacks a letter.
    assert SEED.check("password") == [Reason.NEEDS_LETTER_AND_DIGIT, Reason.BLOCKLISTED]
    assert SEED.check("12345") == [Reason.TOO_SHORT, Reason.NEEDS_LETTER_AND_DIGIT, Reason.BLOCKLISTED]


def test_seed_custom_blocklist_replaces_shipped_one() -> None:
    policy = seed_policy(blocklist=["Portal2025"])
    assert policy.check("PORTAL2025") == [Reason.BLOCKLISTED]
    assert policy.check("password1") == []


def test_seed_survives_a_lone_surrogate() -> None:
    assert SEED.check("abc\ud800123") == [Reason.NOT_ALPHANUMERIC]


def test_seed_custom_bounds() -> None:
    policy = seed_policy(min_len=8, max_len=10)
    assert policy.check("xqz1234") == [Reason.TOO_SHORT]
    assert policy.check("xqz12345") == []
    assert policy.check("xqz1234567") == []
    assert policy.check("xqz12345678") == [Reason.TOO_LONG]


# ------------------------------------------------------------------ nist examples


@pytest.mark.parametrize(
    "key",
    [
        "una frase larga con espacios",
        "mi perro se llama Firulais",
        "ñandú-cóndor-águila",
        "🐢🐢🐢 slow and steady 🐢🐢🐢",
        "家族と一緒に旅行するのが大好きです",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaX",  # 64
    ],
)
def test_nist_accepts_long_printable_keys(key: str) -> None:
    assert NIST.check(key) == []


def test_nist_has_no_composition_rules() -> None:
    assert NIST.check("sololetrasminusculas") == []
    assert NIST.check("90817263544536271809") == []


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("corto", [Reason.TOO_SHORT]),
        ("", [Reason.TOO_SHORT]),
        ("x" * 64 + "y", [Reason.TOO_LONG]),
        ("linea uno\nlinea dos", [Reason.NOT_PRINTABLE]),
        ("tab\tseparated key", [Reason.NOT_PRINTABLE]),
        ("null\x00byte in the key", [Reason.NOT_PRINTABLE]),
        ("line\u2028separator key", [Reason.NOT_PRINTABLE]),
        ("unassigned \U000e0080 code point", [Reason.NOT_PRINTABLE]),
        ("lone \ud800 surrogate key!", [Reason.NOT_PRINTABLE]),
        ("\x07\x07", [Reason.TOO_SHORT, Reason.NOT_PRINTABLE]),
    ],
)
def test_nist_reasons(key: str, expected: list[str]) -> None:
    assert NIST.check(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "123456789012345",
        "passwordpassword",
        "PasswordPassword",
        "qwertyuiopasdfgh",
        "contraseñasegura",
        "CONTRASEÑASEGURA",
        "contrasenasegura",
        "correct horse battery staple",
        # full-width letters normalise (NFKC) to the blocklisted ASCII phrase
        "ｐａｓｓｗｏｒｄｐａｓｓｗｏｒｄ",
        # decomposed ñ (n + combining tilde) equals the precomposed entry
        unicodedata.normalize("NFD", "contraseñasegura"),
    ],
)
def test_nist_blocklist_is_case_and_normalisation_insensitive(key: str) -> None:
    assert NIST.check(key) == [Reason.BLOCKLISTED]


def test_nist_short_blocklisted_key_reports_both() -> None:
    assert NIST.check("password") == [Reason.TOO_SHORT, Reason.BLOCKLISTED]


def test_nist_length_counts_code_points_after_nfkc() -> None:
    # 15 decomposed "ñ" are 30 code points raw but 15 after NFKC.
    key = unicodedata.normalize("NFD", "ñ" * 15)
    assert len(key) == 30
    assert NIST.check(key) == []
    # "ﬃ" is one code point that NFKC expands to three.
    assert NIST.check("ﬃ" * 5) == []
    assert NIST.check("ﬃ" * 4) == [Reason.TOO_SHORT]


def test_nist_custom_blocklist_replaces_shipped_one() -> None:
    policy = nist_policy(blocklist=["Mi Clave Secreta Del IESS"])
    assert policy.check("mi clave secreta del iess") == [Reason.BLOCKLISTED]
    assert policy.check("passwordpassword") == []


# ------------------------------------------------------------------ shipped blocklist


def test_shipped_blocklist_is_large_and_normalised() -> None:
    entries = shipped_blocklist()
    assert len(entries) > 5000
    assert all(e == blocklist_key(e) for e in entries)
    assert not any(e.startswith("#") for e in entries)
    assert sum(len(e) >= 15 for e in entries) > 500
    for known in ("123456", "password", "qwerty", "contraseña", "teamo", "ecuador",
                  "quito", "guayaquil", "iess123", "1qaz2wsx", "passwordpassword"):
        assert known in entries


def test_shipped_blocklist_loads_once() -> None:
    assert shipped_blocklist() is shipped_blocklist()


# ------------------------------------------------------------------ selection / protocol


def test_policy_from_name() -> None:
    assert isinstance(policy_from_name("seed"), SeedPolicy)
    assert isinstance(policy_from_name("nist"), NistPolicy)
    assert policy_from_name("seed").name == "seed"
    assert policy_from_name("nist").name == "nist"
    with pytest.raises(ValueError):
        policy_from_name("lax")  # type: ignore[arg-type]


@pytest.mark.parametrize(("lo", "hi"), [(0, 10), (10, 9), (-1, 5)])
def test_invalid_bounds_are_refused(lo: int, hi: int) -> None:
    with pytest.raises(ValueError):
        seed_policy(min_len=lo, max_len=hi)
    with pytest.raises(ValueError):
        nist_policy(min_len=lo, max_len=hi)


def test_reason_codes_are_stable() -> None:
    assert Reason.ALL == (
        "password_too_short",
        "password_too_long",
        "password_not_alphanumeric",
        "password_needs_letter_and_digit",
        "password_blocklisted",
        "password_not_printable",
        "password_reused",
    )


# ------------------------------------------------------------------ properties


@st.composite
def seed_valid_keys(draw: st.DrawFn) -> str:
    letter = draw(st.sampled_from(string.ascii_letters))
    digit = draw(st.sampled_from(string.digits))
    rest = draw(st.text(alphabet=ALNUM, min_size=4, max_size=13))
    chars = list(letter + digit + rest)
    return "".join(draw(st.permutations(chars)))


@given(seed_valid_keys())
def test_prop_seed_accepts_every_valid_key_not_in_blocklist(key: str) -> None:
    assume(blocklist_key(key) not in shipped_blocklist())
    assert SEED.check(key) == []


@given(st.sampled_from(sorted(e for e in shipped_blocklist() if e.isascii())), st.booleans())
def test_prop_seed_refuses_every_ascii_blocklist_entry(entry: str, upper: bool) -> None:
    assert Reason.BLOCKLISTED in SEED.check(entry.upper() if upper else entry)


@given(st.text(alphabet=ALNUM, max_size=5), st.characters().filter(lambda c: c not in ALNUM),
       st.text(alphabet=ALNUM, max_size=20))
def test_prop_seed_flags_any_non_alphanumeric_char(head: str, bad: str, tail: str) -> None:
    assert Reason.NOT_ALPHANUMERIC in SEED.check(head + bad + tail)


@given(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=60))
def test_prop_seed_length_bounds_are_exact(min_len: int, extra: int) -> None:
    max_len = min_len + extra
    policy = seed_policy(min_len=min_len, max_len=max_len)
    for size, short, long_ in [
        (min_len - 1, True, False),
        (min_len, False, False),
        (max_len, False, False),
        (max_len + 1, False, True),
    ]:
        reasons = policy.check(("a1" * size)[:size])
        assert (Reason.TOO_SHORT in reasons) is short
        assert (Reason.TOO_LONG in reasons) is long_


@given(st.integers(min_value=1, max_value=40), st.integers(min_value=0, max_value=60))
def test_prop_nist_length_bounds_are_exact(min_len: int, extra: int) -> None:
    max_len = min_len + extra
    policy = nist_policy(min_len=min_len, max_len=max_len, blocklist=[])
    for size, short, long_ in [
        (min_len - 1, True, False),
        (min_len, False, False),
        (max_len, False, False),
        (max_len + 1, False, True),
    ]:
        reasons = policy.check("é" * size)
        assert (Reason.TOO_SHORT in reasons) is short
        assert (Reason.TOO_LONG in reasons) is long_


# Printable per the nist profile: everything except Cc, Cs, Cn, Zl, Zp.
printable = st.characters(exclude_categories=("Cc", "Cs", "Cn", "Zl", "Zp"))


@given(st.text(alphabet=printable, min_size=15, max_size=64))
def test_prop_nist_accepts_printable_keys_not_in_blocklist(key: str) -> None:
    normal = unicodedata.normalize("NFKC", key)
    # NFKC can change the length or (rarely) yield a non-printable code point;
    # the property is about keys that are 15..64 printable code points after it.
    assume(15 <= len(normal) <= 64)
    assume(all(unicodedata.category(c) not in {"Cc", "Cs", "Cn", "Zl", "Zp"} for c in normal))
    assume(blocklist_key(key) not in shipped_blocklist())
    assert NIST.check(key) == []


policies = st.sampled_from([SEED, NIST, seed_policy(1, 3), nist_policy(1, 3, blocklist=["ab"])])


@given(policies, st.text(max_size=80))
def test_prop_no_duplicate_reasons_and_only_known_codes(policy: PasswordPolicy, key: str) -> None:
    reasons = policy.check(key)
    assert len(reasons) == len(set(reasons))
    assert set(reasons) <= set(Reason.ALL) - {Reason.REUSED}


@given(policies, st.text(max_size=80))
def test_prop_check_is_deterministic(policy: PasswordPolicy, key: str) -> None:
    assert policy.check(key) == policy.check(key)
    assert policy.check(key) == policy.check(str(key))
