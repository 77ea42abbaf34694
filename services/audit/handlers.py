"""The audit read model's one handler: project each audit event and follow its chain."""

from __future__ import annotations

import json

from pymongo.asynchronous.client_session import AsyncClientSession

from services.audit import domain
from services.audit.store import AuditStore
from shared.consumer import HandlerContext
from shared.metrics import ServiceMetrics
from shared.schemas import AuditRecord


class AuditHandlers:
    def __init__(self, store: AuditStore, metrics: ServiceMetrics) -> None:
        self.store = store
        self.projected = metrics.counter("clave_audit_events_projected_total", "Audit events in the read model")
        self.breaks = metrics.counter(
            "clave_audit_chain_breaks_total", "Audit events out of chain order (possible tampering)"
        )

    async def audit_event(self, ctx: HandlerContext, record: AuditRecord) -> None:
        event = json.loads(ctx.raw)
        doc = domain.project(event)
        producer = doc["producer"]
        step = None
        if producer is not None:
            step = domain.follow(*await self.store.head(producer), event)

        async def writes(s: AsyncClientSession) -> None:
            await self.store.record(
                doc,
                producer,
                (step.head_seq, step.head_hash) if step else None,
                step.problem if step else None,
                s,
            )

        await ctx.commit(writes)
        self.projected.inc()
        if step is not None and not step.ok:
            self.breaks.inc()
