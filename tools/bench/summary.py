"""The bench's headline figures: `var/bench/latest.json`, before/after against the previous
run's, and a chart (throughput and latency percentiles against concurrency, CPU per part).

Absolute figures drift with the machine (2 shared cores here): compare ratios of one run
(efficiency, the CPU shares, round trips and records per recovery), or two runs made back
to back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from tools.bench.common import OPTIONAL, SERVICES, console, percentile
from tools.bench.flow import EndToEnd
from tools.bench.probes import sample_sum

PORTAL_RECORDS = 2  # what the portal publishes per recovery: the request and the reset
STORE_COMMANDS = "clave_store_commands_total"
PUBLISHED = "clave_outbox_published_total"


def counter_delta(e2e: EndToEnd, name: str) -> dict[str, float]:
    """A counter's increase over the measured phase, by service."""
    out = {}
    for service in SERVICES + OPTIONAL:
        if service in e2e.metrics_after:
            before = sample_sum(e2e.metrics_before.get(service, ""), name) if service in e2e.metrics_before else 0.0
            out[service] = sample_sum(e2e.metrics_after[service], name) - before
    return out


def point(e2e: EndToEnd, concurrency: int) -> dict[str, Any]:
    """One concurrency level: throughput, request -> mail percentiles, costs per recovery."""
    done = e2e.completed
    per = max(len(done), 1)
    to_mail = [r.to_mail_s * 1000 for r in done if r.to_mail_s is not None]
    commands = counter_delta(e2e, STORE_COMMANDS)
    published = counter_delta(e2e, PUBLISHED)
    consumed = counter_delta(e2e, "clave_events_consumed_total")
    commits = counter_delta(e2e, "clave_offset_commits_total")
    return {
        "concurrency": concurrency,
        "completed": len(done),
        "recoveries_per_s": e2e.throughput,
        "request_to_mail_ms": {f"p{q}": percentile(to_mail, q) for q in (50, 95, 99)},
        "cpu_ms_per_recovery": {k: v / per * 1000 for k, v in sorted(e2e.cpu.items())},
        "store_round_trips_per_recovery": sum(commands.values()) / per,
        "store_round_trips_by_service": {k: v / per for k, v in commands.items()},
        "kafka_records_per_recovery": sum(published.values()) / per + PORTAL_RECORDS,
        # Records the services handled; before shared/commits.py, one OffsetCommit each.
        "kafka_records_consumed_per_recovery": sum(consumed.values()) / per,
        "kafka_offset_commits_per_recovery": sum(commits.values()) / per,
    }


def headline(results: dict[str, Any], main: dict[str, Any], sweep: list[dict[str, Any]]) -> dict[str, Any]:
    floor = results["floor"]["cases"]["bench_citizen"]["max_recoveries_per_s"]
    points = sorted([*sweep, main], key=lambda p: p["concurrency"])
    rated = [p for p in points if p["recoveries_per_s"]]
    peak = max((p["recoveries_per_s"] for p in rated), default=None)
    half = next((p for p in rated if peak and p["recoveries_per_s"] >= peak / 2), None)
    cpu = main["cpu_ms_per_recovery"]
    argon2_ms = results["floor"]["cases"]["bench_citizen"]["cpu_ms_per_recovery"]
    return {
        "recoveries_per_s": main["recoveries_per_s"],
        "hashing_floor_per_s": floor,
        "efficiency": main["recoveries_per_s"] / floor if main["recoveries_per_s"] and floor else None,
        "argon2_share_of_stack_cpu": argon2_ms / sum(cpu.values()) if cpu else None,
        "cpu_ms_per_recovery": cpu,
        "store_round_trips_per_recovery": main["store_round_trips_per_recovery"],
        "store_round_trips_by_service": main["store_round_trips_by_service"],
        "kafka_records_per_recovery": main["kafka_records_per_recovery"],
        "kafka_records_consumed_per_recovery": main.get("kafka_records_consumed_per_recovery"),
        "kafka_offset_commits_per_recovery": main.get("kafka_offset_commits_per_recovery"),
        "request_to_mail_ms": main["request_to_mail_ms"],
        "first_request_to_mail_ms": results.get("first_request_to_mail_ms"),
        "peak_recoveries_per_s": peak,
        "half_peak": None
        if half is None
        else {
            "concurrency": half["concurrency"],
            "recoveries_per_s": half["recoveries_per_s"],
            "request_to_mail_ms": half["request_to_mail_ms"],
        },
        "concurrency": main["concurrency"],
        "sweep": points,
        "loadavg": [results["environment"].get("loadavg_start"), results["environment"].get("loadavg_end")],
    }


