"""Prometheus metrics and the per-service HTTP endpoint (/metrics, /healthz, /readyz).

Labels carry only bounded, non-personal values (topic, event type, reason
code): never an ID, an address or a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServiceMetrics:
    """Metrics every service has; services add their business counters on `registry`."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        r = self.registry
        self.consumed = Counter("clave_events_consumed_total", "Events handled", ["topic", "type"], registry=r)
        self.failures = Counter(
            "clave_handler_failures_total",
            "Handler runs that raised (redelivered)",
            ["topic", "error"],
            registry=r,
        )
        self.duration = Histogram(
            "clave_handler_seconds",
            "Handler processing time",
            ["topic"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.dead_letters = Counter(
            "clave_dlq_messages_total", "Messages sent to a DLQ", ["topic", "reason"], registry=r
        )
        self.outbox_published = Counter(
            "clave_outbox_published_total", "Events relayed from the outbox to Kafka", registry=r
        )
        self.outbox_pending = Gauge("clave_outbox_pending", "Outbox events not yet relayed", registry=r)
        self.relay_errors = Counter("clave_relay_errors_total", "Relay failures (retried)", registry=r)
        self.consumer_lag = Gauge(
            "clave_consumer_lag_messages", "Messages behind the log end, per topic", ["topic"], registry=r
        )
        self.stalled_partitions = Gauge(
            "clave_consumer_stalled_partitions",
            "Partitions with records waiting and no commit for a minute (shared.lag.STALL_S)",
            ["topic"],
            registry=r,
        )
        # Background loops (shared.loops): what escaped a run, what was set aside, what is running.
        self.loop_errors = Counter(
            "clave_loop_errors_total",
            "Background loop runs that raised and were run again after a back-off",
            ["loop", "kind"],
            registry=r,
        )
        self.items_parked = Counter(
            "clave_loop_items_parked_total",
            "Items a background loop failed or parked with a reason instead of retrying them",
            ["loop", "reason"],
            registry=r,
        )
        self.tasks_up = Gauge(
            "clave_background_task_up", "1 while a background task runs, 0 once it died", ["task"], registry=r
        )
        self.producer_events = Counter(
            "clave_producer_events_total",
            "The relay's Kafka producer replaced after aiokafka's idempotence broke it (kind=replaced), "
            "sends retried (kind=retried)",
            ["kind", "error"],
            registry=r,
        )

    def count_producer_event(self, kind: str, exc: BaseException) -> None:
        """The metrics hook of the service's shared.producer.Producer (the relay's)."""
        self.producer_events.labels(kind, exc.__class__.__name__).inc()

    def count_store_commands(self, counts: Mapping[str, int]) -> None:
        """Expose the store client's command counts (shared.store.CommandCounter), read at
        each scrape, as `clave_store_commands_total{command}`."""
        self.registry.register(_StoreCommands(counts))

    def counter(self, name: str, doc: str, labels: list[str] | None = None) -> Counter:
        return Counter(name, doc, labels or [], registry=self.registry)

    def gauge(self, name: str, doc: str, labels: list[str] | None = None) -> Gauge:
        return Gauge(name, doc, labels or [], registry=self.registry)

    def histogram(self, name: str, doc: str, labels: list[str] | None = None) -> Histogram:
        return Histogram(name, doc, labels or [], buckets=LATENCY_BUCKETS, registry=self.registry)


class _StoreCommands(Collector):
    def __init__(self, counts: Mapping[str, int]) -> None:
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "clave_store_commands_total", "Commands sent to the store (round trips), by command", labels=["command"]
        )
        for command, count in sorted(self.counts.items()):
            family.add_metric([command], count)
        yield family


ReadyCheck = Callable[[], Awaitable[bool]]


class HealthServer:
    """A minimal HTTP/1.1 server on asyncio: three GET routes, no dependencies."""

    def __init__(
        self,
        metrics: ServiceMetrics,
        ready: ReadyCheck,
        host: str,
        port: int,
        live: Callable[[], bool] = lambda: True,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        # False once a background task died: /healthz fails too, so the orchestrator restarts us.
        self.live = live
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            path = request.split(b" ", 2)[1].decode("ascii", "replace").split("?")[0]
            if path == "/metrics":
                status, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(self.metrics.registry)
            elif path == "/healthz":
                ok = self.live()
                status, ctype, body = (200 if ok else 503), "text/plain", b"ok\n" if ok else b"background task died\n"
            elif path == "/readyz":
                ok = await self.ready()
                status, ctype, body = (200 if ok else 503), "text/plain", b"ready\n" if ok else b"not ready\n"
            else:
                status, ctype, body = 404, "text/plain", b"not found\n"
            reason = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, IndexError, ConnectionError):
            pass
        finally:
            writer.close()
