"""Audit read-model service wiring: consumes `audit.events` into its own store, checking
each producer's signatures with the public keys (AUDIT_PUBLIC_KEYS). At start-up, before
consuming, a store in an older format is projected again from the log (migrate.py)."""

from __future__ import annotations

import logging

from services.audit.handlers import AuditHandlers
from services.audit.migrate import ReadModelMigration
from services.audit.rebuild import LogReader, audit_log
from services.audit.settings import AuditSettings
from services.audit.store import make_store
from shared.auditkeys import LiveKeyRing
from shared.consumer import Route
from shared.runtime import Service
from shared.schemas import AuditRecord
from shared.settings import load
from shared.topics import AUDIT_EVENTS, EventType

NAME = "audit"
log = logging.getLogger(__name__)


__all__ = ["NAME", "build", "make_store"]


def build(settings: AuditSettings | None = None, log_reader: LogReader | None = None) -> Service:
    """`log_reader`: where the start-up migration reads the log (tests); audit.events by default."""
    settings = settings or load(AuditSettings)
    store = make_store(settings)
    service = Service(NAME, store, settings)
    # On-start hooks run before the broker starts its consumers: /readyz stays 503 meanwhile.
    migration = ReadModelMigration(store, settings, service.metrics, log_reader or audit_log(settings))
    service.on_start(migration.run)
    keys = LiveKeyRing(settings.audit_public_keys)
    if not len(keys.ring):
        log.warning("AUDIT_PUBLIC_KEYS is not set: every audit event will count as a chain break")
    h = AuditHandlers(store, service.metrics, keys, settings.legacy_hmac_key())
    service.consume(AUDIT_EVENTS, {EventType.AUDIT: Route(AuditRecord, h.audit_event)}, hot=True)
    return service
