"""Consumer lag per topic: how far a service's consumer group is behind the log end."""

from __future__ import annotations

import asyncio
import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from shared.kafka import client_kwargs
from shared.metrics import ServiceMetrics
from shared.settings import PlatformSettings

MEASURE_TIMEOUT_S = 30.0  # a broker that never answers must not hold the lag loop for ever


class LagMonitor:
    def __init__(self, settings: PlatformSettings, group_id: str, topics: list[str], metrics: ServiceMetrics) -> None:
        self.settings = settings
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
            lag = 0
            for tp in (tp for tp in partitions if tp.topic == topic):
                offset = committed.get(tp)
                position = offset.offset if offset is not None and offset.offset >= 0 else starts[tp]
                lag += max(ends[tp] - position, 0)
            self.metrics.consumer_lag.labels(topic).set(lag)

    async def close(self) -> None:
        clients, self._consumer, self._admin = (self._consumer, self._admin), None, None
        for client in clients:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close() if isinstance(client, AIOKafkaAdminClient) else await client.stop()
