"""Wiring common to the four services: broker, store, relay, metrics endpoint,
background loops and the FastStream application that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import StreamMessage

from shared.consumer import EventPipeline, Route
from shared.kafka import make_broker
from shared.lag import LagMonitor
from shared.metrics import HealthServer, ServiceMetrics
from shared.relay import OutboxRelay
from shared.settings import PlatformSettings
from shared.store import ServiceStore

log = logging.getLogger(__name__)

Periodic = Callable[[], Awaitable[None]]


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
        self._periodic: list[tuple[str, float, Periodic]] = []
        self._consumed_topics: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._health: HealthServer | None = None
        self._starters: list[Callable[[], Awaitable[None]]] = []
        self._stoppers: list[Callable[[], Awaitable[None]]] = []

    @property
    def group_id(self) -> str:
        # One consumer group per service: instances of a service share the partitions.
        return f"clave-{self.name}"

    def consume(self, topic: str, routes: dict[str, Route], *, hot: bool = False) -> None:
        """Subscribe `routes` to `topic`. A `hot` topic (on the recovery's critical path) gets
        CONSUMER_WORKERS consumers in the group: partitions in parallel, each still in order."""
        self._consumed_topics.append(topic)
        workers = self.settings.consumer_workers if hot else 1
        pipeline = EventPipeline(
            service=self.name,
            topic=topic,
            routes=routes,
            store=self.store,
            settings=self.settings,
            metrics=self.metrics,
            on_committed=self.relay.wake,
        )

        @self.broker.subscriber(
            topic,
            group_id=self.group_id,
            auto_offset_reset="earliest",
            decoder=_raw_body,
            title=f"{self.name}:{topic}",
            max_workers=workers if workers > 1 else None,
        )
        async def handle(msg: KafkaMessage) -> None:
            await pipeline.process(msg.raw_message, msg.body)  # type: ignore[arg-type]

    def every(self, name: str, seconds: float, job: Periodic) -> None:
        """Run `job` every `seconds` while the service is up (sweepers, senders)."""
        self._periodic.append((name, seconds, job))

    def on_start(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._starters.append(fn)

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        self._stoppers.append(fn)

    async def ready(self) -> bool:
        if not await self.store.ping():
            return False
        try:
            return bool(await self.broker.ping(timeout=2.0))
        except Exception:
            return False

    async def _loop(self, name: str, seconds: float, job: Periodic) -> None:
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s loop %s: %s", self.name, name, exc.__class__.__name__)
            await asyncio.sleep(seconds)

    async def _startup(self) -> None:
        port = self.settings.metrics_port(self.name)
        self._health = HealthServer(self.metrics, self.ready, self.settings.metrics_host, port)
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
        lag = LagMonitor(self.settings, self.group_id, self._consumed_topics, self.metrics)
        self._periodic.append(("consumer-lag", 15.0, lag.measure))
        self._stoppers.append(lag.close)
        for name, seconds, job in self._periodic:
            self._tasks.append(asyncio.create_task(self._loop(name, seconds, job), name=name))
        log.info("%s service ready", self.name)

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for fn in self._stoppers:
            await fn()
        await self.relay.stop()
        if self._health is not None:
            await self._health.stop()
        await self.store.close()

    def app(self) -> FastStream:
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
