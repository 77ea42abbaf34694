"""Background loops that no item can stop, and a supervisor that no dead loop escapes.

A service's long-running tasks (the outbox relay and its change-stream watcher, the periodic
jobs: the notifier's sender, the tokens reservation sweeper, the lag monitor) follow one rule:

- a failure caused by one item (a document that does not decode, a template that does not
  render, an unexpected exception from a library on that item) is settled for that item:
  it is failed or parked with its reason, counted (`clave_loop_items_parked_total`), logged
  without secrets, and the loop goes on with the next one;
- an outage (store or broker away: `is_outage`) is retried with a back-off;
- anything else that escapes a job is logged and counted (`clave_loop_errors_total`) and the
  job runs again after a growing back-off (`run_periodic`);
- a task that still ends while the service runs is reported by `TaskSupervisor`: /healthz
  and /readyz answer 503 naming it, so the orchestrator restarts the process (a loop that
  died silently would leave a service that looks healthy and does nothing).

Logs name an exception by its class and where it was raised, never by its message: messages
of library errors may quote the values they choked on (an address, a link, a key).
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiokafka.errors import KafkaError

from shared.metrics import ServiceMetrics
from shared.store import is_transient

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[None]]
# A job that fails again and again waits 1, 2, 4 ... times its interval, at most this long.
BACKOFF_MAX_S = 30.0
# A job that ran this long before failing had recovered: its back-off starts again.
HEALTHY_RUN_S = 60.0


def describe(exc: BaseException) -> str:
    """`KeyError at services/notifier/handlers.py:312 (_render_context)`: the class and the
    innermost frame of the raise, never the message (it may quote a secret or an address)."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ is not None else []
    if not frames:
        return exc.__class__.__name__
    last = frames[-1]
    parts = Path(last.filename).parts
    where = "/".join(parts[-3:]) if len(parts) > 3 else last.filename
    return f"{exc.__class__.__name__} at {where}:{last.lineno} ({last.name})"


def is_outage(exc: BaseException) -> bool:
    """The store, the broker or the network away: retried with a back-off, never blamed on an
    item (the same test as the consumer pipeline's)."""
    return is_transient(exc) or isinstance(exc, KafkaError | OSError | TimeoutError)


class TaskSupervisor:
    """Watches a service's background tasks. A task that ends with an exception (or a task
    meant to run for ever that returns) while the service is not stopping is dead: it is
    logged, `clave_background_task_up{task}` drops to 0, and `alive()` is False, which turns
    /healthz and /readyz to 503."""

    def __init__(self, service: str, metrics: ServiceMetrics) -> None:
        self.service = service
        self.metrics = metrics
        self.dead: dict[str, str] = {}  # task name -> how it ended
        self.stopping = False

    def watch(self, task: asyncio.Task[None], *, forever: bool = True) -> asyncio.Task[None]:
        name = task.get_name()
        self.metrics.tasks_up.labels(name).set(1)

        def ended(t: asyncio.Task[None]) -> None:
            if self.stopping or t.cancelled():
                return
            exc = t.exception()
            if exc is None and not forever:
                return  # a task allowed to finish (the relay's watcher on a store without change streams)
            how = describe(exc) if exc is not None else "returned"
            self.dead[name] = how
            self.metrics.tasks_up.labels(name).set(0)
            log.error(
                "%s: background task %s died (%s); reporting unhealthy so the process is restarted",
                self.service,
                name,
                how,
            )

        task.add_done_callback(ended)
        return task

    def alive(self) -> bool:
        return not self.dead

    def status(self) -> str:
        return ", ".join(f"{name}: {how}" for name, how in sorted(self.dead.items()))


async def run_periodic(
    service: str, name: str, seconds: float, job: Job, metrics: ServiceMetrics, *, max_backoff: float = BACKOFF_MAX_S
) -> None:
    """Run `job` every `seconds`, for ever. An exception that escapes a run is the job's own
    (its items are settled inside it): logged, counted, and the job runs again after
    `seconds`, doubling while it keeps failing (at most `max_backoff`)."""
    loop = asyncio.get_running_loop()
    streak = 0
    while True:
        started = loop.time()
        try:
            await job()
            streak = 0
            delay = seconds
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            streak = 1 if loop.time() - started > HEALTHY_RUN_S else streak + 1
            delay = min(seconds * 2 ** (streak - 1), max(max_backoff, seconds))
            metrics.loop_errors.labels(name, "outage" if is_outage(exc) else "error").inc()
            level = logging.WARNING if is_outage(exc) else logging.ERROR
            log.log(level, "%s loop %s: %s; running it again in %.1fs", service, name, describe(exc), delay)
        await asyncio.sleep(delay)
