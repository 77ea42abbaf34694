"""The idempotent consumer: raw Kafka record -> validated event -> handler -> one transaction.

Every subscription of every service goes through `EventPipeline.process`:

1. parse the CloudEvent strictly and validate `data` against its schema; any
   failure is a `BadInput`: the record goes to `<topic>.dlq` (through the
   outbox, with reason and origin), is counted and audited, and the consumer
   moves on;
2. run the handler, which loads state, decides, and calls `ctx.commit(...)`:
   the processed-event record, the state writes and the outgoing events are
   stored atomically; a redelivered event id is refused there (`DuplicateEvent`)
   and dead-lettered as `duplicate_event`, so it changes nothing;
3. any other exception (store or broker down) propagates after a backoff, so
   the offset is not committed and Kafka redelivers: at-least-once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError
from pymongo.asynchronous.client_session import AsyncClientSession

from shared.audit import audit_event
from shared.crypto import SecretBox
from shared.envelope import BadInput, CloudEvent, DeadLetterReason, describe_errors, new_event, parse_event
from shared.metrics import ServiceMetrics
from shared.schemas import AuditRecord, Payload
from shared.settings import PlatformSettings
from shared.store import DuplicateEvent, Outgoing, ServiceStore, is_transient
from shared.topics import EventType, dlq

log = logging.getLogger(__name__)

HANDLER_ATTEMPTS = 3
HANDLER_ERROR = DeadLetterReason.HANDLER_ERROR  # the handler failed the same way HANDLER_ATTEMPTS times

Writes = Callable[[AsyncClientSession], Awaitable[None]]


@dataclass
class HandlerContext:
    """What a handler gets besides its event: emit, audit and commit, nothing else."""

    service: str
    consumer: str
    topic: str
    event: CloudEvent
    store: ServiceStore
    outgoing: list[Outgoing] = field(default_factory=list)
    committed: bool = False
    raw: bytes = b""  # the record exactly as received (the audit read model hashes it)

    @property
    def source(self) -> str:
        return f"/clave/{self.service}"

    def emit(self, topic: str, key: str, type: str, data: Payload, subject: str | None = None) -> CloudEvent:
        event = new_event(
            type=type,
            source=self.source,
            data=data.model_dump(mode="json"),
            correlationid=self.event.correlationid,
            causationid=self.event.id,
            subject=subject,
        )
        self.outgoing.append(Outgoing(topic=topic, key=key, event=event))
        return event

    def audit(
        self,
        action: str,
        outcome: str,
        *,
        account_id: str | None = None,
        subject_ref: str | None = None,
        request_id: str | None = None,
        reasons: list[str] | None = None,
        actor: str = "system",
        details: dict[str, Any] | None = None,
    ) -> None:
        record = AuditRecord(
            service=self.service,
            action=action,
            outcome=outcome,  # type: ignore[arg-type]
            actor=actor,
            account_id=account_id,
            subject_ref=subject_ref,
            request_id=request_id,
            reasons=reasons or [],
            details=details or {},
        )
        self.outgoing.append(
            audit_event(record, correlationid=self.event.correlationid, causationid=self.event.id, source=self.source)
        )

    async def commit(self, writes: Writes | None = None) -> None:
        await self.store.commit(consumer=self.consumer, event_id=self.event.id, writes=writes, outgoing=self.outgoing)
        self.committed = True


Handler = Callable[[HandlerContext, Any], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    model: type[Payload]
    handler: Handler


class EventPipeline:
    def __init__(
        self,
        *,
        service: str,
        topic: str,
        routes: dict[str, Route],
        store: ServiceStore,
        settings: PlatformSettings,
        metrics: ServiceMetrics,
        on_committed: Callable[[], None],
    ) -> None:
        self.service = service
        self.topic = topic
        self.consumer = f"{service}:{topic}"
        self.routes = routes
        self.known_types = frozenset(routes)
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.on_committed = on_committed
        self.dlq_box = SecretBox(settings.dlq_keys)
        self._failure_streak = 0
        self._attempts: dict[tuple[int, int], int] = {}

    async def process(self, record: ConsumerRecord[Any, Any], raw: bytes) -> None:
        started = time.perf_counter()
        try:
            await self._process(record, raw)
            self._failure_streak = 0
            self._attempts.pop((record.partition, record.offset), None)
        except Exception as exc:
            self._failure_streak += 1
            self.metrics.failures.labels(self.topic, exc.__class__.__name__).inc()
            position = (record.partition, record.offset)
            outage = _is_outage(exc)
            if not outage:  # an outage says nothing about the record: it never counts against it
                self._attempts[position] = self._attempts.get(position, 0) + 1
            if not outage and self._attempts[position] >= HANDLER_ATTEMPTS:
                # Deterministic failure (a bug, not an outage): retrying forever would block the
                # partition. Park the record, with the error class, and go on.
                log.error("%s: %s on %s/%s, dead-lettering", self.consumer, exc.__class__.__name__, *position)
                await self.dead_letter(record, raw, BadInput(HANDLER_ERROR, f"handler raised {exc.__class__.__name__}"))
                self._attempts.pop(position, None)
                self._failure_streak = 0
                self.on_committed()
                return
            # Store or broker trouble: back off, then let Kafka redeliver (at-least-once).
            delay = min(0.1 * 2 ** min(self._failure_streak, 6), 5.0)
            log.warning("%s: %s (redelivery in %.1fs)", self.consumer, exc.__class__.__name__, delay)
            await asyncio.sleep(delay)
            raise
        finally:
            self.metrics.duration.labels(self.topic).observe(time.perf_counter() - started)
        self.on_committed()

    async def _process(self, record: ConsumerRecord[Any, Any], raw: bytes) -> None:
        try:
            event = parse_event(raw, max_bytes=self.settings.max_event_bytes, known_types=self.known_types)
            route = self.routes[event.type]
            try:
                data = route.model.model_validate(event.data)
            except ValidationError as exc:
                raise BadInput(DeadLetterReason.SCHEMA_INVALID, describe_errors(exc)) from None
            ctx = HandlerContext(self.service, self.consumer, self.topic, event, self.store, raw=raw)
            try:
                await route.handler(ctx, data)
                if not ctx.committed:
                    await ctx.commit()
            except DuplicateEvent:
                raise BadInput(DeadLetterReason.DUPLICATE_EVENT, f"event {event.id} already processed") from None
            self.metrics.consumed.labels(self.topic, event.type).inc()
        except BadInput as bad:
            await self.dead_letter(record, raw, bad)

    async def dead_letter(self, record: ConsumerRecord[Any, Any], raw: bytes, bad: BadInput) -> None:
        """Park the record in `<topic>.dlq`, sealed (it may hold what a citizen typed), and audit it."""
        origin = f"{record.topic}/{record.partition}/{record.offset}"
        correlation = _peek_correlation(raw) or origin
        data = {
            "reason": bad.reason,
            "detail": bad.detail,
            "origin_topic": record.topic,
            "origin_partition": record.partition,
            "origin_offset": record.offset,
            "payload_sha256": hashlib.sha256(raw).hexdigest(),
            "payload_bytes": len(raw),
            "sealed_payload": self.dlq_box.seal_bytes(raw),
        }
        letter = new_event(
            type=EventType.DEAD_LETTER,
            source=f"/clave/{self.service}",
            data=data,
            correlationid=correlation,
            subject=bad.reason,
        )
        key = record.key.decode("utf-8", "replace") if record.key else origin
        headers = {
            "clave-dlq-reason": bad.reason,
            "clave-dlq-detail": bad.detail[:500],
            "clave-origin-topic": record.topic,
            "clave-origin-partition": str(record.partition),
            "clave-origin-offset": str(record.offset),
        }
        record_audit = AuditRecord(
            service=self.service,
            action="message_dead_lettered",
            outcome="rejected",
            reasons=[bad.reason],
            details={"topic": record.topic, "partition": record.partition, "offset": record.offset},
        )
        outgoing = [
            Outgoing(topic=dlq(record.topic), key=key, event=letter, headers=headers),
            audit_event(record_audit, correlationid=correlation, causationid=None, source=f"/clave/{self.service}"),
        ]
        try:
            # Keyed by position, so a redelivered bad record is parked once.
            await self.store.commit(consumer=f"{self.consumer}:dlq", event_id=origin, writes=None, outgoing=outgoing)
        except DuplicateEvent:
            return
        self.metrics.dead_letters.labels(record.topic, bad.reason).inc()
        log.info("%s: dead-lettered %s (%s)", self.consumer, origin, bad.reason)


def _is_outage(exc: BaseException) -> bool:
    """Errors of the store, the broker or the network: retried for as long as they last."""
    return is_transient(exc) or isinstance(exc, KafkaError | OSError | TimeoutError)


def _peek_correlation(raw: bytes) -> str | None:
    """The correlation id of a malformed event, if it has one we can read safely."""
    import json

    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if isinstance(doc, dict):
        value = doc.get("correlationid")
        if isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return None
