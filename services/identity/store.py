"""AccountStore: the identity service's own database (accounts, lockout counters, seen requests).

Counters live in one collection, one document each for
- a principal (`p:a:<account_id>`, or `p:s:<keyed hash of an ID>` for an ID with no account):
  its failures, mails and lock notices, and `rev`, bumped by every write;
- a principal seen from one address block (`b:<principal>|<block ref>`): its failures,
  its lock and its last evaluated attempt;
- an address block (`ip:<block ref>`): its failed requests.

A decision is applied only to the state it was made on: the principal's update carries the
`rev` that was read, so a concurrent request for the same account (another spelling of the
ID lands on another partition) makes it fail with `StaleCounters`, and the handler reads the
counters again and decides again. No failure is lost and no lock is missed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from services.identity.domain import Account, AddressState, BlockState, Contact, Counters, PrincipalState, Record
from services.identity.operator_domain import ChangeStatus, EmailChange, RegisteredKey
from shared.store import ServiceStore, Write

ACCOUNTS = "accounts"
COUNTERS = "counters"
REQUESTS = "requests"
OPERATOR_KEYS = "operator_keys"  # the registry of operator public keys (from identity.operator_keys)
COMMANDS = "commands"  # operator command ids already processed (replays are refused)
EMAIL_CHANGES = "email_changes"  # requested e-mail changes and what became of them
# A command older than its lifetime (minutes) is refused as expired, so its id need not be kept
# for ever: a month is far beyond any lifetime.
COMMANDS_KEEP_S = 30 * 24 * 3600
# Codes of a write that lost a race for the same principal document: the state changed.
RACE_CODES = frozenset({11000, 112})


class StaleContact(Exception):
    """The account's contact data changed since it was read: read it again and decide again."""


class StaleChange(Exception):
    """The e-mail change is no longer in the state the decision saw (approved, applied or
    cancelled meanwhile)."""


def _change_doc(change: EmailChange) -> dict[str, Any]:
    return {
        "_id": change.change_id,
        "account_id": change.account_id,
        "new_email": change.new_email,
        "requested_by": change.requested_by,
        "requested_at": change.requested_at,
        "not_before": change.not_before,
        "status": change.status,
        "approved_by": change.approved_by,
        "approved_at": change.approved_at,
    }


def _to_change(doc: dict[str, Any]) -> EmailChange:
    return EmailChange(
        change_id=doc["_id"],
        account_id=doc["account_id"],
        new_email=doc["new_email"],
        requested_by=doc["requested_by"],
        requested_at=doc["requested_at"],
        not_before=doc["not_before"],
        status=doc["status"],
        approved_by=doc.get("approved_by"),
        approved_at=doc.get("approved_at"),
        cancelled_by=doc.get("cancelled_by"),
        cancelled_at=doc.get("cancelled_at"),
    )


class StaleCounters(Exception):
    """The counters changed since they were read: read them again and decide again."""


@dataclass(frozen=True)
class CounterKeys:
    """Which counters a request touches: its principal, and its address block when known."""

    principal: str  # "a:<account_id>" or "s:<subject_ref>"
    block_ref: str | None = None  # keyed hash of the normalised address block

    @classmethod
    def for_account(cls, account_id: str, block_ref: str | None = None) -> CounterKeys:
        return cls(f"a:{account_id}", block_ref)

    @classmethod
    def for_subject(cls, subject_ref: str, block_ref: str | None = None) -> CounterKeys:
        return cls(f"s:{subject_ref}", block_ref)

    @property
    def principal_id(self) -> str:
        return f"p:{self.principal}"

    @property
    def block_id(self) -> str | None:
        return None if self.block_ref is None else f"b:{self.principal}|{self.block_ref}"

    @property
    def address_id(self) -> str | None:
        return None if self.block_ref is None else f"ip:{self.block_ref}"


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
        backup_email=doc.get("backup_email"),
        phone=doc.get("phone"),
    )


def _times(doc: dict[str, Any] | None, name: str) -> tuple[datetime, ...]:
    return tuple(doc.get(name, ())) if doc else ()


