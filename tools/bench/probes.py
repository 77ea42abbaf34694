"""What the stack says about itself: CPU of each process, /metrics scrapes and their deltas."""

import asyncio
import os
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tools.bench.common import INFRA, OPTIONAL, SERVICES
from tools.workbench import WorkbenchSettings as Settings
from tools.workbench import metrics_url

# ------------------------------------------------------------------------------ stack probes


def var_dir() -> Path:
    return Path(os.environ.get("VAR_DIR", "var")).resolve()


def stack_cpu() -> dict[str, float]:
    """user+system CPU seconds of each stack process (from the stack's pid files)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for component in SERVICES + OPTIONAL + INFRA:
        try:
            pid = int((var_dir() / "run" / f"{component}.pid").read_text().strip())
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[component] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


def scrape(settings: Settings, service: str) -> str:
    with urllib.request.urlopen(metrics_url(settings, service), timeout=5) as response:  # noqa: S310 - the stack's own loopback endpoint
        return response.read().decode()  # type: ignore[no-any-return]


async def scrape_all(settings: Settings) -> dict[str, str]:
    """Every service's /metrics; the optional ones (the audit read model) when they answer."""
    texts = await asyncio.gather(*(asyncio.to_thread(scrape, settings, s) for s in SERVICES))
    optional = await asyncio.gather(*(asyncio.to_thread(scrape, settings, s) for s in OPTIONAL), return_exceptions=True)
    found = dict(zip(SERVICES, texts, strict=True))
    found.update({s: t for s, t in zip(OPTIONAL, optional, strict=True) if isinstance(t, str)})
    return found


def sample_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]  # service, histogram, labels without le


def histograms(texts: dict[str, str]) -> dict[SeriesKey, dict[str, Any]]:
    out: dict[SeriesKey, dict[str, Any]] = {}
    for service, text in texts.items():
        for family in text_string_to_metric_families(text):
            if family.type != "histogram":
                continue
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                series = out.setdefault((service, family.name, labels), {"buckets": {}, "count": 0.0, "sum": 0.0})
                if sample.name.endswith("_bucket"):
                    series["buckets"][float(sample.labels["le"])] = sample.value
                elif sample.name.endswith("_count"):
                    series["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    series["sum"] = sample.value
    return out


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative bucket counts."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def histogram_deltas(before: dict[str, str], after: dict[str, str], wall_s: float) -> list[dict[str, Any]]:
    old, new = histograms(before), histograms(after)
    rows = []
    for key, series in sorted(new.items()):
        prev = old.get(key, {"buckets": {}, "count": 0.0, "sum": 0.0})
        count = series["count"] - prev["count"]
        if count <= 0:
            continue
        buckets = {le: v - prev["buckets"].get(le, 0.0) for le, v in series["buckets"].items()}
        service, name, labels = key
        rows.append(
            {
                "service": service,
                "histogram": name,
                "labels": dict(labels),
                "count": int(count),
                "mean_s": (series["sum"] - prev["sum"]) / count,
                "p50_s": bucket_quantile(0.5, buckets),
                "p95_s": bucket_quantile(0.95, buckets),
                # Share of the run this handler was busy (handler histograms only).
                "busy": (series["sum"] - prev["sum"]) / wall_s if name == "clave_handler_seconds" and wall_s else None,
            }
        )
    return rows


async def idle_cpu(seconds: float) -> dict[str, float]:
    """Share of one core each stack process uses with no traffic (background loops)."""
    cpu0, t0 = stack_cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, elapsed = stack_cpu(), time.monotonic() - t0
    return {k: (cpu1[k] - cpu0[k]) / elapsed for k in cpu1 if k in cpu0}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        values = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total
