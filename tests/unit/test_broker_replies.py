"""The services' FastStream broker never publishes: a consumed record that asks for a reply
(FastStream's `reply_to` header, which any writer of a topic can set) gets none.

Replies go through the outbox and the relay's producer (shared.producer, replaced when
aiokafka's idempotence breaks it). FastStream's broker has an idempotent AIOKafkaProducer of its
own (aio-libs/aiokafka#1017 applies to it too), used only to answer `reply_to`: with it, a record
naming a topic the service may not write would fail after its handler, be redelivered and fail
again for ever (the partition stalled), one naming a topic it may write would have the service
write an empty record there, and a broken producer would stall every record that asks."""

from __future__ import annotations

from typing import Any

from faststream.kafka import TestKafkaBroker

from shared.consumer import EventPipeline
from shared.runtime import Service
from shared.settings import PlatformSettings
from shared.store import ServiceStore


async def test_a_record_asking_for_a_reply_gets_none(monkeypatch: Any) -> None:
    handled: list[bytes] = []

    async def process(self: EventPipeline, record: Any, raw: bytes) -> None:
        handled.append(raw)

    monkeypatch.setattr(EventPipeline, "process", process)
    settings = PlatformSettings(clave_env="development")
    service = Service("test", ServiceStore(settings.mongodb_uri, "clave_unit_replies"), settings)
    service.consume("test.in", {})
    service.subscribe()  # its consumers, one per lane, as app() makes them
    replies: list[bytes] = []

    @service.broker.subscriber("test.elsewhere")
    async def spy(body: bytes) -> None:
        replies.append(body)

    async with TestKafkaBroker(service.broker) as broker:
        # The test broker runs the handler, then any reply, before publish returns.
        await broker.publish(b"record", "test.in", reply_to="test.elsewhere")
        await broker.publish(b"control", "test.elsewhere")
    assert handled == [b"record"]
    assert replies == [b"control"], "no reply besides the control record"
    await service.store.close()
