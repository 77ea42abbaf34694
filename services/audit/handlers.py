"""The audit read model's one handler: project each audit event, check its seal and follow
its producer's chain; count and record every break. One idempotent write of the event's entry
per event (no transaction, no processed record), plus a read of the producer's head when it is
not known.

Audit events are keyed by their producer, so a producer's chain lives in one partition. The
heads this process recorded from a partition stay valid while it reads that partition without
a gap: when the next record's offset follows the last one it handled there, nobody else can
have moved those heads (a rebalance, a redelivery or a seek leaves a gap, and the heads of that
partition are read again)."""

from __future__ import annotations

import json
import logging
from typing import Any

from services.audit import domain
from services.audit.store import AuditStore
from shared.auditkeys import LiveKeyRing
from shared.consumer import HandlerContext
from shared.metrics import ServiceMetrics
from shared.schemas import AuditRecord

log = logging.getLogger(__name__)


class AuditHandlers:
    def __init__(self, store: AuditStore, metrics: ServiceMetrics, keys: LiveKeyRing, legacy_key: str | None) -> None:
        self.store = store
        self.keys = keys
        self.legacy_key = legacy_key
        self.projected = metrics.counter("clave_audit_events_projected_total", "Audit events in the read model")
        self.breaks = metrics.counter(
            "clave_audit_chain_breaks_total",
            "Audit events that break their producer's chain: bad or unknown signature, out of order (tampering)",
            ["reason"],
        )
        for reason in domain.BREAK_REASONS:
            self.breaks.labels(reason)  # every series exists from the start, at 0
        # partition -> (offset of the last record handled from it, producer -> head recorded)
        self._known: dict[int, tuple[int, dict[str, dict[str, Any] | None]]] = {}

    async def _head(self, ctx: HandlerContext, producer: str) -> dict[str, Any] | None:
        last, heads = self._known.get(ctx.partition, (-2, {}))
        if ctx.partition >= 0 and ctx.offset == last + 1 and producer in heads:
            return heads[producer]
        if last + 1 != ctx.offset:
            self._known.pop(ctx.partition, None)  # a gap: what this process knew may be stale
        return await self.store.head(producer)

    def _handled(self, ctx: HandlerContext, producer: str | None, head: dict[str, Any] | None) -> None:
        if ctx.partition < 0:
            return
        last, heads = self._known.get(ctx.partition, (ctx.offset - 1, {}))
        if last + 1 != ctx.offset:
            heads = {}
        if producer is not None:
            heads[producer] = head
        self._known[ctx.partition] = (ctx.offset, heads)

    async def audit_event(self, ctx: HandlerContext, record: AuditRecord) -> None:
        event = json.loads(ctx.raw)
        doc = domain.project(event)
        producer = doc["producer"]
        head = await self._head(ctx, producer) if producer is not None else None
        step = domain.follow(head, event, self.keys.ring, self.legacy_key)
        if step.reason in ("unknown_key", "key_not_valid") and self.keys.reload():
            # A rotation publishes the new public key before the producer uses it: read them again.
            step = domain.follow(head, event, self.keys.ring, self.legacy_key)

        if step.reason == "sequence" and producer is not None:
            head, step = await self._older_writer(producer, head, step, event)

        if step.problem is not None and await self._redelivered(doc):
            ctx.settled()  # projected already (a relay's republish): nothing new to record or count
            self._handled(ctx, producer, head)
            return
        await self.store.record(domain.entry(doc, step))
        ctx.settled()
        self._handled(ctx, producer, step.head if step.head is not None else head)
        self.projected.inc()
        if step.problem is not None:
            self.breaks.labels(step.reason).inc()
            log.warning("audit chain break (%s): event %s of %r: %s", step.reason, doc["_id"], producer, step.problem)

    async def _older_writer(
        self, producer: str, head: dict[str, Any] | None, step: domain.ChainStep, event: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, domain.ChainStep]:
        """During a rolling upgrade an instance of the version before 454e64b may still consume
        (after this one's start-up migration) and record its heads in `chain_heads` only: an
        event that continues such a head is no break. Read only on a sequence break."""
        older = await self.store.old_head(producer)
        if older is None or int(older["seq"]) <= (int(head["seq"]) if head else 0):
            return head, step
        retry = domain.follow(older, event, self.keys.ring, self.legacy_key)
        if retry.problem is not None:
            return head, step
        log.warning(
            "audit event %s of %r continues the head an older version of the read model recorded (seq %s; a "
            "rolling upgrade): followed from it; the next start of the audit service projects the read model again",
            event.get("id"),
            producer,
            older["seq"],
        )
        return older, retry

    async def _redelivered(self, doc: dict[str, Any]) -> bool:
        """An event that seems to break its chain may be one already projected, delivered again
        (it then trails its own head): the same id with the same digest. Read only then."""
        stored = await self.store.projected(doc["_id"])
        return stored is not None and stored.get("digest") == doc["digest"]
