"""Tokens service wiring."""

from __future__ import annotations

from services.tokens.domain import Reason
from services.tokens.handlers import TokenHandlers
from services.tokens.settings import TokensSettings
from services.tokens.store import TokenStore
from shared.consumer import InvalidAnswer, Route
from shared.runtime import Service
from shared.schemas import (
    ContactChanged,
    EmailChanged,
    IdentityDeclined,
    IdentityVerified,
    PasswordRejected,
    PasswordUpdated,
    RecoveryOutcome,
    ResetSubmitted,
)
from shared.settings import load
from shared.topics import (
    IDENTITY_CONTACT_CHANGED,
    IDENTITY_DECLINED,
    IDENTITY_EMAIL_CHANGED,
    IDENTITY_VERIFIED,
    PASSWORD_REJECTED,
    PASSWORD_UPDATED,
    RECOVERY_OUTCOMES,
    RECOVERY_RESETS,
    EventType,
)

NAME = "tokens"


def invalid_reset(request_id: str) -> RecoveryOutcome:
    return RecoveryOutcome(request_id=request_id, stage="reset", status="rejected", reasons=[Reason.RESET_INVALID])


def build(settings: TokensSettings | None = None) -> Service:
    settings = settings or load(TokensSettings)
    store = TokenStore(settings.mongodb_uri, settings.db_name(NAME))
    service = Service(NAME, store, settings)
    h = TokenHandlers(store, settings, service.metrics)
    # Configuration as a metric: operators (and tests) can see the lifetimes in force.
    ttl = service.metrics.gauge("clave_tokens_ttl_seconds", "Configured token lifetime", ["kind"])
    ttl.labels("link").set(settings.link_ttl_s)
    ttl.labels("code").set(settings.code_ttl_s)
    service.consume(
        IDENTITY_VERIFIED, {EventType.IDENTITY_VERIFIED: Route(IdentityVerified, h.identity_verified)}, hot=True
    )
    # Hot: a decoy must be in place as soon as a real token would be (same timing).
    service.consume(
        IDENTITY_DECLINED, {EventType.IDENTITY_DECLINED: Route(IdentityDeclined, h.identity_declined)}, hot=True
    )
    # Every reset gets an answer: one that cannot be processed is `rejected` / `reset_invalid`.
    service.consume(
        RECOVERY_RESETS,
        {EventType.RESET_SUBMITTED: Route(ResetSubmitted, h.reset_submitted)},
        hot=True,
        answer=InvalidAnswer("request_id", RECOVERY_OUTCOMES, EventType.RECOVERY_OUTCOME, invalid_reset),
    )
    service.consume(PASSWORD_UPDATED, {EventType.PASSWORD_UPDATED: Route(PasswordUpdated, h.password_updated)})
    service.consume(PASSWORD_REJECTED, {EventType.PASSWORD_REJECTED: Route(PasswordRejected, h.password_rejected)})
    service.consume(IDENTITY_EMAIL_CHANGED, {EventType.IDENTITY_EMAIL_CHANGED: Route(EmailChanged, h.email_changed)})
    service.consume(
        IDENTITY_CONTACT_CHANGED, {EventType.IDENTITY_CONTACT_CHANGED: Route(ContactChanged, h.contact_changed)}
    )

    async def sweep() -> None:
        await h.sweep_forever(on_outbox=service.relay.committed)

    # Not a poll: sleeps until the earliest reservation runs out or a new one is made.
    service.every("release-overdue-reservations", 1.0, sweep)
    return service
