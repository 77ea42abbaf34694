"""The outbox relay against a real store (a private secantusd-py) with a stand-in Kafka
producer: what it costs the store when idle, how it is woken, and its lease."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest

from shared import relay as relay_module
from shared.audit import audit_event
from shared.envelope import new_event
from shared.metrics import ServiceMetrics
from shared.relay import LEASE_S, LINGER_S, SAFETY_POLL_S, OutboxRelay
from shared.schemas import AuditRecord
from shared.settings import PlatformSettings
from shared.store import LEASES, OUTBOX, Outgoing, ServiceStore
from tests.middle.conftest import Commands, listen

IDLE_WINDOW_S = 11.0  # longer than one change-stream wait (WATCH_AWAIT_S)


class FakeProducer:
    """Records what the relay sends, in order (aiokafka's send returns a future)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.sent_at: list[float] = []  # time.monotonic() of each send

    async def send(self, topic: str, *, value: bytes, key: bytes, headers: list[Any]) -> asyncio.Future[None]:
        self.sent.append((topic, value))
        self.sent_at.append(time.monotonic())
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def stop(self) -> None:
        return None

    def ids(self) -> list[str]:
        import json

        return [json.loads(v)["id"] for _, v in self.sent]


async def until(check: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> float:
    """Wait for `check` (polled every 20 ms) with a deadline; the seconds it took."""
    t0 = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.02)


def outgoing(n: int = 1) -> list[Outgoing]:
    return [
        Outgoing(
            topic="test.events",
            key="k",
            event=new_event(type="ec.clave.test.v1", source="/clave/test", data={"i": i}, correlationid="c"),
        )
        for i in range(n)
    ]


class Instance:
    """One service instance's store client and relay."""

    def __init__(self, uri: str, db: str) -> None:
        self.store = ServiceStore(uri, db)
        self.producer = FakeProducer()
        self.relay = OutboxRelay("test", self.store, PlatformSettings(clave_env="development"), ServiceMetrics("test"))
        self.commands: Commands | None = None
        self.uri = uri

    async def start(self, *, listen_commands: bool = False) -> Instance:
        if listen_commands:
            self.commands = await listen(self.store, self.uri)
        await self.store.ensure_indexes()
        await self.relay.start(self.producer)
        return self

    async def commit(self, n: int = 1, *, wake: bool = True) -> list[str]:
        events = outgoing(n)
        await self.store.commit(consumer=None, event_id=None, writes=None, outgoing=events)
        if wake:
            self.relay.wake()
        return [o.event.id for o in events]

    async def stop(self) -> None:
        await self.relay.stop()
        await self.store.close()


@pytest.fixture
async def instances(store_uri: str, db_name: str) -> AsyncIterator[Callable[[], Instance]]:
    made: list[Instance] = []

    def make() -> Instance:
        made.append(Instance(store_uri, db_name))
        return made[-1]

    yield make
    for inst in made:
        await inst.stop()


async def quiet(inst: Instance) -> None:
    """Idle means: the lease has been given back, and the change stream's getMore that is now
    waiting in the store was sent after the last other command (the store wakes waiting
    getMores on any write, so the one before the lease's release has been answered)."""

    def idle() -> bool:
        if inst.relay.holding or not inst.relay._watching:
            return False
        if inst.commands is None:
            return True
        log = inst.commands.log
        others = [t for t, name, _ in log if name != "getMore"]
        return bool(log) and log[-1][1] == "getMore" and (not others or log[-1][0] > others[-1])

    await until(idle, LINGER_S + 10, "relay idle")


async def test_an_idle_relay_costs_its_store_almost_nothing(instances: Callable[[], Instance]) -> None:
    a = await instances().start(listen_commands=True)
    published = await a.commit(2)
    await until(lambda: a.producer.ids() == published, 5, "first events published")
    await quiet(a)
    assert a.commands is not None
    counted0 = sum(a.store.commands.counts.values())
    t0 = time.monotonic()
    await asyncio.sleep(IDLE_WINDOW_S)  # the measurement window itself, not a synchronisation
    idle = a.commands.since(t0)
    rate = sum(idle.values()) / IDLE_WINDOW_S
    # Before: a find and a lease write every 0.5 s, 4 round trips a second. Now: one change-
    # stream getMore per WATCH_AWAIT_S, and a safety read per SAFETY_POLL_S.
    assert rate <= 0.25, f"{rate:.2f} store round trips/s while idle: {dict(idle)}"
    assert a.commands.on(LEASES, "update", t0) == 0, "an idle relay renews no lease"
    # The metric's counter saw the same commands.
    assert sum(a.store.commands.counts.values()) - counted0 == sum(idle.values())


async def test_a_wake_with_nothing_to_publish_costs_one_read(instances: Callable[[], Instance]) -> None:
    a = await instances().start(listen_commands=True)
    assert a.commands is not None
    await quiet(a)
    t0 = time.monotonic()
    for _ in range(5):  # e.g. the tokens sweeper wakes the relay every 5 s, most often for nothing
        a.relay.wake()
        # Back asleep: its turn for this wake is over, with whatever (wrong) write it made.
        await until(lambda: asleep(a.relay), 5, "wake handled")
    sent = a.commands.since(t0)
    assert sent.get("find", 0) <= 5, dict(sent)
    assert a.commands.on(LEASES, "update", t0) == 0 and a.commands.on(LEASES, "delete", t0) == 0, dict(sent)


def published(inst: Instance, n: int) -> bool:
    return len(inst.producer.ids()) == n


def asleep(relay: OutboxRelay) -> bool:
    """The relay waits for a wake: the wake was taken (cleared at the start of a turn) and
    the turn ended in its wait (asyncio.Event keeps its waiters)."""
    return not relay._wake.is_set() and bool(getattr(relay._wake, "_waiters", None))


async def test_another_process_commit_is_published_without_a_wake(instances: Callable[[], Instance]) -> None:
    a = await instances().start()
    await quiet(a)
    other = ServiceStore(a.uri, a.store.db.name)  # `clave accounts import`, or a second instance
    try:
        events = outgoing(3)
        await other.commit(consumer=None, event_id=None, writes=None, outgoing=events)
        took = await until(lambda: len(a.producer.ids()) == 3, 5, "events of another process published")
    finally:
        await other.close()
    assert a.producer.ids() == [o.event.id for o in events]
    # The safety poll is SAFETY_POLL_S: only the change stream can have been this quick.
    assert took < SAFETY_POLL_S / 3, f"published after {took:.1f}s"


async def test_instance_b_commits_while_a_holds_the_lease(
    instances: Callable[[], Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both instances live in this one process: owner_is_dead would take A (our own pid, another
    # nonce) for an earlier run of ours and let B take over. Two processes never see that.
    monkeypatch.setattr(relay_module, "owner_is_dead", lambda owner: False)
    a = await instances().start()
    b = await instances().start()
    await until(lambda: a.relay._watching and b.relay._watching, 10, "change streams open")
    first = await a.commit()  # both see it (A by its wake, B by its stream): one takes the lease
    await until(lambda: a.producer.ids() + b.producer.ids() == first, 5, "the first event published")
    holder, committer = (a, b) if a.relay.holding else (b, a)
    assert holder.relay.holding and not committer.relay.holding, "one lease, held while lingering"
    second = await committer.commit()  # woken, it cannot take the lease: the holder must publish it
    took = await until(lambda: second[0] in a.producer.ids() + b.producer.ids(), 5, "the second event published")
    # The holder's next read while busy, or its change stream once it gives the lease back.
    assert took < LINGER_S + 1.5
    assert sorted(a.producer.ids() + b.producer.ids()) == sorted(first + second), "each published exactly once"


async def test_the_lease_is_renewed_on_a_timer_not_per_cycle(instances: Callable[[], Instance]) -> None:
    a = await instances().start(listen_commands=True)
    assert a.commands is not None
    await quiet(a)
    t0 = time.monotonic()
    ids: list[str] = []
    for _ in range(20):  # 20 separate commits, each waking the relay, each published
        ids += await a.commit()
        await until(partial(published, a, len(ids)), 5, "commit published")
    busy_s = time.monotonic() - t0
    assert a.producer.ids() == ids
    lease_writes = a.commands.on(LEASES, "update", t0)
    # While busy the change stream is paused: at most the getMore already waiting, answered.
    assert a.commands.since(t0)["getMore"] <= 2, dict(a.commands.since(t0))
    # One to take it, then one per RENEW_S of work (before: one per cycle, here >= 20).
    assert lease_writes <= 1 + int(busy_s / relay_module.RENEW_S) + 1, f"{lease_writes} lease writes in {busy_s:.1f}s"
    await until(lambda: not a.relay.holding, LINGER_S + 5, "lease given back when idle")
    assert await a.store.db[LEASES].find_one({"_id": "relay"}) is None


async def test_a_dead_holder_on_this_host_is_taken_over_at_once(instances: Callable[[], Instance]) -> None:
    a = instances()
    await a.store.ensure_indexes()
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()  # a pid of this host that is gone
    await a.store.db[LEASES].insert_one(
        {
            "_id": "relay",
            "owner": f"{socket.gethostname()}:{dead.pid}:deadbeef",
            "expires_at": datetime.now(UTC) + timedelta(seconds=LEASE_S),
        }
    )
    ids = await a.commit(wake=False)
    await a.start()
    took = await until(lambda: a.producer.ids() == ids, 5, "published after taking over")
    assert took < 2.0


async def test_a_live_holder_elsewhere_is_waited_out_then_taken_over(instances: Callable[[], Instance]) -> None:
    a = instances()
    await a.store.ensure_indexes()
    expires = datetime.now(UTC) + timedelta(seconds=2)
    await a.store.db[LEASES].insert_one({"_id": "relay", "owner": "another-host:1:cafe", "expires_at": expires})
    ids = await a.commit(wake=False)
    await a.start()
    # Not polled every 0.5 s any more: retried when the other lease would run out.
    await until(lambda: a.producer.ids() == ids, 5, "published once the other lease ran out")
    # Nothing within the other holder's lease (timed by what happened, not by a wait).
    ran_out = expires.timestamp() - (time.time() - time.monotonic())
    assert a.producer.sent_at[0] >= ran_out - 0.01, f"published {ran_out - a.producer.sent_at[0]:.2f}s too early"
    assert os.getpid() and a.relay.holding
    # Marked sent once the broker acknowledged them, just after the producer saw them.
    await until(lambda: all_sent(a), 5, "marked sent")


async def all_sent(inst: Instance) -> bool:
    return await inst.store.db[OUTBOX].count_documents({"sent": False}) == 0


def audits(n: int) -> list[Outgoing]:
    return [
        audit_event(
            AuditRecord(service="test", action="thing_done", outcome="success", details={"i": i}),
            correlationid="c",
            causationid=None,
            source="/clave/test",
        )
        for i in range(n)
    ]


def chain(inst: Instance) -> list[int]:
    import json

    return [json.loads(v)["data"]["integrity"]["seq"] for _, v in inst.producer.sent]


async def test_a_busy_relay_seals_with_one_bulk_write_and_the_commit(instances: Callable[[], Instance]) -> None:
    """While it holds the lease the relay knows the chain's head: sealing a batch costs the
    bulk write and the commit, no read; the chain runs on without a gap."""
    a = await instances().start(listen_commands=True)
    assert a.commands is not None
    await a.store.commit(consumer=None, event_id=None, writes=None, outgoing=audits(2))
    a.relay.committed()
    await until(lambda: len(a.producer.sent) == 2, 5, "first audit events published")
    # The first batch is marked sent just after the producer saw it: wait for that write, or
    # it would land inside the window counted below.
    await until(lambda: all_sent(a), 5, "first audit events marked sent")
    assert a.relay.holding
    t0 = time.monotonic()
    await a.store.commit(consumer=None, event_id=None, writes=None, outgoing=audits(3))
    a.relay.committed()
    await until(lambda: len(a.producer.sent) == 5, 5, "second audit events published")
    await until(lambda: all_sent(a), 5, "second audit events marked sent")
    sent = a.commands.since(t0)
    # The commit (bulkWrite, commitTransaction), then the relay: its read of the outbox, the
    # seal (bulkWrite, commitTransaction) and marking them sent; the chain head is not read.
    # (Updates are counted on the outbox only: the lease's renewal runs on its own timer.)
    marked = a.commands.on(OUTBOX, "update", t0)
    assert sent["bulkWrite"] == 2 and sent["commitTransaction"] == 2 and marked == 1, dict(sent)
    assert a.commands.on(LEASES, "find", t0) == 0, dict(sent)
    assert chain(a) == [1, 2, 3, 4, 5]


async def test_a_seal_whose_reply_was_lost_is_not_sealed_twice(
    instances: Callable[[], Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await instances().start()
    await a.store.commit(consumer=None, event_id=None, writes=None, outgoing=audits(2))
    a.relay.committed()
    await until(lambda: len(a.producer.sent) == 2, 5, "first audit events published")
    real = a.store.in_transaction
    lost = {"n": 1}

    async def losing(work: Any, **kw: Any) -> Any:
        if lost["n"]:
            lost["n"] -= 1
            await real(work, **kw)  # the seal lands, its reply is lost: the work runs again
        return await real(work, **kw)

    await a.store.commit(consumer=None, event_id=None, writes=None, outgoing=audits(3))
    monkeypatch.setattr(a.store, "in_transaction", losing)  # the relay's next seal only
    a.relay.committed()
    await until(lambda: len(a.producer.sent) == 5, 5, "second audit events published")
    assert lost["n"] == 0, "the seal ran"
    assert chain(a) == [1, 2, 3, 4, 5]
