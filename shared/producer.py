"""The one Kafka producer of the platform: aiokafka's idempotent producer, replaced when it breaks.

aiokafka's idempotent producer does not survive some broker errors (aio-libs/aiokafka#1017):
on OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId or InvalidProducerEpoch its
sender task ends, and every later send fails with the same error, for ever (the Java client
bumps the epoch instead). The fault suite's Kafka restart produced them. `Producer` starts a
new one (a new producer id, sequences from 0) when a send fails so, and retries what failed.

Retries are bounded, with a doubling back-off: the broken producer's replacement, and
errors that say the broker is away or moving (aiokafka's `retriable` ones, a send that timed
out, a socket error). Anything else (an ACL refusal, a record too large) is raised at once.
A retried send may deliver a record twice (the first try may have landed): every consumer
of the platform drops a redelivered event by its id.

The outbox relay keeps its own unbounded retry loop (an outage is retried for as long as it
lasts, from the outbox) and uses `send` and `recover`; commands and tools use `send_and_wait`
or `send_many`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    KafkaTimeoutError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from shared.kafka import client_kwargs
from shared.settings import PlatformSettings

log = logging.getLogger(__name__)

# What leaves aiokafka's idempotent producer unusable (its sender task ends on them).
PRODUCER_BROKEN = (OutOfOrderSequenceNumber, ProducerFenced, UnknownProducerId, InvalidProducerEpoch)
ATTEMPTS = 6
BACKOFF_S = 0.25
MAX_BACKOFF_S = 4.0  # 0.25 + 0.5 + 1 + 2 + 4: about 8 s of waiting in all, plus the sends'
# No new try after this long: a send waits up to request_timeout_ms (40 s) for a broker that
# is away, so the attempts alone do not bound the time.
DEADLINE_S = 60.0

Headers = Sequence[tuple[str, bytes]]
# Events for the metrics hook: "replaced" (a broken producer was replaced), "retried" (a
# send is tried again after a retriable error).
OnEvent = Callable[[str, BaseException], None]


@dataclass(frozen=True)
class Message:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = ()


def is_retriable(exc: BaseException) -> bool:
    """An error a later try of the same send may not meet (the broker away, restarting or
    moving a partition), or the broken producer that `recover` replaces."""
    if isinstance(exc, (*PRODUCER_BROKEN, KafkaTimeoutError, OSError, TimeoutError)):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


class Producer:
    """A started producer, replaced when it breaks. `make` returns a new, started producer
    (an AIOKafkaProducer, or a stand-in in tests); `first`, when given, is used first."""

    def __init__(
        self,
        make: Callable[[], Awaitable[Any]],
        *,
        name: str = "producer",
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        deadline_s: float = DEADLINE_S,
        on_event: OnEvent | None = None,
        first: Any = None,
    ) -> None:
        self._make = make
        self.name = name
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.deadline_s = deadline_s
        self.on_event = on_event
        self._current: Any = first
        self._lock = asyncio.Lock()
        self.replaced = 0  # how many broken producers were replaced

    @property
    def current(self) -> Any:
        return self._current

    async def start(self) -> None:
        if self._current is None:
            self._current = await self._make()

    async def stop(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            await current.stop()

    async def send(
        self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()
    ) -> asyncio.Future[Any]:
        """One try, as aiokafka's `send`: the future of the broker's acknowledgement."""
        if self._current is None:
            raise RuntimeError(f"{self.name}: the producer is not started")
        future: asyncio.Future[Any] = await self._current.send(topic, value=value, key=key, headers=list(headers))
        return future

    async def recover(self, exc: BaseException, failed: Any = None) -> bool:
        """After a failed send: replace the producer if `exc` broke it (`failed`: the producer
        the send used, so that concurrent failures replace it once). False when it was not
        broken, or its replacement could not start (the broker away: the next failure tries
        again)."""
        if not isinstance(exc, PRODUCER_BROKEN):
            return False
        async with self._lock:
            broken = self._current if failed is None else failed
            if broken is not self._current:
                return True  # another send replaced it meanwhile
            try:
                fresh = await self._make()
            except (KafkaError, OSError) as err:
                log.warning("%s: broken by %s; no new producer yet (%s)", self.name, _name(exc), _name(err))
                return False
            self._current = fresh
            self.replaced += 1
        log.warning("%s: producer broken by %s, replaced", self.name, _name(exc))
        self._event("replaced", exc)
        with contextlib.suppress(Exception):
            await broken.stop()
        return True

    async def send_and_wait(self, topic: str, value: bytes, *, key: bytes | None = None, headers: Headers = ()) -> Any:
        """Send and wait for the acknowledgement, retrying as the module says."""
        return (await self.send_many([Message(topic, value, key, headers)]))[0]

    async def send_many(self, messages: Iterable[Message]) -> list[Any]:
        """Send all (in order, pipelined) and wait for every acknowledgement; what failed with
        a retriable error is sent again, in order, after a back-off. The results, in order."""
        pending = dict(enumerate(messages))
        results: dict[int, Any] = {}
        delay = self.backoff_s
        give_up_at = asyncio.get_running_loop().time() + self.deadline_s
        for attempt in range(1, self.attempts + 1):
            producer = self._current
            failed = await self._try(pending, results)
            if not failed:
                break
            errors = [failed[i] for i in sorted(failed)]
            final = next((e for e in errors if not is_retriable(e)), None)
            if final is not None:
                raise final
            exc = next((e for e in errors if isinstance(e, PRODUCER_BROKEN)), errors[0])
            if attempt == self.attempts or asyncio.get_running_loop().time() + delay > give_up_at:
                raise exc
            await self.recover(exc, producer)
            self._event("retried", exc)
            log.warning("%s: %s; %d send(s) again in %.2fs", self.name, _name(exc), len(failed), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)
            pending = {i: pending[i] for i in sorted(failed)}  # in their order again
        return [results[i] for i in sorted(results)]

    async def _try(self, pending: dict[int, Message], results: dict[int, Any]) -> dict[int, BaseException]:
        """Send each pending message once; fill `results`, return the failures by index."""
        futures: dict[int, asyncio.Future[Any]] = {}
        failed: dict[int, BaseException] = {}
        for i, m in pending.items():
            try:
                futures[i] = await self.send(m.topic, m.value, key=m.key, headers=m.headers)
            except Exception as exc:
                failed[i] = exc
        done = await asyncio.gather(*futures.values(), return_exceptions=True)
        for i, result in zip(futures, done, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result  # cancelled: not ours to swallow
                failed[i] = result
            else:
                results[i] = result
        return failed

    def _event(self, event: str, exc: BaseException) -> None:
        if self.on_event is not None:
            with contextlib.suppress(Exception):  # a metrics hook must not fail a send
                self.on_event(event, exc)


async def started_kafka_producer(settings: PlatformSettings, **kwargs: Any) -> AIOKafkaProducer:
    """A started AIOKafkaProducer; one that cannot start is closed before the error goes up
    (no "Unclosed AIOKafkaProducer" warning besides the error)."""
    producer = AIOKafkaProducer(**client_kwargs(settings), **kwargs)
    try:
        await producer.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await producer.stop()
        raise
    return producer


def kafka_producer(
    settings: PlatformSettings,
    *,
    name: str = "producer",
    on_event: OnEvent | None = None,
    attempts: int = ATTEMPTS,
    **kwargs: Any,
) -> Producer:
    """A `Producer` of idempotent AIOKafkaProducers (acks=all) for these settings; `kwargs`
    go to AIOKafkaProducer (client_id, linger_ms...). Call `start()` before sending."""
    options = {"enable_idempotence": True, **kwargs}

    async def make() -> AIOKafkaProducer:
        return await started_kafka_producer(settings, **options)

    return Producer(make, name=name, on_event=on_event, attempts=attempts)


def _name(exc: BaseException) -> str:
    return exc.__class__.__name__
