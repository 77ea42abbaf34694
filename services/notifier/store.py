"""NotificationStore: the notifier's own database (one document per e-mail to send).

A notification moves pending -> sending -> accepted -> sent (or back to pending for a
retry, or failed).  `sending` is a claim: a lease (`lease_until`) and a fencing token
(`claim`) that every later write of that sender must match, so a sender that lost its
claim (it stalled past the lease and another took over) cannot overwrite the new owner.
`accepted` is written, in one small update, the moment the SMTP server accepted the
message; recording `sent` (state, event, audit) follows in a transaction.  After a crash:
- `accepted` is only settled, never sent again;
- `sending` with an expired lease is *in doubt* (the sender died during the SMTP
  conversation, perhaps after the server accepted): it is sent again, with the same
  Message-ID, and flagged `in_doubt` so the resend is audited as such;
- a claim whose reply was lost (the store went away during the call) was never used:
  the sender that made it gives the mail back as soon as the store answers again.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.errors import PyMongoError

from services.notifier.domain import State
from shared.schemas import Recipient
from shared.store import ServiceStore, Write

NOTIFICATIONS = "notifications"
# Default claim length; the sender passes one derived from its SMTP deadline.
SENDING_LEASE = timedelta(seconds=30)
# An accepted mail is settled by its sender within milliseconds; after this, by anyone.
ACCEPTED_GRACE = timedelta(seconds=5)
ACCEPTED = "accepted"  # SMTP accepted the message; `sent` not yet recorded
KEEP_SENT = timedelta(days=30)  # a notification's document stays this long, then the TTL index removes it


def new_notification(
    notification_id: str,
    kind: str,
    to: Recipient,
    *,
    account_id: str,
    request_id: str | None,
    context: dict[str, Any],
    sealed: str | None,
    token_id: str | None,
    correlationid: str | None,
    causationid: str,
    event_time: datetime,
    now: datetime,
) -> dict[str, Any]:
    """The document of one mail to send, pending and due at once."""
    return {
        "_id": notification_id,
        "kind": kind,
        "to": to.email,
        "name": to.name,
        "locale": to.locale,
        "context": context,
        "sealed": sealed,  # the link and code, still sealed; removed once sent
        "token_id": token_id,  # what they are sealed for (with account, request and address)
        "account_id": account_id,
        "request_id": request_id,
        "correlationid": correlationid,
        "causationid": causationid,
        "event_time": event_time,
        "state": State.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "purge_at": now + KEEP_SENT,
    }


class NotificationStore(ServiceStore):
    def __init__(self, uri: str, db_name: str) -> None:
        super().__init__(uri, db_name)
        # Claims made by this process whose reply never came (the store went away mid-call):
        # the claim may have been applied, but no SMTP conversation was started with it.
        self._unanswered: set[str] = set()

    async def ensure_service_indexes(self) -> None:
        await self.db[NOTIFICATIONS].create_index([("state", 1), ("next_attempt_at", 1)])
        await self.db[NOTIFICATIONS].create_index([("state", 1), ("lease_until", 1)])
        await self.db[NOTIFICATIONS].create_index("purge_at", expireAfterSeconds=0)

    def add(self, docs: list[dict[str, Any]]) -> list[Write]:
        return [self.insert(NOTIFICATIONS, doc) for doc in docs]

    async def claim_due(
        self, now: datetime, lease: timedelta = SENDING_LEASE, *, orphans: bool = True
    ) -> dict[str, Any] | None:
        """Atomically take one notification to work on, with a fresh fencing token:
        first one accepted but not settled (its sender died), then one whose sender died
        mid-send (in doubt), then the next due one. `orphans=False` skips the first two
        (the caller knows no claim has run out since it last looked: one round trip, not three)."""
        if self._unanswered:
            await self._give_back_unanswered(now)
        claim = uuid.uuid4().hex
        if not orphans:
            return await self._claim_pending(claim, now, lease)
        doc = await self._claim(
            claim,
            {"state": ACCEPTED, "lease_until": {"$lt": now}},
            {"$set": {"lease_until": now + lease, "claim": claim}},
        )
        if doc is not None:
            return doc
        doc = await self._claim(
            claim,
            {"state": State.SENDING, "lease_until": {"$lt": now}},
            {"$set": {"lease_until": now + lease, "claim": claim, "in_doubt": True}, "$inc": {"attempts": 1}},
        )
        if doc is not None:
            return doc
        return await self._claim_pending(claim, now, lease)

    async def _claim_pending(self, claim: str, now: datetime, lease: timedelta) -> dict[str, Any] | None:
        return await self._claim(
            claim,
            {"state": State.PENDING, "next_attempt_at": {"$lte": now}},
            {"$set": {"state": State.SENDING, "lease_until": now + lease, "claim": claim}, "$inc": {"attempts": 1}},
            sort=[("next_attempt_at", 1)],
        )

    async def next_due_at(self) -> datetime | None:
        """When `claim_due` will next find something (None: nothing is waiting)."""
        pending, claimed = await self.due_times()
        times = [t for t in (pending, claimed) if t is not None]
        return min(times) if times else None

    async def due_times(self, *, claims: bool = True) -> tuple[datetime | None, datetime | None]:
        """The earliest next attempt of a pending notification, and the earliest end of a
        claim (a sender that may have died; not read with `claims=False`). Indexed reads, so
        the sender can sleep instead of polling."""
        coll = self.db[NOTIFICATIONS]
        pending = await coll.find_one({"state": State.PENDING}, {"next_attempt_at": 1}, sort=[("next_attempt_at", 1)])
        if not claims:
            return pending.get("next_attempt_at") if pending else None, None
        claimed = await coll.find_one(
            {"state": {"$in": [State.SENDING, ACCEPTED]}}, {"lease_until": 1}, sort=[("lease_until", 1)]
        )
        pending_at = pending.get("next_attempt_at") if pending else None
        claimed_at = claimed.get("lease_until") if claimed else None
        return (
            pending_at if isinstance(pending_at, datetime) else None,
            claimed_at if isinstance(claimed_at, datetime) else None,
        )

    async def _claim(
        self, claim: str, query: dict[str, Any], update: dict[str, Any], **kw: Any
    ) -> dict[str, Any] | None:
        try:
            return await self.db[NOTIFICATIONS].find_one_and_update(
                query, update, return_document=ReturnDocument.AFTER, **kw
            )
        except PyMongoError:
            self._unanswered.add(claim)
            raise

    async def _give_back_unanswered(self, now: datetime) -> None:
        """A claim whose reply was lost was never used: give its mail back at once (not after
        the lease, and not as "in doubt", since no SMTP conversation was started with it)."""
        claims = sorted(self._unanswered)
        coll = self.db[NOTIFICATIONS]
        await coll.update_many(
            {"claim": {"$in": claims}, "state": State.SENDING},
            {
                "$set": {"state": State.PENDING, "next_attempt_at": now},
                "$unset": {"lease_until": "", "claim": ""},
                "$inc": {"attempts": -1},
            },
        )
        await coll.update_many({"claim": {"$in": claims}, "state": ACCEPTED}, {"$set": {"lease_until": now}})
        self._unanswered.difference_update(claims)

    async def mark_accepted(self, nid: str, claim: str, now: datetime) -> bool:
        """One small write right after the SMTP server's 250: from here on the mail is never
        sent again. The sealed link and code are dropped with it."""
        result = await self.db[NOTIFICATIONS].update_one(
            # ACCEPTED too: a retry after a lost reply finds its own earlier write.
            {"_id": nid, "state": {"$in": [State.SENDING, ACCEPTED]}, "claim": claim},
            {
                "$set": {"state": ACCEPTED, "accepted_at": now, "lease_until": now + ACCEPTED_GRACE},
                "$unset": {"sealed": ""},
            },
        )
        return result.matched_count == 1

    def _claimed(self, nid: str, claim: str) -> dict[str, Any]:
        return {"_id": nid, "state": {"$in": [State.SENDING, ACCEPTED]}, "claim": claim}

    def settle(self, nid: str, claim: str, state: str, error: str | None, now: datetime, lost: Any) -> Write:
        """The final state (sent or failed), the sealed secrets dropped; staged for the commit
        that also announces it. Refused with `lost()` unless this sender still holds the claim."""
        update = {
            "$set": {"state": state, "finished_at": now, "last_error": error},
            "$unset": {"sealed": "", "lease_until": "", "claim": ""},
        }
        return self.update(NOTIFICATIONS, self._claimed(nid, claim), update, stale=lost, must_match=True)

    def fail_in_place(self, nid: Any, claim: Any, error: str, now: datetime) -> list[Write]:
        """The last resort for a notification too broken to announce (its failure event cannot
        even be built): out of the sender's way, without an event. One the SMTP server already
        accepted is recorded as sent, never as failed. Fenced by the claim, like every write
        (at most one of the two matches)."""
        drop = {"sealed": "", "lease_until": "", "claim": ""}
        return [
            self.update(
                NOTIFICATIONS,
                {"_id": nid, "state": ACCEPTED, "claim": claim},
                {"$set": {"state": State.SENT, "finished_at": now, "last_error": error}, "$unset": drop},
            ),
            self.update(
                NOTIFICATIONS,
                {"_id": nid, "state": State.SENDING, "claim": claim},
                {"$set": {"state": State.FAILED, "finished_at": now, "last_error": error}, "$unset": drop},
            ),
        ]

    async def retry_later(self, nid: str, claim: str, next_at: datetime | None, error: str) -> bool:
        """Back to pending until `next_at`, if this sender still holds the claim (False when it
        lost it). One document, one write: no transaction needed."""
        result = await self.db[NOTIFICATIONS].update_one(
            self._claimed(nid, claim),
            {
                "$set": {"state": State.PENDING, "next_attempt_at": next_at, "last_error": error},
                "$unset": {"lease_until": "", "claim": ""},
            },
        )
        return result.modified_count == 1
