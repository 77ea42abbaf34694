"""Producers that break as aiokafka's idempotent producer does (aio-libs/aiokafka#1017), for the
tests of shared.producer and of the portal client's copy of it.

When the sender task of an idempotent AIOKafkaProducer ends on OutOfOrderSequenceNumber,
ProducerFenced, UnknownProducerId or InvalidProducerEpoch, its done-callback calls
`MessageAccumulator.fail_all(error)`: the sends in flight fail with the error, and every later
`send` raises a copy of it, for ever. `broken_aiokafka` is the real class brought to that state
(no broker needed); `Recording` is a stand-in that works, or breaks the same way on demand.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

BROKEN_BY = [OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId, InvalidProducerEpoch]


async def broken_aiokafka(error: type[Exception]) -> tuple[AIOKafkaProducer, asyncio.Future[Any]]:
    """A real AIOKafkaProducer with one send in flight when its sender task ended on `error`:
    that send's future, and the producer (every later send raises `error`)."""
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", enable_idempotence=True)

    async def metadata_known(topic: str) -> None:
        return None

    producer.client._wait_on_metadata = metadata_known  # type: ignore[method-assign]  # no broker here
    producer._partition = lambda *args: 0  # type: ignore[method-assign]
    in_flight: asyncio.Future[Any] = await producer.send("t", b"in flight", key=b"k")
    producer._message_accumulator.fail_all(error())  # what the sender's done-callback does
    return producer, in_flight


class Recording:
    """A started producer that acknowledges every send and records it, until `break_with(error)`:
    from then on it behaves as aiokafka's broken producer (in-flight sends fail, later sends
    raise). `fail_next`: errors for the next sends' futures, one each (then it works again)."""

    def __init__(self, name: str = "p") -> None:
        self.name = name
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.broken: Exception | None = None
        self.break_after: tuple[int, Exception] | None = None  # break on the n-th send from now
        self.fail_next: list[Exception] = []
        self.stopped = False

    def break_with(self, error: Exception, after: int = 0) -> None:
        if after:
            self.break_after = (after, error)
        else:
            self.broken = error

    async def send(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None
    ) -> asyncio.Future[Any]:
        if self.stopped:
            raise AssertionError(f"{self.name}: send after stop")
        if self.broken is not None:
            raise copy.copy(self.broken)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if self.break_after is not None:
            n, error = self.break_after
            if n <= 1:
                self.break_after, self.broken = None, error
                future.set_exception(copy.copy(error))  # the send in flight when the sender died
                return future
            self.break_after = (n - 1, error)
        if self.fail_next:
            future.set_exception(self.fail_next.pop(0))
            return future
        assert value is not None
        self.sent.append((topic, value, key))
        future.set_result((topic, len(self.sent) - 1))  # stands for RecordMetadata
        return future

    async def send_and_wait(
        self, topic: str, value: bytes | None = None, key: bytes | None = None, headers: Any = None
    ) -> Any:
        return await (await self.send(topic, value, key, headers))

    async def stop(self) -> None:
        self.stopped = True

    def values(self) -> list[bytes]:
        return [v for _, v, _ in self.sent]
