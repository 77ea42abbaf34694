"""The Mongo side every service shares: connection, transactions, the
idempotent-consumer record and the transactional outbox.

A handler's state change, the record that its incoming event was processed,
and the events it publishes are written in ONE multi-document transaction, as ONE
client bulk write (the `bulkWrite` command, every collection at once) plus the commit:
two store round trips, whatever the handler writes. The handler never writes itself:
each store offers intent-named operations (`TokenStore.reserve`, ...) that return a
`Write`, and the handler hands them to `ctx.commit(...)`.
The relay (shared.relay) then publishes the outbox to Kafka. A crash at any
point therefore neither loses nor doubles an effect: either all of it is
stored, or none, and the incoming event is redelivered.

A transaction whose commit reply is lost (the store restarts, the connection
drops) may or may not have committed. `in_transaction` runs it again; `commit`
makes that safe: the outbox documents (with their `_id`s) and a `commit_id` are
made once per call, so a re-run after a commit that did land collides with its
own earlier writes, and that collision is recognised as success instead of
being taken for a duplicate event (or, worse, writing the events twice).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from bson import ObjectId
from pymongo import (
    ASCENDING,
    AsyncMongoClient,
    DeleteMany,
    DeleteOne,
    InsertOne,
    ReplaceOne,
    UpdateMany,
    UpdateOne,
    monitoring,
)
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from pymongo.results import ClientBulkWriteResult

from shared.envelope import CONTENT_TYPE, CloudEvent

log = logging.getLogger(__name__)
T = TypeVar("T")

PROCESSED = "processed_events"
OUTBOX = "outbox"
LEASES = "leases"
OUTBOX_KEEP_S = 7 * 24 * 3600


# What any store operation raises when the store fails (handlers catch this name: they never
# import the driver).
StoreError = PyMongoError


class DuplicateEvent(Exception):
    """This consumer already processed this event id."""


Operation = InsertOne[Any] | UpdateOne | UpdateMany | ReplaceOne[Any] | DeleteOne | DeleteMany
DUPLICATE_KEY = 11000
_DUPLICATE = frozenset({DUPLICATE_KEY})
Refusal = Callable[[], Exception]


@dataclass(frozen=True)
class Write:
    """One staged write of a store's intent operation, applied by `ServiceStore.commit` in
    the handler's transaction together with every other staged write (one bulk write).
    Made by `ServiceStore.insert/update/replace/delete`, inside a store module only.

    `stale`: the exception that aborts the transaction when the write did not apply to the
    state the decision was made on: with `must_match`, the write matched no document (a
    conditional move whose document moved meanwhile); or it failed with one of `race_codes`
    (an upsert on a revision another writer bumped). Handlers take that as "decide again"."""

    collection: str
    op: Operation
    stale: Refusal | None = None
    must_match: bool = False
    race_codes: frozenset[int] = frozenset()

    def refused(self, code: object) -> Exception | None:
        if self.stale is not None and code in self.race_codes:
            return self.stale()
        return None


def _as_writes(writes: Iterable[Write]) -> list[Write]:
    return list(writes)


# A handler's writes: its store's intent operations' `Write`s (every handler and loop stages
# them; none writes through a session of its own).
Writes = Sequence[Write] | None


@dataclass
class Outgoing:
    """An event waiting in the outbox for the relay."""

    topic: str
    key: str
    event: CloudEvent
    headers: dict[str, str] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        return {
            "_id": ObjectId(),  # monotonic per process: the relay publishes in this order
            "event_id": self.event.id,
            "topic": self.topic,
            "key": self.key,
            "value": self.event.to_bytes(),
            "headers": {"content-type": CONTENT_TYPE, **self.headers},
            "is_audit": self.event.type.startswith("ec.clave.audit."),
            "created_at": datetime.now(UTC),
            "sent": False,
        }


# Server error codes that mean "not now" rather than "never": write conflict, a transaction
# the server no longer knows (it restarted), and the codes MongoDB drivers retry (node
# shutting down or interrupted, not primary, network).
TRANSIENT_CODES = frozenset({112, 251, 6, 7, 89, 91, 134, 189, 262, 9001, 10058, 10107, 11600, 11602, 13435, 13436})


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientBulkWriteException):
        # A client bulkWrite reports what stopped it as its top-level `error` (the connection
        # lost, the server shutting down) or in its write errors; the exception itself always has
        # code 65 and no labels. Unread, a store restart in the middle of a bulk write was taken
        # for a fault of the item (a mail failed for good, a record counted towards its DLQ).
        return _bulk_write_transient(exc)
    if isinstance(exc, PyMongoError) and (
        exc.has_error_label("TransientTransactionError") or exc.has_error_label("UnknownTransactionCommitResult")
    ):
        return True
    if isinstance(exc, OperationFailure) and exc.code in TRANSIENT_CODES:
        return True
    return isinstance(exc, ConnectionFailure)


def _bulk_write_transient(exc: ClientBulkWriteException) -> bool:
    error = exc.error
    if isinstance(error, BaseException):
        return is_transient(error) or isinstance(error, OSError | TimeoutError)
    if isinstance(error, Mapping) and _transient_document(error):
        return True
    others = [*(exc.write_concern_errors or []), *(exc.write_errors or [])]
    return bool(others) and all(isinstance(e, Mapping) and _transient_document(e) for e in others)


def _transient_document(error: Mapping[str, Any]) -> bool:
    """A server's error document (a command's `ok: 0` reply, a write error) that says retry."""
    labels = error.get("errorLabels") or ()
    return error.get("code") in TRANSIENT_CODES or "TransientTransactionError" in labels


class _OutboxCollision(Exception):
    """An outbox `_id` of this commit is there already: an earlier attempt landed."""


def _matched(result: ClientBulkWriteResult, index: int) -> int:
    if index in result.update_results:
        upd = result.update_results[index]
        return upd.matched_count + (1 if upd.upserted_id is not None else 0)
    if index in result.delete_results:
        return result.delete_results[index].deleted_count
    return 1


class CommandCounter(monitoring.CommandListener):
    """Counts the commands this client sends (store round trips), by command name only, for
    `clave_store_commands_total`: what the service costs its store, idle or busy. The
    driver's own heartbeats are not commands and are not counted."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        return None

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return None


