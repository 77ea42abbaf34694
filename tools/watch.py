"""The workbench's live view of topics (portal stand-in, e2e and fault tests, bench).

`TopicWatcher` follows some topics from a point on (their end when it starts, or offsets
given) and keeps every record; an `on_record` callback can index them as they come. Waits
are on a condition with a deadline. A bounded read of a whole range is the product's
`shared.kafkaio.read_topic`; `read_from` applies it from offsets noted earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from shared.kafka import client_kwargs
from shared.kafkaio import Record, read_topic, record_of
from shared.settings import PlatformSettings
from tools.waits import Changes, deadline_of, until

# A predicate on (topic, headers, event document): the form most tests write.
DocPredicate = Callable[[str, dict[str, str], dict[str, Any]], bool]


@dataclass(frozen=True)
class Rec(Record):
    """A record with its value parsed: `doc` is the JSON object, None when the value is not one."""

    doc: dict[str, Any] | None

    @classmethod
    def of(cls, record: Record) -> Rec:
        try:
            doc = json.loads(record.value)
        except (ValueError, TypeError, RecursionError):
            doc = None
        fields = {name: getattr(record, name) for name in Record.__dataclass_fields__}
        return cls(**fields, doc=doc if isinstance(doc, dict) else None)

    @property
    def data(self) -> dict[str, Any]:
        """The event's `data`, or {} when there is none."""
        data = (self.doc or {}).get("data")
        return data if isinstance(data, dict) else {}


async def _topic_partitions(consumer: AIOKafkaConsumer, topics: Iterable[str]) -> list[TopicPartition]:
    await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call
    tps: list[TopicPartition] = []
    for topic in topics:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise RuntimeError(f"topic {topic} has no partitions (is it created?)")
        tps.extend(TopicPartition(topic, p) for p in sorted(parts))
    return tps


async def end_offsets(settings: PlatformSettings, topics: Iterable[str]) -> dict[TopicPartition, int]:
    """Where each partition of `topics` ends now: a later `read_from` or watcher starts there."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        return dict(await consumer.end_offsets(await _topic_partitions(consumer, topics)))
    finally:
        await consumer.stop()


async def read_from(
    settings: PlatformSettings, starts: Mapping[TopicPartition, int], timeout: float = 120.0
) -> list[Rec]:
    """Every record from `starts` up to the ends seen now, topic by topic, each partition in
    log order (read afresh: a second opinion on what a watcher saw)."""
    by_topic: dict[str, dict[int, int]] = {}
    for tp, offset in starts.items():
        by_topic.setdefault(tp.topic, {})[tp.partition] = offset
    out: list[Rec] = []
    async with asyncio.timeout(timeout):
        for topic, offsets in by_topic.items():
            out.extend([Rec.of(r) async for r in read_topic(settings, topic, starts=offsets) if r.partition in offsets])
    return out


async def stop_background_consumer(task: asyncio.Task[None] | None, consumer: AIOKafkaConsumer | None) -> None:
    """Stop a task that polls `consumer`, then the consumer. aiokafka's fetcher can surface its
    own cancelled retry sleep (or a broker error) on close: neither matters once we stop. A task
    that died keeps its error for whoever reads its results (see TopicWatcher._check_alive)."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    if consumer is not None:
        with contextlib.suppress(asyncio.CancelledError, KafkaError):
            await consumer.stop()


