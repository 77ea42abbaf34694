"""An in-memory MongoDB for the services' real stores: the middle layer's store.

The stores are not re-implemented: each service's own store class (its intent operations, its
reads, `ServiceStore.commit` with its lost-reply recovery) runs unchanged over `MemoryClient`,
a stand-in for pymongo's `AsyncMongoClient` that keeps the data in mongomock (a library that
evaluates MongoDB queries and updates in memory). So the in-memory store implements exactly the
same intents as the real one, by construction. What the stand-in adds:
- client `bulkWrite` (what `ServiceStore.apply` sends), with pymongo's error shape;
- transactions: a snapshot on start, restored on abort (one transaction at a time);
- faults, injected where the driver would raise them: the store away (`down`), the next
  operations failing with a given error (`fail_next`), a commit that lands but whose reply is
  lost (`lose_commit_replies`).

What it does not do: change streams. `watch` fails as on a standalone server, so the outbox
relay runs here as it would there: woken by its own service's commits, polling for the rest
(its change-stream behaviour is tested against a real store, tests/middle/test_relay*.py).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import mongomock
from pymongo import DeleteMany, DeleteOne, InsertOne, ReplaceOne, UpdateMany, UpdateOne
from pymongo.errors import AutoReconnect, ClientBulkWriteException, OperationFailure, ServerSelectionTimeoutError

from shared.store import ServiceStore


@dataclass
class MemoryMongo:
    """One in-memory server, shared by every client of a test (and its fault switches)."""

    server: mongomock.MongoClient = field(default_factory=lambda: mongomock.MongoClient(tz_aware=True))
    up: bool = True
    # Errors the next operations raise, in order (an operation name, or "*" for any).
    failures: list[tuple[str, BaseException]] = field(default_factory=list)
    lost_replies: int = 0  # commits still to land with their reply lost
    calls: Counter[str] = field(default_factory=Counter)
    commits: int = 0  # transactions committed (landed)
    in_transaction: bool = False

    def down(self) -> None:
        self.up = False

    def back(self) -> None:
        self.up = True

    def fail_next(self, operation: str, error: BaseException, times: int = 1) -> None:
        self.failures.extend([(operation, error)] * times)

    def lose_commit_replies(self, times: int = 1) -> None:
        self.lost_replies += times

    def check(self, operation: str) -> None:
        """Called by every operation before it runs: the injected faults."""
        self.calls[operation] += 1
        if not self.up:
            raise ServerSelectionTimeoutError("memory store: down")
        for i, (name, error) in enumerate(self.failures):
            if name in (operation, "*"):
                del self.failures[i]
                raise error

    def snapshot(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        return {
            (db, name): copy.deepcopy(list(self.server[db][name].find()))
            for db in self.server.list_database_names()
            for name in self.server[db].list_collection_names()
        }

    def restore(self, snap: dict[tuple[str, str], list[dict[str, Any]]]) -> None:
        for db in self.server.list_database_names():
            for name in self.server[db].list_collection_names():
                coll = self.server[db][name]
                coll.delete_many({})
                docs = snap.get((db, name), [])
                if docs:
                    coll.insert_many(copy.deepcopy(docs))


class MemoryCursor:
    """A mongomock cursor, awaited as pymongo's async cursor is (read when iterated)."""

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def sort(self, *args: Any, **kwargs: Any) -> MemoryCursor:
        self._cursor.sort(*args, **kwargs)
        return self

    def limit(self, n: int) -> MemoryCursor:
        self._cursor.limit(n)
        return self

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[dict[str, Any]]:
        for doc in list(self._cursor):
            yield doc

    async def to_list(self, length: int | None = None) -> list[dict[str, Any]]:
        docs = list(self._cursor)
        return docs if length is None else docs[:length]


