"""The password service's login intents against a real store (secantusd-py): one credential
check's counters, rehash and outbox events are one bulk write and the commit; a check decided
on counters another check changed meanwhile is refused (StaleCounters) and leaves nothing
behind; a new key clears the principal's wrong guesses in the same commit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.password.domain import KeyHistory, KeyRecord
from services.password.store import LOGIN_COUNTERS, CounterKeys, CredentialStore, StaleCounters
from shared.envelope import new_event
from shared.store import OUTBOX, PROCESSED, Outgoing
from tests.middle.conftest import listen

KEYS = CounterKeys(principal="s:principal-ref", block_ref="block-ref")
WRONG = KeyRecord(principal_failure=True, block_failure=True, address_failure=True)


def answer() -> list[Outgoing]:
    event = new_event(type="ec.clave.login.result.v1", source="/t", data={"check_id": "c1"}, correlationid="c1")
    return [Outgoing("login.results", "c1", event)]


@pytest.fixture
async def store(store_uri: str, db_name: str) -> Any:
    s = CredentialStore(store_uri, db_name, keep=4, retention=timedelta(hours=1))
    await s.ensure_indexes()
    yield s
    await s.client.drop_database(db_name)
    await s.close()


async def failures(store: CredentialStore) -> dict[str, int]:
    return {d["_id"]: len(d.get("failures", [])) async for d in store.db[LOGIN_COUNTERS].find()}


async def test_a_check_is_one_bulk_write_and_the_commit(store: CredentialStore, store_uri: str) -> None:
    now = datetime.now(UTC)
    await store.commit(
        consumer=None,
        event_id=None,
        writes=store.save("acc-1", KeyHistory(current="old-hash"), now, national_id="1710034065"),
        outgoing=[],
    )
    commands = await listen(store, store_uri)
    seen = await store.key_counters(KEYS)
    writes = [*store.record_key_check(KEYS, seen, WRONG, now), store.rehash("acc-1", "old-hash", "new-hash")]
    await store.commit(consumer="password:login.checks", event_id="e1", writes=writes, outgoing=answer())
    assert [name for _, name, _ in commands.log] == ["find", "bulkWrite", "commitTransaction"]
    assert await failures(store) == {KEYS.principal_id: 1, KEYS.block_id: 1, KEYS.address_id: 1}
    assert (await store.credential("acc-1")).history.current == "new-hash"  # type: ignore[union-attr]
    assert (await store.key_counters(KEYS)).rev == 1


async def test_a_check_decided_on_changed_counters_is_refused(store: CredentialStore) -> None:
    now = datetime.now(UTC)
    seen = await store.key_counters(KEYS)  # both checks read rev 0
    await store.commit(consumer=None, event_id=None, writes=store.record_key_check(KEYS, seen, WRONG, now), outgoing=[])
    with pytest.raises(StaleCounters):
        await store.commit(
            consumer="password:login.checks",
            event_id="e2",
            writes=store.record_key_check(KEYS, seen, WRONG, now),
            outgoing=answer(),
        )
    assert await failures(store) == {KEYS.principal_id: 1, KEYS.block_id: 1, KEYS.address_id: 1}
    assert await store.db[OUTBOX].count_documents({}) == 0
    assert await store.db[PROCESSED].count_documents({}) == 0
    fresh = await store.key_counters(KEYS)  # decided again on what is there: counted
    await store.commit(
        consumer=None, event_id=None, writes=store.record_key_check(KEYS, fresh, WRONG, now), outgoing=[]
    )
    assert await failures(store) == {KEYS.principal_id: 2, KEYS.block_id: 2, KEYS.address_id: 2}


async def test_a_new_key_clears_the_principals_wrong_guesses(store: CredentialStore) -> None:
    now = datetime.now(UTC)
    seen = await store.key_counters(KEYS)
    await store.commit(consumer=None, event_id=None, writes=store.record_key_check(KEYS, seen, WRONG, now), outgoing=[])
    writes = store.save("acc-1", KeyHistory(current="h2"), now, token_id="tok-1")
    writes += store.clear_key_failures(KEYS.principal)
    await store.commit(consumer="password:tokens.redeemed", event_id="e3", writes=writes, outgoing=[])
    counters = await failures(store)
    assert counters == {KEYS.principal_id: 0, KEYS.address_id: 1}  # the block's document is gone
    assert await store.token_used("tok-1")
