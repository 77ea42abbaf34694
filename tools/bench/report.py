"""The printed report and the JSON summaries."""

import os
from typing import Any

from rich.table import Table

from tools.bench.common import OPTIONAL, SERVICES, console, ms, percentile
from tools.bench.flow import EndToEnd, Recovery


def print_report(results: dict[str, Any], e2e: EndToEnd | None, threads: int) -> None:
    env = results["environment"]
    console.rule("[bold]Clave benchmark")
    console.print(
        f"{env['cpus']} CPUs, load average {env['loadavg_start']} at start, Python {env['python']}; "
        f"argon2id m={env['argon2_memory_kib']} KiB t={env['argon2_time_cost']} p={env['argon2_parallelism']}; "
        f"{env['questions']} security questions; key history {env['password_history']}"
    )

    t = Table(title="1. argon2id with the configured parameters")
    for col in ("measure", "ops", "wall ms/op", "CPU ms/op", "ops/s", "CPU/wall"):
        t.add_column(col, justify="right" if col != "measure" else "left")
    for key, row in results["argon2"].items():
        t.add_row(
            key,
            str(row["ops"]),
            f"{row['ms_per_op']:.2f}",
            f"{row['cpu_ms_per_op']:.2f}",
            f"{row['ops_per_s']:.1f}",
            f"{row['cpu_s'] / row['wall_s']:.2f}",
        )
    console.print(t)
    console.print(
        "CPU/wall below the thread count means other processes took the CPU meanwhile: the floor "
        "below uses CPU ms/op, which does not depend on them."
    )

    floor = results["floor"]
    t = Table(title="Hashing floor of one recovery")
    for col in (
        "case",
        "identity verifies",
        "password verifies",
        "password hashes",
        "hashes",
        "argon2 CPU ms",
        f"max/s on {threads} cores",
        f"max/s at measured {threads}-thread rate",
    ):
        t.add_column(col, justify="right" if col != "case" else "left")
    for name, case in floor["cases"].items():
        t.add_row(
            name,
            str(case["identity_verifies"]),
            str(case["password_verifies"]),
            str(case["password_hashes"]),
            str(case["hashes"]),
            f"{case['cpu_ms_per_recovery']:.0f}",
            f"{case['max_recoveries_per_s']:.1f}",
            f"{case['max_recoveries_per_s_now']:.1f}",
        )
    console.print(t)

    if e2e is not None:
        r = results["end_to_end"]
        t = Table(title=f"2. End to end: {r['n']} recoveries, {r['concurrency']} at a time")
        t.add_column("measure")
        t.add_column("value", justify="right")
        t.add_row("completed / timeout / other", f"{r['completed']} / {r['timeouts']} / {r['other']}")
        t.add_row("import (CLI) + initial keys", f"{r['import_s']:.1f}s + {r['initial_keys_s'] or 0:.1f}s")
        t.add_row("wall, first request -> last completed", f"{r['wall_s']:.2f}s")
        t.add_row("throughput", f"{r['recoveries_per_s'] or 0:.2f} recoveries/s")
        for name, label in (
            ("to_mail", "request -> e-mail written"),
            ("to_mail_seen", "request -> e-mail read"),
            ("reset", "reset -> completed"),
        ):
            lat = r["latency_s"][name]
            t.add_row(f"{label} p50/p95/p99 ms", f"{ms(lat['p50'])} / {ms(lat['p95'])} / {ms(lat['p99'])}")
        t.add_row("drain: last 'key changed' mail after", f"{r['drain_s'] or 0:.2f}s")
        if r["serial"]["n"]:
            idle = r["serial"]
            t.add_row(
                f"idle system ({idle['n']} one at a time): e-mail / reset p50, max ms",
                f"{ms(idle['to_mail']['p50'])}, {ms(idle['to_mail']['max'])} / "
                f"{ms(idle['reset']['p50'])}, {ms(idle['reset']['max'])}",
            )
        if r["machine_busy"] is not None:
            t.add_row(
                "machine CPU busy during the run (all processes)",
                f"{r['machine_busy'] * 100:.0f}% (this stack: {r['stack_share_of_machine'] * 100:.0f}%)",
            )
        console.print(t)

        t = Table(title="CPU per recovery (over the run, incl. drain)")
        t.add_column("component")
        t.add_column("CPU s", justify="right")
        t.add_column("ms / recovery", justify="right")
        t.add_column("idle: % of a core", justify="right")
        t.add_column("ms / recovery above idle", justify="right")
        for comp, sec in r["cpu_s"].items():
            idle = r["idle_core_share"].get(comp)
            t.add_row(
                comp,
                f"{sec:.2f}",
                f"{r['cpu_ms_per_recovery'][comp]:.1f}",
                "-" if idle is None else f"{idle * 100:.0f}",
                f"{r['cpu_ms_per_recovery_above_idle'][comp]:.1f}",
            )
        t.add_row("[bold]services", f"{r['cpu_services_s']:.2f}", f"{r['cpu_ms_per_recovery_services']:.1f}")
        t.add_row("[bold]whole stack", f"{r['cpu_stack_s']:.2f}", f"{r['cpu_ms_per_recovery_stack']:.1f}")
        t.add_row("bench (portal stand-in)", f"{r['bench_cpu_s']:.2f}", "")
        console.print(t)

        eff = results["efficiency"]
        t = Table(title="Measured vs the hashing floor (bench citizens)")
        t.add_column("ratio")
        t.add_column("value", justify="right")
        t.add_row(f"floor: recoveries/s on {threads} cores", f"{eff['floor_recoveries_per_s']:.1f}")
        t.add_row("measured recoveries/s", f"{eff['measured_recoveries_per_s'] or 0:.2f}")
        t.add_row("throughput efficiency (measured / floor)", f"{(eff['throughput_efficiency'] or 0) * 100:.1f}%")
        t.add_row("argon2 CPU ms / recovery (floor)", f"{eff['floor_cpu_ms']:.0f}")
        t.add_row("services CPU ms / recovery", f"{eff['services_cpu_ms']:.0f}")
        t.add_row("whole-stack CPU ms / recovery", f"{eff['stack_cpu_ms']:.0f}")
        t.add_row("argon2 share of services CPU", f"{(eff['argon2_share_services'] or 0) * 100:.1f}%")
        t.add_row("argon2 share of whole-stack CPU", f"{(eff['argon2_share_stack'] or 0) * 100:.1f}%")
        t.add_row("CPU-bound ceiling: cores / stack CPU per recovery", f"{eff['cpu_ceiling_recoveries_per_s']:.1f}/s")
        console.print(t)

        t = Table(title="Handler and flow latency from /metrics (histogram deltas, bucket-interpolated)")
        numeric = ("n", "mean ms", "p50 ms", "p95 ms", "busy %")
        for col in ("service", "histogram", "labels", *numeric):
            t.add_column(col, justify="right" if col in numeric else "left")
        for row in results["metrics"]:
            t.add_row(
                row["service"],
                row["histogram"].removeprefix("clave_"),
                ",".join(f"{k}={v}" for k, v in row["labels"].items()),
                str(row["count"]),
                ms(row["mean_s"]),
                ms(row["p50_s"]),
                ms(row["p95_s"]),
                "" if row["busy"] is None else f"{row['busy'] * 100:.0f}",
            )
        console.print(t)
        console.print(
            "busy %: handler time / wall time of the run. Each topic is consumed by one consumer, one "
            "message at a time, so a topic near 100% is the ceiling of the whole flow."
        )
        failed = [x for x in e2e.recoveries if x.status != "completed"]
        for rec in failed[:5]:
            console.print(f"[red]{rec.status}[/red] {rec.request_id or rec.citizen.national_id}: {rec.error}")

    if "dlq" in results:
        print_dlq(results["dlq"])
    if e2e is not None:
        eff = results["efficiency"]
        busiest = max(
            (row for row in results["metrics"] if row["busy"] is not None), key=lambda row: row["busy"], default=None
        )
        console.print(
            f"[bold]Summary[/bold]: the hashing floor allows {eff['floor_recoveries_per_s']:.1f} recoveries/s on "
            f"{threads} cores; measured {eff['measured_recoveries_per_s'] or 0:.2f}/s; efficiency "
            f"{(eff['throughput_efficiency'] or 0) * 100:.0f}%; argon2 is "
            f"{(eff['argon2_share_stack'] or 0) * 100:.0f}% of the stack's CPU per recovery"
            + (
                f"; busiest consumer: {busiest['service']} on {busiest['labels'].get('topic')} "
                f"({busiest['busy'] * 100:.0f}% busy, mean {busiest['mean_s'] * 1000:.0f} ms)"
                if busiest
                else ""
            )
        )


