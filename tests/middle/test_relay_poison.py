"""The outbox relay against a real store with a stand-in producer, with one bad outbox event
in front of good ones: the bad one is parked in place with its reason (counted), the ones
after it are published, the audit chain stays whole; an outage is retried, not parked; a bug
in the relay does not stop it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
)
from bson import ObjectId

from shared.audit import audit_event
from shared.relay import CHAIN_ID, PRODUCER_BROKEN, unpublishable
from shared.schemas import AuditRecord
from shared.store import LEASES, OUTBOX, Outgoing
from tests.middle.test_relay import FakeProducer, Instance, all_sent, instances, outgoing, until

__all__ = ["instances"]  # the fixture, used by name


def parked_count(inst: Instance, reason: str) -> float:
    value = inst.relay.metrics.registry.get_sample_value(
        "clave_loop_items_parked_total", {"loop": "relay", "reason": reason}
    )
    return 0.0 if value is None else value


def raw_doc(**overrides: Any) -> dict[str, Any]:
    """An outbox document as ServiceStore.commit writes it, with `overrides` (the bad part)."""
    doc = {
        "_id": ObjectId(),
        "event_id": "bad",
        "topic": "test.events",
        "key": "k",
        "value": b'{"id": "bad"}',
        "headers": {"content-type": "application/cloudevents+json"},
        "is_audit": False,
        "created_at": datetime.now(UTC),
        "sent": False,
    }
    doc.update(overrides)
    return doc


def audit(action: str) -> Outgoing:
    record = AuditRecord(service="test", action=action, outcome="info")
    return audit_event(record, correlationid="c", causationid=None, source="/clave/test")


async def bad_then_good(inst: Instance, bad: dict[str, Any]) -> list[str]:
    """Insert `bad`, then commit two good events after it; they are published."""
    await inst.store.db[OUTBOX].insert_one(bad)
    good = await inst.commit(2)
    await until(lambda: inst.producer.ids()[-2:] == good, 10, "the next events published")
    return good


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (raw_doc(value="a str, not bytes"), "malformed_outbox_document"),
        (raw_doc(headers=None), "malformed_outbox_document"),
        (raw_doc(key=None), "malformed_outbox_document"),
        (raw_doc(topic=""), "malformed_outbox_document"),
        (raw_doc(is_audit=True, value=b"not json"), "audit_event_unreadable"),
        (raw_doc(is_audit=True, value=b"[" * 5000 + b"]" * 5000), "audit_event_unreadable"),
        (raw_doc(is_audit=True, value=b'{"data": "not an object"}'), "audit_event_unreadable"),
    ],
)
async def test_an_unpublishable_event_is_parked_and_the_next_ones_go_out(
    instances: Callable[[], Instance], bad: dict[str, Any], reason: str
) -> None:
    a = await instances().start()
    await bad_then_good(a, bad)
    stored = await a.store.db[OUTBOX].find_one({"_id": bad["_id"]})
    assert stored is not None
    assert stored["sent"] is None and stored["parked"] == reason and isinstance(stored["parked_at"], datetime)
    assert "bad" not in a.producer.ids()
    assert parked_count(a, reason) == 1
    await until(lambda: all_sent(a), 5, "the good ones marked sent")  # just after the producer saw them


async def test_an_unreadable_audit_event_takes_no_place_in_the_chain(instances: Callable[[], Instance]) -> None:
    a = await instances().start()
    await a.store.commit(consumer=None, event_id=None, writes=None, outgoing=[audit("first")])
    await a.store.db[OUTBOX].insert_one(raw_doc(is_audit=True, value=b"not json"))
    await a.store.commit(consumer=None, event_id=None, writes=None, outgoing=[audit("second")])
    a.relay.wake()
    await until(lambda: len(a.producer.sent) == 2, 10, "both good audit events published")
    sealed = [json.loads(v)["data"] for _, v in a.producer.sent]
    assert [d["action"] for d in sealed] == ["first", "second"]
    assert [d["integrity"]["seq"] for d in sealed] == [1, 2]  # no gap: the chain verifies
    head = await a.store.db[LEASES].find_one({"_id": CHAIN_ID})
    assert head is not None and head["seq"] == 2


class RefusingProducer(FakeProducer):
    """Refuses records whose value contains a marker: at send (as aiokafka does for a record
    over max_request_size) or in the future (as the broker answers), or fails like a broker
    that is away for the first `outages` sends."""

    def __init__(self) -> None:
        super().__init__()
        self.outages = 0

    async def send(self, topic: str, *, value: bytes, key: bytes, headers: list[Any]) -> asyncio.Future[None]:
        if self.outages > 0:
            self.outages -= 1
            raise KafkaConnectionError("broker away")
        if b"too-large-at-send" in value:
            raise MessageSizeTooLargeError("too large")
        if b"refused-by-broker" in value:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_exception(RecordListTooLargeError())
            return future
        return await super().send(topic, value=value, key=key, headers=headers)


@pytest.mark.parametrize("marker", [b"too-large-at-send", b"refused-by-broker"])
async def test_a_record_the_broker_refuses_is_parked_and_the_next_ones_go_out(
    instances: Callable[[], Instance], marker: bytes
) -> None:
    inst = instances()
    inst.producer = RefusingProducer()
    await inst.start()
    bad = raw_doc(value=b'{"id": "bad", "x": "' + marker + b'"}')
    await bad_then_good(inst, bad)

    async def parked() -> bool:
        # The producer records a send when it is made; the refusal (a send error, or the
        # broker's answer on the future) is parked by the relay's store write after that.
        doc = await inst.store.db[OUTBOX].find_one({"_id": bad["_id"]})
        return bool(doc and doc.get("parked"))

    await until(parked, 10, "the refused record parked")
    stored = await inst.store.db[OUTBOX].find_one({"_id": bad["_id"]})
    assert stored is not None and stored["sent"] is None and stored["parked"] == "record_refused"
    assert stored["parked_error"].split(" at ")[0] in ("MessageSizeTooLargeError", "RecordListTooLargeError")
    assert parked_count(inst, "record_refused") == 1


async def test_a_broker_outage_is_retried_not_parked(instances: Callable[[], Instance]) -> None:
    inst = instances()
    producer = RefusingProducer()
    producer.outages = 3
    inst.producer = producer
    await inst.start()
    published = await inst.commit(2)
    await until(lambda: inst.producer.ids() == published, 15, "published once the broker is back")
    assert producer.outages == 0
    assert await inst.store.db[OUTBOX].count_documents({"parked": {"$exists": True}}) == 0
    assert inst.relay.metrics.registry.get_sample_value("clave_relay_errors_total") == 3


async def test_a_bug_in_the_relay_does_not_stop_it(
    instances: Callable[[], Instance], monkeypatch: pytest.MonkeyPatch
) -> None:
    inst = instances()
    await inst.start()
    real = inst.relay.publish_pending
    bugs = 2

    async def buggy() -> int:
        nonlocal bugs
        if bugs > 0:
            bugs -= 1
            raise AttributeError("a bug")
        return await real()

    monkeypatch.setattr(inst.relay, "publish_pending", buggy)
    published = await inst.commit(1)
    await until(lambda: inst.producer.ids() == published, 10, "published after the bug")
    assert bugs == 0
    assert inst.relay._task is not None and not inst.relay._task.done()
    errors = inst.relay.metrics.registry.get_sample_value("clave_loop_errors_total", {"loop": "relay", "kind": "error"})
    assert errors == 2


def test_a_well_formed_outbox_document_is_publishable() -> None:
    # The check parks only what is really unpublishable: a document as commit writes it passes.
    doc = Outgoing(topic="t", key="k", event=audit("x").event).to_document()
    assert unpublishable(doc) is None
    assert unpublishable({**doc, "sealed": True, "value": b"anything"}) is None  # sealed: not re-read


class BrokenProducer(FakeProducer):
    """aiokafka's idempotent producer after a broker restart lost its sequence state: its
    sender task has ended and every send fails with OutOfOrderSequenceNumber (or another of
    PRODUCER_BROKEN), for ever."""

    def __init__(self, error: type[Exception] = OutOfOrderSequenceNumber) -> None:
        super().__init__()
        self.error = error
        self.stopped = False

    async def send(self, topic: str, *, value: bytes, key: bytes, headers: list[Any]) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_exception(self.error())
        return future

    async def stop(self) -> None:
        self.stopped = True


@pytest.mark.parametrize("error", PRODUCER_BROKEN, ids=lambda e: e.__name__)
async def test_a_producer_broken_by_a_broker_restart_is_replaced(
    instances: Callable[[], Instance], error: type[Exception]
) -> None:
    """The fault suite's Kafka restart left the password relay retrying OutOfOrderSequenceNumber
    for ever (13 recoveries never completed): the relay now replaces the broken producer."""
    inst = instances()
    broken, fresh = BrokenProducer(error), FakeProducer()

    async def new_producer() -> FakeProducer:
        return fresh

    await inst.store.ensure_indexes()
    await inst.relay.start(broken, new_producer)
    published = await inst.commit(2)
    await until(lambda: fresh.ids() == published, 15, "published by the new producer")
    assert broken.stopped and broken.sent == []
    assert await inst.store.db[OUTBOX].count_documents({"parked": {"$exists": True}}) == 0


async def test_an_immediate_reply_on_a_broken_producer_goes_out_from_the_outbox(
    instances: Callable[[], Instance],
) -> None:
    """A service's replies are sent at once by the relay's producer (send_now); when that
    producer is broken the reply fails (the consumer pipeline logs it and goes on:
    tests/unit/test_consumer.py::test_a_failed_immediate_reply_changes_nothing), the producer is
    replaced, and the reply's outbox copy is published by the new one."""
    inst = instances()
    broken, fresh = BrokenProducer(), FakeProducer()

    async def new_producer() -> FakeProducer:
        return fresh

    await inst.store.ensure_indexes()
    await inst.relay.start(broken, new_producer)
    replies = outgoing(1)
    # The reply first, its commit after: committed first, the outbox change stream could wake
    # the relay, whose own publish would meet the broken producer before the reply does.
    with pytest.raises(OutOfOrderSequenceNumber):
        await inst.relay.send_now(replies)
    assert broken.stopped, "replaced by the failed reply itself"
    await inst.store.commit(consumer=None, event_id=None, writes=None, outgoing=replies)
    inst.relay.wake()
    await until(lambda: fresh.ids() == [replies[0].event.id], 15, "the outbox copy published")
