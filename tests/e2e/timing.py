"""Helpers for the timing tests: keys chosen by partition, an order of the kinds that favours
none, and a paired verdict on the gaps that drifting machine load cannot tip.

Why partitions matter. A Kafka consumer (aiokafka, as the Java client) leaves a partition out
of its next fetch while a record of it is being handled, and that fetch waits at the broker up
to `fetch_max_wait_ms` (500 ms) for data on the partitions it does name. A record that arrives
on the partition the consumer read last therefore waits for that fetch to end: up to half a
second, whatever the record says. The portal's own reader of `recovery.outcomes` behaves the
same. A timing test that sends one kind of request on repeated keys (one citizen's ID several
times) and another kind on fresh random keys measures that wait, not the services. So each
sample's keys are chosen to walk all partitions in turn: every consumer then reads its
partitions alternately and no sample waits for a fetch, whatever its kind.

Why pairs. On two shared cores the load of other processes moves every sample by tens of per
cent within seconds, far more than the 5 % the tests must tell apart. Comparing medians of
all samples of each kind lets that drift in: a burst of load that happens to fall on more
samples of one kind makes it look slower, and a later run may show the opposite sign. So a
timing test runs in cycles, each timing one sample of every kind back to back (in an order
that rotates, see `balanced_orders`), and judges the per-cycle ratios kind / reference: load
that lasts longer than a cycle weighs on both sides of a ratio and cancels (see `PairedTiming`).
"""

from __future__ import annotations

import math
import secrets
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # only a type: the unit tests of the verdict import this module without a stack
    from tests.e2e.conftest import Publisher

Verdict = Literal["pass", "fail", "open"]
CONFIDENCE = 0.90  # of the interval around each paired estimate


def keyed_on(publisher: Publisher, partition: int, make: Callable[[], str]) -> str:
    """A fresh key from `make` that Kafka's default partitioner puts on `partition`."""
    while True:
        key = make()
        if publisher.partition_of(key) == partition:
            return key


def new_rid_on(publisher: Publisher, partition: int) -> str:
    return keyed_on(publisher, partition, lambda: f"req-{secrets.token_hex(12)}")


def balanced_orders(a: str, b: str, c: str) -> tuple[tuple[str, str, str], ...]:
    """The six orders of three kinds, chained so that each ends with the kind the next one
    starts with (the last ends with the first's). Run in this order, again and again, each
    kind takes each place in a cycle equally often, and each kind follows each kind (itself
    included) equally often: what a request leaves running after its outcome (a relay's last
    write, the audit projection, a recovery mail) weighs on every kind alike. A plain rotation
    does not do that: with (unknown, wrong, right) rotating, unknown follows right twice as
    often as wrong does and right never follows right, which alone once made unknown IDs
    look 27 % slower."""
    return ((a, b, c), (c, b, a), (a, c, b), (b, a, c), (c, a, b), (b, c, a))


def summary(samples: Mapping[str, Sequence[float]]) -> str:
    """Median and quartiles of each kind, in ms, for the test's output and failure messages."""
    parts = []
    for kind, values in samples.items():
        q1, q2, q3 = statistics.quantiles(values, n=4)
        median = statistics.median(values)
        parts.append(f"{kind} {median:.1f} ms (quartiles {q1:.0f}/{q2:.0f}/{q3:.0f}, n={len(values)})")
    return ", ".join(parts)


@dataclass(frozen=True)
class PairedGap:
    """How much slower (positive) or faster (negative) one kind is than the reference, as a
    fraction of the reference's time, from `n` cycles: a point estimate and an interval."""

    estimate: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.estimate:+.1%} ({CONFIDENCE:.0%} interval {self.low:+.1%}..{self.high:+.1%}, {self.n} pairs)"


def paired_gap(kind: Sequence[float], reference: Sequence[float], confidence: float = CONFIDENCE) -> PairedGap:
    """The gap of `kind` to `reference` from samples paired by index (sample i of each was
    taken in the same cycle).

    Each pair gives the log of its ratio, kind / reference. The estimate is their
    Hodges-Lehmann estimate (the median of all pairwise means, the Walsh averages), and the
    interval the matching Wilcoxon signed-rank interval (order statistics of the Walsh
    averages; normal approximation of the rank statistic, rounded outward). When the two kinds
    cost the same, each pair's kinds are interchangeable (the order rotates), so its log ratio
    is symmetric about 0, which is all the interval assumes: nothing about the shape of the
    noise, however skewed or heavy-tailed load makes it. The estimate resists outliers (up to
    29 % of the pairs) and, on long-tailed noise, needs fewer pairs than the median of the
    differences. Logs make the gap relative and let a slow spell scale both sides alike; the
    figures are given back as fractions (ratio - 1)."""
    logs = [math.log(k / r) for k, r in zip(kind, reference, strict=True)]
    n = len(logs)
    if n < 2:
        raise ValueError(f"a paired gap needs 2 pairs at least, got {n}")
    sums: list[float] = []  # of each pair of pairs (with itself too): twice the Walsh averages
    for i, log in enumerate(logs):
        sums.extend([log + other for other in logs[i:]])
    walsh = [total / 2 for total in sorted(sums)]
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    spread = math.sqrt(n * (n + 1) * (2 * n + 1) / 24)  # sd of the signed-rank statistic
    outer = max(1, math.floor(len(walsh) / 2 - z * spread))  # 1-based rank of the lower bound
    return PairedGap(
        estimate=math.expm1(statistics.median(walsh)),
        low=math.expm1(walsh[outer - 1]),
        high=math.expm1(walsh[len(walsh) - outer]),
        n=n,
    )


