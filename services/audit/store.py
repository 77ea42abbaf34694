"""AuditStore: the audit read model's own database (events by id, chain heads, breaks)."""

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

    async def head(self, producer: str) -> tuple[int, str]:
        doc = await self.db[HEADS].find_one({"_id": producer})
        return (int(doc["seq"]), str(doc["hash"])) if doc else (0, "")

    async def record(
        self,
        doc: dict[str, Any],
        producer: str | None,
        head: tuple[int, str] | None,
        problem: str | None,
        s: AsyncClientSession,
    ) -> None:
        await self.db[EVENTS].replace_one({"_id": doc["_id"]}, doc, upsert=True, session=s)
        if producer is not None and head is not None:
            await self.db[HEADS].update_one(
                {"_id": producer}, {"$set": {"seq": head[0], "hash": head[1]}}, upsert=True, session=s
            )
        if problem is not None:
            await self.db[BREAKS].insert_one(
                {"event_id": doc["_id"], "producer": producer, "problem": problem, "time": doc["time"]}, session=s
            )

    async def find(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.db[EVENTS].find(query).sort([("time", ASCENDING), ("seq", ASCENDING)]).to_list()
