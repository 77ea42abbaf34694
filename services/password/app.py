"""Password service wiring."""

from __future__ import annotations

from services.password.handlers import PasswordHandlers
from services.password.policy import policy_from_name
from services.password.settings import PasswordSettings
from services.password.store import CredentialStore
from shared.consumer import Route
from shared.hashing import SecretHasher
from shared.runtime import Service
from shared.schemas import AccountRegistered, TokensRedeemed
from shared.settings import load
from shared.topics import IDENTITY_ACCOUNT_REGISTERED, TOKENS_REDEEMED, EventType

NAME = "password"


def build(settings: PasswordSettings | None = None) -> Service:
    settings = settings or load(PasswordSettings)
    store = CredentialStore(settings.mongodb_uri, settings.db_name(NAME))
    service = Service(NAME, store, settings)
    hasher = SecretHasher(settings)
    h = PasswordHandlers(store, hasher, policy_from_name(settings.password_policy), settings, service.metrics)
    service.consume(TOKENS_REDEEMED, {EventType.TOKENS_REDEEMED: Route(TokensRedeemed, h.tokens_redeemed)}, hot=True)
    service.consume(
        IDENTITY_ACCOUNT_REGISTERED,
        {EventType.ACCOUNT_REGISTERED: Route(AccountRegistered, h.account_registered)},
    )

    async def close_hasher() -> None:
        hasher.close()

    service.on_stop(close_hasher)
    return service
