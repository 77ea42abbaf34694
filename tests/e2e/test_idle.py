"""An idle stack costs its store almost nothing: at most 2 round trips a second for the five
services together (they used to poll: about 26 a second). Counted by each service's own
store client (`clave_store_commands_total`, a pymongo command listener)."""

from __future__ import annotations

import asyncio
import time

from tests.e2e.conftest import SERVICES, fetch, metric_value, metrics_url
from tools.workbench import WorkbenchSettings

NAME = "clave_store_commands_total"
WINDOW_S = 10.0  # longer than one change-stream wait (shared.relay.WATCH_AWAIT_S)
TARGET_PER_S = 2.0
QUIET_DEADLINE_S = 120.0  # what earlier tests left behind (mail retries, reservations) settles first


def store_commands(settings: WorkbenchSettings) -> dict[str, float]:
    out = {}
    for service in SERVICES:
        status, text = fetch(metrics_url(settings, service))
        assert status == 200, f"{service} /metrics answered {status}"
        assert f"# TYPE {NAME} counter" in text, f"{service} does not expose {NAME}"
        out[service] = metric_value(text, NAME)
    return out


async def test_the_idle_stack_makes_at_most_two_store_round_trips_a_second(stack: WorkbenchSettings) -> None:
    first = await asyncio.to_thread(store_commands, stack)
    # The counter counts: every service has used its store (indexes at start-up, at least).
    assert all(v > 0 for v in first.values()), first
    # Sliding windows of WINDOW_S, sampled every second, until one is quiet enough; a stack
    # that polls never gets there (and then the last windows are reported).
    samples: list[tuple[float, dict[str, float]]] = [(time.monotonic(), first)]
    deadline = time.monotonic() + QUIET_DEADLINE_S
    rates: list[float] = []
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)  # the sampling period of the measurement
        samples.append((time.monotonic(), await asyncio.to_thread(store_commands, stack)))
        now, latest = samples[-1]
        old = [s for s in samples if now - s[0] >= WINDOW_S]
        if not old:
            continue
        t0, earlier = old[-1]
        per_service = {s: (latest[s] - earlier[s]) / (now - t0) for s in SERVICES}
        rate = sum(per_service.values())
        rates.append(rate)
        if rate <= TARGET_PER_S:
            return
    raise AssertionError(
        f"no {WINDOW_S:.0f}s window at <= {TARGET_PER_S}/s in {QUIET_DEADLINE_S:.0f}s; last rates "
        f"{[round(r, 2) for r in rates[-5:]]}, per service in the last window {per_service}"
    )
