"""Helpers for the timing tests: keys chosen by partition, and the figures they report.

Why partitions matter. A Kafka consumer (aiokafka, as the Java client) leaves a partition out
of its next fetch while a record of it is being handled, and that fetch waits at the broker up
to `fetch_max_wait_ms` (500 ms) for data on the partitions it does name. A record that arrives
on the partition the consumer read last therefore waits for that fetch to end: up to half a
second, whatever the record says. The portal's own reader of `recovery.outcomes` behaves the
same. A timing test that sends one kind of request on repeated keys (one citizen's ID several
times) and another kind on fresh random keys measures that wait, not the services. So each
sample's keys are chosen to walk all partitions in turn: every consumer then reads its
partitions alternately and no sample waits for a fetch, whatever its kind.
"""

from __future__ import annotations

import random
import secrets
import statistics
from collections.abc import Callable, Mapping, Sequence

from tests.e2e.conftest import Publisher


def keyed_on(publisher: Publisher, partition: int, make: Callable[[], str]) -> str:
    """A fresh key from `make` that Kafka's default partitioner puts on `partition`."""
    while True:
        key = make()
        if publisher.partition_of(key) == partition:
            return key


def new_rid_on(publisher: Publisher, partition: int) -> str:
    return keyed_on(publisher, partition, lambda: f"req-{secrets.token_hex(12)}")


def gap(median: float, reference: float) -> float:
    return abs(median - reference) / reference


def summary(samples: Mapping[str, Sequence[float]]) -> str:
    """Median and quartiles of each kind, in ms, for the test's output and failure messages."""
    parts = []
    for kind, values in samples.items():
        q1, q2, q3 = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        parts.append(f"{kind} {median:.1f} ms (quartiles {q1:.0f}/{q2:.0f}/{q3:.0f}, n={len(values)})")
    return ", ".join(parts)


def gap_interval(kind: Sequence[float], reference: Sequence[float], rounds: int = 1000) -> tuple[float, float]:
    """A 90 % bootstrap interval of gap(median(kind), median(reference)): how far the measured
    gap may be from the true one, given the spread of these samples."""
    rng = random.Random(1)  # reproducible for the same samples

    def resampled(values: Sequence[float]) -> float:
        return statistics.median(rng.choices(values, k=len(values)))

    gaps = sorted(gap(resampled(kind), resampled(reference)) for _ in range(rounds))
    return gaps[int(0.05 * rounds)], gaps[int(0.95 * rounds) - 1]


def settled(samples: Mapping[str, Sequence[float]], reference: str, limit: float) -> bool:
    """Enough samples to judge: for every kind, the 90 % interval of its gap to `reference`
    lies wholly under `limit` or wholly over it. Until then a timing test takes more samples
    (up to its cap) rather than judge on noise: on two shared cores one sample's spread is
    far larger than the gaps the test must tell apart. The verdict itself is always the
    medians' gap against `limit`."""
    for kind, values in samples.items():
        if kind == reference:
            continue
        low, high = gap_interval(values, samples[reference])
        if low <= limit <= high:
            return False
    return True
