"""NotificationStore: the notifier's own database (one document per e-mail to send)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.asynchronous.client_session import AsyncClientSession

from services.notifier.domain import State
from shared.store import ServiceStore

NOTIFICATIONS = "notifications"
SENDING_LEASE = timedelta(seconds=60)


class NotificationStore(ServiceStore):
    async def ensure_service_indexes(self) -> None:
        await self.db[NOTIFICATIONS].create_index([("state", 1), ("next_attempt_at", 1)])
        await self.db[NOTIFICATIONS].create_index([("state", 1), ("lease_until", 1)])
        await self.db[NOTIFICATIONS].create_index("purge_at", expireAfterSeconds=0)

    async def add(self, docs: list[dict[str, Any]], s: AsyncClientSession) -> None:
        await self.db[NOTIFICATIONS].insert_many(docs, session=s)

    async def claim_due(self, now: datetime) -> dict[str, Any] | None:
        """Atomically take one due notification (or one whose sender died mid-send)."""
        return await self.db[NOTIFICATIONS].find_one_and_update(
            {
                "$or": [
                    {"state": State.PENDING, "next_attempt_at": {"$lte": now}},
                    {"state": State.SENDING, "lease_until": {"$lt": now}},
                ]
            },
            {"$set": {"state": State.SENDING, "lease_until": now + SENDING_LEASE}, "$inc": {"attempts": 1}},
            sort=[("next_attempt_at", 1)],
            return_document=ReturnDocument.AFTER,
        )

    async def finish(self, nid: str, update: dict[str, Any], s: AsyncClientSession) -> None:
        await self.db[NOTIFICATIONS].update_one({"_id": nid, "state": State.SENDING}, update, session=s)
