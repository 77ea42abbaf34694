"""The audit read model's start-up migration against a real store (a private secantusd-py),
with the log of record (`audit.events`) given as records in memory.

A store is written as the read model wrote it before commit 454e64b (version 1: projections on
the events, heads in `chain_heads`, breaks in `chain_breaks`), from a log holding two real
breaks (a forged and an altered event) and an exact redelivery. Then the audit service is
started as FastStream starts it (its on-start hooks, before the broker) and checked: no false
break, the real ones kept, `rebuild` finds nothing different, the format marker written,
/readyz 503 until the migration is done, a second start changes nothing, and a migration
killed midway completes on the next start."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pymongo import AsyncMongoClient

from services.audit import domain
from services.audit.app import build
from services.audit.handlers import AuditHandlers
from services.audit.rebuild import LogReader, rebuild
from services.audit.settings import AuditSettings
from services.audit.store import BREAK, EVENTS, FORMAT_VERSION, AuditStore, make_store
from shared.audit import GENESIS, Signer, audit_event, seal
from shared.auditkeys import KeyRing, LiveKeyRing, PublicKeyEntry
from shared.consumer import HandlerContext
from shared.envelope import parse_event
from shared.kafkaio import Record
from shared.metrics import ServiceMetrics
from shared.runtime import Service
from shared.schemas import AuditRecord
from shared.topics import AUDIT_EVENTS, EventType
from tests.middle.conftest import listen

PRODUCERS = ("identity", "tokens")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Chain:
    """One producer's signed chain, as its service seals it."""

    def __init__(self, producer: str, key: Ed25519PrivateKey) -> None:
        self.producer, self.key = producer, key
        self.seq, self.prev = 0, GENESIS

    def unsealed(self, i: int) -> dict[str, Any]:
        record = AuditRecord(service=self.producer, action="token_issued", outcome="success", details={"i": i})
        out = audit_event(record, correlationid=f"c-{i}", causationid=None, source=f"/clave/{self.producer}")
        return dict(json.loads(bytes(out.to_document()["value"])))

    def next(self) -> bytes:
        sealed, self.prev = seal(
            self.unsealed(self.seq), producer=self.producer, seq=self.seq + 1, prev=self.prev, signer=Signer(self.key)
        )
        self.seq += 1
        return sealed


@dataclass
class Log:
    """audit.events in memory: one partition per producer (events are keyed by producer)."""

    partitions: dict[int, list[bytes]] = field(default_factory=dict)
    reads: int = 0

    def append(self, partition: int, value: bytes) -> int:
        self.partitions.setdefault(partition, []).append(value)
        return len(self.partitions[partition]) - 1

    def records(self) -> list[Record]:
        return [
            Record(AUDIT_EVENTS, p, offset, None, value, {}, 0)
            for p in sorted(self.partitions)
            for offset, value in enumerate(self.partitions[p])
        ]

    def reader(self, fail_after: int | None = None) -> LogReader:
        """What `read_topic` yields; `fail_after`: the broker goes away after that many records."""

        async def read() -> AsyncIterator[Record]:
            self.reads += 1
            for n, record in enumerate(self.records()):
                if fail_after is not None and n == fail_after:
                    raise ConnectionError("broker gone (test)")
                yield record

        return read


@dataclass
class World:
    settings: AuditSettings
    chains: dict[str, Chain]
    log: Log
    real_breaks: dict[str, str]  # event id -> reason
    partition: dict[str, int]


def forged(chain: Chain, i: int, key: Ed25519PrivateKey) -> bytes:
    """An event claiming the producer's next sequence number, sealed with another key."""
    sealed, _ = seal(
        chain.unsealed(1000 + i), producer=chain.producer, seq=chain.seq + 1, prev=chain.prev, signer=Signer(key)
    )
    return sealed


def altered(sealed: bytes) -> bytes:
    """A sealed event changed after sealing (a new id, so it is an event of its own)."""
    doc = json.loads(sealed)
    doc["id"] = doc["id"] + "-altered"
    doc["data"]["details"] = {"i": "changed"}
    return json.dumps(doc).encode()


