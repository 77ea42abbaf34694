"""Replies (HandlerContext.reply, sent by the relay's send_now right after the commit) and the
relay: what was committed with a reply reaches the broker after it, and a reply the broker
acknowledged is not published a second time from the outbox (its copy is marked sent).
Against a real store with a stand-in producer whose acknowledgements the test holds back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from shared.store import OUTBOX, Outgoing
from tests.middle.test_relay import FakeProducer, Instance, all_sent, instances, outgoing, until

__all__ = ["instances"]  # the fixture, used by name


class HeldProducer(FakeProducer):
    """Records sends in order; the acknowledgement of the first record sent is held until
    `release()` (a reply on its way to a slow broker)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: asyncio.Future[None] | None = None

    async def send(self, topic: str, *, value: bytes, key: bytes, headers: list[Any]) -> asyncio.Future[None]:
        done = await super().send(topic, value=value, key=key, headers=headers)
        if self.held is None:
            self.held = asyncio.get_running_loop().create_future()
            return self.held
        return done

    def release(self) -> None:
        assert self.held is not None
        self.held.set_result(None)


async def committed_with_held_reply(
    instances: Callable[[], Instance],
) -> tuple[Instance, HeldProducer, Outgoing, Outgoing]:
    """A started instance whose producer holds the first acknowledgement back, and a reply and
    the event that follows it, committed together."""
    inst = instances()
    inst.producer = producer = HeldProducer()
    await inst.start()
    reply, follower = outgoing(2)
    await inst.store.commit(consumer=None, event_id=None, writes=None, outgoing=[reply, follower])
    return inst, producer, reply, follower


async def test_an_acknowledged_reply_is_not_published_again(instances: Callable[[], Instance]) -> None:
    inst = await instances().start()
    reply, follower = outgoing(2)
    await inst.store.commit(consumer=None, event_id=None, writes=None, outgoing=[reply, follower])
    await inst.relay.send_now([reply])
    inst.relay.wake()
    await until(lambda: all_sent(inst), 15, "the outbox published")
    assert inst.producer.ids() == [reply.event.id, follower.event.id]
    assert await inst.store.db[OUTBOX].count_documents({"sent": True}) == 2


async def test_what_was_committed_with_a_reply_waits_for_it(instances: Callable[[], Instance]) -> None:
    inst, producer, reply, follower = await committed_with_held_reply(instances)
    reached = asyncio.Event()
    after_replies = inst.relay._after_replies

    async def watched(docs: list[dict[str, Any]]) -> None:
        reached.set()
        await after_replies(docs)

    inst.relay._after_replies = watched  # type: ignore[method-assign]
    replying = asyncio.create_task(inst.relay.send_now([reply]))
    await until(lambda: producer.held is not None, 5, "the reply handed to the producer")
    inst.relay.wake()
    # A relay that did not wait would have handed the follower over in the same step (the
    # stand-in's send never suspends) before this test runs again.
    await asyncio.wait_for(reached.wait(), 10)
    assert inst.producer.ids() == [reply.event.id]
    producer.release()
    await replying
    await until(lambda: all_sent(inst), 15, "the outbox published")
    assert inst.producer.ids() == [reply.event.id, follower.event.id], "the reply first, once"


async def test_a_reply_that_failed_goes_out_from_the_outbox(instances: Callable[[], Instance]) -> None:
    """A reply whose send failed is not taken for delivered: its copy is published."""
    inst, producer, reply, follower = await committed_with_held_reply(instances)
    replying = asyncio.create_task(inst.relay.send_now([reply]))
    await until(lambda: producer.held is not None, 5, "the reply handed to the producer")
    assert producer.held is not None
    producer.held.set_exception(TimeoutError())
    try:
        await replying
    except TimeoutError:
        pass
    inst.relay.wake()
    await until(lambda: all_sent(inst), 15, "the outbox published")
    ids = [json.loads(v)["id"] for _, v in inst.producer.sent]
    assert ids == [reply.event.id, reply.event.id, follower.event.id]
