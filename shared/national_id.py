"""National IDs as citizens type them: a cédula (10 digits) or, for an employer, a RUC
(13 digits), checked with python-stdnum. Pure; used by identity (requests, imports,
operator commands) and by the password service (credential checks)."""

from __future__ import annotations

from stdnum.ec import ci, ruc
from stdnum.exceptions import ValidationError as StdnumError


class InvalidId(ValueError):
    pass


def normalize_national_id(profile: str, raw: str) -> str:
    """Cédula (affiliate, 10 digits) or RUC (employer, 13 digits), as people type them."""
    module = ci if profile == "affiliate" else ruc
    try:
        return str(module.validate(raw))  # compact() drops spaces and dashes first
    except StdnumError as exc:
        raise InvalidId(str(exc)) from None


def normalize_cedula(raw: str) -> str:
    return normalize_national_id("affiliate", raw)


def profile_of(raw: str) -> str:
    """Where no profile is given (a login, an operator command): 13 digits are a RUC."""
    return "employer" if sum(c.isdigit() for c in raw) == 13 else "affiliate"


def normalize_any(raw: str) -> str:
    """A cédula or a RUC, told apart by its length."""
    return normalize_national_id(profile_of(raw), raw)
