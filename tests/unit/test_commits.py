"""Offsets committed together, after the records were handled (shared/commits.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import TopicPartition

from shared.commits import Committers, OffsetCommitter

A0, A1, B0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)


class FakeConsumer:
    def __init__(self, *assigned: TopicPartition) -> None:
        self.assigned = set(assigned)
        self.commits: list[dict[TopicPartition, int]] = []
        self.fail: Exception | None = None
        self.committed = asyncio.Event()

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        if self.fail is not None:
            raise self.fail
        self.commits.append(dict(offsets))
        self.committed.set()


async def test_records_handled_together_are_committed_once_past_the_last() -> None:
    consumer = FakeConsumer(A0, A1, B0)
    committer = OffsetCommitter(consumer, delay_s=0.05)
    for tp, offset in ((A0, 4), (A0, 5), (B0, 9), (A1, 0), (A0, 3)):
        committer.handled(tp.topic, tp.partition, offset)
    assert consumer.commits == []  # not per record
    await asyncio.wait_for(consumer.committed.wait(), 5)
    assert consumer.commits == [{A0: 6, B0: 10, A1: 1}]  # the next record to read; never backwards
    await committer.close()
    assert len(consumer.commits) == 1  # nothing pending: no empty commit


async def test_a_failed_commit_keeps_the_positions_still_assigned() -> None:
    consumer = FakeConsumer(A0, B0)
    committer = OffsetCommitter(consumer, delay_s=3600)
    committer.handled("a", 0, 1)
    committer.handled("b", 0, 7)
    consumer.fail = RuntimeError("rebalancing")
    await committer.flush()
    consumer.fail = None
    consumer.assigned = {A0}  # b/0 went to another consumer meanwhile: its records go there again
    committer.handled("a", 0, 2)
    await committer.close()
    assert consumer.commits == [{A0: 3}]


async def test_a_partition_taken_away_is_not_committed() -> None:
    consumer = FakeConsumer(A0)
    committer = OffsetCommitter(consumer, delay_s=3600)
    committer.handled("a", 0, 1)
    committer.handled("b", 0, 1)  # handled, then b/0 was revoked
    await committer.close()
    assert consumer.commits == [{A0: 2}]


async def test_positions_are_committed_before_partitions_are_taken_away() -> None:
    committers = Committers(delay_s=3600)
    first, second = FakeConsumer(A0), FakeConsumer(B0)
    committers.of(first).handled("a", 0, 3)
    committers.of(second).handled("b", 0, 8)
    assert committers.of(first) is committers.of(first)
    listener: Any = committers.listener()
    await listener.on_partitions_revoked({A0})
    assert first.commits == [{A0: 4}] and second.commits == [{B0: 9}]
    await committers.close()
    assert len(first.commits) == 1 and len(second.commits) == 1


async def test_a_record_handled_while_a_commit_is_in_flight_is_committed_too() -> None:
    """A position handled while the timer's commit awaits the broker gets a timer of its own:
    left pending, it would wait for the next record on this consumer, and an idle consumer's
    partition would show records waiting and no commit (a stalled partition) for ever."""
    consumer = FakeConsumer(A0)
    started, release, both = asyncio.Event(), asyncio.Event(), asyncio.Event()
    plain_commit = consumer.commit

    async def slow_commit(offsets: dict[TopicPartition, int]) -> None:
        started.set()
        await release.wait()
        await plain_commit(offsets)
        if len(consumer.commits) == 2:
            both.set()

    consumer.commit = slow_commit  # type: ignore[method-assign]
    committer = OffsetCommitter(consumer, delay_s=0.01)
    committer.handled("a", 0, 1)
    await asyncio.wait_for(started.wait(), 5)  # the timer's commit awaits the broker
    committer.handled("a", 0, 2)
    release.set()
    await asyncio.wait_for(both.wait(), 5)
    assert consumer.commits == [{A0: 2}, {A0: 3}]
    await committer.close()
    assert len(consumer.commits) == 2


async def test_a_failed_commit_is_tried_again_without_a_next_record() -> None:
    """An idle consumer whose commit failed (the broker away a moment) commits its positions on a
    timer of its own: left for the next record, its partitions would show handled records as
    waiting (a stalled partition) until traffic came back."""
    consumer = FakeConsumer(A0)
    consumer.fail = RuntimeError("coordinator not available")
    committer = OffsetCommitter(consumer, delay_s=0.01)
    committer.handled("a", 0, 4)
    deadline = asyncio.get_running_loop().time() + 5
    while committer.commits < 2:  # the first try, and at least one more on the timer
        assert asyncio.get_running_loop().time() < deadline, "no second try"
        await asyncio.sleep(0.005)
    consumer.fail = None
    await asyncio.wait_for(consumer.committed.wait(), 5)  # no record handled meanwhile
    assert consumer.commits == [{A0: 5}]
    await committer.close()
    assert len(consumer.commits) == 1


async def test_a_commit_failing_at_close_is_not_tried_again() -> None:
    consumer = FakeConsumer(A0)
    committer = OffsetCommitter(consumer, delay_s=0.01)
    committer.handled("a", 0, 1)
    consumer.fail = RuntimeError("broker gone")
    await committer.close()
    assert committer.commits == 1
    assert committer._task is None or committer._task.done()  # noqa: SLF001 - no timer left behind
