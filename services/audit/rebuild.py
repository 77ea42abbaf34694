"""Projecting the whole of `audit.events` again, from offset 0, with the same code as the live
consumer (`domain.follow`, `domain.entry`). Two users:

- `clave audit rebuild` projects into a fresh copy of the read model and compares the two;
- the audit service's start-up migration (services/audit/migrate.py) projects into the live
  read model itself when it finds an older format there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from services.audit import domain
from services.audit.settings import AuditSettings
from services.audit.store import EVENTS, AuditStore, make_store
from shared.auditkeys import KeyRing
from shared.envelope import BadInput, parse_event
from shared.kafkaio import Record, read_topic
from shared.schemas import AuditRecord
from shared.settings import PlatformSettings
from shared.topics import AUDIT_EVENTS, EventType

REBUILD_SUFFIX = "_rebuild"

# A fresh read of the whole audit log, from offset 0 up to its end when the read starts.
LogReader = Callable[[], AsyncIterable[Record]]


def audit_log(settings: PlatformSettings) -> LogReader:
    return lambda: read_topic(settings, AUDIT_EVENTS)


class Replay:
    """Follows every producer's chain through the log, in log order, as the live consumer
    does: each valid audit event becomes its read-model entry once (an exact redelivery is
    skipped, an invalid record too: the live consumer dead-letters it)."""

    def __init__(self, keys: KeyRing, legacy_key: str | None, max_bytes: int) -> None:
        self.keys = keys
        self.legacy_key = legacy_key
        self.max_bytes = max_bytes
        self.heads: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()
        self.broken: dict[str, str] = {}  # event id -> reason
        self.breaks: list[str] = []  # "event id: problem", in log order
        self.skipped = 0
        self.duplicates = 0

    @property
    def events(self) -> int:
        return len(self.seen)

    def entry(self, value: bytes) -> dict[str, Any] | None:
        """The read-model entry of one record of the log; None for one to skip."""
        try:
            parse_event(value, max_bytes=self.max_bytes, known_types={EventType.AUDIT})
            event = json.loads(value)
            AuditRecord.model_validate(event["data"])
        except (BadInput, ValidationError):
            self.skipped += 1
            return None
        if event["id"] in self.seen:
            self.duplicates += 1
            return None
        self.seen.add(event["id"])
        doc = domain.project(event)
        producer = doc["producer"]
        head = self.heads.get(producer) if producer is not None else None
        step = domain.follow(head, event, self.keys, self.legacy_key)
        if producer is not None and step.head is not None:
            self.heads[producer] = step.head
        if step.problem:
            self.breaks.append(f"{event['id']}: {step.problem}")
            self.broken[doc["_id"]] = step.reason or ""
        return domain.entry(doc, step)

    async def entries(self, records: AsyncIterable[Record]) -> AsyncIterator[dict[str, Any]]:
        async for record in records:
            found = self.entry(record.value)
            if found is not None:
                yield found


def replay_for(settings: AuditSettings) -> Replay:
    return Replay(KeyRing.load(settings.audit_public_keys), settings.legacy_hmac_key(), settings.max_event_bytes)


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


async def rebuild(
    settings: AuditSettings, wait_for_live: float = 60.0, *, log: LogReader | None = None
) -> RebuildReport:
    replay = replay_for(settings)
    copy = make_store(settings, REBUILD_SUFFIX)
    live = make_store(settings)
    try:
        await copy.client.drop_database(copy.db.name)
        await copy.ensure_indexes()
        docs = {e["_id"]: e async for e in replay.entries((log or audit_log(settings))())}
        if docs:
            await copy.db[EVENTS].insert_many(list(docs.values()))
        report = RebuildReport(
            events=replay.events, skipped=replay.skipped, duplicates=replay.duplicates, breaks=replay.breaks
        )
        await _compare(report, replay, docs, live, wait_for_live)
        return report
    finally:
        await copy.close()
        await live.close()


async def _compare(
    report: RebuildReport, replay: Replay, docs: dict[str, dict[str, Any]], live: AuditStore, wait_for_live: float
) -> None:
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
    live_heads = {p: (d["seq"], d["hash"]) for p, d in (await live.heads()).items()}
    live_broken = await live.breaks_for(list(docs))
    report.live_breaks = len(live_broken)
    report.breaks_differ = sorted(set(replay.broken) ^ set(live_broken))
    for producer, head in replay.heads.items():
        # The live head may be ahead (newer events); it must never be behind or elsewhere.
        live_head = live_heads.get(producer)
        seq, digest = head["seq"], head["hash"]
        if live_head is None or (live_head[0] == seq and live_head[1] != digest) or live_head[0] < seq:
            report.heads_differ.append(producer)
