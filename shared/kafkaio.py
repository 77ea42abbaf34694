"""Reading and writing whole topics: the `clave` command and the audit service's rebuild.

`read_topic` reads a whole topic (or from a point in time) up to the end
offsets seen when it starts, so a replay of a live log terminates.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from shared.envelope import CONTENT_TYPE, CloudEvent
from shared.kafka import client_kwargs
from shared.producer import kafka_producer
from shared.settings import PlatformSettings


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: str | None
    value: bytes
    headers: dict[str, str]
    timestamp_ms: int


def record_of(msg: ConsumerRecord[Any, Any]) -> Record:
    """A consumed record as plain values (key and headers decoded; bytes kept as they came)."""
    return Record(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        key=msg.key.decode("utf-8", "replace") if msg.key else None,
        value=msg.value or b"",
        headers={k: v.decode("utf-8", "replace") for k, v in (msg.headers or [])},
        timestamp_ms=msg.timestamp,
    )


async def publish(settings: PlatformSettings, topic: str, key: str, event: CloudEvent) -> None:
    producer = kafka_producer(settings, name="publish")
    await producer.start()
    try:
        await producer.send_and_wait(
            topic, event.to_bytes(), key=key.encode(), headers=[("content-type", CONTENT_TYPE.encode())]
        )
    finally:
        await producer.stop()


async def publish_raw(settings: PlatformSettings, topic: str, key: bytes | None, value: bytes) -> None:
    producer = kafka_producer(settings, name="publish-raw", enable_idempotence=False)  # as it always was
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def partitions_of(settings: PlatformSettings, topic: str) -> list[int]:
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await _started(consumer)
    try:
        return sorted(consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def read_topic(
    settings: PlatformSettings,
    topic: str,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    partition: int | None = None,
    starts: Mapping[int, int] | None = None,
) -> AsyncGenerator[Record, None]:
    """The records of `topic` (or of one partition), one partition after another; `starts`
    (partition -> offset) begins there instead (a partition it omits: from its beginning)."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await _started(consumer)
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or await _partitions(consumer, topic))
        if partition is not None:
            partitions = [p for p in partitions if p == partition]
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        firsts = await consumer.beginning_offsets(tps)
        if since is not None:
            found = await consumer.offsets_for_times({tp: int(since.timestamp() * 1000) for tp in tps})
            firsts = {tp: (found[tp].offset if found.get(tp) else ends[tp]) for tp in tps}
        if starts is not None:
            firsts.update({tp: max(firsts[tp], starts[tp.partition]) for tp in tps if tp.partition in starts})
        # One partition after another: each is in order, which is what the audit chain needs.
        for tp in tps:
            if firsts[tp] >= ends[tp]:
                continue
            consumer.seek(tp, firsts[tp])
            done = False
            # Up to the end seen at the start; the position test also ends a partition whose
            # last offsets hold no record a consumer is given.
            while not done and await consumer.position(tp) < ends[tp]:
                batch = await consumer.getmany(tp, timeout_ms=2000, max_records=1000)
                for msg in batch.get(tp, []):
                    if msg.offset >= ends[tp]:
                        done = True
                        break
                    if until is not None and msg.timestamp > until.timestamp() * 1000:
                        done = True
                        break
                    yield record_of(msg)
                    if msg.offset + 1 >= ends[tp]:
                        done = True
                        break
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


async def _started(client: AIOKafkaConsumer) -> None:
    """Start a client; one that cannot start (no broker) is closed before the error goes up, so
    the caller sees the error alone, not also an "Unclosed AIOKafka..." warning."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call
    return consumer.partitions_for_topic(topic) or set()
