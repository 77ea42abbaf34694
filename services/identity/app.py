"""Identity service wiring: which topics it consumes and with which handlers."""

from __future__ import annotations

from services.identity.commands import EmailChangeApplier, OperatorHandlers
from services.identity.domain import OutcomeReason
from services.identity.handlers import IdentityHandlers
from services.identity.settings import IdentitySettings
from services.identity.store import AccountStore
from shared.consumer import InvalidAnswer, Route
from shared.hashing import SecretHasher
from shared.runtime import Service
from shared.schemas import (
    AccountImport,
    CodeRejected,
    ContactUpdateAuthorized,
    OperatorApproval,
    OperatorCancel,
    OperatorCommand,
    OperatorKeyRegistered,
    OperatorKeyRevoked,
    PasswordUpdated,
    RecoveryOutcome,
    RecoveryRequested,
)
from shared.settings import load
from shared.topics import (
    IDENTITY_COMMANDS,
    IDENTITY_OPERATOR_KEYS,
    PASSWORD_CONTACT_AUTHORIZED,
    PASSWORD_UPDATED,
    RECOVERY_OUTCOMES,
    RECOVERY_REQUESTS,
    TOKENS_CODE_REJECTED,
    EventType,
)

NAME = "identity"


def invalid_request(request_id: str) -> RecoveryOutcome:
    return RecoveryOutcome(
        request_id=request_id, stage="request", status="rejected", reasons=[OutcomeReason.REQUEST_INVALID]
    )


# Every request gets an answer: one that cannot be processed is `rejected` / `request_invalid`,
# keyed by the request_id read from its data. Never by its record key: that is the national ID,
# not an id of the portal's to echo. Built before any store lookup, so the same for every ID.
REQUEST_ANSWER = InvalidAnswer(
    "request_id", RECOVERY_OUTCOMES, EventType.RECOVERY_OUTCOME, invalid_request, from_key=False
)


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
        hashing=True,
        answer=REQUEST_ANSWER,
    )
    service.consume(PASSWORD_UPDATED, {EventType.PASSWORD_UPDATED: Route(PasswordUpdated, handlers.password_updated)})
    # Wrong codes count towards the lockout like failed requests.
    service.consume(TOKENS_CODE_REJECTED, {EventType.TOKENS_CODE_REJECTED: Route(CodeRejected, handlers.code_rejected)})
    # Operators: signed commands, verified against the registry of their keys (which only
    # `admin` can write); approved e-mail changes are applied by a timer once due.
    applier = EmailChangeApplier(store, on_outbox=service.relay.committed)
    ops = OperatorHandlers(store, hasher, settings, service.metrics, wake_applier=applier.wake.set)
    service.consume(
        IDENTITY_OPERATOR_KEYS,
        {
            EventType.OPERATOR_KEY_REGISTERED: Route(OperatorKeyRegistered, ops.key_registered),
            EventType.OPERATOR_KEY_REVOKED: Route(OperatorKeyRevoked, ops.key_revoked),
        },
    )
    service.consume(
        IDENTITY_COMMANDS,
        {
            EventType.OPERATOR_UNLOCK: Route(OperatorCommand, ops.unlock),
            EventType.OPERATOR_EMAIL_UPDATE: Route(OperatorCommand, ops.email_update),
            EventType.OPERATOR_SEND_RECOVERY: Route(OperatorCommand, ops.send_recovery),
            EventType.OPERATOR_APPROVE: Route(OperatorApproval, ops.approve),
            EventType.OPERATOR_CANCEL: Route(OperatorCancel, ops.cancel),
            EventType.OPERATOR_ACCOUNT_IMPORT: Route(AccountImport, ops.account_import),
            EventType.OPERATOR_CONTACT_UPDATE: Route(OperatorCommand, ops.contact_update),
        },
    )
    service.every("email-change-applier", 1.0, applier.run_forever)
    # Contact updates whose key the password service checked.
    service.consume(
        PASSWORD_CONTACT_AUTHORIZED,
        {EventType.CONTACT_AUTHORIZED: Route(ContactUpdateAuthorized, handlers.contact_authorized)},
    )

    async def close_hasher() -> None:
        hasher.close()

    service.on_stop(close_hasher)
    return service
