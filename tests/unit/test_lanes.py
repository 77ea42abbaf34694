"""A service's topics share one Kafka consumer per lane (shared/runtime.py, issue 10)."""

from __future__ import annotations

from typing import Any

from faststream.kafka import TestKafkaBroker

from shared.consumer import Route
from shared.runtime import Service
from shared.schemas import PasswordUpdated
from shared.settings import PlatformSettings
from shared.store import ServiceStore


async def _nothing(ctx: Any, data: Any) -> None:
    return None


ROUTES = {"t": Route(PasswordUpdated, _nothing)}


def _service(**settings: Any) -> Service:
    config = PlatformSettings(clave_env="development", **settings)
    return Service("lanes", ServiceStore(config.mongodb_uri, "clave_unit_lanes"), config)


def _topics(subscriber: Any) -> list[str]:
    return [t.name for t in subscriber.topics]


async def test_the_topics_of_a_lane_share_one_consumer() -> None:
    service = _service()
    service.consume("a", ROUTES, hot=True)
    service.consume("b", ROUTES, lane="answers")
    service.consume("c", ROUTES)
    service.consume("d", ROUTES, lane="answers")
    service.subscribe()
    service.subscribe()  # once only
    subs = service._subscribers
    assert len(subs) == 4 and len({id(s) for s in subs}) == 2
    assert subs[0] is subs[2] and subs[1] is subs[3]
    assert _topics(subs[0]) == ["a", "c"] and _topics(subs[1]) == ["b", "d"]
    await service.store.close()


async def test_hot_topics_with_several_workers_keep_consumers_of_their_own() -> None:
    service = _service(consumer_workers=3)
    service.consume("a", ROUTES, hot=True)
    service.consume("b", ROUTES)
    service.consume("c", ROUTES)
    service.subscribe()
    hot, rest = service._subscribers[0], service._subscribers[1]
    assert _topics(hot) == ["a"] and _topics(rest) == ["b", "c"] and service._subscribers[2] is rest
    await service.store.close()


async def test_a_shared_consumer_hands_each_record_to_its_topics_pipeline() -> None:
    service = _service()
    for topic in ("a", "b", "c"):
        service.consume(topic, ROUTES)
    seen: list[tuple[str, str, bytes]] = []
    for topic, pipeline in service.pipelines.items():

        async def process(record: Any, raw: bytes, topic: str = topic) -> None:
            seen.append((topic, record.topic, raw))

        pipeline.process = process  # type: ignore[method-assign]
    service.subscribe()
    async with TestKafkaBroker(service.broker) as broker:
        await broker.publish(b"to-c", "c")
        await broker.publish(b"to-a", "a")
    assert seen == [("c", "c", b"to-c"), ("a", "a", b"to-a")]
    await service.store.close()
