"""Identity's settings: its rules (questions, lockout, limits), the answer hashing cost
and the keys it uses (pseudonyms of IDs and addresses; sealing initial keys)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import NonNegativeInt, PositiveInt

from services.identity.domain import Limits
from shared.settings import (
    DEV_IMPORT_KEY,
    DEV_PASSWORD_KEY,
    DEV_PSEUDONYM_KEY,
    Argon2Settings,
    PlatformSettings,
    PortalInputSettings,
)

MIN_COOLING_OFF_S = 3600


class IdentitySettings(PlatformSettings, Argon2Settings, PortalInputSettings):
    pseudonym_key: str = DEV_PSEUDONYM_KEY
    password_keys: str = DEV_PASSWORD_KEY  # seals an imported initial key for the password service
    import_keys: str = DEV_IMPORT_KEY  # opens the answers and initial key of an import command

    # Operator commands: a signed command is accepted this long after it was signed.
    operator_command_ttl_s: PositiveInt = 300
    # An approved e-mail change takes effect this long after it was requested, at the earliest
    # (both addresses are told at once: the owner has this long to object). Tests use seconds.
    email_change_cooling_off_s: NonNegativeInt = 24 * 3600

    security_questions: str = "birth_date,fingerprint_code,mother_surname"
    # Per (account, address block): this many failures in the window lock that block out.
    lockout_max_failures: PositiveInt = 5
    lockout_window_s: PositiveInt = 15 * 60
    lockout_duration_s: PositiveInt = 30 * 60
    # Per account, across all blocks: this many failures in the window slow the account down
    # to one evaluated attempt per block per SLOWED_ATTEMPT_INTERVAL_S.
    account_max_failures: PositiveInt = 20
    account_failure_window_s: PositiveInt = 24 * 3600
    slowed_attempt_interval_s: PositiveInt = 3600
    # Per address block (IPv4 address, IPv6 /64): failed requests before it is rate-limited.
    ip_max_requests: PositiveInt = 30
    ip_window_s: PositiveInt = 15 * 60
    recovery_mails_per_hour: PositiveInt = 3
    # Lock notices have their own quota (never the recovery mails').
    lock_notices_max: PositiveInt = 1
    lock_notice_window_s: PositiveInt = 6 * 3600

    def question_ids(self) -> list[str]:
        return [q.strip() for q in self.security_questions.split(",") if q.strip()]

    def limits(self) -> Limits:
        return Limits(
            block_max_failures=self.lockout_max_failures,
            block_window=timedelta(seconds=self.lockout_window_s),
            block_lock=timedelta(seconds=self.lockout_duration_s),
            account_max_failures=self.account_max_failures,
            account_window=timedelta(seconds=self.account_failure_window_s),
            slowed_interval=timedelta(seconds=self.slowed_attempt_interval_s),
            address_max_failures=self.ip_max_requests,
            address_window=timedelta(seconds=self.ip_window_s),
            mails_per_hour=self.recovery_mails_per_hour,
            notices_max=self.lock_notices_max,
            notice_window=timedelta(seconds=self.lock_notice_window_s),
        )

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "PASSWORD_KEYS": self.password_keys, "IMPORT_KEYS": self.import_keys}

    def hmac_keys(self) -> dict[str, str]:
        return {**super().hmac_keys(), "PSEUDONYM_KEY": self.pseudonym_key}

    def problems(self) -> list[str]:
        found = super().problems() + self.argon2_problems() + self.portal_input_problems()
        if self.email_change_cooling_off_s < MIN_COOLING_OFF_S:
            # Seconds are for tests: in production the owner must have time to object.
            found.append(f"EMAIL_CHANGE_COOLING_OFF_S: under {MIN_COOLING_OFF_S} s")
        return found
