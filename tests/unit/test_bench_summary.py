"""The bench's headline figures, comparison and chart from made-up points (no stack)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tools.bench import summary


def point(concurrency: int, rate: float, p99: float) -> dict[str, Any]:
    return {
        "concurrency": concurrency,
        "completed": 10,
        "recoveries_per_s": rate,
        "request_to_mail_ms": {"p50": p99 / 3, "p95": p99 / 2, "p99": p99},
        "cpu_ms_per_recovery": {"identity": 90.0, "kafka": 70.0, "store": 30.0},
        "store_round_trips_per_recovery": 70.0,
        "store_round_trips_by_service": {"identity": 20.0},
        "kafka_records_per_recovery": 17.0,
        "kafka_records_consumed_per_recovery": 15.0,
        "kafka_offset_commits_per_recovery": 4.0,
    }


RESULTS = {
    "floor": {"cases": {"bench_citizen": {"max_recoveries_per_s": 10.0, "cpu_ms_per_recovery": 95.0}}},
    "environment": {"loadavg_start": [1, 1, 1], "loadavg_end": [2, 2, 2]},
    "first_request_to_mail_ms": 900.0,
}


def test_headline_takes_the_half_peak_point_at_the_lowest_concurrency() -> None:
    latest = summary.headline(RESULTS, point(10, 4.0, 3000), [point(1, 1.0, 200), point(4, 3.0, 400)])
    assert latest["efficiency"] == 0.4
    assert latest["peak_recoveries_per_s"] == 4.0
    assert latest["half_peak"]["concurrency"] == 4 and latest["half_peak"]["request_to_mail_ms"]["p99"] == 400
    assert latest["argon2_share_of_stack_cpu"] == 95.0 / 190.0
    assert [p["concurrency"] for p in latest["sweep"]] == [1, 4, 10]
    assert latest["kafka_offset_commits_per_recovery"] == 4.0
    assert latest["kafka_records_consumed_per_recovery"] == 15.0


def test_write_keeps_the_previous_run_and_draws_the_chart(tmp_path: Path) -> None:
    first = summary.headline(RESULTS, point(10, 2.0, 3000), [point(1, 1.0, 200)])
    second = summary.headline(RESULTS, point(10, 4.0, 1500), [point(1, 1.5, 150)])
    summary.write(tmp_path, first)
    summary.write(tmp_path, second)
    assert json.loads((tmp_path / "previous.json").read_text())["recoveries_per_s"] == 2.0
    assert json.loads((tmp_path / "latest.json").read_text())["recoveries_per_s"] == 4.0
    assert (tmp_path / "latest.png").read_bytes()[:4] == b"\x89PNG"
    rows = summary.compare(first, second).columns[3]._cells
    assert "+100 %" in rows  # recoveries/s doubled
