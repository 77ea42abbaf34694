"""Identity's settings: its rules (questions, lockout, limits), the answer hashing cost
and the keys it uses (pseudonyms of IDs and addresses; sealing initial keys)."""

from __future__ import annotations

from shared.settings import DEV_PASSWORD_KEY, DEV_PSEUDONYM_KEY, Argon2Settings, PlatformSettings


class IdentitySettings(PlatformSettings, Argon2Settings):
    pseudonym_key: str = DEV_PSEUDONYM_KEY
    password_keys: str = DEV_PASSWORD_KEY  # seals an imported initial key for the password service

    security_questions: str = "birth_date,fingerprint_code,mother_surname"
    lockout_max_failures: int = 5
    lockout_window_s: int = 15 * 60
    lockout_duration_s: int = 30 * 60
    ip_max_requests: int = 30
    ip_window_s: int = 15 * 60
    recovery_mails_per_hour: int = 3

    def question_ids(self) -> list[str]:
        return [q.strip() for q in self.security_questions.split(",") if q.strip()]

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "PASSWORD_KEYS": self.password_keys}

    def hmac_keys(self) -> dict[str, str]:
        return {**super().hmac_keys(), "PSEUDONYM_KEY": self.pseudonym_key}

    def problems(self) -> list[str]:
        return super().problems() + self.argon2_problems()
