"""Tools of the fault suite: Kafka readers with explicit start offsets, an indexed view of
the mail catcher's folder, a portal that re-sends the same event when the broker is away,
and the `stack.sh` fault commands.  Everything waits on conditions with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from shared.envelope import CONTENT_TYPE, new_event
from shared.kafka import client_kwargs
from tools.portal import Portal, body_text, extract_link, stop_background_consumer
from tools.workbench import WorkbenchSettings

ROOT = Path(__file__).resolve().parents[2]
STACK = ROOT / "deploy" / "local" / "stack.sh"
LAST_SUMMARY = ""  # printed by conftest at the end of the run


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def var_dir() -> Path:
    return Path(os.environ.get("VAR_DIR", "var"))


# ---------------------------------------------------------------------------- Kafka


@dataclass(frozen=True)
class Rec:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: str | None
    headers: dict[str, str]
    raw: bytes
    doc: dict[str, Any] | None


def _rec(msg: Any) -> Rec:
    raw = msg.value or b""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            doc = None
    except (ValueError, RecursionError):
        doc = None
    return Rec(
        topic=msg.topic,
        partition=msg.partition,
        offset=msg.offset,
        timestamp_ms=msg.timestamp,
        key=msg.key.decode("utf-8", "replace") if msg.key else None,
        headers={k: v.decode("utf-8", "replace") for k, v in (msg.headers or [])},
        raw=raw,
        doc=doc,
    )


async def _partitions(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call
    tps = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise RuntimeError(f"topic {topic} has no partitions (is it created?)")
        tps.extend(TopicPartition(topic, p) for p in sorted(parts))
    return tps


async def end_offsets(settings: WorkbenchSettings, topics: Iterable[str]) -> dict[TopicPartition, int]:
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        tps = await _partitions(consumer, topics)
        return dict(await consumer.end_offsets(tps))
    finally:
        await consumer.stop()


async def read_records(
    settings: WorkbenchSettings, starts: dict[TopicPartition, int], timeout: float = 120.0
) -> list[Rec]:
    """Every record from `starts` up to the end offsets seen now, partition by partition (log order)."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False, max_partition_fetch_bytes=4 << 20)
    await consumer.start()
    out: list[Rec] = []
    deadline = time.monotonic() + timeout
    try:
        tps = list(starts)
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp in tps:
            if starts[tp] >= ends[tp]:
                continue
            consumer.seek(tp, starts[tp])
            while await consumer.position(tp) < ends[tp]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"reading {tp} did not reach offset {ends[tp]} in {timeout}s")
                batch = await consumer.getmany(tp, timeout_ms=1000, max_records=2000)
                out.extend(_rec(m) for m in batch.get(tp, []) if m.offset < ends[tp])
    finally:
        await consumer.stop()
    return out


class Tail:
    """Follows some partitions from given offsets; `on_record` indexes; waiters use `cond`."""

    def __init__(
        self, settings: WorkbenchSettings, starts: dict[TopicPartition, int], on_record: Callable[[Rec], None]
    ):
        self.settings = settings
        self.starts = starts
        self.on_record = on_record
        self.cond = asyncio.Condition()
        self.count = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        await self._consumer.start()
        self._consumer.assign(list(self.starts))
        for tp, offset in self.starts.items():
            self._consumer.seek(tp, offset)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        await stop_background_consumer(self._task, self._consumer)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500)
            except KafkaError:  # the broker is being restarted: the consumer reconnects
                await asyncio.sleep(0.5)
                continue
            if not batch:
                continue
            for messages in batch.values():
                for msg in messages:
                    self.on_record(_rec(msg))
                    self.count += 1
            async with self.cond:
                self.cond.notify_all()

    async def wait(self, predicate: Callable[[], bool], deadline: float, what: str) -> None:
        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(predicate), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise TimeoutError(f"timed out waiting for {what}") from None


# ---------------------------------------------------------------------------- mail


@dataclass
class Mail:
    path: str
    arrived: float  # monotonic, when this harness first saw the file
    arrived_utc: str
    message_id: str
    to: str
    subject: str
    request_id: str | None  # recovery e-mails only (from the link)
    token: str | None


@dataclass
class MailIndex:
    """The mail catcher's folder, indexed as files appear (each file parsed once)."""

    mail_dir: Path
    ignore: set[str] = field(default_factory=set)
    mails: list[Mail] = field(default_factory=list)
    by_request: dict[str, list[Mail]] = field(default_factory=dict)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    _seen: set[str] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    def snapshot_existing(self) -> None:
        self.ignore = {p.name for p in self.mail_dir.glob("*.eml")}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def scan(self) -> int:
        new = 0
        names = sorted(e.name for e in os.scandir(self.mail_dir) if e.name.endswith(".eml"))
        for name in names:
            if name in self._seen or name in self.ignore:
                continue
            self._seen.add(name)
            path = self.mail_dir / name
            with path.open("rb") as fh:
                msg: EmailMessage = email.message_from_binary_file(fh, policy=email.policy.default)  # type: ignore[assignment]
            request_id = token = None
            if "recuperar?" in body_text(msg):
                _, request_id, token = extract_link(msg)
            mail = Mail(
                path=str(path),
                arrived=time.monotonic(),
                arrived_utc=utc_now(),
                message_id=str(msg["Message-ID"]),
                to=str(msg["To"]),
                subject=str(msg["Subject"]),
                request_id=request_id,
                token=token,
            )
            self.mails.append(mail)
            if request_id:
                self.by_request.setdefault(request_id, []).append(mail)
            new += 1
        return new

    async def _run(self) -> None:
        while True:
            if await asyncio.to_thread(self.scan):
                async with self.cond:
                    self.cond.notify_all()
            await asyncio.sleep(0.1)  # polling a folder: waiters re-check their condition on every change

    async def recovery_mail(self, request_id: str, deadline: float) -> Mail:
        async with self.cond:
            try:
                await asyncio.wait_for(
                    self.cond.wait_for(lambda: request_id in self.by_request),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            except TimeoutError:
                raise TimeoutError(f"no recovery e-mail for {request_id}") from None
        return self.by_request[request_id][0]


# ---------------------------------------------------------------------------- portal


class RetryingPortal(Portal):
    """The portal stand-in, re-sending the SAME event (same id) while the broker is away,
    as a real portal with an at-least-once producer would."""

    send_retries = 0
    retry_window_s = 120.0

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
            except KafkaError:
                if time.monotonic() > deadline:
                    raise
                RetryingPortal.send_retries += 1
                await asyncio.sleep(0.5)  # back-off before re-sending the same bytes


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