def judged(gap: PairedGap, limit: float) -> Verdict:
    """`fail` when the interval lies wholly beyond the limit (slower or faster by more than
    `limit`); `pass` when it lies wholly within it; `open` while it straddles either bound."""
    if gap.low > limit or gap.high < -limit:
        return "fail"
    if -limit <= gap.low and gap.high <= limit:
        return "pass"
    return "open"


def finally_judged(gap: PairedGap, limit: float) -> Verdict:
    """The verdict once no more samples will come: the interval's, or when it still straddles
    a bound, the point estimate's against the limit."""
    verdict = judged(gap, limit)
    if verdict != "open":
        return verdict
    return "pass" if abs(gap.estimate) <= limit else "fail"


class PairedTiming:
    """Samples taken in cycles (one of every kind, back to back) and the verdict on them.

    The rule, for each kind against the reference kind:
    - after each whole round of cycles (`every`), from `least` cycles on, compute the paired
      gap (see `paired_gap`): the Hodges-Lehmann estimate of the per-cycle ratio and its 90 %
      interval;
    - the kind fails when that interval lies wholly beyond the limit (the evidence says the
      gap exceeds it), and passes when the interval lies wholly within the limit;
    - while an interval straddles the limit, sampling goes on (every kind, a whole round at a
      time) until every kind is decided, or `most` cycles are in; at `most`, a kind still
      undecided is judged on its point estimate: it passes when |estimate| <= limit.
    The limit is `limit`, or `floor_ms` over the reference's median when that is larger (a
    gap of a few milliseconds is noise whatever the fraction).

    A real leak still fails: a steady gap shifts every pair alike, so the estimate sits on
    it and the interval narrows around it as pairs come in. Noise that flips sign (a slow
    spell on one kind here, on the other there) cancels inside pairs or averages out."""

    def __init__(
        self,
        kinds: Sequence[str],
        reference: str,
        limit: float,
        least: int,
        most: int,
        every: int = 1,
        floor_ms: float = 0.0,
    ) -> None:
        assert reference in kinds and least <= most
        self.kinds = tuple(kinds)
        self.reference = reference
        self.base_limit = limit
        self.least, self.most, self.every = least, most, every
        self.floor_ms = floor_ms
        self.samples: dict[str, list[float]] = {kind: [] for kind in kinds}
        self._gaps: tuple[int, dict[str, PairedGap]] = (0, {})  # computed for so many cycles

    @property
    def cycles(self) -> int:
        return len(self.samples[self.reference])

    @property
    def limit(self) -> float:
        return max(self.base_limit, self.floor_ms / statistics.median(self.samples[self.reference]))

    def add(self, cycle: Mapping[str, float]) -> None:
        """One cycle's times, in ms, one per kind."""
        assert set(cycle) == set(self.kinds), cycle
        for kind in self.kinds:
            self.samples[kind].append(cycle[kind])

    def gaps(self) -> dict[str, PairedGap]:
        if self._gaps[0] != self.cycles:
            reference = self.samples[self.reference]
            self._gaps = (self.cycles, {k: paired_gap(self.samples[k], reference) for k in self.compared()})
        return self._gaps[1]

    def compared(self) -> list[str]:
        return [k for k in self.kinds if k != self.reference]

    def done(self) -> bool:
        """Time to stop: `most` cycles in, or from `least` on, at the end of a round, every kind
        decided by its interval. (Not as soon as one kind's interval lies beyond the limit: the
        kinds share the reference's samples, and a few slow ones of the reference can put one
        kind's interval past the limit for a while; in a model of the loaded machine that
        stopped about 1 run in 40 with no gap at all.)"""
        if self.cycles >= self.most:
            return True
        if self.cycles < self.least or self.cycles % self.every:
            return False
        limit = self.limit
        return all(judged(g, limit) != "open" for g in self.gaps().values())

    def verdicts(self) -> dict[str, Verdict]:
        """Each kind's verdict as things stand: the interval's, or (at `most` cycles) the point
        estimate's when the interval still straddles the limit; `open` before that."""
        limit = self.limit
        last = self.cycles >= self.most
        return {k: finally_judged(g, limit) if last else judged(g, limit) for k, g in self.gaps().items()}

    def failed(self) -> list[str]:
        return [k for k, v in self.verdicts().items() if v == "fail"]

    def report(self) -> str:
        """The medians of all kinds, and each kind's paired gap to the reference with its verdict."""
        limit, verdicts = self.limit, self.verdicts()
        paired = "; ".join(f"{k}: {g} -> {verdicts[k]}" for k, g in self.gaps().items())
        return (
            f"{summary(self.samples)}\n"
            f"paired gap to {self.reference} (Hodges-Lehmann, limit {limit:.1%}, {self.cycles} cycles): {paired}"
        )
