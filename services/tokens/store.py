"""TokenStore: the tokens service's own database. Only hashes of secrets are stored.

Every state change is an intent-named operation that applies one move of the domain's
state machine from the state the handler decided on: if the token is no longer in that
state (a concurrent reset, revocation or timeout got there first), `StaleToken` aborts
the transaction and the handler decides again on fresh state.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta
from typing import Any

from services.tokens.domain import (
    KILL,
    RELEASE,
    RESERVE,
    REVOKE,
    SPEND,
    By,
    CodeGuard,
    Move,
    NewToken,
    State,
    TokenView,
)
from shared.store import ServiceStore, Write

TOKENS = "tokens"
# One document per wrong code: its subject (account or ID keyed hash) and the guard keys it
# counts under (domain.code_guard). Documents written before the keys came carry one `key`
# (the account): they still count, for it, until their TTL removes them.
CODE_FAILURES = "code_failures"
# Expired tokens stay a day (so a late click says "expired", not "invalid"), then the TTL index removes them.
PURGE_GRACE = timedelta(days=1)


class StaleToken(Exception):
    """The token is no longer in the state the decision was made on."""


def to_view(doc: dict[str, Any]) -> TokenView:
    return TokenView(
        token_id=doc["_id"],
        state=doc["state"],
        link_expires_at=doc["link_expires_at"],
        code_expires_at=doc["code_expires_at"],
        code_hash=doc["code_hash"],
        code_attempts=doc.get("code_attempts", 0),
        request_id=doc.get("request_id", ""),
        account_id=doc.get("account_id"),
        subject_ref=doc.get("subject_ref"),
        decoy=doc.get("decoy", False),
        reserved_by=doc.get("reserved_by"),
        recipient=doc.get("recipient"),
    )


def _document(token: NewToken) -> dict[str, Any]:
    return {
        "_id": token.token_id,
        "account_id": token.account_id,
        "subject_ref": token.subject_ref,
        "request_id": token.request_id,
        "token_hash": token.token_hash,
        "code_hash": token.code_hash,
        "code_attempts": 0,
        "state": State.LIVE,
        "decoy": token.decoy,
        "issued_at": token.issued_at,
        "link_expires_at": token.link_expires_at,
        "code_expires_at": token.code_expires_at,
        "recipient": token.recipient,
        "purge_at": max(token.link_expires_at, token.code_expires_at) + PURGE_GRACE,
    }


def _earlier_real(account_id: str) -> dict[str, Any]:
    """The account's real tokens that could still be used (a document without `decoy` is a
    real one, as `to_view` reads it)."""
    return {"account_id": account_id, "state": {"$in": list(REVOKE.sources)}, "decoy": {"$ne": True}}


class TokenStore(ServiceStore):
    async def ensure_service_indexes(self) -> None:
        await self.db[TOKENS].create_index("token_hash", unique=True)
        await self.db[TOKENS].create_index("request_id", unique=True)
        await self.db[TOKENS].create_index([("account_id", 1), ("state", 1)])
        await self.db[TOKENS].create_index([("state", 1), ("reserved_until", 1)])
        await self.db[TOKENS].create_index("purge_at", expireAfterSeconds=0)
        await self.db[CODE_FAILURES].create_index([("key", 1), ("at", 1)])  # documents from before the keys
        await self.db[CODE_FAILURES].create_index([("keys", 1), ("at", 1)])
        await self.db[CODE_FAILURES].create_index("subject")
        await self.db[CODE_FAILURES].create_index("purge_at", expireAfterSeconds=0)

    # ---- reads ----------------------------------------------------------------------------

    async def by_hash(self, token_hash: str) -> TokenView | None:
        return await self._view({"token_hash": token_hash})

    async def by_request(self, request_id: str) -> TokenView | None:
        return await self._view({"request_id": request_id})

    async def by_id(self, token_id: str) -> TokenView | None:
        return await self._view({"_id": token_id})

    async def _view(self, query: dict[str, Any]) -> TokenView | None:
        doc = await self.db[TOKENS].find_one(query)
        return to_view(doc) if doc else None

    async def issue_facts(self, request_id: str, account_id: str) -> tuple[bool, int]:
        """Has this request a token already, and how many of the account's real tokens could
        still be used (`revoke_earlier_tokens` revokes them for the new one): one read."""
        query = {"$or": [{"request_id": request_id}, _earlier_real(account_id)]}
        projection = {"request_id": 1, "account_id": 1, "state": 1, "decoy": 1}
        docs = await self.db[TOKENS].find(query, projection).to_list()
        seen = any(d.get("request_id") == request_id for d in docs)
        count = sum(
            d.get("account_id") == account_id and REVOKE.allows(d.get("state", "")) and d.get("decoy") is not True
            for d in docs
        )
        return seen, count

    async def revocable_count(self, account_id: str) -> int:
        return await self.db[TOKENS].count_documents({"account_id": account_id, "state": {"$in": list(REVOKE.sources)}})

    async def overdue_reservations(self, now: datetime) -> list[dict[str, Any]]:
        query = {"state": State.RESERVED, "reserved_until": {"$lt": now}, "sweep_parked": {"$exists": False}}
        cursor = self.db[TOKENS].find(query).limit(100)
        return await cursor.to_list()

    async def next_reservation_end(self) -> datetime | None:
        """When the earliest reservation still to be swept runs out (None: nothing reserved):
        one indexed read, so the sweeper sleeps until then instead of polling. A parked one is
        not waited for (it is overdue for good: the sweeper would wake at once, every time)."""
        doc = await self.db[TOKENS].find_one(
            {"state": State.RESERVED, "sweep_parked": {"$exists": False}},
            {"reserved_until": 1},
            sort=[("reserved_until", 1)],
        )
        until = doc.get("reserved_until") if doc else None
        return until if isinstance(until, datetime) else None

    async def code_failures(self, keys: tuple[str, ...], since: datetime) -> dict[str, int]:
        """Wrong codes under each of `keys` since `since`: one read, the same for any token.
        At most about twice the limit can match (a refused code is not recorded)."""
        query = {"$or": [{"keys": {"$in": list(keys)}}, {"key": {"$in": list(keys)}}], "at": {"$gte": since}}
        counts = dict.fromkeys(keys, 0)
        async for doc in self.db[CODE_FAILURES].find(query, {"keys": 1, "key": 1}):
            for key in doc.get("keys") or [doc.get("key")]:
                if key in counts:
                    counts[key] += 1
        return counts

    # ---- writes: staged, applied by the handler's commit in its transaction -------------------

    def insert_token(self, token: NewToken) -> Write:
        return self.insert(TOKENS, _document(token))

    def revoke_earlier_tokens(self, account_id: str) -> Write:
        """For a newly issued token: revoke the account's earlier *real* tokens that could still
        be used, reserved ones included (as `revoke_account`). Never a decoy: a decoy revoked by
        a verified request would answer `token_invalid` for ever, where one left alone answers
        `code_attempts_exceeded` at its 5th wrong code, so wrong codes on a known decoy would
        tell whether a later request (with guessed answers) was verified. A decoy ends by its
        lifetime or its attempts only."""
        return self._revoke(_earlier_real(account_id))

    def revoke_account(self, account_id: str) -> Write:
        """Revoke every token of the account that could still be used, reserved ones included:
        a reservation revoked now is never released (a key change already made still stands).
        Decoys included: this follows a contact or e-mail change, which a requester cannot make
        happen by guessing answers, so it is no oracle on them (see the handlers)."""
        return self._revoke({"account_id": account_id, "state": {"$in": list(REVOKE.sources)}})

    def _revoke(self, query: dict[str, Any]) -> Write:
        return self.update(
            TOKENS, query, {"$set": {"state": REVOKE.target}, "$unset": {"reserved_until": ""}}, many=True
        )

    def reserve(self, token_id: str, by: By, until: datetime) -> Write:
        return self._move(token_id, RESERVE, State.LIVE, {"reserved_until": until, "reserved_by": by})

    def release(self, token_id: str) -> Write:
        return self._move(token_id, RELEASE, State.RESERVED, unset=("reserved_until",))

    def spend(self, token_id: str, seen: str, now: datetime) -> Write:
        return self._move(token_id, SPEND, seen, {"spent_at": now}, unset=("reserved_until",))

    def count_wrong_code(self, token_id: str, seen_attempts: int, kill: bool) -> Write:
        """One more wrong code on a live token (killing it on the last allowed one). Conditional
        on the count the decision saw, so two racing guesses are decided one after the other."""
        update: dict[str, Any] = {"$inc": {"code_attempts": 1}}
        if kill:
            assert KILL.allows(State.LIVE)
            update["$set"] = {"state": KILL.target}
        return self.update(
            TOKENS,
            {"_id": token_id, "state": State.LIVE, "code_attempts": seen_attempts},
            update,
            stale=lambda: StaleToken(token_id),
            must_match=True,
        )

    def record_code_failure(self, guard: CodeGuard, now: datetime, keep_until: datetime) -> Write:
        # An insert per wrong code, never a read-modify-write: parallel guesses are all counted.
        doc = {
            "_id": secrets.token_hex(12),
            "subject": guard.subject,
            "keys": list(guard.adds),
            "at": now,
            "purge_at": keep_until,
        }
        return self.insert(CODE_FAILURES, doc)

    def clear_code_failures(self, subject: str) -> Write:
        """Every wrong code of the subject: its account count and each of its block counts."""
        return self.delete(CODE_FAILURES, {"$or": [{"subject": subject}, {"key": subject}]}, many=True)

    def park_reservation(self, token_id: Any, reason: str, now: datetime) -> Write:
        """The sweeper could not release this reservation: it no longer looks at it (the token
        stays reserved, unusable; an operator sees `sweep_parked` and its reason)."""
        parked = {"$set": {"sweep_parked": reason, "sweep_parked_at": now}}
        return self.update(TOKENS, {"_id": token_id, "state": State.RESERVED}, parked)

    def _move(
        self,
        token_id: str,
        move: Move,
        seen: str,
        fields: dict[str, Any] | None = None,
        unset: tuple[str, ...] = (),
    ) -> Write:
        """One move of the state machine, applied only if the token is still in `seen`."""
        if not move.allows(seen):
            raise ValueError(f"{move.name} does not start from {seen}")
        update: dict[str, Any] = {"$set": {"state": move.target, **(fields or {})}}
        if unset:
            update["$unset"] = dict.fromkeys(unset, "")
        return self.update(
            TOKENS, {"_id": token_id, "state": seen}, update, stale=lambda: StaleToken(token_id), must_match=True
        )
