"""The portal client's producer (clients/python, its own copy of shared.producer): a producer
broken by aiokafka's idempotence (aio-libs/aiokafka#1017) is replaced and the request goes out;
retries are bounded; other errors are raised at once. No broker (tests/middle/breakable.py)."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka.errors import KafkaConnectionError, OutOfOrderSequenceNumber, TopicAuthorizationFailedError
from clave_portal import PortalClient, PortalSettings
from clave_portal import events as ev
from clave_portal import producer as client_producer
from clave_portal.producer import Producer

from shared import producer as shared_producer
from tests.middle.breakable import BROKEN_BY, Recording, broken_aiokafka

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.02}


class Factory:
    def __init__(self) -> None:
        self.made: list[Recording] = []
        self.refuse: list[Exception] = []

    async def __call__(self) -> Recording:
        await asyncio.sleep(0)
        if self.refuse:
            raise self.refuse.pop(0)
        self.made.append(Recording(f"p{len(self.made)}"))
        return self.made[-1]


def test_the_copy_keeps_the_platforms_rules() -> None:
    """The deliberate duplicate of shared.producer: the same broken errors and retry bounds."""
    assert client_producer.PRODUCER_BROKEN == shared_producer.PRODUCER_BROKEN
    for name in ("ATTEMPTS", "BACKOFF_S", "MAX_BACKOFF_S", "DEADLINE_S"):
        assert getattr(client_producer, name) == getattr(shared_producer, name), name


@pytest.mark.parametrize("error", BROKEN_BY, ids=lambda e: e.__name__)
async def test_a_request_after_the_producer_broke_goes_out_on_a_new_one(error: type[Exception]) -> None:
    broken, in_flight = await broken_aiokafka(error)
    with pytest.raises(error):
        await in_flight
    make = Factory()
    events: list[tuple[str, str]] = []
    settings = PortalSettings(security_protocol="PLAINTEXT")
    client = PortalClient(settings, on_producer_event=lambda e, x: events.append((e, type(x).__name__)))
    client._producer = Producer(make, on_event=client.on_producer_event, **FAST)
    client._producer.current = broken  # the client's producer, broken as the fault suite saw it

    request_id = await client.request_recovery(
        national_id="0102030405", email="a@example.org", answers={}, client_ip="10.0.0.1", captcha_passed=True
    )
    await client.request_recovery(
        national_id="0102030406", email="b@example.org", answers={}, client_ip="10.0.0.2", captcha_passed=True
    )

    [fresh] = make.made
    assert [topic for topic, _, _ in fresh.sent] == [ev.RECOVERY_REQUESTS] * 2
    assert json.loads(fresh.sent[0][1])["data"]["request_id"] == request_id
    assert broken._closed and client._producer.current is fresh
    assert events == [("replaced", error.__name__), ("retried", error.__name__)]


async def test_concurrent_requests_replace_a_broken_producer_once() -> None:
    make = Factory()
    producer = Producer(make, **FAST)
    await producer.start()
    make.made[0].break_with(OutOfOrderSequenceNumber(), after=2)

    await asyncio.gather(*(producer.send_and_wait("t", f"{i}".encode(), key=b"k", headers=[]) for i in range(10)))

    assert len(make.made) == 2
    assert sorted(make.made[0].values() + make.made[1].values()) == sorted(f"{i}".encode() for i in range(10))


async def test_a_replacement_that_cannot_start_yet_is_tried_again() -> None:
    make = Factory()
    producer = Producer(make, **FAST)
    await producer.start()
    make.made[0].break_with(OutOfOrderSequenceNumber())
    make.refuse = [KafkaConnectionError()]

    await producer.send_and_wait("t", b"x", key=b"k", headers=[])
    assert make.refuse == [] and make.made[1].values() == [b"x"]


async def test_retries_are_bounded_and_only_for_retriable_errors() -> None:
    make = Factory()
    producer = Producer(make, attempts=3, **FAST)
    await producer.start()
    make.made[0].fail_next = [KafkaConnectionError() for _ in range(5)]
    with pytest.raises(KafkaConnectionError):
        await producer.send_and_wait("t", b"x", key=b"k", headers=[])
    assert len(make.made[0].fail_next) == 2, "three tries, then the error"

    make.made[0].fail_next = [TopicAuthorizationFailedError("t")]
    with pytest.raises(TopicAuthorizationFailedError):
        await producer.send_and_wait("t", b"x", key=b"k", headers=[])
    assert make.made[0].values() == [] and len(make.made) == 1
