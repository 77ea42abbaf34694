"""Password's settings: the key policy and history, the hashing cost, and the keys that
open what the tokens service (and the import) sealed for it."""

from __future__ import annotations

from typing import Literal

from shared.settings import DEV_PASSWORD_KEY, Argon2Settings, PlatformSettings, PortalInputSettings


class PasswordSettings(PlatformSettings, Argon2Settings, PortalInputSettings):
    password_keys: str = DEV_PASSWORD_KEY
    password_policy: Literal["seed", "nist"] = "seed"
    password_history: int = 5

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "PASSWORD_KEYS": self.password_keys}

    def problems(self) -> list[str]:
        return super().problems() + self.argon2_problems() + self.portal_input_problems()
