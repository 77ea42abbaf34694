"""Checks of what the citizen typed that need no account: format only.

They return field errors (message keys) so the page can show each next to its field. Such
checks leak nothing: they are about the citizen's own input, as identity's own check-digit
check is, and Clave runs its own checks again whatever the page says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from email_validator import EmailNotValidError, validate_email
from stdnum.ec import ci, ruc

CODE = re.compile(r"^[0-9]{6}$")


@dataclass
class RecoveryForm:
    profile: Literal["affiliate", "employer"] | None
    national_id: str
    representative_id: str
    email: str
    answers: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)


def read_recovery(form: Mapping[str, str], questions: list[str]) -> RecoveryForm:
    profile_raw = form.get("profile", "")
    profile: Literal["affiliate", "employer"] | None = (
        "employer" if profile_raw == "employer" else "affiliate" if profile_raw == "affiliate" else None
    )
    parsed = RecoveryForm(
        profile=profile,
        national_id=form.get("national_id", "").strip(),
        representative_id=form.get("representative_id", "").strip(),
        email=form.get("email", "").strip(),
        answers={q: form.get(f"answers.{q}", "").strip() for q in questions},
    )
    errors = parsed.errors
    if profile is None:
        errors["profile"] = "error.required"
    if not parsed.national_id:
        errors["national_id"] = "error.required"
    elif not _valid_id(parsed.national_id, profile):
        errors["national_id"] = "error.national_id"
    if profile == "employer":
        if not parsed.representative_id:
            errors["representative_id"] = "error.required"
        elif not ci.is_valid(parsed.representative_id):
            errors["representative_id"] = "error.representative_id"
    if not parsed.email:
        errors["email"] = "error.required"
    else:
        try:
            validate_email(parsed.email, check_deliverability=False)
        except EmailNotValidError:
            errors["email"] = "error.email"
    for question, answer in parsed.answers.items():
        if not answer:
            errors[f"answers.{question}"] = "error.required"
    return parsed


def _valid_id(value: str, profile: str | None) -> bool:
    if profile == "employer":
        return bool(ruc.is_valid(value))
    return bool(ci.is_valid(value))


@dataclass
class ResetForm:
    request_id: str
    token: str
    code: str
    new_password: str
    errors: dict[str, str] = field(default_factory=dict)


def read_reset(form: Mapping[str, str]) -> ResetForm:
    parsed = ResetForm(
        request_id=form.get("request_id", "").strip(),
        token=form.get("token", "").strip(),
        code=form.get("code", "").strip(),
        new_password=form.get("new_password", ""),
    )
    errors = parsed.errors
    if not parsed.request_id or not (parsed.token or "code" in form):
        errors["form"] = "error.no_token"
    elif not parsed.token and not CODE.match(parsed.code):
        errors["code"] = "error.code" if parsed.code else "error.required"
    if not parsed.new_password:
        errors["new_password"] = "error.required"
    elif form.get("new_password_confirm", "") != parsed.new_password:
        errors["new_password_confirm"] = "error.confirm"
    return parsed
