"""3. The DLQ path of recovery.requests: one consumer pipeline on its cheapest path."""

import asyncio
import time
from typing import Any

from aiokafka import AIOKafkaProducer

from shared.kafka import client_kwargs
from shared.topics import RECOVERY_REQUESTS
from tools.bench.flow import wait_metric
from tools.bench.probes import sample_sum, scrape, stack_cpu
from tools.workbench import WorkbenchSettings as Settings

# ------------------------------------------------------------------------------ 3. DLQ path


async def dlq_throughput(settings: Settings, count: int, timeout: float = 60.0) -> dict[str, Any]:
    """`count` records that are not CloudEvents on recovery.requests: identity parks each one
    in recovery.requests.dlq (sealed, through the outbox, audited). One pipeline, no argon2."""
    name, labels = "clave_dlq_messages_total", {"topic": RECOVERY_REQUESTS}
    before = sample_sum(await asyncio.to_thread(scrape, settings, "identity"), name, **labels)
    cpu0 = stack_cpu()
    producer = AIOKafkaProducer(**client_kwargs(settings), linger_ms=5)
    await producer.start()
    t0 = time.perf_counter()
    try:
        futures = [
            await producer.send(RECOVERY_REQUESTS, b'{"bench": "not a cloudevent", "n": %d}' % i, key=b"bench-%d" % i)
            for i in range(count)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    published_s = time.perf_counter() - t0
    waited = await wait_metric(settings, "identity", name, before + count, timeout, **labels)
    elapsed = time.perf_counter() - t0
    cpu1 = stack_cpu()
    return {
        "messages": count,
        "published_s": published_s,
        "elapsed_s": elapsed if waited is not None else None,
        "events_per_s": count / elapsed if waited is not None else None,
        "identity_cpu_ms_per_event": (cpu1.get("identity", 0) - cpu0.get("identity", 0)) / count * 1000,
        "stack_cpu_ms_per_event": (sum(cpu1.values()) - sum(cpu0.values())) / count * 1000,
        "cpu_ms_per_event": {k: (cpu1[k] - cpu0[k]) / count * 1000 for k in cpu1 if k in cpu0},
    }
