"""CredentialStore: the password service's own database (key hashes and history)."""

from __future__ import annotations

from datetime import datetime

from services.password.domain import KeyHistory
from shared.store import ServiceStore, Write

CREDENTIALS = "credentials"
USED_TOKENS = "used_tokens"


class CredentialStore(ServiceStore):
    async def ensure_service_indexes(self) -> None:
        await self.db[USED_TOKENS].create_index("at", expireAfterSeconds=30 * 24 * 3600)

    async def history(self, account_id: str) -> KeyHistory:
        doc = await self.db[CREDENTIALS].find_one({"_id": account_id})
        if doc is None:
            return KeyHistory()
        return KeyHistory(current=doc.get("hash"), previous=list(doc.get("previous", [])))

    async def exists(self, account_id: str) -> bool:
        return await self.db[CREDENTIALS].find_one({"_id": account_id}, {"_id": 1}) is not None

    async def token_used(self, token_id: str) -> bool:
        return await self.db[USED_TOKENS].find_one({"_id": token_id}, {"_id": 1}) is not None

    def save(
        self,
        account_id: str,
        history: KeyHistory,
        now: datetime,
        token_id: str | None = None,
        *,
        must_change: bool = False,
    ) -> list[Write]:
        # must_change: a legacy key taken by the import's migration option; any key change clears it.
        fields = {"hash": history.current, "previous": history.previous, "changed_at": now, "must_change": must_change}
        writes = [self.update(CREDENTIALS, {"_id": account_id}, {"$set": fields}, upsert=True)]
        if token_id is not None:
            # One key change per token, even if the tokens service released and re-reserved it.
            writes.append(self.insert(USED_TOKENS, {"_id": token_id, "at": now}))
        return writes