class AccountStore(ServiceStore):
    def __init__(self, uri: str, db_name: str, *, keep: int = 32, retention: timedelta = timedelta(days=1)) -> None:
        super().__init__(uri, db_name)
        self.keep = keep  # timestamps kept per counter: enough for every configured limit
        self.retention = retention  # a counter untouched this long is dropped (TTL)

    async def ensure_service_indexes(self) -> None:
        await self.db[ACCOUNTS].create_index("national_id", unique=True)
        await self.db[COUNTERS].create_index("principal")
        await self.db[COUNTERS].create_index("expires_at", expireAfterSeconds=0)
        await self.db[REQUESTS].create_index("at", expireAfterSeconds=7 * 24 * 3600)
        await self.db[OPERATOR_KEYS].create_index("operator_id")
        await self.db[COMMANDS].create_index("at", expireAfterSeconds=COMMANDS_KEEP_S)
        await self.db[EMAIL_CHANGES].create_index([("account_id", 1), ("status", 1)])
        await self.db[EMAIL_CHANGES].create_index([("status", 1), ("effective_at", 1)])

    # ---- accounts ------------------------------------------------------------------------------

    async def by_national_id(self, national_id: str) -> Account | None:
        doc = await self.db[ACCOUNTS].find_one({"national_id": national_id})
        return _to_account(doc) if doc else None

    async def by_id(self, account_id: str) -> Account | None:
        doc = await self.db[ACCOUNTS].find_one({"_id": account_id})
        return _to_account(doc) if doc else None

    def set_answer_hashes(self, account_id: str, hashes: dict[str, str]) -> Write:
        return self.update(
            ACCOUNTS, {"_id": account_id}, {"$set": {f"answer_hashes.{q}": h for q, h in hashes.items()}}
        )

    def set_email(self, account_id: str, email: str) -> Write:
        return self.update(ACCOUNTS, {"_id": account_id}, {"$set": {"email": email}})

    def set_contact(self, account_id: str, contact: Contact, seen: Contact) -> Write:
        """Apply a contact change decided on `seen`; the commit raises StaleContact if it changed meanwhile."""
        return self.update(
            ACCOUNTS,
            {"_id": account_id, "email": seen.email, "backup_email": seen.backup_email, "phone": seen.phone},
            {"$set": {"email": contact.email, "backup_email": contact.backup_email, "phone": contact.phone}},
            stale=lambda: StaleContact(account_id),
            must_match=True,
        )

    def create_account(self, doc: dict[str, Any]) -> Write:
        return self.insert(ACCOUNTS, doc)

    def update_account(self, account_id: str, fields: dict[str, Any]) -> Write:
        return self.update(ACCOUNTS, {"_id": account_id}, {"$set": fields})

    # ---- operators: key registry, processed commands, e-mail changes --------------------------

    async def operator_keys(self, operator_id: str) -> list[RegisteredKey]:
        docs = self.db[OPERATOR_KEYS].find({"operator_id": operator_id})
        return [
            RegisteredKey(d["_id"], d["operator_id"], d["public_key"], revoked=d.get("revoked_at") is not None)
            async for d in docs
        ]

    async def operator_key(self, key_id: str) -> RegisteredKey | None:
        d = await self.db[OPERATOR_KEYS].find_one({"_id": key_id})
        if d is None:
            return None
        return RegisteredKey(d["_id"], d["operator_id"], d["public_key"], revoked=d.get("revoked_at") is not None)

    def register_operator_key(self, key: RegisteredKey, now: datetime) -> Write:
        return self.insert(
            OPERATOR_KEYS,
            {"_id": key.key_id, "operator_id": key.operator_id, "public_key": key.public_key, "registered_at": now},
        )

    def revoke_operator_key(self, key_id: str, now: datetime) -> Write:
        return self.update(OPERATOR_KEYS, {"_id": key_id}, {"$set": {"revoked_at": now}})

    async def command_seen(self, command_id: str) -> bool:
        return await self.db[COMMANDS].find_one({"_id": command_id}, {"_id": 1}) is not None

    def record_command(self, command_id: str, operator_id: str, now: datetime) -> Write:
        # A second copy racing this one collides here (unique _id): its transaction fails and,
        # retried, is refused as replayed.
        return self.insert(COMMANDS, {"_id": command_id, "operator_id": operator_id, "at": now})

    async def pending_change(self, account_id: str) -> EmailChange | None:
        doc = await self.db[EMAIL_CHANGES].find_one(
            {"account_id": account_id, "status": {"$in": [ChangeStatus.PENDING, ChangeStatus.APPROVED]}}
        )
        return _to_change(doc) if doc else None

    async def email_change(self, change_id: str) -> EmailChange | None:
        doc = await self.db[EMAIL_CHANGES].find_one({"_id": change_id})
        return _to_change(doc) if doc else None

    def add_email_change(self, change: EmailChange) -> Write:
        return self.insert(EMAIL_CHANGES, _change_doc(change))

    def approve_email_change(self, change: EmailChange, effective_at: datetime) -> Write:
        """Record the approval, only on a change still pending (else StaleChange)."""
        change_id = change.change_id
        return self.update(
            EMAIL_CHANGES,
            {"_id": change_id, "status": ChangeStatus.PENDING},
            {
                "$set": {
                    "status": ChangeStatus.APPROVED,
                    "approved_by": change.approved_by,
                    "approved_at": change.approved_at,
                    "effective_at": effective_at,
                }
            },
            stale=lambda: StaleChange(change_id),
            must_match=True,
        )

    def cancel_email_change(self, change: EmailChange, seen_status: str) -> Write:
        """Record the cancellation, only on a change still in the state it was decided on (else
        StaleChange: applied or approved meanwhile, decided again). Applying filters on
        `approved`, so a cancelled change is never applied, whichever commits first."""
        change_id = change.change_id
        return self.update(
            EMAIL_CHANGES,
            {"_id": change_id, "status": seen_status},
            {
                "$set": {
                    "status": ChangeStatus.CANCELLED,
                    "cancelled_by": change.cancelled_by,
                    "cancelled_at": change.cancelled_at,
                }
            },
            stale=lambda: StaleChange(change_id),
            must_match=True,
        )

    async def next_change_due_at(self) -> datetime | None:
        """When the next approved change falls due (one indexed read), or None."""
        doc = await self.db[EMAIL_CHANGES].find_one(
            {"status": ChangeStatus.APPROVED}, {"effective_at": 1}, sort=[("effective_at", 1)]
        )
        return doc["effective_at"] if doc else None

    async def due_changes(self, now: datetime, limit: int = 100) -> list[EmailChange]:
        docs = self.db[EMAIL_CHANGES].find(
            {"status": ChangeStatus.APPROVED, "effective_at": {"$lte": now}}, sort=[("effective_at", 1)], limit=limit
        )
        return [_to_change(d) async for d in docs]

    def mark_change_applied(self, change_id: str, now: datetime) -> Write:
        """Applied once: a second instance applying the same change fails here (StaleChange)."""
        return self.update(
            EMAIL_CHANGES,
            {"_id": change_id, "status": ChangeStatus.APPROVED},
            {"$set": {"status": ChangeStatus.APPLIED, "applied_at": now}},
            stale=lambda: StaleChange(change_id),
            must_match=True,
        )

    # ---- requests ------------------------------------------------------------------------------

    async def request_seen(self, request_id: str) -> bool:
        return await self.db[REQUESTS].find_one({"_id": request_id}, {"_id": 1}) is not None

    def record_request(self, request_id: str, now: datetime) -> Write:
        return self.insert(REQUESTS, {"_id": request_id, "at": now})

    # ---- counters ------------------------------------------------------------------------------

    async def counters(self, keys: CounterKeys) -> Counters:
        """The principal's, the block's and the address's counters, in one round trip."""
        ids = [i for i in (keys.principal_id, keys.block_id, keys.address_id) if i is not None]
        docs = {d["_id"]: d async for d in self.db[COUNTERS].find({"_id": {"$in": ids}})}
        p = docs.get(keys.principal_id)
        b = docs.get(keys.block_id) if keys.block_id else None
        a = docs.get(keys.address_id) if keys.address_id else None
        return Counters(
            PrincipalState(
                rev=int(p.get("rev", 0)) if p else 0,
                failures=_times(p, "failures"),
                mails=_times(p, "mails"),
                notices=_times(p, "notices"),
            ),
            BlockState(
                failures=_times(b, "failures"),
                locked_until=b.get("locked_until") if b else None,
                last_attempt=b.get("last_attempt") if b else None,
            ),
            AddressState(failures=_times(a, "failures")),
        )

    def record_counters(self, keys: CounterKeys, seen: Counters, record: Record, now: datetime) -> list[Write]:
        """One decision's counts: the same three updates on every path (only their contents
        differ), so no path costs the store more than another. The commit raises
        StaleCounters when the principal changed since `seen` was read."""
        expires = now + self.retention
        principal_push = self._push(now, failures=record.principal_failure, mails=record.mail, notices=record.notice)

        def stale() -> Exception:
            return StaleCounters(keys.principal)

        writes = [
            # Upsert on {_id, rev}: a missing document is created (rev 0 → 1); an existing one
            # with another rev makes the insert collide on _id, which is how a race shows.
            self.update(
                COUNTERS,
                {"_id": keys.principal_id, "rev": seen.principal.rev},
                {"$inc": {"rev": 1}, "$set": {"expires_at": expires}, **principal_push},
                upsert=True,
                stale=stale,
                race_codes=RACE_CODES,
            )
        ]
        if keys.block_id is not None and keys.address_id is not None:
            block_expires = max(expires, record.lock_until or expires)
            block_set: dict[str, Any] = {"principal": keys.principal, "expires_at": block_expires}
            if record.lock_until is not None:
                block_set["locked_until"] = record.lock_until
            if record.attempt:
                block_set["last_attempt"] = now
            writes.append(
                self.update(
                    COUNTERS,
                    {"_id": keys.block_id},
                    {"$set": block_set, **self._push(now, failures=record.block_failure)},
                    upsert=True,
                    stale=stale,
                    race_codes=RACE_CODES,
                )
            )
            writes.append(
                self.update(
                    COUNTERS,
                    {"_id": keys.address_id},
                    {"$set": {"expires_at": expires}, **self._push(now, failures=record.address_failure)},
                    upsert=True,
                    stale=stale,
                    race_codes=RACE_CODES,
                )
            )
        return writes

    def _push(self, now: datetime, **fields: bool) -> dict[str, Any]:
        pushes = {name: {"$each": [now], "$slice": -self.keep} for name, on in fields.items() if on}
        return {"$push": pushes} if pushes else {}

    def record_mail(self, keys: CounterKeys, now: datetime) -> Write:
        """A recovery mail sent on an operator's command (counts towards the mailbox limit)."""
        return self.update(
            COUNTERS,
            {"_id": keys.principal_id},
            {"$inc": {"rev": 1}, "$set": {"expires_at": now + self.retention}, **self._push(now, mails=True)},
            upsert=True,
        )

    async def has_lockout_state(self, keys: CounterKeys) -> bool:
        """Any failure or lock on record for the principal (anything an unlock would clear),
        in one read. Every evaluated request leaves a block document (its last attempt): only
        failures or a lock in one are state an unlock clears (slowed mode follows the
        principal's failures)."""
        failed = {"failures.0": {"$exists": True}}
        query = {
            "$or": [
                {"_id": keys.principal_id, **failed},
                {"principal": keys.principal, "$or": [failed, {"locked_until": {"$ne": None}}]},
            ]
        }
        return await self.db[COUNTERS].find_one(query, {"_id": 1}) is not None

    def clear_lockout(self, keys: CounterKeys) -> list[Write]:
        """Forget the principal's failures, locks and slowed mode (mails and notices stay:
        they protect the mailbox, not the account)."""
        return [
            self.update(COUNTERS, {"_id": keys.principal_id}, {"$set": {"failures": []}, "$inc": {"rev": 1}}),
            self.delete(COUNTERS, {"principal": keys.principal}, many=True),
        ]