@pytest.fixture
def world(store_uri: str, db_name: str, tmp_path: Path) -> World:
    keys = {p: Ed25519PrivateKey.generate() for p in PRODUCERS}
    public = tmp_path / "public"
    public.mkdir()
    for producer, key in keys.items():
        (public / f"{producer}.json").write_text(PublicKeyEntry.of(producer, key.public_key()).model_dump_json())
    settings = AuditSettings(
        clave_env="development",
        mongodb_uri=store_uri,
        mongodb_db_prefix=f"{db_name}_",
        audit_public_keys=str(public),
        audit_metrics_port=_free_port(),
    )
    chains = {p: Chain(p, k) for p, k in keys.items()}
    log = Log()
    partition = {p: n for n, p in enumerate(PRODUCERS)}
    real_breaks: dict[str, str] = {}
    for _ in range(5):
        log.append(partition["identity"], chains["identity"].next())
    tokens = chains["tokens"]
    for _ in range(2):
        log.append(partition["tokens"], tokens.next())
    stranger = forged(tokens, 1, Ed25519PrivateKey.generate())
    log.append(partition["tokens"], stranger)
    real_breaks[json.loads(stranger)["id"]] = "unknown_key"
    third = tokens.next()
    log.append(partition["tokens"], third)
    log.append(partition["tokens"], third)  # an exact redelivery (a relay's republish)
    changed = altered(third)
    log.append(partition["tokens"], changed)
    real_breaks[json.loads(changed)["id"]] = "bad_signature"
    for _ in range(2):
        log.append(partition["tokens"], tokens.next())
    return World(settings, chains, log, real_breaks, partition)


async def write_old_format(world: World) -> None:
    """The read model as 454e64b^ wrote it from this log: its handler (an event already
    processed is dropped; the head read from `chain_heads`) and its AuditStore.record (the
    projection alone on the event; the head upserted into `chain_heads`; the break inserted
    into `chain_breaks`), one transaction per event."""
    store = make_store(world.settings)
    keys = KeyRing.load(world.settings.audit_public_keys)
    try:
        for record in world.log.records():
            event = json.loads(record.value)
            if await store.db["processed_events"].find_one({"consumer": "audit:audit.events", "event_id": event["id"]}):
                continue
            doc = domain.project(event)
            producer = doc["producer"]
            head = await store.db["chain_heads"].find_one({"_id": producer})
            step = domain.follow(head, event, keys, None)

            async def writes(
                s: Any, doc: dict[str, Any] = doc, step: domain.ChainStep = step, producer: str | None = producer
            ) -> None:
                await store.db["processed_events"].insert_one(
                    {"consumer": "audit:audit.events", "event_id": doc["_id"]}, session=s
                )
                await store.db[EVENTS].replace_one({"_id": doc["_id"]}, doc, upsert=True, session=s)
                if producer is not None and step.head is not None:
                    await store.db["chain_heads"].update_one(
                        {"_id": producer}, {"$set": step.head}, upsert=True, session=s
                    )
                if step.problem is not None:
                    row = {"event_id": doc["_id"], "producer": producer, "reason": step.reason, "problem": step.problem}
                    await store.db["chain_breaks"].insert_one({**row, "time": doc["time"]}, session=s)

            await store.in_transaction(writes)
        assert {d["event_id"] async for d in store.db["chain_breaks"].find()} == set(world.real_breaks)
    finally:
        await store.close()


# ---- the running service ---------------------------------------------------------------------


def http(settings: AuditSettings, path: str) -> tuple[int, str]:
    url = f"http://127.0.0.1:{settings.audit_metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()
    except urllib.error.URLError:
        return 0, ""  # not listening yet


