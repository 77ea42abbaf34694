"""CredentialStore: the password service's own database (key hashes and history, the login
name of each account, and the counters that throttle credential checks).

Throttling counters live in `login_counters`, one document each for
- a principal (`p:s:<keyed hash of the national ID>`, whether or not it names an account):
  its wrong keys, and `rev`, bumped by every write;
- a principal seen from one address block (`b:<principal>|<block ref>`): its wrong keys and lock;
- an address block (`ip:<block ref>`): its wrong keys, any principal.
A decision is applied only to the state it was made on (the principal's `rev`), so two checks
racing for one account (two spellings of an ID land on two partitions) are both counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from services.password.domain import KeyHistory, KeyRecord
from shared.store import ServiceStore, Write
from shared.throttle import ThrottleState

CREDENTIALS = "credentials"
USED_TOKENS = "used_tokens"
LOGIN_COUNTERS = "login_counters"
# Codes of a write that lost a race for the same principal document: the state changed.
RACE_CODES = frozenset({11000, 112})


class StaleCounters(Exception):
    """The counters changed since they were read: read them again and decide again."""


@dataclass(frozen=True)
class Credential:
    account_id: str
    national_id: str | None  # the login name (from the registry import)
    history: KeyHistory
    must_change: bool = False  # a legacy key the import took against the policy: to be changed


@dataclass(frozen=True)
class CounterKeys:
    """Which counters a check touches: its principal and its address block."""

    principal: str  # "s:<keyed hash of the national ID>"
    block_ref: str  # keyed hash of the normalised address block

    @property
    def principal_id(self) -> str:
        return f"p:{self.principal}"

    @property
    def block_id(self) -> str:
        return f"b:{self.principal}|{self.block_ref}"

    @property
    def address_id(self) -> str:
        return f"ip:{self.block_ref}"


def _credential(doc: dict[str, Any]) -> Credential:
    return Credential(
        account_id=doc["_id"],
        national_id=doc.get("national_id"),
        history=KeyHistory(current=doc.get("hash"), previous=list(doc.get("previous", []))),
        must_change=bool(doc.get("must_change", False)),
    )


def _times(doc: dict[str, Any] | None, name: str) -> tuple[datetime, ...]:
    return tuple(doc.get(name, ())) if doc else ()


class CredentialStore(ServiceStore):
    def __init__(self, uri: str, db_name: str, *, keep: int = 32, retention: timedelta = timedelta(days=1)) -> None:
        super().__init__(uri, db_name)
        self.keep = keep  # failure times kept per counter: enough for every configured limit
        self.retention = retention  # a counter untouched this long is dropped (TTL)

    async def ensure_service_indexes(self) -> None:
        await self.db[USED_TOKENS].create_index("at", expireAfterSeconds=30 * 24 * 3600)
        await self.db[CREDENTIALS].create_index(
            "national_id", unique=True, partialFilterExpression={"national_id": {"$type": "string"}}
        )
        await self.db[LOGIN_COUNTERS].create_index("principal")
        await self.db[LOGIN_COUNTERS].create_index("expires_at", expireAfterSeconds=0)

    # ---- credentials ---------------------------------------------------------------------------

    async def history(self, account_id: str) -> KeyHistory:
        found = await self.credential(account_id)
        return found.history if found else KeyHistory()

    async def credential(self, account_id: str) -> Credential | None:
        doc = await self.db[CREDENTIALS].find_one({"_id": account_id})
        return _credential(doc) if doc else None

    async def by_national_id(self, national_id: str) -> Credential | None:
        doc = await self.db[CREDENTIALS].find_one({"national_id": national_id})
        return _credential(doc) if doc else None

    async def exists(self, account_id: str) -> bool:
        """Has the account a key (a login name alone is no credential)?"""
        return (
            await self.db[CREDENTIALS].find_one({"_id": account_id, "hash": {"$type": "string"}}, {"_id": 1})
            is not None
        )

    async def token_used(self, token_id: str) -> bool:
        return await self.db[USED_TOKENS].find_one({"_id": token_id}, {"_id": 1}) is not None

    def save(
        self,
        account_id: str,
        history: KeyHistory,
        now: datetime,
        token_id: str | None = None,
        national_id: str | None = None,
        *,
        must_change: bool = False,
    ) -> list[Write]:
        # must_change: a legacy key taken by the import's migration option; any key change clears it.
        fields: dict[str, Any] = {
            "hash": history.current,
            "previous": history.previous,
            "changed_at": now,
            "must_change": must_change,
        }
        if national_id is not None:
            fields["national_id"] = national_id
        writes = [self.update(CREDENTIALS, {"_id": account_id}, {"$set": fields}, upsert=True)]
        if token_id is not None:
            # One key change per token, even if the tokens service released and re-reserved it.
            writes.append(self.insert(USED_TOKENS, {"_id": token_id, "at": now}))
        return writes

    def set_national_id(self, account_id: str, national_id: str) -> Write:
        return self.update(CREDENTIALS, {"_id": account_id}, {"$set": {"national_id": national_id}}, upsert=True)

    def rehash(self, account_id: str, old_hash: str, new_hash: str) -> Write:
        """The same key, hashed with today's parameters; only if the key did not change meanwhile."""
        return self.update(CREDENTIALS, {"_id": account_id, "hash": old_hash}, {"$set": {"hash": new_hash}})

    # ---- login counters ------------------------------------------------------------------------

    async def key_counters(self, keys: CounterKeys) -> ThrottleState:
        """The principal's, the block's and the address's counters, in one round trip."""
        ids = [keys.principal_id, keys.block_id, keys.address_id]
        docs = {d["_id"]: d async for d in self.db[LOGIN_COUNTERS].find({"_id": {"$in": ids}})}
        p, b, a = docs.get(keys.principal_id), docs.get(keys.block_id), docs.get(keys.address_id)
        return ThrottleState(
            rev=int(p.get("rev", 0)) if p else 0,
            principal_failures=_times(p, "failures"),
            block_failures=_times(b, "failures"),
            locked_until=b.get("locked_until") if b else None,
            address_failures=_times(a, "failures"),
        )

    def record_key_check(self, keys: CounterKeys, seen: ThrottleState, record: KeyRecord, now: datetime) -> list[Write]:
        """One check's counts: the same three updates on every path (only their contents
        differ), so no path costs the store more than another. The commit raises StaleCounters
        when the principal changed since `seen` was read."""
        expires = now + self.retention
        block_set: dict[str, Any] = {
            "principal": keys.principal,
            "expires_at": max(expires, record.lock_until or expires),
        }
        if record.lock_until is not None:
            block_set["locked_until"] = record.lock_until
        if record.clear_block:
            block_set["failures"] = []
        principal = keys.principal
        return [
            # Upsert on {_id, rev}: a missing document is created; an existing one with another
            # rev makes the insert collide on _id, which is how a race shows.
            self.update(
                LOGIN_COUNTERS,
                {"_id": keys.principal_id, "rev": seen.rev},
                {"$inc": {"rev": 1}, "$set": {"expires_at": expires}, **self._push(now, record.principal_failure)},
                upsert=True,
                stale=lambda: StaleCounters(principal),
                race_codes=RACE_CODES,
            ),
            self.update(
                LOGIN_COUNTERS,
                {"_id": keys.block_id},
                {"$set": block_set, **self._push(now, record.block_failure)},
                upsert=True,
            ),
            self.update(
                LOGIN_COUNTERS,
                {"_id": keys.address_id},
                {"$set": {"expires_at": expires}, **self._push(now, record.address_failure)},
                upsert=True,
            ),
        ]

    def _push(self, now: datetime, on: bool) -> dict[str, Any]:
        return {"$push": {"failures": {"$each": [now], "$slice": -self.keep}}} if on else {}

    def clear_key_failures(self, principal: str) -> list[Write]:
        """A new key: the wrong guesses at the old one no longer matter (every block of it)."""
        return [
            self.update(LOGIN_COUNTERS, {"_id": f"p:{principal}"}, {"$set": {"failures": []}, "$inc": {"rev": 1}}),
            self.delete(LOGIN_COUNTERS, {"principal": principal}, many=True),
        ]
