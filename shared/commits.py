"""Offsets committed together, a moment after the records were handled (issue 10).

FastStream's NACK_ON_ERROR commits after every record: one OffsetCommit round trip to the
broker per record handled, about 15 per recovery across the services, each waited for
before the consumer takes its next record. Here a consumer's handled positions are
committed together at most COMMIT_DELAY_S later, and before its partitions are taken away
(a rebalance) or the service stops.

At-least-once is kept: only the offset after a record whose handling returned (handled or
dead-lettered) is ever committed, never the position of one still being handled; a crash
redelivers the records handled since the last commit, and the consumers drop them as
`duplicate_event` (their processed-event record), as they already did for the one record
in flight. A failed commit (the broker away, a rebalance under way) keeps the positions of
the partitions still assigned and is tried again on a timer of its own, each time a little
later (up to RETRY_MAX_S): an idle consumer would otherwise leave them uncommitted until its
next record, and its lag would show records waiting that were handled long ago. The others'
records go to their new owner again, as duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from aiokafka import ConsumerRebalanceListener, TopicPartition

log = logging.getLogger(__name__)

COMMIT_DELAY_S = 0.5
RETRY_MAX_S = 30.0  # the longest wait between tries of a commit that keeps failing


class OffsetCommitter:
    """The handled positions of one aiokafka consumer, committed in the background."""

    def __init__(
        self, consumer: Any, delay_s: float = COMMIT_DELAY_S, on_commit: Callable[[], None] | None = None
    ) -> None:
        self.consumer = consumer
        self.delay_s = delay_s
        self.on_commit = on_commit
        self._handled: dict[TopicPartition, int] = {}  # partition -> offset of the next record
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._failures = 0  # commits failed in a row: the next try waits longer
        self._closing = False
        self.commits = 0  # OffsetCommit requests made (tests)

    def handled(self, topic: str, partition: int, offset: int) -> None:
        """The record at `offset` is done with: commit past it soon."""
        tp = TopicPartition(topic, partition)
        if offset + 1 > self._handled.get(tp, -1):
            self._handled[tp] = offset + 1
        self._schedule(self.delay_s)

    def _schedule(self, delay_s: float) -> None:
        if not self._closing and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._later(delay_s), name="offset-commit")

    async def _later(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        # Positions handled while this commit awaits the broker get a timer of their own (left
        # to the next record, an idle consumer would never commit them: a stalled partition).
        self._task = None
        await self.flush()

    async def flush(self) -> None:
        """Commit what was handled so far (nothing when nothing is pending)."""
        async with self._lock:
            pending, self._handled = self._handled, {}
            # A partition taken away meanwhile: its records go to the new owner again.
            assigned = set(self.consumer.assignment())
            offsets = {tp: offset for tp, offset in pending.items() if tp in assigned}
            if not offsets:
                return
            try:
                self.commits += 1
                if self.on_commit is not None:
                    self.on_commit()
                await self.consumer.commit(offsets)
            except Exception as exc:
                # Keep what is still ours for the next try; a newer position wins.
                assigned = set(self.consumer.assignment())
                for tp, offset in offsets.items():
                    if tp in assigned and offset > self._handled.get(tp, -1):
                        self._handled[tp] = offset
                self._failures += 1
                retry_s = min(RETRY_MAX_S, self.delay_s * 2**self._failures)
                log.warning("offset commit failed (%s); tried again in %.1f s", exc.__class__.__name__, retry_s)
                if self._handled:
                    self._schedule(retry_s)
            else:
                self._failures = 0

    async def close(self) -> None:
        """Commit what is pending and stop the timer (a commit failing now is not tried again:
        the next owner of these partitions reads their records again, as duplicates)."""
        self._closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()


class Committers:
    """One OffsetCommitter per consumer of a subscription (FastStream gives one consumer per
    worker); also its rebalance listener, which commits before partitions are taken away."""

    def __init__(self, delay_s: float = COMMIT_DELAY_S, on_commit: Callable[[], None] | None = None) -> None:
        self.delay_s = delay_s
        self.on_commit = on_commit  # counts OffsetCommit requests (clave_offset_commits_total)
        self._by_consumer: dict[int, OffsetCommitter] = {}

    def of(self, consumer: Any) -> OffsetCommitter:
        committer = self._by_consumer.get(id(consumer))
        if committer is None or committer.consumer is not consumer:
            committer = self._by_consumer[id(consumer)] = OffsetCommitter(consumer, self.delay_s, self.on_commit)
        return committer

    def all(self) -> list[OffsetCommitter]:
        return list(self._by_consumer.values())

    async def close(self) -> None:
        for committer in self.all():
            await committer.close()

    def listener(self) -> ConsumerRebalanceListener:
        return _CommitOnRevoke(self)


class _CommitOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, committers: Committers) -> None:
        self.committers = committers

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # aiokafka awaits this before the group rebalances: the positions handled so far are
        # still ours to commit, so the next owner starts after them.
        for committer in self.committers.all():
            await committer.flush()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None
