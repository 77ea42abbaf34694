"""The page's settings (environment variables, like every Clave process)."""

from __future__ import annotations

from typing import Literal

from pydantic_settings import BaseSettings, SettingsConfigDict


class PageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", case_sensitive=False)

    clave_env: Literal["production", "development"] = "production"
    page_host: str = "127.0.0.1"
    page_port: int = 8000
    # The questions Clave's identity service asks (its SECURITY_QUESTIONS): same ids.
    security_questions: str = "birth_date,fingerprint_code,mother_surname"
    # The key policy Clave's password service applies (its PASSWORD_POLICY), shown next to
    # the field so a citizen knows the rule before typing.
    password_policy: Literal["seed", "nist"] = "seed"
    # "stand-in": a checkbox, development only. A portal plugs its captcha in by giving
    # create_app a Captcha of its own (clave_page.captcha).
    page_captcha: Literal["stand-in", "external"] = "stand-in"
    # Behind a reverse proxy, the citizen's address comes from X-Forwarded-For's last hop.
    page_trust_forwarded_for: bool = False
    # How long a form waits for Clave's answer to a reset or a login before saying so.
    page_answer_timeout_s: float = 15.0

    def question_ids(self) -> list[str]:
        return [q.strip() for q in self.security_questions.split(",") if q.strip()]

    def problems(self) -> list[str]:
        """What production refuses: the development captcha stand-in lets robots in."""
        found = []
        if self.clave_env == "production" and self.page_captcha == "stand-in":
            found.append("PAGE_CAPTCHA: the stand-in captcha is for development; plug in a real one")
        return found
