"""TokenStore: the tokens service's own database. Only hashes of secrets are stored."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from services.tokens.domain import State, TokenView
from shared.store import ServiceStore

TOKENS = "tokens"
# Expired tokens stay a day (so a late click says "expired", not "invalid"), then the TTL index removes them.
PURGE_GRACE = timedelta(days=1)


def to_view(doc: dict[str, Any]) -> TokenView:
    return TokenView(
        token_id=doc["_id"],
        state=doc["state"],
        link_expires_at=doc["link_expires_at"],
        code_expires_at=doc["code_expires_at"],
        code_hash=doc["code_hash"],
        code_attempts=doc.get("code_attempts", 0),
    )


class TokenStore(ServiceStore):
    async def ensure_service_indexes(self) -> None:
        await self.db[TOKENS].create_index("token_hash", unique=True)
        await self.db[TOKENS].create_index("request_id", unique=True)
        await self.db[TOKENS].create_index([("account_id", 1), ("state", 1)])
        await self.db[TOKENS].create_index([("state", 1), ("reserved_until", 1)])
        await self.db[TOKENS].create_index("purge_at", expireAfterSeconds=0)

    async def by_hash(self, token_hash: str) -> dict[str, Any] | None:
        return await self.db[TOKENS].find_one({"token_hash": token_hash})

    async def by_request(self, request_id: str) -> dict[str, Any] | None:
        return await self.db[TOKENS].find_one({"request_id": request_id})

    async def by_id(self, token_id: str) -> dict[str, Any] | None:
        return await self.db[TOKENS].find_one({"_id": token_id})

    async def live_ids(self, account_id: str) -> list[str]:
        docs = self.db[TOKENS].find(
            {"account_id": account_id, "state": {"$in": [State.LIVE, State.RESERVED]}}, {"_id": 1}
        )
        return [d["_id"] async for d in docs]

    async def revoke(self, token_ids: list[str], s: AsyncClientSession) -> None:
        if token_ids:
            await self.db[TOKENS].update_many(
                {"_id": {"$in": token_ids}, "state": State.LIVE},
                {"$set": {"state": State.REVOKED}},
                session=s,
            )

    async def insert(self, doc: dict[str, Any], s: AsyncClientSession) -> None:
        doc["purge_at"] = max(doc["link_expires_at"], doc["code_expires_at"]) + PURGE_GRACE
        await self.db[TOKENS].insert_one(doc, session=s)

    async def transition(
        self, token_id: str, from_states: list[str], update: dict[str, Any], s: AsyncClientSession
    ) -> bool:
        result = await self.db[TOKENS].update_one({"_id": token_id, "state": {"$in": from_states}}, update, session=s)
        return result.modified_count == 1

    async def overdue_reservations(self, now: datetime) -> list[dict[str, Any]]:
        cursor = self.db[TOKENS].find({"state": State.RESERVED, "reserved_until": {"$lt": now}}).limit(100)
        return await cursor.to_list()
