"""Tools of the fault suite: a portal that re-sends the same event when the broker is away,
the `stack.sh` fault commands and the summary table. The topics and the mail catcher's
folder are read with the workbench's readers (tools/watch.py, tools/mail.py)."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.errors import KafkaError

from shared.envelope import CONTENT_TYPE, new_event
from tools.portal import Portal

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "local" / "stack.sh"
LAST_SUMMARY = ""  # printed by conftest at the end of the run


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def var_dir() -> Path:
    return Path(os.environ.get("VAR_DIR", "var"))


# ---------------------------------------------------------------------------- portal


class RetryingPortal(Portal):
    """The portal stand-in, re-sending the SAME event (same id) while the broker is away,
    as a real portal with an at-least-once producer would. Its producer (shared.producer)
    replaces itself when aiokafka's idempotence broke it (aio-libs/aiokafka#1017; the Kafka
    restart fault made 21 sends fail with OutOfOrderSequenceNumber before it did, `recover`);
    this loop retries for the whole window."""

    send_retries = 0
    retry_window_s = 120.0
    producer_attempts = 1  # the retries are this loop's, over the whole window

    async def _send(self, topic: str, key: str, event_type: str, data: dict[str, Any], request_id: str) -> str:
        assert self._producer is not None
        event = new_event(type=event_type, source="/portal/faults", data=data, correlationid=request_id)
        value = event.to_bytes()
        deadline = time.monotonic() + self.retry_window_s
        while True:
            try:
                await self._producer.send_and_wait(
                    topic, value, key=key.encode(), headers=[("content-type", CONTENT_TYPE.encode())]
                )
                return event.id
            except KafkaError as exc:
                if time.monotonic() > deadline:
                    raise
                RetryingPortal.send_retries += 1
                await asyncio.sleep(0.5)  # back-off before re-sending the same bytes
                await self._producer.recover(exc)  # a broken one replaced (the broker back by now)


# ---------------------------------------------------------------------------- stack


async def stack(*args: str, timeout: float = 240.0) -> str:
    """Run `stack.sh ARGS` (same environment: same VAR_DIR, same ports); fail on error."""
    proc = await asyncio.create_subprocess_exec(
        "bash",
        str(STACK),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=str(ROOT),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"stack.sh {' '.join(args)} did not finish in {timeout}s") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        raise AssertionError(f"stack.sh {' '.join(args)} failed ({proc.returncode}):\n{text}")
    return text


# ---------------------------------------------------------------------------- report


def format_table(report: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    rows.append(("N recoveries", str(report["n"])))
    rows.append(("plan, instances", f"{report.get('plan', 'faults')}, {report.get('instances', 1)} per service"))
    rows.append(("concurrency", str(report["concurrency"])))
    rows.append(("load duration", f"{report['load_seconds']:.1f} s"))
    rows.append(
        (
            "throughput",
            f"{report.get('throughput_per_s', 0)} completed recoveries/s of load "
            f"(machine load average {report.get('loadavg_1m', '?')} at its end, {os.cpu_count()} cores)",
        )
    )
    rows.append(("completed / failed", f"{report['recoveries']['completed']} / {report['recoveries']['failed']}"))
    for f in report["faults"]:
        detail = ", ".join(f"{k}={v}" for k, v in f["counts"].items())
        rows.append((f"fault: {f['name']}", f"at {f['injected_at']} held {f['held_s']:.1f}s; {detail}"))
    m = report["mails"]
    rows.append(
        (
            "recovery e-mails",
            f"{m['recovery']} messages ({m['recovery_files']} files) for {m['recovery_requests']} requests, "
            f"{m['tokens']} tokens",
        )
    )
    rows.append(("key-changed e-mails", f"{m['password_changed']} messages ({m['password_changed_files']} files)"))
    rows.append(
        (
            "duplicate e-mails",
            f"by Message-ID {m['dup_message_id']}, by request {m['dup_request']}; "
            f"in-doubt resends {m['in_doubt_resends']} (allowed {m['in_doubt_allowed']}), "
            f"unexplained {len(m['unexplained_duplicates'])}",
        )
    )
    o = report["outcomes"]
    rows.append(("reset outcomes", f"completed {o['completed']}, other {o['other']}, redelivered copies {o['copies']}"))
    a = report["audit"]
    rows.append(
        (
            "audit events",
            f"{a['distinct']} distinct, {a['exact_redeliveries']} exact redeliveries, "
            f"{a['conflicting']} conflicting, {a['lost']} lost, {a['duplicated']} duplicated",
        )
    )
    rows.append(("clave audit verify", a["verify"]))
    dlq = report["dlq"]
    rows.append(("DLQ by reason", ", ".join(f"{k}={v}" for k, v in sorted(dlq["by_reason"].items())) or "none"))
    rows.append(("DLQ by topic", ", ".join(f"{k}={v}" for k, v in sorted(dlq["by_topic"].items())) or "none"))
    rows.append(("portal re-sends", str(report["portal_resends"])))
    rows.append(("service recoveries (logs)", ", ".join(f"{k}={v}" for k, v in report["recoveries_logged"].items())))
    lat = report["recoveries"]["latency_s"]
    rows.append(("recovery latency", f"p50 {lat['p50']} s, p95 {lat['p95']} s, max {lat['max']} s"))
    rows.append(("suite time", f"{report['suite_seconds']} s"))
    width = max(len(k) for k, _ in rows)
    lines = ["=" * 100, "FAULT SUITE SUMMARY", "-" * 100]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines.append("=" * 100)
    return "\n".join(lines)
