"""Identity service wiring: which topics it consumes and with which handlers."""

from __future__ import annotations

from services.identity.handlers import IdentityHandlers
from services.identity.settings import IdentitySettings
from services.identity.store import AccountStore
from shared.consumer import Route
from shared.hashing import SecretHasher
from shared.runtime import Service
from shared.schemas import CodeRejected, ContactUpdateAuthorized, OperatorCommand, PasswordUpdated, RecoveryRequested
from shared.settings import load
from shared.topics import (
    IDENTITY_COMMANDS,
    PASSWORD_CONTACT_AUTHORIZED,
    PASSWORD_UPDATED,
    RECOVERY_REQUESTS,
    TOKENS_CODE_REJECTED,
    EventType,
)

NAME = "identity"


def make_store(settings: IdentitySettings) -> AccountStore:
    limits = settings.limits()
    return AccountStore(
        settings.mongodb_uri, settings.db_name(NAME), keep=limits.keep() + 1, retention=limits.retention()
    )


def build(settings: IdentitySettings | None = None) -> Service:
    settings = settings or load(IdentitySettings)
    store = make_store(settings)
    service = Service(NAME, store, settings)
    hasher = SecretHasher(settings)
    handlers = IdentityHandlers(store, hasher, settings, service.metrics)
    service.consume(
        RECOVERY_REQUESTS,
        {EventType.RECOVERY_REQUESTED: Route(RecoveryRequested, handlers.recovery_requested)},
        hot=True,
    )
    service.consume(PASSWORD_UPDATED, {EventType.PASSWORD_UPDATED: Route(PasswordUpdated, handlers.password_updated)})
    # Wrong codes count towards the lockout like failed requests.
    service.consume(TOKENS_CODE_REJECTED, {EventType.TOKENS_CODE_REJECTED: Route(CodeRejected, handlers.code_rejected)})
    service.consume(
        IDENTITY_COMMANDS,
        {
            EventType.OPERATOR_UNLOCK: Route(OperatorCommand, handlers.operator_unlock),
            EventType.OPERATOR_EMAIL_UPDATE: Route(OperatorCommand, handlers.operator_email_update),
            EventType.OPERATOR_SEND_RECOVERY: Route(OperatorCommand, handlers.operator_send_recovery),
            EventType.OPERATOR_CONTACT_UPDATE: Route(OperatorCommand, handlers.operator_contact_update),
        },
    )
    # Contact updates whose key the password service checked.
    service.consume(
        PASSWORD_CONTACT_AUTHORIZED,
        {EventType.CONTACT_AUTHORIZED: Route(ContactUpdateAuthorized, handlers.contact_authorized)},
    )

    async def close_hasher() -> None:
        hasher.close()

    service.on_stop(close_hasher)
    return service
