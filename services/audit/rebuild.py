"""`clave audit rebuild`: replay `audit.events` from offset 0 into a fresh copy of the
read model, with the same projection as the live consumer, and compare the two."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from pydantic import ValidationError

from services.audit import domain
from services.audit.app import make_store
from services.audit.settings import AuditSettings
from services.audit.store import EVENTS, HEADS
from shared.auditkeys import KeyRing
from shared.envelope import BadInput, parse_event
from shared.kafkaio import read_topic
from shared.schemas import AuditRecord
from shared.topics import AUDIT_EVENTS, EventType

REBUILD_SUFFIX = "_rebuild"


@dataclass
class RebuildReport:
    events: int = 0
    skipped: int = 0  # not valid audit events (the live consumer dead-letters them)
    duplicates: int = 0  # exact redeliveries, projected once
    breaks: list[str] = field(default_factory=list)
    missing_live: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    heads_differ: list[str] = field(default_factory=list)
    live_breaks: int = 0  # breaks the live model recorded for the same events
    breaks_differ: list[str] = field(default_factory=list)  # event ids where the two disagree

    @property
    def identical(self) -> bool:
        return not (self.missing_live or self.different or self.heads_differ or self.breaks_differ)


async def rebuild(settings: AuditSettings, wait_for_live: float = 60.0) -> RebuildReport:
    report = RebuildReport()
    keys = KeyRing.load(settings.audit_public_keys)
    legacy_key = settings.legacy_hmac_key()
    copy = make_store(settings, REBUILD_SUFFIX)
    live = make_store(settings)
    try:
        await copy.client.drop_database(copy.db.name)
        await copy.ensure_indexes()
        heads: dict[str, dict] = {}
        docs: dict[str, dict] = {}
        broken: dict[str, str] = {}  # event id -> reason
        async for record in read_topic(settings, AUDIT_EVENTS):
            try:
                parse_event(record.value, max_bytes=settings.max_event_bytes, known_types={EventType.AUDIT})
                event = json.loads(record.value)
                AuditRecord.model_validate(event["data"])
            except (BadInput, ValidationError):
                report.skipped += 1
                continue
            if event["id"] in docs:
                report.duplicates += 1
                continue
            doc = domain.project(event)
            producer = doc["producer"]
            step = domain.follow(heads.get(producer) if producer is not None else None, event, keys, legacy_key)
            if producer is not None and step.head is not None:
                heads[producer] = step.head
            if step.problem:
                report.breaks.append(f"{event['id']}: {step.problem}")
                broken[doc["_id"]] = step.reason or ""
            docs[doc["_id"]] = doc
        if docs:
            await copy.db[EVENTS].insert_many(list(docs.values()))
        for producer, head in heads.items():
            await copy.db[HEADS].insert_one({"_id": producer, **head})
        report.events = len(docs)

        # The live model may still be catching up with the end of the log: wait (bounded).
        deadline = time.monotonic() + wait_for_live
        while True:
            present = await live.db[EVENTS].count_documents({"_id": {"$in": list(docs)}})
            if present == len(docs) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        live_docs = {d["_id"]: d async for d in live.db[EVENTS].find({"_id": {"$in": list(docs)}})}
        for event_id, doc in docs.items():
            if event_id not in live_docs:
                report.missing_live.append(event_id)
            elif live_docs[event_id] != doc:
                report.different.append(event_id)
        live_heads = {d["_id"]: (d["seq"], d["hash"]) async for d in live.db[HEADS].find()}
        live_broken = await live.breaks_for(list(docs))
        report.live_breaks = len(live_broken)
        report.breaks_differ = sorted(set(broken) ^ set(live_broken))
        for producer, head in heads.items():
            # The live head may be ahead (newer events); it must never be behind or elsewhere.
            live_head = live_heads.get(producer)
            seq, digest = head["seq"], head["hash"]
            if live_head is None or (live_head[0] == seq and live_head[1] != digest) or live_head[0] < seq:
                report.heads_differ.append(producer)
        return report
    finally:
        await copy.close()
        await live.close()
