"""AccountStore: the identity service's own database (accounts, IP failures, seen requests)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from pymongo import ASCENDING
from pymongo.asynchronous.client_session import AsyncClientSession

from services.identity.domain import Account
from shared.store import ServiceStore

ACCOUNTS = "accounts"
IP_FAILURES = "ip_failures"
SUBJECT_FAILURES = "subject_failures"  # failed requests for IDs with no account, by keyed hash
REQUESTS = "requests"
KEEP_TIMESTAMPS = 20  # bounded arrays: enough for any configured window


def _to_account(doc: dict[str, Any]) -> Account:
    return Account(
        account_id=doc["_id"],
        national_id=doc["national_id"],
        profile=doc["profile"],
        name=doc["name"],
        email=doc["email"],
        locale=doc.get("locale", "es"),
        answer_hashes=doc["answer_hashes"],
        representative_id=doc.get("representative_id"),
        failures=doc.get("failures", []),
        locked_until=doc.get("locked_until"),
        mails_sent=doc.get("mails_sent", []),
    )


class AccountStore(ServiceStore):
    def __init__(self, uri: str, db_name: str, ip_window_s: int) -> None:
        super().__init__(uri, db_name)
        self.ip_window_s = ip_window_s

    async def ensure_service_indexes(self) -> None:
        await self.db[ACCOUNTS].create_index("national_id", unique=True)
        await self.db[IP_FAILURES].create_index([("ip_ref", ASCENDING), ("at", ASCENDING)])
        await self.db[IP_FAILURES].create_index("at", expireAfterSeconds=self.ip_window_s)
        await self.db[REQUESTS].create_index("at", expireAfterSeconds=7 * 24 * 3600)
        await self.db[SUBJECT_FAILURES].create_index("last_at", expireAfterSeconds=24 * 3600)

    async def by_national_id(self, national_id: str) -> Account | None:
        doc = await self.db[ACCOUNTS].find_one({"national_id": national_id})
        return _to_account(doc) if doc else None

    async def raw_by_national_id(self, national_id: str) -> dict[str, Any] | None:
        return await self.db[ACCOUNTS].find_one({"national_id": national_id})

    async def by_id(self, account_id: str) -> Account | None:
        doc = await self.db[ACCOUNTS].find_one({"_id": account_id})
        return _to_account(doc) if doc else None

    async def request_seen(self, request_id: str) -> bool:
        return await self.db[REQUESTS].find_one({"_id": request_id}, {"_id": 1}) is not None

    async def record_request(self, request_id: str, now: datetime, s: AsyncClientSession) -> None:
        await self.db[REQUESTS].insert_one({"_id": request_id, "at": now}, session=s)

    async def ip_failures(self, ip_ref: str, since: datetime) -> int:
        return await self.db[IP_FAILURES].count_documents({"ip_ref": ip_ref, "at": {"$gt": since}})

    async def record_ip_failure(self, ip_ref: str, now: datetime, s: AsyncClientSession) -> None:
        await self.db[IP_FAILURES].insert_one({"ip_ref": ip_ref, "at": now}, session=s)

    async def record_failure(
        self, account_id: str, now: datetime, locked_until: datetime | None, s: AsyncClientSession
    ) -> None:
        update: dict[str, Any] = {"$push": {"failures": {"$each": [now], "$slice": -KEEP_TIMESTAMPS}}}
        if locked_until is not None:
            update["$set"] = {"locked_until": locked_until}
        await self.db[ACCOUNTS].update_one({"_id": account_id}, update, session=s)

    async def record_subject_failure(self, subject_ref: str, now: datetime, s: AsyncClientSession) -> None:
        await self.db[SUBJECT_FAILURES].update_one(
            {"_id": subject_ref},
            {"$push": {"failures": {"$each": [now], "$slice": -KEEP_TIMESTAMPS}}, "$set": {"last_at": now}},
            upsert=True,
            session=s,
        )

    async def set_answer_hashes(self, account_id: str, hashes: dict[str, str], s: AsyncClientSession) -> None:
        await self.db[ACCOUNTS].update_one(
            {"_id": account_id}, {"$set": {f"answer_hashes.{q}": h for q, h in hashes.items()}}, session=s
        )

    async def record_mail(self, account_id: str, now: datetime, s: AsyncClientSession) -> None:
        await self.db[ACCOUNTS].update_one(
            {"_id": account_id},
            {"$push": {"mails_sent": {"$each": [now], "$slice": -KEEP_TIMESTAMPS}}},
            session=s,
        )

    async def unlock(self, account_id: str, s: AsyncClientSession) -> None:
        await self.db[ACCOUNTS].update_one(
            {"_id": account_id}, {"$set": {"failures": [], "locked_until": None}}, session=s
        )

    async def set_email(self, account_id: str, email: str, s: AsyncClientSession) -> None:
        await self.db[ACCOUNTS].update_one({"_id": account_id}, {"$set": {"email": email}}, session=s)

    async def upsert(self, doc: dict[str, Any], s: AsyncClientSession) -> None:
        await self.db[ACCOUNTS].replace_one({"_id": doc["_id"]}, doc, upsert=True, session=s)

    @staticmethod
    def window_start(now: datetime, seconds: int) -> datetime:
        return now - timedelta(seconds=seconds)