class TopicWatcher:
    """Every record published to `topics` from the moment it starts (or from `starts`)."""

    def __init__(
        self,
        settings: PlatformSettings,
        topics: Iterable[str] = (),
        *,
        starts: Mapping[TopicPartition, int] | None = None,
        on_record: Callable[[Rec], None] | None = None,
    ) -> None:
        self.settings = settings
        self.topics = sorted({*topics, *(tp.topic for tp in starts or {})})
        self.starts = dict(starts) if starts is not None else None
        self.on_record = on_record
        self.records: list[Rec] = []
        self.errors: list[str] = []  # broker errors seen while following (it keeps following)
        self._changes = Changes()
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        await self._consumer.start()
        try:
            if self.starts is None:
                tps = await _topic_partitions(self._consumer, self.topics)
                self._consumer.assign(tps)
                await self._consumer.seek_to_end(*tps)
                for tp in tps:  # resolve the end position now, so nothing published later is missed
                    await self._consumer.position(tp)
            else:
                self._consumer.assign(list(self.starts))
                for tp, offset in self.starts.items():
                    self._consumer.seek(tp, offset)
        except BaseException:
            await stop_background_consumer(None, self._consumer)
            raise
        self._task = asyncio.create_task(self._follow())

    async def stop(self) -> None:
        await stop_background_consumer(self._task, self._consumer)
        self._consumer = None  # the finished task stays: its error, if any, is still reported

    async def __aenter__(self) -> TopicWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _follow(self) -> None:
        try:
            await self._follow_records()
        finally:
            self._changes.notify()  # waiters see at once that it stopped

    async def _follow_records(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as exc:  # e.g. while the broker restarts: the consumer reconnects
                self.errors.append(exc.__class__.__name__)
                await asyncio.sleep(0.5)  # back-off before the next fetch
                continue
            for messages in batch.values():
                for msg in messages:
                    rec = Rec.of(record_of(msg))
                    self.records.append(rec)
                    if self.on_record is not None:
                        self.on_record(rec)
            if batch:
                self._changes.notify()

    def _check_alive(self) -> None:
        """A follower that died (a callback's bug) fails its readers and waiters now, not at
        their deadline."""
        task = self._task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the topic watcher on {self.topics} stopped") from task.exception()

    def _check_following(self) -> None:
        if self._task is None or self._consumer is None:
            raise RuntimeError("the topic watcher is not running: nothing it waits for can come")
        self._check_alive()

    # ---- waiting

    async def wait_until(
        self,
        condition: Callable[[], bool],
        *,
        timeout: float | None = 60.0,
        deadline: float | None = None,
        what: str = "",
    ) -> None:
        """Until `condition()` holds (re-checked on every new record), or the deadline."""
        await until(
            condition,
            self._changes,
            deadline_of(timeout, deadline),
            what or f"a condition on {self.topics}",
            refresh=self._check_following,
        )

    def found(self, predicate: Callable[[Rec], bool]) -> list[Rec]:
        """The records so far matching `predicate`, in arrival order."""
        self._check_alive()
        return [rec for rec in list(self.records) if predicate(rec)]

    async def wait_records(
        self,
        predicate: Callable[[Rec], bool],
        *,
        timeout: float | None = 60.0,
        deadline: float | None = None,
        count: int = 1,
    ) -> list[Rec]:
        """At least `count` records matching `predicate` (all of them, in arrival order)."""
        found: list[Rec] = []

        def enough() -> bool:
            nonlocal found
            found = self.found(predicate)
            return len(found) >= count

        try:
            await self.wait_until(enough, timeout=timeout, deadline=deadline)
        except TimeoutError:
            raise TimeoutError(f"{len(found)}/{count} matching records on {self.topics}") from None
        return found

    def matching(self, predicate: DocPredicate) -> list[dict[str, Any]]:
        """The event documents of the records matching `predicate(topic, headers, doc)`."""
        return [_doc(r) for r in self.found(lambda r: predicate(r.topic, r.headers, _doc(r)))]

    async def wait(self, predicate: DocPredicate, timeout: float = 60.0, count: int = 1) -> list[dict[str, Any]]:
        """At least `count` event documents matching `predicate`, waiting up to `timeout` seconds."""
        recs = await self.wait_records(lambda r: predicate(r.topic, r.headers, _doc(r)), timeout=timeout, count=count)
        return [_doc(r) for r in recs]


def _doc(rec: Rec) -> dict[str, Any]:
    """What a DocPredicate sees: the event document, or a marker for a value that is not one."""
    return rec.doc if rec.doc is not None else {"unparseable": True}
