"""The client's producer: aiokafka's idempotent producer, replaced when it breaks.

aiokafka's idempotent producer does not survive some broker errors (aio-libs/aiokafka#1017):
on OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId or InvalidProducerEpoch its
sender task ends and every later send fails the same way, for ever (seen after a Kafka
restart). `Producer.send_and_wait` starts a new producer then and sends again; errors that say
the broker is away or moving are retried too, a bounded number of times with a doubling
back-off; any other error is raised at once. A retried send may deliver a record twice: Clave
drops a redelivered event by its id.

A deliberate small copy of Clave's `shared.producer` (the same behaviour, without what only
Clave's services use): this package ships to the portal on its own and imports nothing of
Clave's. A change to one should be made to the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

PRODUCER_BROKEN = (OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId, InvalidProducerEpoch)
ATTEMPTS = 6
BACKOFF_S = 0.25
MAX_BACKOFF_S = 4.0
DEADLINE_S = 60.0  # no new try after this long (one try may wait request_timeout_ms)


def is_retriable(exc: BaseException) -> bool:
    if isinstance(exc, (*PRODUCER_BROKEN, KafkaTimeoutError, OSError, TimeoutError)):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


class Producer:
    """`make` returns a new, started AIOKafkaProducer (or a stand-in in tests). `on_event(event,
    error)`, if given, is told of each "replaced" producer and each "retried" send."""

    def __init__(
        self,
        make: Callable[[], Awaitable[Any]],
        *,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        deadline_s: float = DEADLINE_S,
        on_event: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self._make = make
        self.attempts, self.backoff_s, self.max_backoff_s = attempts, backoff_s, max_backoff_s
        self.deadline_s = deadline_s
        self.on_event = on_event
        self.current: Any = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        if self.current is None:
            self.current = await self._make()

    async def stop(self) -> None:
        current, self.current = self.current, None
        if current is not None:
            await current.stop()

    async def send_and_wait(self, topic: str, value: bytes, *, key: bytes, headers: list[tuple[str, bytes]]) -> Any:
        delay = self.backoff_s
        give_up_at = asyncio.get_running_loop().time() + self.deadline_s
        for attempt in range(1, self.attempts + 1):
            used = self.current
            if used is None:
                raise RuntimeError("the producer is not started")
            try:
                return await used.send_and_wait(topic, value, key=key, headers=headers)
            except Exception as exc:
                last = attempt == self.attempts or asyncio.get_running_loop().time() + delay > give_up_at
                if last or not is_retriable(exc):
                    raise
                if isinstance(exc, PRODUCER_BROKEN):
                    await self._replace(used, exc)
                self._event("retried", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def _replace(self, broken: Any, exc: BaseException) -> None:
        """A new producer for `broken` (once, however many sends met it); if none can start
        yet (the broker away), the next try meets the broken one and tries again."""
        async with self._lock:
            if broken is not self.current:
                return
            try:
                self.current = await self._make()
            except (KafkaError, OSError):
                return
        self._event("replaced", exc)
        with contextlib.suppress(Exception):
            await broken.stop()

    def _event(self, event: str, exc: BaseException) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):
                self.on_event(event, exc)
