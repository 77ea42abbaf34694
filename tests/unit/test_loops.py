"""Background loops (shared/loops.py): a job that raises runs again after a growing back-off,
a task that dies turns /healthz and /readyz to 503, and logs never carry an error's message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from shared import loops
from shared.loops import TaskSupervisor, describe, is_outage, run_periodic
from shared.metrics import HealthServer, ServiceMetrics
from shared.runtime import Service
from shared.settings import PlatformSettings
from shared.store import ServiceStore


def sample(metrics: ServiceMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_describe_names_the_class_and_the_place_never_the_message() -> None:
    try:
        {"a": 1}["maria.perez@example.org"]
    except KeyError as exc:
        text = describe(exc)
    assert text.startswith("KeyError at tests/unit/test_loops.py:")
    assert "maria" not in text and "example.org" not in text


def test_outages_are_the_store_and_the_broker_not_the_items() -> None:
    from aiokafka.errors import KafkaConnectionError

    assert is_outage(AutoReconnect("store away"))
    assert is_outage(KafkaConnectionError())
    assert is_outage(ConnectionResetError())
    assert not is_outage(KeyError("code"))
    assert not is_outage(ValueError("template"))


async def test_a_failing_job_runs_again_after_a_growing_back_off_and_resets_on_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = ServiceMetrics("test")
    delays: list[float] = []
    real_sleep = asyncio.sleep

    async def record(delay: float) -> None:
        delays.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(loops.asyncio, "sleep", record)
    outcomes: list[BaseException | None] = [
        AutoReconnect("store away"),
        AutoReconnect("store away"),
        KeyError("x"),
        None,
        ValueError("y"),
    ]
    done = asyncio.Event()

    async def job() -> None:
        if not outcomes:
            done.set()
            await asyncio.Event().wait()  # park the loop here until cancelled
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome

    task = asyncio.create_task(run_periodic("test", "sweeper", 1.0, job, metrics, max_backoff=3.0))
    await asyncio.wait_for(done.wait(), 5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # 1, 2, then capped at 3; a success resets it to the interval; the next failure starts at 1.
    assert delays == [1.0, 2.0, 3.0, 1.0, 1.0]
    assert sample(metrics, "clave_loop_errors_total", loop="sweeper", kind="outage") == 2
    assert sample(metrics, "clave_loop_errors_total", loop="sweeper", kind="error") == 2


async def test_the_loop_logs_without_the_message(caplog: pytest.LogCaptureFixture) -> None:
    metrics = ServiceMetrics("test")
    failed = asyncio.Event()

    async def job() -> None:
        failed.set()
        raise ValueError("link https://portal/recuperar?token=SECRET")

    caplog.set_level(logging.WARNING, logger="shared.loops")
    task = asyncio.create_task(run_periodic("test", "mail-sender", 60.0, job, metrics))
    await asyncio.wait_for(failed.wait(), 5)
    await asyncio.sleep(0)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert "ValueError at tests/unit/test_loops.py" in caplog.text
    assert "SECRET" not in caplog.text


async def _dies() -> None:
    raise RuntimeError("bug")


async def _returns() -> None:
    return None


async def _forever() -> None:
    await asyncio.Event().wait()


async def test_a_task_that_dies_is_reported_not_one_cancelled_or_allowed_to_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = ServiceMetrics("test")
    supervisor = TaskSupervisor("test", metrics)
    caplog.set_level(logging.ERROR, logger="shared.loops")
    cancelled = supervisor.watch(asyncio.create_task(_forever(), name="cancelled"))
    allowed = supervisor.watch(asyncio.create_task(_returns(), name="watcher"), forever=False)
    await asyncio.sleep(0.01)
    cancelled.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await cancelled
    await allowed
    await asyncio.sleep(0)
    assert supervisor.alive() and supervisor.dead == {}
    assert sample(metrics, "clave_background_task_up", task="watcher") == 1

    died = supervisor.watch(asyncio.create_task(_dies(), name="relay"))
    returned = supervisor.watch(asyncio.create_task(_returns(), name="mail-sender"))
    await asyncio.gather(died, returned, return_exceptions=True)
    await asyncio.sleep(0)  # done callbacks run on the next turn
    assert not supervisor.alive()
    assert supervisor.dead["relay"].startswith("RuntimeError at tests/unit/test_loops.py")
    assert supervisor.dead["mail-sender"] == "returned"
    assert sample(metrics, "clave_background_task_up", task="relay") == 0
    assert "background task relay died (RuntimeError at" in caplog.text


async def test_nothing_is_reported_while_the_service_stops() -> None:
    supervisor = TaskSupervisor("test", ServiceMetrics("test"))
    supervisor.stopping = True
    task = supervisor.watch(asyncio.create_task(_dies(), name="relay"))
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert supervisor.alive()


async def _get(port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


async def test_a_dead_task_turns_healthz_and_readyz_to_503() -> None:
    settings = PlatformSettings(clave_env="development")
    service = Service("test", ServiceStore(settings.mongodb_uri, "clave_unit_loops"), settings)
    ready_checks: list[bool] = []

    async def ready() -> bool:
        # The store and broker of this unit test are not running: only the supervisor's part.
        ready_checks.append(service.supervisor.alive())
        return service.supervisor.alive() and not await asyncio.sleep(0)

    health = HealthServer(service.metrics, ready, "127.0.0.1", 0, live=service.supervisor.alive)
    await health.start()
    assert health._server is not None
    port = health._server.sockets[0].getsockname()[1]
    try:
        assert await _get(port, "/healthz") == (200, b"ok\n")
        assert (await _get(port, "/readyz"))[0] == 200
        task = service.supervisor.watch(asyncio.create_task(_dies(), name="relay"))
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
        assert await _get(port, "/healthz") == (503, b"background task died\n")
        assert (await _get(port, "/readyz"))[0] == 503
        # The service's own readiness says the same before it asks the store or the broker.
        assert not await service.ready()
    finally:
        await health.stop()
        await service.store.close()


async def test_the_service_watches_its_relay_and_its_periodic_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """_after_startup hands the relay's tasks and every periodic job to the supervisor: a relay
    whose publishing task dies makes the service unhealthy; a job that raises does not."""
    from shared import runtime

    class NoLag:
        def __init__(self, *_: Any) -> None:
            return None

        async def measure(self) -> None:
            return None

        async def close(self) -> None:
            return None

    class NoProducer:
        async def stop(self) -> None:
            return None

    monkeypatch.setattr(runtime, "LagMonitor", NoLag)
    settings = PlatformSettings(clave_env="development")
    # A store nobody listens on (port 1): the relay's change stream retries, nothing more.
    store = ServiceStore("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=200", "clave_unit_loops")
    service = Service("test", store, settings)
    start = service.relay.start

    async def start_with_stand_in(producer: Any = None) -> None:
        await start(NoProducer())

    async def relay_bug() -> None:
        raise RuntimeError("relay bug")

    monkeypatch.setattr(service.relay, "start", start_with_stand_in)
    monkeypatch.setattr(service.relay, "_run", relay_bug)
    ran = asyncio.Event()

    async def job() -> None:
        ran.set()
        raise KeyError("an item")

    service.every("sweeper", 60.0, job)
    await service._after_startup()
    try:
        await asyncio.wait_for(ran.wait(), 5)
        for _ in range(100):
            if not service.supervisor.alive():
                break
            await asyncio.sleep(0.01)
        assert set(service.supervisor.dead) == {"test-relay"}
        assert not await service.ready()
    finally:
        await service._shutdown()


async def test_the_lag_monitor_reconnects_after_a_failed_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker away at the lag monitor's first run left a half-started client that failed
    every later run (the lag gauge froze); now a failed run drops its clients."""
    from aiokafka import TopicPartition
    from aiokafka.errors import KafkaConnectionError

    from shared import lag

    starts: list[str] = []

    class Admin:
        def __init__(self, **_: Any) -> None:
            return None

        async def start(self) -> None:
            starts.append("admin")
            if starts.count("admin") == 1:
                raise KafkaConnectionError("broker away")

        async def list_consumer_group_offsets(self, group: str) -> dict[Any, Any]:
            return {TopicPartition("t", 0): type("Offset", (), {"offset": 3})()}

        async def close(self) -> None:
            return None

    class Consumer:
        def __init__(self, **_: Any) -> None:
            self._client = type("Client", (), {"force_metadata_update": staticmethod(_noop)})()

        async def start(self) -> None:
            starts.append("consumer")

        def partitions_for_topic(self, topic: str) -> set[int]:
            return {0}

        async def end_offsets(self, partitions: list[Any]) -> dict[Any, int]:
            return dict.fromkeys(partitions, 10)

        async def beginning_offsets(self, partitions: list[Any]) -> dict[Any, int]:
            return dict.fromkeys(partitions, 0)

        async def stop(self) -> None:
            return None

    monkeypatch.setattr(lag, "AIOKafkaAdminClient", Admin)
    monkeypatch.setattr(lag, "AIOKafkaConsumer", Consumer)
    metrics = ServiceMetrics("test")
    monitor = lag.LagMonitor(PlatformSettings(clave_env="development"), "g", ["t"], metrics)
    with pytest.raises(KafkaConnectionError):
        await monitor.measure()
    await monitor.measure()
    assert starts == ["admin", "admin", "consumer"]
    assert sample(metrics, "clave_consumer_lag_messages", topic="t") == 7


async def _noop() -> None:
    return None
