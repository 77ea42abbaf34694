"""Clave's services in one process, without Kafka or a store server: each service as its app.py
wires it (`build`), its FastStream broker under FastStream's `TestKafkaBroker` (in memory), its
own store class over the in-memory MongoDB (tests/middle/memory_store.py).

`Cluster.deliver` hands a record to the services as Kafka would: to each consumer group through
its subscriber for the topic (FastStream's decoder, ack policy and the service's
`EventPipeline`), with its own partition and offset, and again after each exception
(NACK_ON_ERROR: Kafka redelivers the record at the same offset, to that group alone).
`Cluster.start_relays` runs the services' real outbox relays, their producer delivering each
record in the same way, so one service's events reach the others.

TestKafkaBroker's own `publish` gives every record offset 0. The pipeline keys a dead letter
by the record's position (a redelivered bad record is parked once), so through it a second bad
record on a partition would get no letter: hence records built here, each with its offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import faststream.kafka.testing as fs_testing
from aiokafka import ConsumerRecord
from faststream.kafka import KafkaBroker, TestKafkaBroker

from shared.producer import Producer
from shared.runtime import Service
from shared.settings import PlatformSettings
from shared.store import OUTBOX, PROCESSED
from shared.topics import dlq
from tests.middle.memory_store import MemoryMongo, in_memory

# Fast argon2 (the tests are about the wiring, not the hash) and answers in the clear.
FAST = {"argon2_memory_kib": 1024, "argon2_time_cost": 1, "portal_input": "any"}
MAX_DELIVERIES = 5  # how often a relayed record is delivered to a group that keeps failing it


class NotSettled(AssertionError):
    """A consumer group failed a record at every delivery."""


@dataclass
class Node:
    """One service: its wiring, its in-memory store server and what it was handed."""

    service: Service
    mongo: MemoryMongo

    @property
    def name(self) -> str:
        return self.service.name

    def collection(self, name: str) -> Any:
        """A collection of its store, read directly (mongomock's synchronous API)."""
        return self.mongo.server[self.service.store.db.name][name]

    def outbox(self, topic: str | None = None) -> list[dict[str, Any]]:
        """Its outbox documents (optionally of one topic), in order, each with its event parsed."""
        query = {} if topic is None else {"topic": topic}
        return [{**d, "event": json.loads(bytes(d["value"]))} for d in self.collection(OUTBOX).find(query).sort("_id")]

    def events(self, topic: str) -> list[dict[str, Any]]:
        return [d["event"] for d in self.outbox(topic)]

    def letters(self, topic: str) -> list[dict[str, Any]]:
        """What it dead-lettered from `topic`."""
        return self.outbox(dlq(topic))

    def processed(self) -> int:
        return int(self.collection(PROCESSED).count_documents({}))

    def subscribers(self, topic: str) -> list[Any]:
        """Its FastStream subscriber(s) of `topic`."""
        service = self.service
        return [sub for t, sub in zip(service._consumed_topics, service._subscribers, strict=True) if t == topic]

    def attempts(self, topic: str) -> dict[Any, Any]:
        """The pipeline's failure counts for `topic` (empty once every record settled)."""
        return dict(self.service.pipelines[topic]._attempts)


class BrokerProducer:
    """The relay's producer: each record is delivered (`Cluster.deliver`) to every service
    subscribed to its topic, at once. Like Kafka, producing succeeds whatever the consumers do:
    a record a consumer never settles is kept in `Cluster.failures`, not raised to the relay."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name

    async def send(self, topic: str, *, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> Any:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        self.cluster.published[topic] += 1
        try:
            await self.cluster.deliver(
                topic, value, key=key, headers={k: v.decode() for k, v in headers}, max_deliveries=MAX_DELIVERIES
            )
        except NotSettled as exc:
            self.cluster.failures.append((self.name, topic, str(exc)))
        return done

    async def stop(self) -> None:
        return None


def relay_producer(cluster: Cluster, name: str) -> Producer:
    """A relay's producer (shared.producer.Producer, as the relay holds it) into the test broker."""

    async def make() -> BrokerProducer:
        return BrokerProducer(cluster, name)

    return Producer(make, name=name, first=BrokerProducer(cluster, name))


@dataclass
class Cluster:
    nodes: dict[str, Node]
    broker: KafkaBroker | None = None  # the first node's broker, under TestKafkaBroker
    offsets: Counter[tuple[str, int]] = field(default_factory=Counter)
    published: Counter[str] = field(default_factory=Counter)  # records the relays produced, by topic
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # records a consumer never settled

    def __getitem__(self, name: str) -> Node:
        return self.nodes[name]

    async def deliver(
        self,
        topic: str,
        raw: bytes,
        *,
        key: bytes | None = b"",
        partition: int = 0,
        headers: dict[str, str] | None = None,
        max_deliveries: int = 1,
        to: str | None = None,
        offset: int | None = None,
        after_failure: Callable[[int], None] | None = None,
    ) -> int:
        """Produce one record to `topic` (the next offset of its partition) and have each
        subscribed service (or only `to`), that is each consumer group, handle it through its
        subscriber; again after each exception, at the same offset, as Kafka redelivers.
        Returns the delivery count that settled it (the highest over the groups); raises
        NotSettled if a group still fails after `max_deliveries`. `offset`: a record delivered
        before, again (Kafka never moved past it). `after_failure(n)`: called after failed delivery n."""
        if offset is None:
            offset = self.offsets[(topic, partition)]
            self.offsets[(topic, partition)] += 1
        record = await fs_testing.build_message(
            raw, topic, partition=partition, key=key, headers=headers, serializer=None
        )
        record.offset = offset  # TestKafkaBroker numbers every record 0; Kafka gives each its own
        settled = 0
        for node in self.nodes.values():
            if to is not None and node.name != to:
                continue
            for subscriber in node.subscribers(topic):
                settled = max(settled, await _handle(subscriber, record, max_deliveries, node.name, after_failure))
        return settled

    async def publish(self, topic: str, raw: bytes, *, key: bytes | None = b"") -> None:
        """Through the broker's own publish (FastStream routes it to every group's subscriber;
        TestKafkaBroker gives it offset 0)."""
        assert self.broker is not None
        await self.broker.publish(raw, topic, key=key)

    async def start_relays(self) -> None:
        """Run every service's outbox relay (the real one) with a producer into the test broker."""
        for node in self.nodes.values():
            await node.service.relay.start(producer=BrokerProducer(self, node.name))

    async def stop_relays(self) -> None:
        for node in self.nodes.values():
            await node.service.relay.stop()


async def _handle(
    subscriber: Any,
    record: ConsumerRecord[Any, Any],
    max_deliveries: int,
    group: str,
    after_failure: Callable[[int], None] | None,
) -> int:
    errors: list[str] = []
    for n in range(1, max_deliveries + 1):
        try:
            # What TestKafkaBroker's producer does for a published record: FastStream's decoder,
            # ack policy and middlewares, then the service's handler (its EventPipeline).
            await subscriber.process_message(record)
            return n
        except Exception as exc:
            errors.append(exc.__class__.__name__)
            if after_failure is not None:
                after_failure(n)
    where = f"{record.topic}/{record.partition}/{record.offset}"
    raise NotSettled(f"{group}: {where} not settled after {max_deliveries} deliveries: {errors}")


@contextlib.asynccontextmanager
async def running(*services: Service) -> AsyncIterator[Cluster]:
    """The services on one in-memory broker, each on its own in-memory store server."""
    nodes = {}
    for service in services:
        mongo = MemoryMongo()
        await in_memory(service.store, mongo)
        await service.store.ensure_indexes()
        nodes[service.name] = Node(service, mongo)
    cluster = Cluster(nodes)
    for service in services:
        service.subscribe()  # its consumers, one per lane, as app() makes them
    async with TestKafkaBroker(*(s.broker for s in services)):
        cluster.broker = services[0].broker  # patched in place: it reaches every service
        try:
            yield cluster
        finally:
            with contextlib.suppress(Exception):
                await cluster.stop_relays()
            for node in nodes.values():
                for fn in node.service._stoppers:
                    with contextlib.suppress(Exception):
                        await fn()


def settings(cls: type[PlatformSettings], **overrides: Any) -> Any:
    fast = {k: v for k, v in FAST.items() if k in cls.model_fields}
    return cls(**{**fast, **overrides})


async def until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for `check` with a deadline (polled every 10 ms); the seconds it took."""
    t0 = time.monotonic()
    while not check():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0
