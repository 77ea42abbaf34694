"""Tokens' settings: lifetimes and attempt limits, and the keys it uses (sealing link and
code for the notifier and a new key for the password service; the codes' keyed hash)."""

from __future__ import annotations

from shared.settings import DEV_CODE_KEY, DEV_NOTIFIER_KEY, DEV_PASSWORD_KEY, PlatformSettings, PortalInputSettings


class TokensSettings(PlatformSettings, PortalInputSettings):
    notifier_keys: str = DEV_NOTIFIER_KEY
    password_keys: str = DEV_PASSWORD_KEY
    code_hmac_key: str = DEV_CODE_KEY

    link_ttl_s: int = 30 * 60
    code_ttl_s: int = 10 * 60
    code_max_attempts: int = 5  # wrong codes per token before it dies (link included)
    # Wrong codes per account (or per unknown ID) across its tokens, in a sliding window: at the
    # limit no code is accepted until the window passes or a key is changed by link.
    code_account_max_failures: int = 10
    code_account_window_s: int = 24 * 3600
    reservation_timeout_s: int = 120

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "NOTIFIER_KEYS": self.notifier_keys, "PASSWORD_KEYS": self.password_keys}

    def hmac_keys(self) -> dict[str, str]:
        return {**super().hmac_keys(), "CODE_HMAC_KEY": self.code_hmac_key}

    def problems(self) -> list[str]:
        return super().problems() + self.portal_input_problems()
