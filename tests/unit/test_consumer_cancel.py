"""A cancelled future the handler awaited (a producer or a connection closed under it by someone
else) is a failure like any other: retried, counted, parked in the end. Propagated as a
cancellation it would end FastStream's consume loop for good (a task that ends cancelled is
never restarted) while its consumer stays in the group and heartbeats: its partitions would
wait for ever and nothing would say so. The service's own stop still cancels."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from faststream.kafka import KafkaBroker

from services.tokens.app import invalid_reset
from shared.consumer import HANDLER_ATTEMPTS, HandlerContext, StrayCancellation
from shared.envelope import DeadLetterReason
from shared.schemas import ResetSubmitted
from shared.store import Outgoing
from shared.topics import RECOVERY_OUTCOMES, EventType
from tests.unit.test_consumer import Harness, no_backoff, reset_bytes, reset_doc

__all__ = ["no_backoff"]  # the autouse fixture: no back-off sleeps here either


def cancelled_by_someone_else() -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(future.cancel)
    return future


async def test_a_cancelled_await_in_the_handler_is_retried_then_parked_and_the_next_event_served() -> None:
    async def handler(ctx: HandlerContext, data: ResetSubmitted) -> None:
        if data.request_id.startswith("req-cut"):
            await cancelled_by_someone_else()

    h = Harness(handler)
    record = h.record(json.dumps(reset_doc(request_id="req-cut-1")).encode())
    for _ in range(HANDLER_ATTEMPTS - 1):
        with pytest.raises(StrayCancellation):  # an Exception: FastStream seeks back, its loop goes on
            await h.pipeline.process(record, record.value)
    await h.pipeline.process(record, record.value)
    [letter] = h.store.letters()
    assert letter.headers["clave-dlq-reason"] == DeadLetterReason.HANDLER_ERROR
    assert letter.headers["clave-dlq-detail"] == "handler raised StrayCancellation"
    assert await h.deliver(reset_bytes(request_id="req-next")) == 1
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


async def test_a_cancelled_immediate_reply_changes_nothing() -> None:
    async def answer(ctx: HandlerContext, data: ResetSubmitted) -> None:
        ctx.reply(RECOVERY_OUTCOMES, data.request_id, EventType.RECOVERY_OUTCOME, invalid_reset(data.request_id))

    async def send_now(outgoing: list[Outgoing]) -> None:
        await cancelled_by_someone_else()

    h = Harness(answer)
    h.pipeline.send_now = send_now
    assert await h.deliver(reset_bytes()) == 1  # settled: the outbox copy goes with the relay
    assert [o.topic for o in h.store.outbox] == [RECOVERY_OUTCOMES]


async def test_stopping_the_service_still_cancels_a_handler() -> None:
    started = asyncio.Event()

    async def slow(ctx: HandlerContext, data: ResetSubmitted) -> None:
        started.set()
        await asyncio.sleep(60)

    h = Harness(slow)
    raw = reset_bytes()
    task = asyncio.create_task(h.pipeline.process(h.record(raw), raw))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled() and h.store.outbox == []


async def test_faststream_never_restarts_a_consume_loop_that_ended_cancelled() -> None:
    """Why the pipeline must not let a stray cancellation out: FastStream (pinned) restarts a
    subscriber task that failed, but not one that ended cancelled."""
    broker = KafkaBroker(logger=None)  # (the supervisor's log lines: tests/unit/test_logsafe.py)
    broker._setup_logger()  # what connecting does
    subscriber: Any = broker.subscriber("t", group_id="g")
    runs = {"failed": 0, "cancelled": 0}

    async def fails() -> None:
        runs["failed"] += 1
        if runs["failed"] == 1:
            raise StrayCancellation("cut")

    async def cancelled() -> None:
        runs["cancelled"] += 1
        raise asyncio.CancelledError

    subscriber.add_task(fails)
    subscriber.add_task(cancelled)
    for _ in range(20):  # a few loop turns: the supervisor restarts from a done callback
        await asyncio.sleep(0)
    assert runs == {"failed": 2, "cancelled": 1}
    for task in subscriber.tasks:
        task.cancel()


async def test_a_dead_consume_loop_makes_the_service_not_alive_nor_ready() -> None:
    from types import SimpleNamespace

    from shared.runtime import Service
    from shared.settings import PlatformSettings
    from shared.store import ServiceStore

    settings = PlatformSettings(clave_env="development")
    service = Service("test", ServiceStore(settings.mongodb_uri, "clave_unit_loops"), settings)
    running = asyncio.create_task(asyncio.sleep(60))
    ended = asyncio.create_task(asyncio.sleep(0))
    joined = SimpleNamespace(_subscription=SimpleNamespace(reassignment_in_progress=False))
    subscriber = SimpleNamespace(consumer=joined, tasks=[running])
    service._subscribers = [subscriber]
    assert service.alive()
    await ended
    subscriber.tasks.append(ended)
    assert not service.alive() and not await service.ready()
    service.supervisor.stopping = True  # a stop ends the loops: not a death
    assert service.alive()
    running.cancel()
    await service.store.close()


async def test_an_immediate_reply_that_never_completes_does_not_hold_the_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shared import consumer

    monkeypatch.setattr(consumer, "REPLY_TIMEOUT_S", 0.05)

    async def answer(ctx: HandlerContext, data: ResetSubmitted) -> None:
        ctx.reply(RECOVERY_OUTCOMES, data.request_id, EventType.RECOVERY_OUTCOME, invalid_reset(data.request_id))

    async def never(outgoing: list[Outgoing]) -> None:
        await asyncio.get_running_loop().create_future()  # a delivery future no one completes

    h = Harness(answer)
    h.pipeline.send_now = never
    async with asyncio.timeout(5):
        assert await h.deliver(reset_bytes()) == 1  # settled: the outbox copy goes with the relay
    assert [o.topic for o in h.store.outbox] == [RECOVERY_OUTCOMES]
