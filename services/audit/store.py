"""AuditStore: the audit read model's own database (events by id, signed chain heads, breaks)."""

from __future__ import annotations

from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession

from shared.store import ServiceStore

EVENTS = "events"
HEADS = "chain_heads"
BREAKS = "chain_breaks"


class AuditStore(ServiceStore):
    async def ensure_service_indexes(self) -> None:
        for field in ("request_id", "account_id", "correlationid", "action", "time"):
            await self.db[EVENTS].create_index([(field, ASCENDING), ("time", ASCENDING)])
        await self.db[BREAKS].create_index("event_id")

    async def head(self, producer: str) -> dict[str, Any] | None:
        """A producer's recorded head: seq, hash, kid, sig, time, event_id and the sealed event."""
        return await self.db[HEADS].find_one({"_id": producer})

    async def heads(self) -> dict[str, dict[str, Any]]:
        return {str(d["_id"]): d async for d in self.db[HEADS].find()}

    async def record(
        self,
        doc: dict[str, Any],
        producer: str | None,
        head: dict[str, Any] | None,
        problem: tuple[str, str] | None,
        s: AsyncClientSession,
    ) -> None:
        """The projected event, the producer's new head (if it moved) and the break (if any),
        in one transaction. `problem` is (reason code, description)."""
        await self.db[EVENTS].replace_one({"_id": doc["_id"]}, doc, upsert=True, session=s)
        if producer is not None and head is not None:
            await self.db[HEADS].update_one({"_id": producer}, {"$set": head}, upsert=True, session=s)
        if problem is not None:
            reason, text = problem
            await self.db[BREAKS].insert_one(
                {"event_id": doc["_id"], "producer": producer, "reason": reason, "problem": text, "time": doc["time"]},
                session=s,
            )

    async def breaks_for(self, event_ids: list[str]) -> dict[str, str]:
        """event id -> reason, for the recorded breaks among these events."""
        found: dict[str, str] = {}
        for i in range(0, len(event_ids), 10_000):
            async for d in self.db[BREAKS].find({"event_id": {"$in": event_ids[i : i + 10_000]}}):
                found[str(d["event_id"])] = str(d.get("reason", ""))
        return found

    async def find(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.db[EVENTS].find(query).sort([("time", ASCENDING), ("seq", ASCENDING)]).to_list()
