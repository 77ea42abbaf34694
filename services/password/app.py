"""Password service wiring."""

from __future__ import annotations

from services.password.domain import LoginReason
from services.password.handlers import PasswordHandlers
from services.password.policy import policy_from_name
from services.password.settings import PasswordSettings
from services.password.store import CredentialStore
from shared.consumer import InvalidAnswer, Route
from shared.hashing import SecretHasher
from shared.runtime import Service
from shared.schemas import (
    AccountRegistered,
    ContactResult,
    ContactUpdateRequested,
    LoginCheckRequested,
    LoginResult,
    TokensRedeemed,
)
from shared.settings import load
from shared.topics import (
    CONTACT_RESULTS,
    CONTACT_UPDATES,
    IDENTITY_ACCOUNT_REGISTERED,
    LOGIN_CHECKS,
    LOGIN_RESULTS,
    TOKENS_REDEEMED,
    EventType,
)

NAME = "password"
# The portal waits for these answers (a login, a contact update), each behind an argon2 check:
# their own consumer, so they never queue behind a reset's hashing on the main one.
ANSWERS_LANE = "answers"


def invalid_check(check_id: str) -> LoginResult:
    return LoginResult(check_id=check_id, status="invalid", reasons=[LoginReason.CHECK_INVALID])


def invalid_update(update_id: str) -> ContactResult:
    return ContactResult(update_id=update_id, status="rejected", reasons=[LoginReason.CHECK_INVALID])


# A check or an update that cannot be read is answered too, by the id in its data; never by its
# record key (the national ID: not an id of the portal's, and not to be echoed).
CHECK_ANSWER = InvalidAnswer("check_id", LOGIN_RESULTS, EventType.LOGIN_RESULT, invalid_check, from_key=False)
UPDATE_ANSWER = InvalidAnswer("update_id", CONTACT_RESULTS, EventType.CONTACT_RESULT, invalid_update, from_key=False)


def build(settings: PasswordSettings | None = None) -> Service:
    settings = settings or load(PasswordSettings)
    limits = settings.login_limits()
    store = CredentialStore(
        settings.mongodb_uri, settings.db_name(NAME), keep=limits.keep(), retention=limits.retention()
    )
    service = Service(NAME, store, settings)
    hasher = SecretHasher(settings)
    h = PasswordHandlers(store, hasher, policy_from_name(settings.password_policy), settings, service.metrics)
    service.consume(
        TOKENS_REDEEMED,
        {EventType.TOKENS_REDEEMED: Route(TokensRedeemed, h.tokens_redeemed)},
        hot=True,
        hashing=True,
    )
    service.consume(
        IDENTITY_ACCOUNT_REGISTERED,
        {EventType.ACCOUNT_REGISTERED: Route(AccountRegistered, h.account_registered)},
    )
    # Hot: the portal's login waits for the answer. A check that cannot be read is answered too.
    service.consume(
        LOGIN_CHECKS,
        {EventType.LOGIN_CHECK_REQUESTED: Route(LoginCheckRequested, h.login_checked)},
        hot=True,
        answer=CHECK_ANSWER,
        lane=ANSWERS_LANE,
    )
    # Contact updates: the key checked as a login's; one that cannot be read is answered too.
    service.consume(
        CONTACT_UPDATES,
        {EventType.CONTACT_UPDATE_REQUESTED: Route(ContactUpdateRequested, h.contact_update_requested)},
        answer=UPDATE_ANSWER,
        lane=ANSWERS_LANE,
    )

    async def close_hasher() -> None:
        hasher.close()

    service.on_stop(close_hasher)
    return service
