"""Password's settings: the key policy and history, the hashing cost, the keys that open what
the tokens service (and the import) sealed for it, and the throttling of credential checks."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

from pydantic import PositiveInt

from shared.settings import DEV_PASSWORD_KEY, DEV_PSEUDONYM_KEY, Argon2Settings, PlatformSettings, PortalInputSettings
from shared.throttle import ThrottleLimits


class PasswordSettings(PlatformSettings, Argon2Settings, PortalInputSettings):
    password_keys: str = DEV_PASSWORD_KEY
    # Sealed keys older than these are dead-lettered (`sealed_expired`) and change nothing. A new
    # key is used within seconds of the reset (the reservation waits 120 s); 10 min leave room
    # for a backlog. An initial key waits for the import's whole run, and can set no key but
    # its own account's first one.
    sealed_new_key_ttl_s: PositiveInt = 10 * 60
    sealed_initial_key_ttl_s: PositiveInt = 7 * 24 * 3600
    password_policy: Literal["seed", "nist"] = "seed"
    password_history: int = 5
    # Keyed hashes of national IDs and client address blocks (audit, throttling counters): the
    # same key as identity's, so an auditor follows one citizen across both services.
    pseudonym_key: str = DEV_PSEUDONYM_KEY

    # Credential checks (login.checks), throttled like recovery requests (shared/throttle.py).
    # Per (account, address block): this many wrong keys in the window lock that block out.
    login_block_max_failures: PositiveInt = 5
    login_block_window_s: PositiveInt = 15 * 60
    login_block_lock_s: PositiveInt = 15 * 60
    # Per account, all blocks: this many wrong keys in the window slow it down to one wrong
    # key per block per LOGIN_SLOWED_INTERVAL_S (a block's first try is still evaluated).
    login_account_max_failures: PositiveInt = 20
    login_account_window_s: PositiveInt = 24 * 3600
    login_slowed_interval_s: PositiveInt = 3600
    # Per address block, any accounts: wrong keys before it is refused without hashing. Higher
    # than recovery's: many citizens log in from behind one carrier-grade NAT address.
    login_ip_max_failures: PositiveInt = 100
    login_ip_window_s: PositiveInt = 15 * 60

    def login_limits(self) -> ThrottleLimits:
        return ThrottleLimits(
            block_max_failures=self.login_block_max_failures,
            block_window=timedelta(seconds=self.login_block_window_s),
            block_lock=timedelta(seconds=self.login_block_lock_s),
            account_max_failures=self.login_account_max_failures,
            account_window=timedelta(seconds=self.login_account_window_s),
            slowed_interval=timedelta(seconds=self.login_slowed_interval_s),
            address_max_failures=self.login_ip_max_failures,
            address_window=timedelta(seconds=self.login_ip_window_s),
        )

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "PASSWORD_KEYS": self.password_keys}

    def hmac_keys(self) -> dict[str, str]:
        return {**super().hmac_keys(), "PSEUDONYM_KEY": self.pseudonym_key}

    def problems(self) -> list[str]:
        return super().problems() + self.argon2_problems() + self.portal_input_problems()
