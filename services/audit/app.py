"""Audit read-model service wiring: consumes `audit.events` into its own store, checking
each producer's signatures with the public keys (AUDIT_PUBLIC_KEYS)."""

from __future__ import annotations

import logging

from services.audit.handlers import AuditHandlers
from services.audit.settings import AuditSettings
from services.audit.store import AuditStore
from shared.auditkeys import LiveKeyRing
from shared.consumer import Route
from shared.runtime import Service
from shared.schemas import AuditRecord
from shared.settings import PlatformSettings, load
from shared.topics import AUDIT_EVENTS, EventType

NAME = "audit"
log = logging.getLogger(__name__)


def make_store(settings: PlatformSettings, db_suffix: str = "") -> AuditStore:
    return AuditStore(settings.mongodb_uri, settings.db_name(NAME) + db_suffix)


def build(settings: AuditSettings | None = None) -> Service:
    settings = settings or load(AuditSettings)
    store = make_store(settings)
    service = Service(NAME, store, settings)
    keys = LiveKeyRing(settings.audit_public_keys)
    if not len(keys.ring):
        log.warning("AUDIT_PUBLIC_KEYS is not set: every audit event will count as a chain break")
    h = AuditHandlers(store, service.metrics, keys, settings.legacy_hmac_key())
    service.consume(AUDIT_EVENTS, {EventType.AUDIT: Route(AuditRecord, h.audit_event)}, hot=True)
    return service
