"""Notifier service wiring: its consumed topics and the SMTP sender loop."""

from __future__ import annotations

from services.notifier.handlers import MailSender, NotifierHandlers
from services.notifier.settings import NotifierSettings
from services.notifier.store import NotificationStore
from shared.consumer import Route
from shared.runtime import Service
from shared.schemas import (
    ContactChanged,
    EmailChangeCancelled,
    EmailChanged,
    EmailChangeRequested,
    IdentityLocked,
    PasswordUpdated,
    TokensIssued,
)
from shared.settings import load
from shared.topics import (
    IDENTITY_CONTACT_CHANGED,
    IDENTITY_EMAIL_CHANGE_REQUESTED,
    IDENTITY_EMAIL_CHANGED,
    IDENTITY_LOCKED,
    PASSWORD_UPDATED,
    TOKENS_ISSUED,
    EventType,
)

NAME = "notifier"


def build(settings: NotifierSettings | None = None) -> Service:
    settings = settings or load(NotifierSettings)
    store = NotificationStore(settings.mongodb_uri, settings.db_name(NAME))
    service = Service(NAME, store, settings)
    sender = MailSender(store, settings, service.metrics, on_outbox=service.relay.committed)
    h = NotifierHandlers(store, settings, wake_sender=sender.wake.set)
    service.consume(TOKENS_ISSUED, {EventType.TOKENS_ISSUED: Route(TokensIssued, h.tokens_issued)}, hot=True)
    service.consume(PASSWORD_UPDATED, {EventType.PASSWORD_UPDATED: Route(PasswordUpdated, h.password_updated)})
    service.consume(IDENTITY_LOCKED, {EventType.IDENTITY_LOCKED: Route(IdentityLocked, h.identity_locked)})
    service.consume(IDENTITY_EMAIL_CHANGED, {EventType.IDENTITY_EMAIL_CHANGED: Route(EmailChanged, h.email_changed)})
    service.consume(
        IDENTITY_EMAIL_CHANGE_REQUESTED,
        {
            EventType.IDENTITY_EMAIL_CHANGE_REQUESTED: Route(EmailChangeRequested, h.email_change_requested),
            EventType.IDENTITY_EMAIL_CHANGE_CANCELLED: Route(EmailChangeCancelled, h.email_change_cancelled),
        },
    )
    service.consume(
        IDENTITY_CONTACT_CHANGED, {EventType.IDENTITY_CONTACT_CHANGED: Route(ContactChanged, h.contact_changed)}
    )
    service.every("mail-sender", 1.0, sender.run_forever)
    return service
