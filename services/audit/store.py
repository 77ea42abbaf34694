"""AuditStore: the audit read model's own database, one document per audit event.

Each event is kept in ONE idempotent write keyed by its event id, with no transaction and no
processed-event record: the document holds the event's projection and what following its
producer's chain made of it: the producer's new head when the event advanced the chain
(`chain_head`, `head_seq`), or the break it is (`chain_break`). A producer's recorded head is
therefore the document with its highest `head_seq`; a redelivered event writes the same
document again.

The read model's format is version 2. Version 1 (before commit 454e64b) kept heads and breaks in
their own collections (`chain_heads`, `chain_breaks`) and nothing on the events; a store without
the version marker (`read_model` collection) is re-projected from the log at start-up
(services/audit/migrate.py) before the marker is written."""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING, DESCENDING, ReplaceOne

from shared.settings import PlatformSettings
from shared.store import ServiceStore

EVENTS = "events"
HEAD = "chain_head"  # the producer's head after this event (only on events that advanced it)
HEAD_SEQ = "head_seq"
BREAK = "chain_break"  # {reason, problem}: this event broke its producer's chain
CHAIN_FIELDS = {HEAD: 0, HEAD_SEQ: 0, BREAK: 0}

FORMAT_VERSION = 2  # chain heads and breaks on each event's document
META = "read_model"  # {_id: "format", version, ...}: written once the store is in this format
FORMAT_ID = "format"
OLD_HEADS = "chain_heads"  # version 1: one document per producer; no longer read
OLD_BREAKS = "chain_breaks"  # version 1: one document per break; read only to compare


class AuditStore(ServiceStore):
    async def ensure_service_indexes(self) -> None:
        for field in ("request_id", "account_id", "correlationid", "action", "time"):
            await self.db[EVENTS].create_index([(field, ASCENDING), ("time", ASCENDING)])
        await self.db[EVENTS].create_index([("producer", ASCENDING), (HEAD_SEQ, DESCENDING)])

    async def head(self, producer: str) -> dict[str, Any] | None:
        """A producer's recorded head: seq, hash, kid, sig, time, event_id and the sealed event."""
        doc = await self.db[EVENTS].find_one(
            {"producer": producer, HEAD_SEQ: {"$gte": 0}}, {HEAD: 1}, sort=[(HEAD_SEQ, DESCENDING)]
        )
        return dict(doc[HEAD]) if doc is not None else None

    async def heads(self) -> dict[str, dict[str, Any]]:
        producers = [p for p in await self.db[EVENTS].distinct("producer") if isinstance(p, str)]
        found = {p: await self.head(p) for p in producers}
        return {p: h for p, h in found.items() if h is not None}

    async def projected(self, event_id: str) -> dict[str, Any] | None:
        """The stored document of this event, if it was projected already (a redelivery)."""
        return await self.db[EVENTS].find_one({"_id": event_id}, {"digest": 1})

    async def record(self, entry: dict[str, Any]) -> None:
        """The event's whole entry (`domain.entry`), in one idempotent write."""
        await self.db[EVENTS].replace_one({"_id": entry["_id"]}, entry, upsert=True)

    async def record_many(self, entries: list[dict[str, Any]]) -> None:
        """Entries (`domain.entry`) as `record` writes them, in one round trip."""
        if entries:
            ops = [ReplaceOne({"_id": e["_id"]}, e, upsert=True) for e in entries]
            await self.db[EVENTS].bulk_write(ops, ordered=False)

    async def format_marker(self) -> dict[str, Any] | None:
        """The version marker ({version, ...}), None when none was written."""
        return await self.db[META].find_one({"_id": FORMAT_ID})

    async def format_version(self) -> int | None:
        doc = await self.format_marker()
        return int(doc["version"]) if doc is not None else None

    async def write_format(self, details: dict[str, Any]) -> None:
        doc = {"_id": FORMAT_ID, "version": FORMAT_VERSION, **details}
        await self.db[META].replace_one({"_id": FORMAT_ID}, doc, upsert=True)

    async def holds_data(self) -> bool:
        """Anything an older version may have written: events or version 1's collections."""
        if await self.db[EVENTS].find_one({}, {"_id": 1}) is not None:
            return True
        return bool({OLD_HEADS, OLD_BREAKS} & set(await self.db.list_collection_names()))

    async def old_heads(self) -> dict[str, int]:
        """producer -> seq of version 1's heads (`chain_heads`): an older version still running
        (a rolling upgrade) moves them."""
        return {str(d["_id"]): int(d["seq"]) async for d in self.db[OLD_HEADS].find({}, {"seq": 1})}

    async def old_head(self, producer: str) -> dict[str, Any] | None:
        """The head an older version recorded for this producer (version 1's `chain_heads`)."""
        return await self.db[OLD_HEADS].find_one({"_id": producer})

    async def old_breaks(self) -> dict[str, str]:
        """event id -> reason, for the breaks a version 1 read model recorded (`chain_breaks`)."""
        return {str(d["event_id"]): str(d.get("reason", "")) async for d in self.db[OLD_BREAKS].find()}

    async def breaks_for(self, event_ids: list[str]) -> dict[str, str]:
        """event id -> reason, for the recorded breaks among these events."""
        found: dict[str, str] = {}
        for i in range(0, len(event_ids), 10_000):
            query = {"_id": {"$in": event_ids[i : i + 10_000]}, BREAK: {"$exists": True}}
            async for d in self.db[EVENTS].find(query, {BREAK: 1}):
                found[str(d["_id"])] = str((d.get(BREAK) or {}).get("reason", ""))
        return found

    async def find(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        cursor = self.db[EVENTS].find(query, CHAIN_FIELDS)
        return await cursor.sort([("time", ASCENDING), ("seq", ASCENDING)]).to_list()


def make_store(settings: PlatformSettings, db_suffix: str = "") -> AuditStore:
    return AuditStore(settings.mongodb_uri, settings.db_name("audit") + db_suffix)
