"""Password (\"clave\") policies: pure rules that say why a candidate key is refused.

Two profiles exist:

* ``seed`` — the portal's historical rule, the default in DESIGN.md: 6 to 15
  characters, ASCII letters and digits only, at least one of each; and not in the
  shipped blocklist (``abc123``, ``password1`` and ``Iess2024`` meet the composition
  rule, yet are the first keys an attacker tries).
* ``nist`` — NIST SP 800-63B rev. 4 for single-factor passwords: 15 to 64
  characters counted in Unicode code points after NFKC, any printable character
  (spaces and non-ASCII included), no composition rules, and a blocklist of
  common / breached passwords.

A policy returns *every* reason that applies, in a fixed order, so the portal can
show the citizen all problems at once instead of one per attempt. History
("not one of the last 5 keys") needs the credentials store, so the password
service checks it and produces ``Reason.REUSED`` itself.

Reason codes are a public contract (they travel to the portal on
``recovery.outcomes``): never rename one, only add.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Final, Literal, Protocol


class Reason:
    """Stable reason codes for a refused key."""

    TOO_SHORT: Final = "password_too_short"
    TOO_LONG: Final = "password_too_long"
    NOT_ALPHANUMERIC: Final = "password_not_alphanumeric"
    NEEDS_LETTER_AND_DIGIT: Final = "password_needs_letter_and_digit"
    BLOCKLISTED: Final = "password_blocklisted"
    # nist only: the key holds a control character, a line/paragraph separator, a
    # lone surrogate or an unassigned code point. Such a key cannot be typed in a
    # form field, cannot be hashed reliably (surrogates do not encode to UTF-8), or
    # could normalise differently after a Unicode upgrade (unassigned code points).
    NOT_PRINTABLE: Final = "password_not_printable"
    # Produced by the password service (history check), never by a policy.
    REUSED: Final = "password_reused"

    ALL: Final = (
        TOO_SHORT,
        TOO_LONG,
        NOT_ALPHANUMERIC,
        NEEDS_LETTER_AND_DIGIT,
        BLOCKLISTED,
        NOT_PRINTABLE,
        REUSED,
    )


PolicyName = Literal["seed", "nist"]


class PasswordPolicy(Protocol):
    # A read-only property rather than a plain attribute so frozen (immutable)
    # implementations satisfy the protocol; callers just read ``policy.name``.
    @property
    def name(self) -> str: ...

    def check(self, candidate: str) -> list[str]:
        """Return all reason codes that apply, ``[]`` if the key is acceptable."""
        ...


# ---------------------------------------------------------------- seed profile

# ASCII only, on purpose: the portal's rule says "letters and digits", and its
# legacy back ends and the keyboards citizens meet at offices and kiosks are not
# guaranteed to round-trip ñ or accented letters (which also have composed and
# decomposed spellings that look identical). ``str.isalnum`` would accept them
# and also digits such as "٣" or "²", so the sets are spelled out.
_ASCII_LETTERS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_ASCII_DIGITS: Final = frozenset("0123456789")
_ASCII_ALNUM: Final = _ASCII_LETTERS | _ASCII_DIGITS


# ---------------------------------------------------------------- blocklist

_BLOCKLIST_RESOURCE: Final = ("data", "blocklist.txt")

# Categories a citizen cannot meaningfully type into a password field (see
# Reason.NOT_PRINTABLE). Format characters (Cf) stay allowed because emoji
# sequences need the zero-width joiner; private-use (Co) stays allowed because
# some input methods produce it and it is stable under normalisation.
_UNPRINTABLE_CATEGORIES: Final = frozenset({"Cc", "Cs", "Cn", "Zl", "Zp"})


def normalize(candidate: str) -> str:
    """NFKC, as SP 800-63B asks before hashing or comparing a password.

    The password service must hash exactly this form, otherwise a citizen who
    types the same key on another device (precomposed vs. decomposed "ñ",
    full-width digits) would be locked out.
    """
    return unicodedata.normalize("NFKC", candidate)


def blocklist_key(candidate: str) -> str:
    """The form a key is compared in against the blocklist: NFKC, case-folded.

    NFKC again after case folding because folding can produce sequences that are
    not in normal form (e.g. "ǰ"), and both sides must meet in one canonical form.
    """
    return normalize(normalize(candidate).casefold())


def _parse_blocklist(lines: Iterable[str]) -> frozenset[str]:
    # Only the line break is stripped: a leading or trailing space is part of
    # the key under the nist profile. Lines starting with '#' are comments.
    entries = (line.rstrip("\r\n") for line in lines)
    return frozenset(blocklist_key(e) for e in entries if e and not e.startswith("#"))


@cache
def shipped_blocklist() -> frozenset[str]:
    """The shipped list, read once per process on first use (it is large)."""
    path = resources.files(__package__ or "services.password").joinpath(*_BLOCKLIST_RESOURCE)
    with path.open("r", encoding="utf-8") as fh:
        return _parse_blocklist(fh)


def _blocked(candidate: str, blocklist: frozenset[str] | None) -> bool:
    """Is the key in the blocklist (the shipped one when ``blocklist`` is None)?"""
    return blocklist_key(candidate) in (shipped_blocklist() if blocklist is None else blocklist)


def _has_unprintable(text: str) -> bool:
    return any(unicodedata.category(ch) in _UNPRINTABLE_CATEGORIES for ch in text)


@dataclass(frozen=True)
class SeedPolicy:
    min_len: int = 6
    max_len: int = 15
    # None means the shipped list, loaded lazily; otherwise already-normalised keys.
    blocklist: frozenset[str] | None = field(default=None, repr=False)
    name: str = "seed"

    def __post_init__(self) -> None:
        _check_bounds(self.min_len, self.max_len)

    def check(self, candidate: str) -> list[str]:
        # No normalisation for the rules: anything outside ASCII is refused anyway, and the
        # length of an ASCII string is the same in every normal form.
        reasons: list[str] = []
        if len(candidate) < self.min_len:
            reasons.append(Reason.TOO_SHORT)
        if len(candidate) > self.max_len:
            reasons.append(Reason.TOO_LONG)
        chars = set(candidate)
        if not chars <= _ASCII_ALNUM:
            reasons.append(Reason.NOT_ALPHANUMERIC)
        if not (chars & _ASCII_LETTERS and chars & _ASCII_DIGITS):
            reasons.append(Reason.NEEDS_LETTER_AND_DIGIT)
        # Surrogates cannot be normalised; such a key is already refused as not alphanumeric.
        if not any(unicodedata.category(ch) == "Cs" for ch in candidate) and _blocked(candidate, self.blocklist):
            reasons.append(Reason.BLOCKLISTED)
        return reasons


def seed_policy(min_len: int = 6, max_len: int = 15, blocklist: Iterable[str] | None = None) -> PasswordPolicy:
    """Seed profile; ``blocklist`` replaces the shipped list (entries are normalised here)."""
    keys = None if blocklist is None else frozenset(blocklist_key(e) for e in blocklist)
    return SeedPolicy(min_len=min_len, max_len=max_len, blocklist=keys)


# ---------------------------------------------------------------- nist profile


@dataclass(frozen=True)
class NistPolicy:
    min_len: int = 15
    max_len: int = 64
    # None means the shipped list, loaded lazily; otherwise already-normalised keys.
    blocklist: frozenset[str] | None = field(default=None, repr=False)
    name: str = "nist"

    def __post_init__(self) -> None:
        _check_bounds(self.min_len, self.max_len)

    def check(self, candidate: str) -> list[str]:
        # Surrogates must be checked on the raw string: NFKC would fail on them.
        if any(unicodedata.category(ch) == "Cs" for ch in candidate):
            return [Reason.NOT_PRINTABLE]
        normal = normalize(candidate)
        reasons: list[str] = []
        if len(normal) < self.min_len:
            reasons.append(Reason.TOO_SHORT)
        if len(normal) > self.max_len:
            reasons.append(Reason.TOO_LONG)
        if _has_unprintable(normal):
            reasons.append(Reason.NOT_PRINTABLE)
        if _blocked(normal, self.blocklist):
            reasons.append(Reason.BLOCKLISTED)
        return reasons


def nist_policy(min_len: int = 15, max_len: int = 64, blocklist: Iterable[str] | None = None) -> PasswordPolicy:
    """NIST profile; ``blocklist`` replaces the shipped list (entries are normalised here)."""
    keys = None if blocklist is None else frozenset(blocklist_key(e) for e in blocklist)
    return NistPolicy(min_len=min_len, max_len=max_len, blocklist=keys)


# ---------------------------------------------------------------- selection


def policy_from_name(name: PolicyName) -> PasswordPolicy:
    """The policy named in settings (``PASSWORD_POLICY``), with its defaults."""
    if name == "seed":
        return seed_policy()
    if name == "nist":
        return nist_policy()
    raise ValueError(f"unknown password policy {name!r}; expected 'seed' or 'nist'")


def _check_bounds(min_len: int, max_len: int) -> None:
    if not 1 <= min_len <= max_len:
        raise ValueError(f"invalid length bounds: min_len={min_len}, max_len={max_len}")