class ServiceStore:
    """Base of every service's repository: one database per service."""

    def __init__(self, uri: str, db_name: str) -> None:
        self.commands = CommandCounter()
        self.client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            uri,
            tz_aware=True,
            serverSelectionTimeoutMS=5000,
            connectTimeoutMS=5000,
            event_listeners=[self.commands],
        )
        self.db: AsyncDatabase[dict[str, Any]] = self.client[db_name]

    async def ensure_indexes(self) -> None:
        """Create every index at start-up: an unindexed query scans the collection."""
        await self.db[PROCESSED].create_index([("consumer", ASCENDING), ("event_id", ASCENDING)], unique=True)
        await self.db[PROCESSED].create_index("processed_at", expireAfterSeconds=30 * 24 * 3600)
        await self.db[OUTBOX].create_index([("sent", ASCENDING), ("_id", ASCENDING)])
        await self.db[OUTBOX].create_index("sent_at", expireAfterSeconds=OUTBOX_KEEP_S)
        await self.ensure_service_indexes()

    async def ensure_service_indexes(self) -> None:  # pragma: no cover - overridden
        return None

    async def ping(self) -> bool:
        try:
            await self.client.admin.command("ping")
            return True
        except PyMongoError:
            return False

    async def close(self) -> None:
        await self.client.close()

    async def in_transaction(self, work: Callable[[AsyncClientSession], Awaitable[T]], *, attempts: int = 8) -> T:
        """Run `work` in a transaction, retrying transient failures (write conflicts, failover)."""
        delay = 0.05
        for attempt in range(1, attempts + 1):
            try:
                async with self.client.start_session() as session:
                    async with await session.start_transaction():
                        return await work(session)
            except DuplicateKeyError:
                raise
            except PyMongoError as exc:
                if attempt == attempts or not is_transient(exc):
                    raise
                log.warning("transient store error (attempt %d): %s", attempt, exc.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    # ---- staged writes (for the intent operations of the service stores) -------------------

    def _ns(self, collection: str) -> str:
        return f"{self.db.name}.{collection}"

    def insert(
        self,
        collection: str,
        doc: dict[str, Any],
        *,
        stale: Refusal | None = None,
        race_codes: frozenset[int] = frozenset(),
    ) -> Write:
        return Write(collection, InsertOne(doc, namespace=self._ns(collection)), stale=stale, race_codes=race_codes)

    def update(
        self,
        collection: str,
        query: dict[str, Any],
        update: dict[str, Any],
        *,
        upsert: bool = False,
        many: bool = False,
        stale: Refusal | None = None,
        must_match: bool = False,
        race_codes: frozenset[int] = frozenset(),
    ) -> Write:
        ns = self._ns(collection)
        op = (
            UpdateMany(query, update, upsert=upsert, namespace=ns)
            if many
            else UpdateOne(query, update, upsert=upsert, namespace=ns)
        )
        return Write(collection, op, stale=stale, must_match=must_match, race_codes=race_codes)

    def replace(self, collection: str, query: dict[str, Any], doc: dict[str, Any], *, upsert: bool = False) -> Write:
        return Write(collection, ReplaceOne(query, doc, upsert=upsert, namespace=self._ns(collection)))

    def delete(self, collection: str, query: dict[str, Any], *, many: bool = False) -> Write:
        ns = self._ns(collection)
        return Write(collection, DeleteMany(query, namespace=ns) if many else DeleteOne(query, namespace=ns))

    async def commit(
        self,
        *,
        consumer: str | None,
        event_id: str | None,
        writes: Writes,
        outgoing: list[Outgoing],
    ) -> None:
        """Mark the event processed, apply the writes and queue the outgoing events, atomically:
        one bulk write and the commit.

        Safe to retry after a lost commit reply: see the module docstring."""
        commit_id = ObjectId()
        docs = [o.to_document() for o in outgoing]  # made once: a re-run reuses these `_id`s
        batch: list[Write] = []
        if consumer is not None and event_id is not None:
            processed = {
                "consumer": consumer,
                "event_id": event_id,
                "commit_id": commit_id,
                "processed_at": datetime.now(UTC),
            }
            duplicate = event_id
            batch.append(
                self.insert(PROCESSED, processed, stale=lambda: DuplicateEvent(duplicate), race_codes=_DUPLICATE)
            )
        # Before the writes: a re-run of a commit that landed stops here, on its own _ids.
        batch.extend(self.insert(OUTBOX, d, stale=_OutboxCollision, race_codes=_DUPLICATE) for d in docs)
        if writes is not None:
            batch.extend(_as_writes(writes))

        async def work(session: AsyncClientSession) -> None:
            if batch:
                await self.apply(batch, session)

        try:
            await self.in_transaction(work)
        except DuplicateEvent:
            if consumer is not None and await self._landed_processed(consumer, event_id, commit_id):
                log.warning("commit of %s/%s had landed before its reply was lost", consumer, event_id)
                return
            raise
        except (_OutboxCollision, DuplicateKeyError, BulkWriteError):
            if docs and await self.db[OUTBOX].find_one({"_id": docs[0]["_id"]}, {"_id": 1}) is not None:
                log.warning("commit of %d outbox events had landed before its reply was lost", len(docs))
                return
            raise

    async def apply(self, batch: Sequence[Write], session: AsyncClientSession | None = None) -> ClientBulkWriteResult:
        """Apply staged writes as one `bulkWrite` (ordered: it stops at the first error), then
        refuse those that found their document moved. In a transaction, a refusal aborts it."""
        try:
            result = await self.client.bulk_write(
                [w.op for w in batch], session=session, ordered=True, verbose_results=True
            )
        except ClientBulkWriteException as exc:
            errors: list[dict[str, Any]] = list((exc.details or {}).get("writeErrors") or [])
            if errors:
                idx = int(errors[0].get("idx", -1))
                refusal = batch[idx].refused(errors[0].get("code")) if 0 <= idx < len(batch) else None
                if refusal is not None:
                    raise refusal from None
            raise
        for i, write in enumerate(batch):
            if write.must_match and write.stale is not None and _matched(result, i) < 1:
                raise write.stale()
        return result

    async def _landed_processed(self, consumer: str, event_id: str | None, commit_id: ObjectId) -> bool:
        """Was the processed-event record written by this very commit call (an earlier attempt)?"""
        doc = await self.db[PROCESSED].find_one({"consumer": consumer, "event_id": event_id}, {"commit_id": 1})
        return doc is not None and doc.get("commit_id") == commit_id

    async def was_processed(self, consumer: str, event_id: str) -> bool:
        doc = await self.db[PROCESSED].find_one({"consumer": consumer, "event_id": event_id}, {"_id": 1})
        return doc is not None
