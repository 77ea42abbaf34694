"""Password's settings: the key policy and history, the hashing cost, and the keys that
open what the tokens service (and the import) sealed for it."""

from __future__ import annotations

from typing import Literal

from pydantic import PositiveInt

from shared.settings import DEV_PASSWORD_KEY, Argon2Settings, PlatformSettings


class PasswordSettings(PlatformSettings, Argon2Settings):
    password_keys: str = DEV_PASSWORD_KEY
    # Sealed keys older than these are dead-lettered (`sealed_expired`) and change nothing. A new
    # key is used within seconds of the reset (the reservation waits 120 s); 10 min leave room
    # for a backlog. An initial key waits for the import's whole run, and can set no key but
    # its own account's first one.
    sealed_new_key_ttl_s: PositiveInt = 10 * 60
    sealed_initial_key_ttl_s: PositiveInt = 7 * 24 * 3600
    password_policy: Literal["seed", "nist"] = "seed"
    password_history: int = 5

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "PASSWORD_KEYS": self.password_keys}

    def problems(self) -> list[str]:
        return super().problems() + self.argon2_problems()
