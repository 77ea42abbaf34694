"""The `make bench` command line: parse the options, run the parts, write the report
(what the bench measures: tools/bench/__init__.py)."""

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from tools.bench import summary
from tools.bench.common import console, ratio
from tools.bench.dlq import dlq_throughput
from tools.bench.floor import bench_argon2, floor_figures
from tools.bench.flow import end_to_end, first_request_to_mail
from tools.bench.probes import histogram_deltas, idle_cpu, var_dir
from tools.bench.report import print_report, summarize_e2e
from tools.workbench import workbench_settings


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = workbench_settings()
    threads = args.threads
    results: dict[str, Any] = {
        "environment": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "argon2_memory_kib": settings.argon2_memory_kib,
            "argon2_time_cost": settings.argon2_time_cost,
            "argon2_parallelism": settings.argon2_parallelism,
            "questions": len(settings.question_ids()),
            "password_history": settings.password_history,
            "kafka": settings.kafka_bootstrap_servers,
            "var_dir": str(var_dir()),
        }
    }
    with console.status(f"argon2id: hashing on 1 and {threads} threads ..."):
        argon = await asyncio.to_thread(bench_argon2, settings, threads, args.argon2_seconds)
    results["argon2"] = {k: v.as_dict() for k, v in argon.items()}
    results["floor"] = floor_figures(settings, argon, threads)

    if args.first_request:
        with console.status("the first request after the services start ..."):
            first = await first_request_to_mail(settings, args.step_timeout)
        results["first_request_to_mail_ms"] = first["first_request_to_mail_ms"]
        results["first_request"] = first
        console.print(
            f"first request after the services start (stack.sh services-up took {first['services_up_s']:.1f}s): "
            f"e-mail after {first['first_request_to_mail_ms']:.0f} ms"
        )

    e2e = None
    idle: dict[str, float] = {}
    if args.idle_seconds > 0:
        with console.status(f"stack CPU with no traffic, {args.idle_seconds:.0f}s ..."):
            idle = await idle_cpu(args.idle_seconds)
        results["idle_core_share"] = idle
    sweep = []
    for level in args.sweep:
        console.print(f"sweep: {args.sweep_n} recoveries, {level} at a time")
        run_ = await end_to_end(settings, args.sweep_n, level, 0, args.step_timeout, args.budget)
        sweep.append(summary.point(run_, level))
    if args.n > 0:
        e2e = await end_to_end(settings, args.n, args.concurrency, args.serial, args.step_timeout, args.budget)
        results["headline"] = summary.headline(results, summary.point(e2e, args.concurrency), sweep)
        r = results["end_to_end"] = summarize_e2e(e2e, args.n, args.concurrency, idle)
        bench_case = results["floor"]["cases"]["bench_citizen"]
        floor_rate = bench_case["max_recoveries_per_s"]
        cores = os.cpu_count() or 1
        results["efficiency"] = {
            "floor_recoveries_per_s": floor_rate,
            "measured_recoveries_per_s": r["recoveries_per_s"],
            "throughput_efficiency": ratio(r["recoveries_per_s"], floor_rate),
            "floor_cpu_ms": bench_case["cpu_ms_per_recovery"],
            "services_cpu_ms": r["cpu_ms_per_recovery_services"],
            "stack_cpu_ms": r["cpu_ms_per_recovery_stack"],
            "argon2_share_services": ratio(bench_case["cpu_ms_per_recovery"], r["cpu_ms_per_recovery_services"]),
            "argon2_share_stack": ratio(bench_case["cpu_ms_per_recovery"], r["cpu_ms_per_recovery_stack"]),
            "cpu_ceiling_recoveries_per_s": cores * 1000 / r["cpu_ms_per_recovery_stack"]
            if r["cpu_ms_per_recovery_stack"]
            else 0.0,
        }
        results["metrics"] = histogram_deltas(e2e.metrics_before, e2e.metrics_after, e2e.wall_s)
    if args.dlq > 0:
        with console.status(f"{args.dlq} malformed records through the DLQ path ..."):
            results["dlq"] = await dlq_throughput(settings, args.dlq)
    results["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results, e2e, threads)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="recoveries end to end (0: argon2 only) [100]")
    parser.add_argument("--serial", type=int, default=5, help="recoveries one at a time first: idle latency [5]")
    parser.add_argument("--concurrency", type=int, default=20, help="recoveries in flight at once [20]")
    parser.add_argument("--threads", type=int, default=2, help="threads for the parallel argon2 measure [2]")
    parser.add_argument("--argon2-seconds", type=float, default=1.5, help="duration of each argon2 measure [1.5]")
    parser.add_argument("--dlq", type=int, default=300, help="malformed records for the DLQ-path measure (0: skip)")
    parser.add_argument("--step-timeout", type=float, default=60, help="max seconds per wait in one recovery [60]")
    parser.add_argument("--budget", type=float, default=120, help="max seconds for the end-to-end phase [120]")
    parser.add_argument(
        "--idle-seconds", type=float, default=3, help="measure the stack's CPU with no traffic first (0: skip) [3]"
    )
    parser.add_argument(
        "--first-request",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart the services, then time the first request to its e-mail [on]",
    )
    parser.add_argument(
        "--sweep",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        default=[1, 4, 10],
        help="concurrency levels measured before the main run, for the chart ('' for none) [1,4,10]",
    )
    parser.add_argument("--sweep-n", type=int, default=30, help="recoveries per sweep level [30]")
    parser.add_argument("--out", type=Path, default=None, help="where latest.json and latest.png go [var/bench]")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.n < 0 or args.serial < 0 or args.dlq < 0 or args.concurrency < 1 or args.threads < 1:
        parser.error("--n, --serial, --dlq >= 0; --concurrency, --threads >= 1")
    started = time.perf_counter()
    try:
        results = asyncio.run(run(args))
    except Exception as exc:  # the stack could not be driven: say what, exit non-zero
        console.print(f"[red]BENCH FAILED[/red]: {exc.__class__.__name__}: {exc}")
        sys.exit(1)
    results["bench_seconds"] = time.perf_counter() - started
    console.print(f"bench took {results['bench_seconds']:.0f}s")
    if "headline" in results:
        summary.write(args.out or var_dir() / "bench", results["headline"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        console.print(f"results written to {args.json}")
    if results.get("end_to_end", {}).get("completed", 1) == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
