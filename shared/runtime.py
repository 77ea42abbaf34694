"""Wiring common to the four services: broker, store, relay, metrics endpoint,
background loops and the FastStream application that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import StreamMessage

from shared.commits import Committers
from shared.consumer import EventPipeline, InvalidAnswer, Route
from shared.kafka import make_broker
from shared.lag import LagMonitor
from shared.loops import TaskSupervisor, run_periodic
from shared.metrics import HealthServer, ServiceMetrics
from shared.relay import OutboxRelay
from shared.settings import PlatformSettings
from shared.store import ServiceStore
from shared.topics import PORTAL_INPUTS

log = logging.getLogger(__name__)

Periodic = Callable[[], Awaitable[None]]
HEARTBEAT_INTERVAL_MS = 500
FETCH_MAX_WAIT_MS = 500  # aiokafka's default
MAIN_LANE = "main"


def consumer_has_joined(consumer: Any) -> bool:
    """Has this aiokafka consumer an assignment from its group (possibly empty: a group with
    more consumers than partitions leaves some idle, and they are ready too) and no rebalance
    under way? `assignment()` alone cannot tell "not joined yet" from "joined, nothing for
    you", so this reads the subscription state behind it (aiokafka 0.14, pinned; a unit test
    checks the attribute is still there)."""
    state = getattr(consumer, "_subscription", None)
    if state is None:
        return bool(consumer.assignment())
    return not state.reassignment_in_progress


async def _raw_body(msg: StreamMessage[Any], original: Any = None) -> bytes:
    # Hand the handler the exact bytes: parsing (and rejecting) is the pipeline's job.
    return msg.body


def configure_logging(settings: PlatformSettings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("pymongo").setLevel(logging.WARNING)


class Service:
    """One Clave service process. Subclass-free: services register routes and loops."""

    def __init__(self, name: str, store: ServiceStore, settings: PlatformSettings) -> None:
        self.name = name
        self.settings = settings
        self.store = store
        self.metrics = ServiceMetrics(name)
        self.broker: KafkaBroker = make_broker(self.settings, name)
        self.relay = OutboxRelay(name, store, self.settings, self.metrics)
        self.metrics.count_store_commands(store.commands.counts)
        self._periodic: list[tuple[str, float, Periodic]] = []
        self._consumed_topics: list[str] = []
        self._subscribers: list[Any] = []  # FastStream Kafka subscribers, for readiness
        self.pipelines: dict[str, EventPipeline] = {}  # by topic (tests read their state)
        self._lanes: dict[str, list[tuple[str, int]]] = {}  # lane -> (topic, workers), in order
        self._committers: list[Committers] = []  # one per subscriber
        self._offset_commits = self.metrics.counter(
            "clave_offset_commits_total", "OffsetCommit requests sent to Kafka by the consumers"
        )
        self._tasks: list[asyncio.Task[None]] = []
        self.supervisor = TaskSupervisor(name, self.metrics)
        self._health: HealthServer | None = None
        self._starters: list[Callable[[], Awaitable[None]]] = []
        self._stoppers: list[Callable[[], Awaitable[None]]] = []

    @property
    def group_id(self) -> str:
        # One consumer group per service: instances of a service share the partitions.
        return f"clave-{self.name}"

    def consume(
        self,
        topic: str,
        routes: dict[str, Route],
        *,
        hot: bool = False,
        hashing: bool = False,
        answer: InvalidAnswer | None = None,
        lane: str = MAIN_LANE,
    ) -> None:
        """Subscribe `routes` to `topic`. The topics of one `lane` share one Kafka consumer
        (one fetch loop, one heartbeat, one group member), one record at a time: every extra
        consumer costs the broker and the service CPU even when idle, and on 2 cores the
        lanes' parallelism bought nothing but that cost (issue 10). A topic whose answer
        someone waits on behind an argon2 hash (logins) gets its own lane. A `hot` topic
        (on the recovery's critical path) with CONSUMER_WORKERS > 1 gets that many consumers
        of its own: partitions in parallel, each still in order. A `hashing` hot topic (its
        handler waits on argon2) gets at least HASHING_CONSUMER_WORKERS.
        `answer`: portal input whose dead-lettered records still get an answer."""
        self._consumed_topics.append(topic)
        workers = self._workers(hot=hot, hashing=hashing)
        self.pipelines[topic] = EventPipeline(
            service=self.name,
            topic=topic,
            routes=routes,
            store=self.store,
            settings=self.settings,
            metrics=self.metrics,
            on_committed=self.relay.committed,
            answer=answer,
            send_now=self.relay.send_now,
        )
        self._lanes.setdefault(f"{topic}:workers" if workers > 1 else lane, []).append((topic, workers))

    def _workers(self, *, hot: bool, hashing: bool) -> int:
        if not hot:
            return 1
        if hashing:
            return max(self.settings.consumer_workers, self.settings.hashing_consumer_workers)
        return self.settings.consumer_workers

    def subscribe(self) -> None:
        """Create one FastStream subscriber per lane (once every topic is declared; `app()`
        calls it). `_subscribers[i]` is the subscriber of `_consumed_topics[i]`."""
        if self._subscribers or not self._consumed_topics:
            return
        by_topic: dict[str, Any] = {}
        for name, members in self._lanes.items():
            topics = [topic for topic, _ in members]
            subscriber = self._subscriber(name, topics, max(workers for _, workers in members))
            by_topic.update(dict.fromkeys(topics, subscriber))
        self._subscribers = [by_topic[topic] for topic in self._consumed_topics]

    def _subscriber(self, lane: str, topics: list[str], workers: int) -> Any:
        pipelines = {topic: self.pipelines[topic] for topic in topics}
        committers = Committers(on_commit=self._offset_commits.inc)
        self._committers.append(committers)
        subscriber = self.broker.subscriber(
            *topics,
            group_id=self.group_id,
            auto_offset_reset="earliest",
            decoder=_raw_body,
            title=f"{self.name}:{lane}",
            max_workers=workers if workers > 1 else None,
            # A service's consumers all join one group, one after another at start-up; each
            # join makes the members already in rejoin, and they learn of it from their next
            # heartbeat (aiokafka's default: every 3 s). A shorter interval lets the group
            # settle in about a second (the broker's own initial delay is already 0).
            heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
            fetch_max_wait_ms=self._fetch_wait_ms(topics),
            # Offsets are committed by `committers` (shared/commits.py), a moment after the
            # records were handled and together, not one OffsetCommit per record.
            ack_policy=AckPolicy.MANUAL,
            listener=committers.listener(),
            # Replies go through the outbox and the relay's producer (shared.producer), never
            # FastStream's: a record's `reply_to` header (any writer of the topic sets it) would
            # have the service write an empty record to the topic it names, or fail after the
            # handler and be redelivered for ever (a topic it may not write, or the broker's own
            # idempotent producer broken: aio-libs/aiokafka#1017, which nothing here replaces).
            no_reply=True,
        )

        @subscriber
        async def handle(msg: KafkaMessage) -> None:
            record = msg.raw_message
            try:
                await pipelines[record.topic].process(record, msg.body)  # type: ignore[union-attr,arg-type]
            except BaseException:
                # Not handled (an outage: the pipeline backed off already): read it again.
                with contextlib.suppress(Exception):  # a partition taken away: its new owner reads it
                    await msg.nack()
                raise
            if isinstance(msg.consumer, AIOKafkaConsumer):  # (FastStream's test broker keeps no offsets)
                committers.of(msg.consumer).handled(record.topic, record.partition, record.offset)  # type: ignore[union-attr]

        return subscriber

    def _fetch_wait_ms(self, topics: list[str]) -> int:
        # aiokafka's default (500 ms) for what no one waits on; less for a lane that reads
        # portal input (the short wait then serves the lane's other topics too).
        if any(topic in PORTAL_INPUTS for topic in topics):
            return self.settings.portal_fetch_max_wait_ms
        return FETCH_MAX_WAIT_MS

    def every(self, name: str, seconds: float, job: Periodic) -> None:
        """Run `job` every `seconds` while the service is up (sweepers, senders)."""
        self._periodic.append((name, seconds, job))

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._starters.append(fn)

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._stoppers.append(fn)

    async def ready(self) -> bool:
        """Ready means it would handle a request now: no background task has died, the store and
        the broker answer and every consumer has its partitions (a fresh consumer group settles
        for seconds after start)."""
        if not self.alive():
            return False
        if not self.consumers_assigned():
            return False
        if not await self.store.ping():
            return False
        try:
            return bool(await self.broker.ping(timeout=2.0))
        except Exception:
            return False

    def alive(self) -> bool:
        """No background task and no consume loop has died. FastStream runs one loop per
        consumer; one that ended while the service runs leaves its consumer in the group,
        heartbeating, with partitions no one serves (and FastStream does not restart a loop
        that ended cancelled)."""
        return self.supervisor.alive() and (self.supervisor.stopping or self.consumers_running())

    def consumers_running(self) -> bool:
        return not any(task.done() for s in self._subscribers for task in getattr(s, "tasks", ()))

    def consumers_assigned(self) -> bool:
        """Has every consumer of every subscription completed its group join, and is none of
        them in the middle of a rebalance?"""
        if not self._subscribers:
            return True
        for subscriber in self._subscribers:
            consumers = list(getattr(subscriber, "consumer_subgroup", None) or [])
            if not consumers and getattr(subscriber, "consumer", None) is not None:
                consumers = [subscriber.consumer]
            if not consumers or not all(consumer_has_joined(c) for c in consumers):
                return False
        return True

    async def _startup(self) -> None:
        port = self.settings.metrics_port(self.name)
        self._health = HealthServer(self.metrics, self.ready, self.settings.metrics_host, port, live=self.alive)
        await self._health.start()
        await self._wait_for_store()
        await self.store.ensure_indexes()
        for fn in self._starters:
            await fn()
        insecure = self.settings.insecure_defaults()
        if insecure:
            log.warning("development keys in use (%s): set them in production", ", ".join(insecure))

    async def _wait_for_store(self) -> None:
        for _ in range(60):
            if await self.store.ping():
                return
            await asyncio.sleep(1)
        raise RuntimeError("store not reachable")

    async def _after_startup(self) -> None:
        await self.relay.start()
        for task, forever in self.relay.tasks():
            self.supervisor.watch(task, forever=forever)
        lag = LagMonitor(self.settings, self.group_id, self._consumed_topics, self.metrics)
        self._periodic.append(("consumer-lag", 15.0, lag.measure))
        self._stoppers.append(lag.close)
        for name, seconds, job in self._periodic:
            loop = run_periodic(self.name, name, seconds, job, self.metrics)
            self._tasks.append(self.supervisor.watch(asyncio.create_task(loop, name=name)))
        log.info("%s service ready", self.name)

    async def _shutdown(self) -> None:
        self.supervisor.stopping = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):  # a death was reported already
                await task
        for fn in self._stoppers:
            await fn()
        for committers in self._committers:
            with contextlib.suppress(Exception):  # not committed: redelivered, dropped as duplicates
                await committers.close()
        await self.relay.stop()
        if self._health is not None:
            await self._health.stop()
        await self.store.close()

    def app(self) -> FastStream:
        self.subscribe()
        return FastStream(
            self.broker,
            on_startup=[self._startup],
            after_startup=[self._after_startup],
            on_shutdown=[self._shutdown],
        )

    def run(self) -> None:
        configure_logging(self.settings)
        asyncio.run(self.app().run())


SettingsT = TypeVar("SettingsT", bound=PlatformSettings)


def serve(name: str, settings: SettingsT, build: Callable[[SettingsT], Service]) -> None:
    """A service's entry point: refuse unsafe production settings before anything is built
    or connects, then run."""
    settings.ensure_safe(f"clave-{name}")
    build(settings).run()
