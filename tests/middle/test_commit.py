"""`ServiceStore.commit` against a real store (secantusd-py): a handler's whole commit is one
bulk write and the commit (two round trips, counted with pymongo's command monitoring), a
refused intent leaves nothing behind, a redelivered event is refused, and a commit whose reply
was lost (it landed; the retry runs it again) is recognised as done, not doubled."""

from __future__ import annotations

from typing import Any

import pytest

from shared.envelope import new_event
from shared.store import OUTBOX, PROCESSED, DuplicateEvent, Outgoing, ServiceStore
from tests.middle.conftest import listen

COLL = "things"


class Stale(Exception):
    pass


class Store(ServiceStore):
    """A store with one collection and the intent operations the test needs."""

    lose_next_reply = False

    def put(self, key: str, value: int) -> Any:
        return self.update(COLL, {"_id": key}, {"$set": {"value": value}}, upsert=True)

    def move(self, key: str, seen: int, value: int) -> Any:
        return self.update(COLL, {"_id": key, "value": seen}, {"$set": {"value": value}}, stale=Stale, must_match=True)

    def create(self, key: str) -> Any:
        return self.insert(COLL, {"_id": key, "value": 0}, stale=Stale, race_codes=frozenset({11000}))

    async def in_transaction(self, work: Any, *, attempts: int = 8) -> Any:
        if self.lose_next_reply:
            # The commit lands but its reply is lost: the driver's retry runs the work again.
            self.lose_next_reply = False
            await super().in_transaction(work, attempts=attempts)
        return await super().in_transaction(work, attempts=attempts)


def outgoing(n: int = 2) -> list[Outgoing]:
    return [
        Outgoing("t", "k", new_event(type="ec.clave.test.v1", source="/t", data={"i": i}, correlationid="c"))
        for i in range(n)
    ]


@pytest.fixture
async def store(store_uri: str, db_name: str) -> Any:
    s = Store(store_uri, db_name)
    await s.ensure_indexes()
    yield s
    await s.client.drop_database(db_name)
    await s.close()


async def test_a_handler_commit_is_one_bulk_write_and_the_commit(store: Store, store_uri: str) -> None:
    commands = await listen(store, store_uri)
    await store.commit(
        consumer="svc:topic", event_id="e1", writes=[store.put("a", 1), store.put("b", 2)], outgoing=outgoing(3)
    )
    assert [name for _, name, _ in commands.log] == ["bulkWrite", "commitTransaction"]
    assert await store.db[OUTBOX].count_documents({}) == 3
    assert await store.db[PROCESSED].count_documents({"event_id": "e1"}) == 1
    assert {d["_id"]: d["value"] async for d in store.db[COLL].find()} == {"a": 1, "b": 2}


async def test_a_refused_intent_aborts_everything(store: Store) -> None:
    await store.commit(consumer=None, event_id=None, writes=[store.put("a", 1)], outgoing=[])
    with pytest.raises(Stale):
        await store.commit(
            consumer="svc:topic", event_id="e2", writes=[store.put("b", 5), store.move("a", 7, 8)], outgoing=outgoing()
        )
    with pytest.raises(Stale):  # a race code on a write (here a duplicate key) refuses too
        await store.commit(consumer="svc:topic", event_id="e3", writes=[store.create("a")], outgoing=outgoing())
    assert await store.db[OUTBOX].count_documents({}) == 0
    assert await store.db[PROCESSED].count_documents({}) == 0
    assert {d["_id"]: d["value"] async for d in store.db[COLL].find()} == {"a": 1}
    await store.commit(consumer="svc:topic", event_id="e2", writes=[store.move("a", 1, 8)], outgoing=[])
    assert (await store.db[COLL].find_one({"_id": "a"}) or {})["value"] == 8


async def test_a_redelivered_event_is_refused(store: Store) -> None:
    await store.commit(consumer="svc:topic", event_id="e1", writes=[store.put("a", 1)], outgoing=outgoing())
    with pytest.raises(DuplicateEvent):
        await store.commit(consumer="svc:topic", event_id="e1", writes=[store.put("a", 2)], outgoing=outgoing())
    assert (await store.db[COLL].find_one({"_id": "a"}) or {})["value"] == 1
    assert await store.db[OUTBOX].count_documents({}) == 2


@pytest.mark.parametrize("consumer", ["svc:topic", None])
async def test_a_commit_whose_reply_was_lost_is_done_once(store: Store, consumer: str | None) -> None:
    store.lose_next_reply = True
    event_id = "e1" if consumer else None
    await store.commit(
        consumer=consumer, event_id=event_id, writes=[store.create("fresh")], outgoing=outgoing(2)
    )  # no DuplicateEvent, no Stale: its own earlier landing is recognised
    assert not store.lose_next_reply
    assert await store.db[OUTBOX].count_documents({}) == 2
    assert await store.db[COLL].count_documents({}) == 1