def print_dlq(d: dict[str, Any]) -> None:
    if d["events_per_s"] is None:
        done = "not all dead-lettered within the timeout"
    else:
        done = f"all dead-lettered after {d['elapsed_s']:.2f}s -> {d['events_per_s']:.0f} events/s"
    console.print(
        f"3. DLQ path of recovery.requests: {d['messages']} malformed records published in "
        f"{d['published_s']:.2f}s, {done}; identity CPU {d['identity_cpu_ms_per_event']:.2f} ms/event, "
        f"whole stack {d['stack_cpu_ms_per_event']:.2f} ms/event"
    )


def serial_summary(runs: list[Recovery]) -> dict[str, Any]:
    done = [r for r in runs if r.status == "completed"]
    out: dict[str, Any] = {"n": len(runs), "completed": len(done)}
    for name in ("to_mail", "reset"):
        values = [v for r in done if (v := getattr(r, f"{name}_s")) is not None]
        out[name] = {"p50": percentile(values, 50), "max": max(values) if values else None}
    return out


def summarize_e2e(e2e: EndToEnd, n: int, concurrency: int, idle: dict[str, float]) -> dict[str, Any]:
    done = e2e.completed
    latency = {}
    for name in ("to_mail", "to_mail_seen", "reset"):
        values = [v for r in done if (v := getattr(r, f"{name}_s")) is not None]
        latency[name] = {f"p{q}": percentile(values, q) for q in (50, 95, 99)} | {
            "mean": sum(values) / len(values) if values else None
        }
    per = max(len(done), 1)
    services = sum(v for k, v in e2e.cpu.items() if k in SERVICES + OPTIONAL)
    stack = sum(e2e.cpu.values())
    return {
        "n": n,
        "concurrency": concurrency,
        "completed": len(done),
        "timeouts": sum(r.status == "timeout" for r in e2e.recoveries),
        "other": sum(r.status not in ("completed", "timeout") for r in e2e.recoveries),
        "import_s": e2e.import_s,
        "import_report": e2e.import_report,
        "initial_keys_s": e2e.initial_keys_s,
        "wall_s": e2e.wall_s,
        "recoveries_per_s": e2e.throughput,
        "latency_s": latency,
        "drain_s": e2e.drain_s,
        "cpu_s": e2e.cpu,
        "cpu_ms_per_recovery": {k: v / per * 1000 for k, v in e2e.cpu.items()},
        # What the process burns with no traffic at all (polling loops), taken out.
        "idle_core_share": idle,
        "cpu_ms_per_recovery_above_idle": {
            k: max(0.0, v - idle.get(k, 0.0) * e2e.cpu_window_s) / per * 1000 for k, v in e2e.cpu.items()
        },
        "cpu_services_s": services,
        "cpu_stack_s": stack,
        "cpu_ms_per_recovery_services": services / per * 1000,
        "cpu_ms_per_recovery_stack": stack / per * 1000,
        "bench_cpu_s": e2e.bench_cpu_s,
        "machine_busy": e2e.machine_busy,
        "stack_share_of_machine": stack / e2e.cpu_window_s / (os.cpu_count() or 1),
        "serial": serial_summary(e2e.serial),
        "failures": [
            {"request_id": r.request_id, "status": r.status, "error": r.error}
            for r in e2e.recoveries
            if r.status != "completed"
        ][:20],
    }