def metric(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found is not None, f"{name} not exposed"
    return float(found.group(1))


async def start(world: World, reader: LogReader) -> Service:
    """The audit service up to where FastStream starts its broker: health endpoints, store,
    indexes, on-start hooks (the migration). Stopped with `stop`."""
    service = build(world.settings, log_reader=reader)
    try:
        await service._startup()  # noqa: SLF001 - FastStream's on_startup, without Kafka
    except BaseException:
        await service._shutdown()  # noqa: SLF001
        raise
    return service


async def stop(service: Service) -> None:
    await service._shutdown()  # noqa: SLF001


async def feed_live(world: World, store: AuditStore, raw: bytes, partition: int, offset: int) -> None:
    """One record through the live consumer's handler, as the pipeline hands it over."""
    event = parse_event(raw, max_bytes=1 << 20, known_types={EventType.AUDIT})
    keys = LiveKeyRing(world.settings.audit_public_keys)
    h = AuditHandlers(store, ServiceMetrics("audit"), keys, None)
    ctx = HandlerContext(
        "audit", "audit:audit.events", AUDIT_EVENTS, event, store, raw=raw, partition=partition, offset=offset
    )
    await h.audit_event(ctx, AuditRecord.model_validate(event.data))


async def breaks(store: AuditStore) -> dict[str, str]:
    return {str(d["_id"]): d[BREAK]["reason"] async for d in store.db[EVENTS].find({BREAK: {"$exists": True}})}


async def next_live_event(world: World, producer: str, store: AuditStore) -> str:
    """The producer's next event arrives live (after the upgrade): in the log and handled."""
    raw = world.chains[producer].next()
    partition = world.partition[producer]
    offset = world.log.append(partition, raw)
    await feed_live(world, store, raw, partition, offset)
    return str(json.loads(raw)["id"])


# ---- tests -------------------------------------------------------------------------------------


async def test_the_old_format_without_migration_is_wrong(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bug, reproduced on this test's version 1 store: the handler as 454e64b left it reads
    heads from the events alone, finds none and takes every chain to restart at 0; the breaks
    recorded before are not seen, and every old entry differs from a rebuild."""
    await write_old_format(world)
    old_entries = len({json.loads(r.value)["id"] for r in world.log.records()})
    store = make_store(world.settings)
    try:
        report = await rebuild(world.settings, wait_for_live=0, log=world.log.reader())
        assert len(report.different) == old_entries and set(report.breaks_differ) == set(world.real_breaks)
        with monkeypatch.context() as m:
            m.setattr(AuditStore, "old_head", lambda self, producer: _none())  # no rolling-upgrade fallback
            for producer in PRODUCERS:
                event_id = await next_live_event(world, producer, store)
                entry = await store.db[EVENTS].find_one({"_id": event_id}) or {}
                problem = entry.get(BREAK, {}).get("problem", "")
                assert re.match(rf"sequence {world.chains[producer].seq} after 0\b", problem), problem
        assert set(world.real_breaks).isdisjoint(await breaks(store))
    finally:
        await store.close()


async def _none() -> None:
    return None


async def test_an_old_read_model_is_projected_again_before_consuming(world: World) -> None:
    await write_old_format(world)
    gate = asyncio.Event()
    inner = world.log.reader()
    half = len(world.log.records()) // 2

    async def held() -> AsyncIterator[Record]:
        n = 0
        async for record in inner():
            if n == half:
                await gate.wait()  # the migration is midway: look at the service from outside
            n += 1
            yield record

    starting = asyncio.create_task(start(world, held))
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status, text = await asyncio.to_thread(http, world.settings, "/metrics")
        if status == 200 and re.search(r"^clave_audit_migration_running 1\.0$", text, re.MULTILINE):
            break
        assert asyncio.get_running_loop().time() < deadline, "the migration never started"
        await asyncio.sleep(0.05)
    assert (await asyncio.to_thread(http, world.settings, "/readyz"))[0] == 503
    assert metric(text, "clave_audit_read_model_format") == 0
    gate.set()
    service = await asyncio.wait_for(starting, 60)
    store = make_store(world.settings)
    try:
        _, text = await asyncio.to_thread(http, world.settings, "/metrics")
        events = len({json.loads(r.value)["id"] for r in world.log.records()})
        assert metric(text, "clave_audit_migration_running") == 0
        assert metric(text, "clave_audit_read_model_format") == FORMAT_VERSION
        assert metric(text, "clave_audit_migration_events_total") == events
        assert 'clave_audit_chain_breaks_total{reason="sequence"} 0.0' in text  # old news is not re-counted
        marker = await store.db["read_model"].find_one({"_id": "format"})
        assert marker is not None and marker["version"] == FORMAT_VERSION and marker["migrated_from"] == 1
        assert marker["events"] == events and marker["breaks"] == len(world.real_breaks)

        assert await breaks(store) == world.real_breaks  # the real breaks kept, no false one
        for producer in PRODUCERS:  # chains go on where they were: no "sequence N after 0"
            head = await store.head(producer)
            assert head is not None and head["seq"] == world.chains[producer].seq
            await next_live_event(world, producer, store)
        assert await breaks(store) == world.real_breaks
        report = await rebuild(world.settings, wait_for_live=0, log=world.log.reader())
        assert report.identical, report
        assert (report.different, report.missing_live, report.breaks_differ) == ([], [], [])
        assert report.live_breaks == len(report.breaks) == len(world.real_breaks)
        assert report.duplicates == 1
    finally:
        await store.close()
        await stop(service)


async def test_a_second_start_is_a_no_op(world: World) -> None:
    await write_old_format(world)
    await stop(await start(world, world.log.reader()))
    store = make_store(world.settings)
    try:
        marker = await store.db["read_model"].find_one({"_id": "format"})
        before = {d["_id"]: d async for d in store.db[EVENTS].find()}
    finally:
        await store.close()
    reads = world.log.reads

    service = build(world.settings, log_reader=world.log.reader())
    commands = await listen(service.store, world.settings.mongodb_uri)
    await service._startup()  # noqa: SLF001
    try:
        writes = {"insert", "update", "delete", "bulkWrite", "findAndModify", "drop"}
        touched = [(name, target) for _, name, target in commands.log if name in writes]
        assert touched == [], touched
        assert world.log.reads == reads  # the log was not read again
        _, text = await asyncio.to_thread(http, world.settings, "/metrics")
        assert metric(text, "clave_audit_read_model_format") == FORMAT_VERSION
        assert metric(text, "clave_audit_migration_events_total") == 0
    finally:
        await stop(service)
    store = make_store(world.settings)
    try:
        assert await store.db["read_model"].find_one({"_id": "format"}) == marker
        assert {d["_id"]: d async for d in store.db[EVENTS].find()} == before
    finally:
        await store.close()


async def test_a_migration_killed_midway_runs_again_on_the_next_start(world: World) -> None:
    await write_old_format(world)
    with pytest.raises(ConnectionError):
        await start(world, world.log.reader(fail_after=len(world.log.records()) - 3))
    store = make_store(world.settings)
    try:
        assert await store.format_version() is None  # not marked: the next start migrates again
        service = await start(world, world.log.reader())
        await stop(service)
        assert await store.format_version() == FORMAT_VERSION
        assert await breaks(store) == world.real_breaks
        report = await rebuild(world.settings, wait_for_live=0, log=world.log.reader())
        assert report.identical, report
    finally:
        await store.close()


async def test_a_new_store_is_marked_without_reading_the_log(world: World) -> None:
    service = await start(world, world.log.reader())
    await stop(service)
    assert world.log.reads == 0
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(world.settings.mongodb_uri)
    try:
        db = client[world.settings.db_name("audit")]
        marker = await db["read_model"].find_one({"_id": "format"})
        assert marker is not None and marker["version"] == FORMAT_VERSION and "migrated_from" not in marker
    finally:
        await client.close()


async def test_an_old_instance_still_consuming_during_a_rolling_upgrade(world: World) -> None:
    """The chart rolls one pod at a time: the old version's pod goes on consuming (in version 1)
    while the new one migrates, until the new one is ready. Its events are no break for the
    new one, and its next start projects the read model again."""
    await write_old_format(world)
    await stop(await start(world, world.log.reader()))
    for _ in range(2):  # handled by the old version's instance after the migration
        world.log.append(world.partition["identity"], world.chains["identity"].next())
    await write_old_format(world)
    store = make_store(world.settings)
    try:
        await next_live_event(world, "identity", store)  # then the new instance has the partition
        assert await breaks(store) == world.real_breaks  # not "sequence 8 after 5"
        head = await store.head("identity")
        assert head is not None and head["seq"] == world.chains["identity"].seq
        report = await rebuild(world.settings, wait_for_live=0, log=world.log.reader())
        assert len(report.different) == 2 and not report.breaks_differ  # the old instance's entries

        reads = world.log.reads
        await stop(await start(world, world.log.reader()))
        assert world.log.reads == reads + 1  # the old heads moved after the migration: projected again
        report = await rebuild(world.settings, wait_for_live=0, log=world.log.reader())
        assert report.identical, report
        reads = world.log.reads
        await stop(await start(world, world.log.reader()))
        assert world.log.reads == reads  # and only once
    finally:
        await store.close()