FIGURES = [
    ("recoveries_per_s", "recoveries/s", None),
    ("hashing_floor_per_s", "hashing floor/s", None),
    ("efficiency", "efficiency", None),
    ("argon2_share_of_stack_cpu", "argon2 share of stack CPU", None),
    ("store_round_trips_per_recovery", "store round trips/recovery", None),
    ("kafka_records_per_recovery", "Kafka records/recovery", None),
    ("kafka_offset_commits_per_recovery", "Kafka offset commits/recovery", None),
    ("request_to_mail_ms", "request->mail p50 ms", "p50"),
    ("request_to_mail_ms", "request->mail p99 ms", "p99"),
    ("first_request_to_mail_ms", "first request->mail ms", None),
]


def _figure(doc: dict[str, Any], key: str, sub: str | None) -> float | None:
    value = doc.get(key)
    if sub is not None:
        value = (value or {}).get(sub)
    return value if isinstance(value, int | float) else None


def compare(previous: dict[str, Any], latest: dict[str, Any]) -> Table:
    table = Table("figure", "previous", "latest", "change", title="before / after (previous var/bench/latest.json)")
    for key, label, sub in FIGURES:
        a, b = _figure(previous, key, sub), _figure(latest, key, sub)
        change = f"{(b - a) / a * 100:+.0f} %" if a and b is not None else "-"
        table.add_row(label, "-" if a is None else f"{a:.3g}", "-" if b is None else f"{b:.3g}", change)
    for part in sorted(set(previous.get("cpu_ms_per_recovery", {})) | set(latest.get("cpu_ms_per_recovery", {}))):
        a, b = previous.get("cpu_ms_per_recovery", {}).get(part), latest.get("cpu_ms_per_recovery", {}).get(part)
        change = f"{(b - a) / a * 100:+.0f} %" if a and b is not None else "-"
        table.add_row(
            f"CPU ms/recovery {part}", "-" if a is None else f"{a:.0f}", "-" if b is None else f"{b:.0f}", change
        )
    return table


def chart(latest: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in latest["sweep"] if p["recoveries_per_s"]]
    conc = [p["concurrency"] for p in points]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    ax1.plot(conc, [p["recoveries_per_s"] for p in points], "o-", label="measured")
    ax1.axhline(latest["hashing_floor_per_s"], color="grey", linestyle="--", label="hashing floor")
    ax1.axhline(latest["hashing_floor_per_s"] / 2, color="grey", linestyle=":", label="50 % target")
    ax1.set(title="throughput", xlabel="recoveries in flight", ylabel="recoveries/s")
    ax1.legend()
    for q in ("p50", "p95", "p99"):
        ax2.plot(conc, [p["request_to_mail_ms"][q] for p in points], "o-", label=q)
    ax2.axhline(500, color="grey", linestyle=":", label="p99 target")
    ax2.set(title="request -> mail", xlabel="recoveries in flight", ylabel="ms", yscale="log")
    ax2.legend()
    cpu = latest["cpu_ms_per_recovery"]
    ax3.barh(list(cpu), list(cpu.values()))
    ax3.set(title=f"CPU per recovery (concurrency {latest['concurrency']})", xlabel="ms")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(out_dir: Path, latest: dict[str, Any]) -> None:
    """latest.json (the previous one kept as previous.json, and compared), latest.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "latest.json"
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        path.replace(out_dir / "previous.json")
        console.print(compare(previous, latest))
    path.write_text(json.dumps(latest, indent=2, default=str) + "\n", encoding="utf-8")
    console.print(f"headline figures written to {path}")
    try:
        chart(latest, out_dir / "latest.png")
        console.print(f"chart drawn: {out_dir / 'latest.png'}")
    except ImportError:
        console.print("no chart: matplotlib is not installed (make install installs it)")