def _no_session(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs.pop("session", None)
    return kwargs


class MemoryCollection:
    """The collection methods the stores await, over a mongomock collection."""

    def __init__(self, mongo: MemoryMongo, db: str, name: str) -> None:
        self.mongo = mongo
        self.name = name
        self._coll = mongo.server[db][name]

    def _run(self, operation: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.mongo.check(operation)
        return fn(*args, **_no_session(kwargs))

    async def create_index(self, keys: Any, **kwargs: Any) -> str:
        return str(self._run("createIndexes", self._coll.create_index, keys, **kwargs))

    async def find_one(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        doc = self._run("find", self._coll.find_one, *args, **kwargs)
        return dict(doc) if doc is not None else None

    def find(self, *args: Any, **kwargs: Any) -> MemoryCursor:
        return MemoryCursor(self._run("find", self._coll.find, *args, **kwargs))

    async def count_documents(self, *args: Any, **kwargs: Any) -> int:
        return int(self._run("count", self._coll.count_documents, *args, **kwargs))

    async def distinct(self, *args: Any, **kwargs: Any) -> list[Any]:
        return list(self._run("distinct", self._coll.distinct, *args, **kwargs))

    async def find_one_and_update(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        return self._run("findAndModify", self._coll.find_one_and_update, *args, **kwargs)  # type: ignore[no-any-return]

    async def update_one(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("update", self._coll.update_one, *args, **kwargs)

    async def update_many(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("update", self._coll.update_many, *args, **kwargs)

    async def replace_one(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("update", self._coll.replace_one, *args, **kwargs)

    async def insert_one(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("insert", self._coll.insert_one, *args, **kwargs)

    async def insert_many(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("insert", self._coll.insert_many, *args, **kwargs)

    async def delete_one(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("delete", self._coll.delete_one, *args, **kwargs)

    async def delete_many(self, *args: Any, **kwargs: Any) -> Any:
        return self._run("delete", self._coll.delete_many, *args, **kwargs)

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        # What a standalone server answers: the relay then polls (FALLBACK_POLL_S) besides
        # being woken by its own service's commits.
        self.mongo.check("aggregate")
        raise OperationFailure("memory store: no change streams", code=40573)


class MemoryDatabase:
    def __init__(self, mongo: MemoryMongo, name: str) -> None:
        self.mongo = mongo
        self.name = name

    def __getitem__(self, collection: str) -> MemoryCollection:
        return MemoryCollection(self.mongo, self.name, collection)

    async def command(self, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.mongo.check(name)
        return {"ok": 1.0}


@dataclass
class _Matched:
    matched_count: int
    upserted_id: Any = None


@dataclass
class _Deleted:
    deleted_count: int


@dataclass
class BulkResult:
    """The parts of pymongo's ClientBulkWriteResult that `ServiceStore.apply` reads."""

    update_results: dict[int, _Matched] = field(default_factory=dict)
    delete_results: dict[int, _Deleted] = field(default_factory=dict)


class _Transaction:
    def __init__(self, mongo: MemoryMongo) -> None:
        self.mongo = mongo
        self.snap: dict[tuple[str, str], list[dict[str, Any]]] = {}

    async def __aenter__(self) -> _Transaction:
        self.mongo.check("startTransaction")
        assert not self.mongo.in_transaction, "the memory store runs one transaction at a time"
        self.mongo.in_transaction = True
        self.snap = self.mongo.snapshot()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.mongo.in_transaction = False
        if exc is not None:
            self.mongo.restore(self.snap)  # abortTransaction
            return
        try:
            self.mongo.check("commitTransaction")
        except BaseException:
            self.mongo.restore(self.snap)
            raise
        self.mongo.commits += 1
        if self.mongo.lost_replies:
            # The commit landed; its reply did not reach the client (what pymongo raises then).
            self.mongo.lost_replies -= 1
            error = AutoReconnect("memory store: connection closed after commitTransaction")
            error._add_error_label("UnknownTransactionCommitResult")
            raise error


class _Session:
    def __init__(self, mongo: MemoryMongo) -> None:
        self.mongo = mongo

    async def __aenter__(self) -> _Session:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def start_transaction(self) -> _Transaction:
        return _Transaction(self.mongo)


class MemoryClient:
    """What the stores use of `AsyncMongoClient`: databases, `admin.command("ping")`,
    sessions with transactions, client `bulk_write`, `close`."""

    def __init__(self, mongo: MemoryMongo) -> None:
        self.mongo = mongo
        self.admin = MemoryDatabase(mongo, "admin")

    def __getitem__(self, name: str) -> MemoryDatabase:
        return MemoryDatabase(self.mongo, name)

    def start_session(self) -> _Session:
        return _Session(self.mongo)

    async def close(self) -> None:
        return None

    async def drop_database(self, name: str) -> None:
        self.mongo.server.drop_database(name)

    async def bulk_write(self, models: list[Any], session: Any = None, ordered: bool = True, **_: Any) -> BulkResult:
        """Apply the writes in order, stopping at the first error, as an ordered client bulkWrite."""
        self.mongo.check("bulkWrite")
        result = BulkResult()
        for i, op in enumerate(models):
            db, _, name = op._namespace.partition(".")
            coll = self.mongo.server[db][name]
            try:
                _apply(coll, op, i, result)
            except OperationFailure as exc:
                details = {
                    "writeErrors": [{"idx": i, "code": exc.code, "errmsg": str(exc)}],
                    "anySuccessful": i > 0,
                }
                raise ClientBulkWriteException(details, True) from None
        return result


def _apply(coll: Any, op: Any, i: int, result: BulkResult) -> None:
    if isinstance(op, InsertOne):
        coll.insert_one(op._doc)
    elif isinstance(op, UpdateOne | UpdateMany | ReplaceOne):
        method = {UpdateOne: coll.update_one, UpdateMany: coll.update_many, ReplaceOne: coll.replace_one}[type(op)]
        r = method(op._filter, op._doc, upsert=bool(op._upsert))
        result.update_results[i] = _Matched(r.matched_count, r.upserted_id)
    elif isinstance(op, DeleteOne | DeleteMany):
        r = (coll.delete_one if isinstance(op, DeleteOne) else coll.delete_many)(op._filter)
        result.delete_results[i] = _Deleted(r.deleted_count)
    else:  # pragma: no cover - a new kind of Write
        raise TypeError(f"memory store: no {type(op).__name__}")


async def in_memory(store: ServiceStore, mongo: MemoryMongo) -> ServiceStore:
    """Move a service's store (the very object its handlers hold) onto the in-memory server."""
    name = store.db.name
    await store.client.close()  # never connected: pymongo connects on the first operation
    store.client = MemoryClient(mongo)  # type: ignore[assignment]
    store.db = store.client[name]  # type: ignore[assignment]
    return store
