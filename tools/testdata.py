"""Fresh, valid citizens for the demo, the tests and the benchmark.

Each call makes a new account (random but valid cédula or RUC, unique e-mail),
so runs never collide with the limits of earlier runs (mailbox limit, lockout,
key history) and never need the stores wiped.
"""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stdnum.ec import ci, ruc

# Every secret made here (answers, keys), so a test can prove none leaked anywhere.
SECRETS_MADE: set[str] = set()


def random_cedula() -> str:
    """A valid 10-digit cédula: province 01-24, third digit < 6, check digit right."""
    while True:
        stem = f"{secrets.randbelow(24) + 1:02d}{secrets.randbelow(6)}{secrets.randbelow(10**6):06d}"
        for digit in "0123456789":
            if ci.is_valid(stem + digit):
                return stem + digit


def random_ruc() -> str:
    """A valid 13-digit RUC of a natural person (cédula + establishment 001)."""
    while True:
        candidate = random_cedula() + "001"
        if ruc.is_valid(candidate):
            return candidate


@dataclass
class Citizen:
    national_id: str
    email: str
    name: str
    answers: dict[str, str]
    password: str
    profile: str = "affiliate"
    representative_id: str | None = None
    locale: str = "es"
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "national_id": self.national_id,
            "profile": self.profile,
            "name": self.name,
            "email": self.email,
            "locale": self.locale,
            "answers": self.answers,
            "password": self.password,
        }
        if self.representative_id:
            doc["representative_id"] = self.representative_id
        return doc


def new_citizen(profile: str = "affiliate", locale: str = "es", domain: str = "example.org") -> Citizen:
    citizen = _make_citizen(profile, locale, domain)
    SECRETS_MADE.add(citizen.password)
    SECRETS_MADE.update(citizen.answers.values())
    return citizen


def _make_citizen(profile: str, locale: str, domain: str) -> Citizen:
    tag = uuid.uuid4().hex[:10]
    if profile == "employer":
        return Citizen(
            national_id=random_ruc(),
            email=f"empresa.{tag}@{domain}",
            name=f"Empresa {tag} S.A.",
            answers={
                "birth_date": "1975-06-01",
                "fingerprint_code": f"E{tag[:4].upper()}I{tag[4:8]}",
                "mother_surname": "Zambrano",
            },
            password=f"Inicial{secrets.randbelow(10**4):04d}",
            profile="employer",
            representative_id=random_cedula(),
            locale=locale,
        )
    return Citizen(
        national_id=random_cedula(),
        email=f"ciudadano.{tag}@{domain}",
        name=f"José Núñez {tag[:4]}",
        answers={
            "birth_date": "1984-03-09",
            "fingerprint_code": f"V{tag[:4].upper()}V{tag[4:8]}",
            "mother_surname": "Andrade",
        },
        password=f"Inicial{secrets.randbelow(10**4):04d}",
        locale=locale,
    )


def new_key() -> str:
    """A key that meets the seed policy (letters and digits, 6-15) and was never used."""
    key = f"Clave{secrets.randbelow(10**8):08d}"
    SECRETS_MADE.add(key)
    return key


def write_jsonl(citizens: list[Citizen], path: Path) -> Path:
    path.write_text("".join(json.dumps(c.record(), ensure_ascii=False) + "\n" for c in citizens), encoding="utf-8")
    return path
