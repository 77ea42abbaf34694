"""Reading the audit log (`audit.events`): filter, verify, tabulate, render a timeline."""

from __future__ import annotations

import asyncio
import heapq
import html
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from shared.audit import ChainVerifier, RecordedHead
from shared.kafkaio import partitions_of, read_topic
from shared.settings import PlatformSettings
from shared.topics import AUDIT_EVENTS


def matches(
    doc: dict[str, Any], request_id: str | None, account_id: str | None, action: str | None, correlationid: str | None
) -> bool:
    data = doc.get("data") or {}
    if request_id and request_id not in (data.get("request_id"), doc.get("correlationid")):
        return False
    # An account id, or its first digits (at least 8: clave.cli checks).
    if account_id and not str(data.get("account_id") or "").startswith(account_id):
        return False
    if action and data.get("action") != action:
        return False
    return not (correlationid and doc.get("correlationid") != correlationid)


async def iter_events(
    settings: PlatformSettings,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: bool = False,
) -> AsyncIterator[dict[str, Any]]:
    """Audit events one at a time, in log order (per producer partition): nothing is kept,
    so a reader of the whole log uses the same memory for a thousand events or a billion."""
    # Progress goes to stderr, so `--json` output on stdout stays clean JSON lines.
    console = Console(stderr=True)
    if not (progress and console.is_terminal):  # a disabled Progress still prints an empty line
        async for record in read_topic(settings, AUDIT_EVENTS, since=since, until=until):
            yield _doc(record.value, f"{record.partition}/{record.offset}")
        return
    with Progress(transient=True, console=console) as bar:
        task = bar.add_task("reading audit.events", total=None)
        async for record in read_topic(settings, AUDIT_EVENTS, since=since, until=until):
            bar.advance(task)
            yield _doc(record.value, f"{record.partition}/{record.offset}")


def _doc(value: bytes, where: str) -> dict[str, Any]:
    try:
        doc = json.loads(value)
    except (ValueError, RecursionError):
        doc = None
    return doc if isinstance(doc, dict) else {"id": f"unparseable@{where}", "data": {}}


async def iter_events_in_time_order(
    settings: PlatformSettings, *, since: datetime | None = None, until: datetime | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Audit events in time order, streamed: the partitions are read side by side and merged by
    event time. Each producer's chain lives in one partition (keyed by service) and keeps its
    own order, so `verify --file` accepts the export; memory is one batch per partition."""
    streams = [
        read_topic(settings, AUDIT_EVENTS, since=since, until=until, partition=p)
        for p in await partitions_of(settings, AUDIT_EVENTS)
    ]
    heap: list[tuple[str, int, dict[str, Any]]] = []

    async def advance(i: int) -> None:
        record = await anext(streams[i], None)
        if record is not None:
            doc = _doc(record.value, f"{record.partition}/{record.offset}")
            heapq.heappush(heap, (str(doc.get("time", "")), i, doc))

    try:
        await asyncio.gather(*(advance(i) for i in range(len(streams))))  # the clients start side by side
        while heap:
            _, i, doc = heapq.heappop(heap)
            yield doc
            await advance(i)
    finally:
        await asyncio.gather(*(stream.aclose() for stream in streams))


async def account_of(settings: PlatformSettings, national_id: str) -> str | None:
    """The account id of a (normalised) national ID, from the identity service's store."""
    from pymongo import AsyncMongoClient

    from services.identity.store import ACCOUNTS

    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_uri, serverSelectionTimeoutMS=5000)
    try:
        doc = await client[settings.db_name("identity")][ACCOUNTS].find_one({"national_id": national_id}, {"_id": 1})
    finally:
        await client.close()
    return str(doc["_id"]) if doc else None


async def collect(
    settings: PlatformSettings,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    request_id: str | None = None,
    account_id: str | None = None,
    action: str | None = None,
    correlationid: str | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Audit events in log order (per producer partition), filtered; a request matches by
    `data.request_id` or by correlation id."""
    return [
        doc
        async for doc in iter_events(settings, since=since, until=until, progress=progress)
        if matches(doc, request_id, account_id, action, correlationid)
    ]


def file_events(path: Path) -> Iterator[dict[str, Any]]:
    """The events of an exported copy (JSON lines), read line by line."""
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except (ValueError, RecursionError):
                doc = None
            yield doc if isinstance(doc, dict) else {"id": f"unparseable line {number}", "data": {}}


async def verify_log(
    settings: PlatformSettings,
    verifier: ChainVerifier,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: bool = False,
) -> None:
    async for doc in iter_events(settings, since=since, until=until, progress=progress):
        verifier.feed(doc)


async def recorded_heads(settings: PlatformSettings) -> list[RecordedHead]:
    """The chain heads the audit service recorded (its read model), one per producer."""
    from services.audit.app import make_store
    from services.audit.domain import as_recorded_head

    store = make_store(settings)
    try:
        return [as_recorded_head(producer, doc) for producer, doc in sorted((await store.heads()).items())]
    finally:
        await store.close()


async def from_read_model(settings: PlatformSettings, request_id: str) -> list[dict[str, Any]]:
    """One recovery's audit events from the audit service's read model (indexed, fast), in
    the same shape as events read from the log."""
    from services.audit.app import make_store

    store = make_store(settings)
    try:
        docs = await store.find({"$or": [{"request_id": request_id}, {"correlationid": request_id}]})
    finally:
        await store.close()
    return [
        {
            "id": d["_id"],
            "time": d["time"],
            "correlationid": d.get("correlationid"),
            "data": {
                k: d.get(k)
                for k in ("service", "action", "outcome", "actor", "account_id", "request_id", "reasons", "details")
            },
        }
        for d in docs
    ]


def in_time_order(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(events, key=lambda e: (e.get("time", ""), (e.get("data") or {}).get("integrity", {}).get("seq", 0)))


def _row(e: dict[str, Any]) -> list[str]:
    d = e.get("data") or {}
    return [
        str(e.get("time", ""))[:23],
        str(d.get("service", "")),
        str(d.get("action", "")),
        str(d.get("outcome", "")),
        ",".join(d.get("reasons", [])),
        str(d.get("actor", "")),
        # Whole: each id is copied into the next command (--account, --request, timeline).
        str(d.get("account_id") or ""),
        str(d.get("request_id") or ""),
    ]


HEADERS = ["time", "service", "action", "outcome", "reasons", "actor", "account", "request"]


def table(events: list[dict[str, Any]], title: str = "audit.events") -> Table:
    t = Table(*HEADERS, title=title)
    for column in t.columns[-2:]:  # the ids: never wrapped or cut while other columns can give way
        column.no_wrap = True
        column.min_width = 32
    for e in in_time_order(events):
        t.add_row(*_row(e))
    return t


def html_page(request_id: str, events: list[dict[str, Any]]) -> str:
    rows = "\n".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row(e)) + "</tr>" for e in in_time_order(events)
    )
    head = "".join(f'<th scope="col">{h}</th>' for h in HEADERS)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Clave timeline {html.escape(request_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:4px 8px;text-align:left}}tr:nth-child(even){{background:#f3f3f3}}</style>
</head><body><h1>Recovery {html.escape(request_id)}</h1>
<p>{len(events)} audit events, in time order, from every service.</p>
<table><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table></body></html>
"""
