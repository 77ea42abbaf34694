"""Consumer lag per topic: how far a service's consumer group is behind the log end; and
stalled partitions: records waiting while the group's committed offset stays put (a consumer
that is in the group and heartbeats yet serves a partition no more is otherwise invisible)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.kafka import client_kwargs
from shared.metrics import ServiceMetrics
from shared.settings import PlatformSettings

log = logging.getLogger(__name__)

MEASURE_TIMEOUT_S = 30.0  # a broker that never answers must not hold the lag loop for ever
# Records waiting and no commit on their partition for this long: stalled. Longer than any
# handler takes, shorter than anyone waiting at the portal would accept.
STALL_S = 60.0


class LagMonitor:
    def __init__(
        self,
        settings: PlatformSettings,
        group_id: str,
        topics: list[str],
        metrics: ServiceMetrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.clock = clock
        # Per partition: the position last measured, since when records have waited behind it
        # unmoved, and whether any waited then.
        self._positions: dict[TopicPartition, tuple[int, float, bool]] = {}
        self._stalled: set[TopicPartition] = set()
        self.group_id = group_id
        self.topics = topics
        self.metrics = metrics
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def measure(self) -> None:
        """One measurement, bounded in time. After any failure the clients are dropped and the
        next run connects afresh: a client left half-started (the broker was away at the
        first run) would otherwise fail every run after it, and the lag gauge would freeze."""
        try:
            async with asyncio.timeout(MEASURE_TIMEOUT_S):
                await self._measure()
        except BaseException:
            await self.close()
            raise

    async def _measure(self) -> None:
        if self._admin is None or self._consumer is None:
            self._admin = AIOKafkaAdminClient(**client_kwargs(self.settings))
            await self._admin.start()
            self._consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
            await self._consumer.start()
        await self._consumer._client.force_metadata_update()  # noqa: SLF001 - an unsubscribed consumer has none
        committed = await self._admin.list_consumer_group_offsets(self.group_id)
        partitions = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(self._consumer.partitions_for_topic(topic) or set())
        ]
        ends = await self._consumer.end_offsets(partitions)
        starts = await self._consumer.beginning_offsets(partitions)
        for topic in self.topics:
            lag = stalled = 0
            for tp in (tp for tp in partitions if tp.topic == topic):
                offset = committed.get(tp)
                position = offset.offset if offset is not None and offset.offset >= 0 else starts[tp]
                waiting = max(ends[tp] - position, 0)
                lag += waiting
                stalled += self._is_stalled(tp, position, waiting)
            self.metrics.consumer_lag.labels(topic).set(lag)
            self.metrics.stalled_partitions.labels(topic).set(stalled)

    def _is_stalled(self, tp: TopicPartition, position: int, waiting: int) -> bool:
        """Records have waited on `tp` for STALL_S and its committed offset has not moved. The
        clock starts when records are first seen waiting, not when the offset last moved: a
        partition quiet for minutes that has just got a record (committed a moment later) has
        not stalled."""
        now = self.clock()
        last = self._positions.get(tp)
        since = last[1] if last is not None and last[0] == position and last[2] else now
        self._positions[tp] = (position, since, waiting > 0)
        stalled = waiting > 0 and now - since >= STALL_S
        if stalled and tp not in self._stalled:
            log.warning(
                "%s: %s/%d has %d records waiting and no commit for %.0f s",
                self.group_id,
                tp.topic,
                tp.partition,
                waiting,
                now - since,
            )
        if stalled:
            self._stalled.add(tp)
        else:
            self._stalled.discard(tp)
        return stalled

    async def close(self) -> None:
        clients, self._consumer, self._admin = (self._consumer, self._admin), None, None
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close() if isinstance(client, AIOKafkaAdminClient) else await client.stop()
