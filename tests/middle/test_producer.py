"""shared.producer: a producer broken by aiokafka's idempotence (aio-libs/aiokafka#1017) is
replaced and the send goes out; retriable errors are retried a bounded number of times with a
back-off; other errors are raised at once. No broker: the broken producers are aiokafka's own
class brought to that state, or a stand-in that behaves as it does (tests/middle/breakable.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    NotLeaderForPartitionError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    TopicAuthorizationFailedError,
    UnknownProducerId,
)

from shared.metrics import ServiceMetrics
from shared.producer import PRODUCER_BROKEN, Message, Producer
from tests.middle.breakable import BROKEN_BY, Recording, broken_aiokafka

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.02}


class Factory:
    """What Producer calls for a new producer: hands out `Recording`s (or raises the errors
    queued in `refuse`, as starting one does while the broker is away)."""

    def __init__(self) -> None:
        self.made: list[Recording] = []
        self.refuse: list[Exception] = []

    async def __call__(self) -> Recording:
        await asyncio.sleep(0)  # a real start yields: concurrent failures meet here
        if self.refuse:
            raise self.refuse.pop(0)
        self.made.append(Recording(f"p{len(self.made)}"))
        return self.made[-1]


def test_the_broken_errors_are_those_of_the_issue() -> None:
    assert set(PRODUCER_BROKEN) == set(BROKEN_BY)


@pytest.mark.parametrize("error", BROKEN_BY, ids=lambda e: e.__name__)
async def test_a_real_aiokafka_producer_broken_by_each_error_is_replaced(error: type[Exception]) -> None:
    broken, in_flight = await broken_aiokafka(error)
    with pytest.raises(error):
        await in_flight  # the send in flight when the sender died
    with pytest.raises(error):
        await broken.send("t", b"again", key=b"k")  # and every later one: the bug itself
    events: list[tuple[str, str]] = []
    make = Factory()
    producer = Producer(make, first=broken, on_event=lambda e, x: events.append((e, type(x).__name__)), **FAST)
    await producer.start()

    assert await producer.send_and_wait("t", b"one", key=b"k") == ("t", 0)
    await producer.send_and_wait("t", b"two", key=b"k")

    assert len(make.made) == 1 and producer.current is make.made[0]
    assert make.made[0].values() == [b"one", b"two"]
    assert broken._closed, "the broken producer is stopped"
    assert producer.replaced == 1
    assert events == [("replaced", error.__name__), ("retried", error.__name__)]


@pytest.mark.parametrize("error", BROKEN_BY, ids=lambda e: e.__name__)
async def test_a_batch_in_flight_when_it_broke_goes_out_whole_and_in_order(error: type[Exception]) -> None:
    make = Factory()
    producer = Producer(make, **FAST)
    await producer.start()
    first = make.made[0]
    first.break_with(error(), after=3)  # sends 1-2 acknowledged, 3 in flight fails, 4.. raise
    messages = [Message("t", f"m{i}".encode(), b"k") for i in range(6)]

    results = await producer.send_many(messages)

    assert first.values() == [b"m0", b"m1"] and first.stopped
    assert make.made[1].values() == [b"m2", b"m3", b"m4", b"m5"]
    assert [r[0] for r in results] == ["t"] * 6
    assert producer.current is make.made[1]


async def test_concurrent_sends_on_a_broken_producer_replace_it_once() -> None:
    make = Factory()
    producer = Producer(make, **FAST)
    await producer.start()
    make.made[0].break_with(UnknownProducerId())

    await asyncio.gather(*(producer.send_and_wait("t", f"{i}".encode()) for i in range(20)))

    assert len(make.made) == 2 and producer.replaced == 1
    assert sorted(make.made[1].values()) == sorted(f"{i}".encode() for i in range(20))


async def test_a_replacement_that_cannot_start_yet_is_tried_again() -> None:
    make = Factory()
    producer = Producer(make, **FAST)
    await producer.start()
    make.made[0].break_with(ProducerFenced())
    make.refuse = [KafkaConnectionError(), KafkaConnectionError()]  # the broker still restarting

    await producer.send_and_wait("t", b"x")

    assert make.refuse == [] and len(make.made) == 2
    assert make.made[1].values() == [b"x"]


async def test_retriable_errors_are_retried_with_a_back_off() -> None:
    make = Factory()
    producer = Producer(make, backoff_s=0.05, max_backoff_s=0.1)
    await producer.start()
    make.made[0].fail_next = [KafkaConnectionError(), NotLeaderForPartitionError(), KafkaConnectionError()]
    loop = asyncio.get_running_loop()
    t0 = loop.time()

    await producer.send_and_wait("t", b"x")

    assert loop.time() - t0 >= 0.05 + 0.1 + 0.1  # 0.05, then doubled to the cap twice
    assert make.made[0].values() == [b"x"] and len(make.made) == 1  # not broken: not replaced


async def test_retries_are_bounded() -> None:
    make = Factory()
    producer = Producer(make, attempts=3, **FAST)
    await producer.start()
    make.made[0].fail_next = [KafkaConnectionError() for _ in range(5)]

    with pytest.raises(KafkaConnectionError):
        await producer.send_and_wait("t", b"x")
    assert len(make.made[0].fail_next) == 2, "three tries, then the error"


async def test_retries_stop_at_the_deadline() -> None:
    make = Factory()
    producer = Producer(make, attempts=100, backoff_s=0.05, max_backoff_s=0.05, deadline_s=0.2)
    await producer.start()
    make.made[0].fail_next = [KafkaConnectionError() for _ in range(100)]

    with pytest.raises(KafkaConnectionError):
        await producer.send_and_wait("t", b"x")
    assert 100 - len(make.made[0].fail_next) <= 5


async def test_an_error_that_retrying_cannot_help_is_raised_at_once() -> None:
    make = Factory()
    producer = Producer(make, **FAST)
    await producer.start()
    make.made[0].fail_next = [TopicAuthorizationFailedError("t")]

    with pytest.raises(TopicAuthorizationFailedError):
        await producer.send_and_wait("t", b"x")
    assert make.made[0].values() == [] and len(make.made) == 1


async def test_replacements_and_retries_are_counted() -> None:
    metrics = ServiceMetrics("test")
    make = Factory()
    producer = Producer(make, on_event=metrics.count_producer_event, **FAST)
    await producer.start()
    make.made[0].break_with(OutOfOrderSequenceNumber())

    await producer.send_and_wait("t", b"x")

    def sample(event: str) -> Any:
        labels = {"kind": event, "error": "OutOfOrderSequenceNumber"}
        return metrics.registry.get_sample_value("clave_producer_events_total", labels)

    assert sample("replaced") == 1 and sample("retried") == 1


async def test_a_send_before_start_is_refused() -> None:
    producer = Producer(Factory())
    with pytest.raises(RuntimeError, match="not started"):
        await producer.send_and_wait("t", b"x")
