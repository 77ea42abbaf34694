"""A service's topics share one Kafka consumer per lane (shared/runtime.py, issue 10)."""

from __future__ import annotations

from typing import Any

from faststream.kafka import TestKafkaBroker

from services.identity.app import build as identity
from services.identity.settings import IdentitySettings
from services.password.app import build as password
from services.password.settings import PasswordSettings
from shared.consumer import Route
from shared.runtime import Service
from shared.schemas import PasswordUpdated
from shared.settings import PlatformSettings
from shared.store import ServiceStore
from shared.topics import RECOVERY_REQUESTS, TOKENS_REDEEMED


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


def _workers(service: Service, topic: str) -> int:
    return next(w for members in service._lanes.values() for t, w in members if t == topic)


async def test_hashing_workers_go_to_the_hashing_topic_alone() -> None:
    service = _service(hashing_consumer_workers=2)
    service.consume("requests", ROUTES, hot=True, hashing=True)
    service.consume("verified", ROUTES, hot=True)
    service.consume("c", ROUTES)
    service.subscribe()
    assert _workers(service, "requests") == 2
    assert _workers(service, "verified") == 1 and _workers(service, "c") == 1
    hashing, rest = service._subscribers[0], service._subscribers[1]
    assert hashing is not rest and _topics(hashing) == ["requests"] and _topics(rest) == ["verified", "c"]
    await service.store.close()


async def test_one_hashing_worker_by_default_and_consumer_workers_can_raise_them() -> None:
    one = _service()
    one.consume("requests", ROUTES, hot=True, hashing=True)
    one.consume("c", ROUTES)
    one.subscribe()
    assert _workers(one, "requests") == 1 and one._subscribers[0] is one._subscribers[1]
    more = _service(consumer_workers=3, hashing_consumer_workers=2)
    more.consume("requests", ROUTES, hot=True, hashing=True)
    more.consume("hashing-but-not-hot", ROUTES, hashing=True)
    assert _workers(more, "requests") == 3 and _workers(more, "hashing-but-not-hot") == 1
    await one.store.close()
    await more.store.close()


async def test_identity_requests_and_password_resets_are_the_hashing_topics() -> None:
    services = [
        identity(IdentitySettings(clave_env="development", hashing_consumer_workers=2)),
        password(PasswordSettings(clave_env="development", hashing_consumer_workers=2)),
    ]
    hashing = {t for s in services for members in s._lanes.values() for t, w in members if w == 2}
    assert hashing == {RECOVERY_REQUESTS, TOKENS_REDEEMED}
    for service in services:
        await service.store.close()
