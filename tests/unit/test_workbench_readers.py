"""The workbench's one mail reader (tools/mail.py) and one topic watcher (tools/watch.py).

The mail reader reads .eml files written here to a temporary folder, as the mail catcher
writes them (a hidden name, then a rename). The watcher follows a stand-in consumer: what it
is given, in what order, and how its waits end; tests/e2e/test_workbench_readers.py runs it
against the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import time
from email.message import EmailMessage
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from shared.settings import PlatformSettings
from tools import mail as mail_module
from tools import watch as watch_module
from tools.mail import Mailbox, extract_code, extract_link
from tools.waits import Changes, until
from tools.watch import Rec, TopicWatcher

# ---------------------------------------------------------------------------- mail

_counter = 0


def eml(to: str, subject: str, body: str, *, envelope_to: str | None = None) -> bytes:
    msg = EmailMessage()
    if envelope_to:
        msg["X-Envelope-To"] = f"<{envelope_to}>"
    msg["From"] = "Clave <no-reply@clave.test>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{_counter}.{time.monotonic_ns()}@clave.test>"
    msg.set_content(body)
    return msg.as_bytes()


def deliver(folder: Path, data: bytes) -> Path:
    """As the mail catcher stores a message: a hidden file, then a rename to a name that sorts
    by arrival."""
    global _counter
    _counter += 1
    name = f"20260101T000000.{_counter:06d}Z-1-{_counter:06d}"
    tmp = folder / f".{name}.tmp"
    tmp.write_bytes(data)
    final = folder / f"{name}.eml"
    os.replace(tmp, final)
    return final


def recovery(to: str, request_id: str, token: str = "tok-1", code: str = "123456") -> bytes:  # noqa: S107 - test data
    link = f"http://127.0.0.1:8000/recuperar?request_id={request_id}&token={token}"
    return eml(to, f"Recupera tu clave {request_id}", f"Abre {link}.\nO escribe el código {code}.\n")


def notice(to: str, subject: str = "Tu clave cambió") -> bytes:
    return eml(to, subject, "Tu clave fue cambiada.\n")


def test_a_recovery_mail_is_indexed_by_request_and_other_mail_by_recipient(tmp_path: Path) -> None:
    path = deliver(tmp_path, recovery("Ana <Ana@Example.org>", "req-1", token="t-1"))
    deliver(tmp_path, notice("ana@example.org"))
    deliver(tmp_path, notice("header@example.org", "other"))
    box = Mailbox(tmp_path)
    new = box.scan()
    assert [m.request_id for m in new] == ["req-1", None, None]
    first = box.by_request["req-1"][0]
    assert (first.path, first.token, first.subject) == (path, "t-1", "Recupera tu clave req-1")
    assert first.captured == path.stat().st_mtime
    assert [m.subject for m in box.notices["ana@example.org"]] == ["Tu clave cambió"]
    assert len(box.to("ANA@example.org")) == 2
    assert box.to("na@example.org") == []  # an address, not a piece of one


def test_the_smtp_envelope_recipient_counts_as_a_recipient(tmp_path: Path) -> None:
    deliver(tmp_path, eml("shown@example.org", "s", "x", envelope_to="hidden@example.org"))
    box = Mailbox(tmp_path)
    assert len(box.to("hidden@example.org")) == 1 and len(box.to("shown@example.org")) == 1


def test_earlier_mail_and_files_still_being_written_are_left_out(tmp_path: Path) -> None:
    deliver(tmp_path, recovery("a@example.org", "req-old"))
    box = Mailbox(tmp_path, ignore_existing=True)
    (tmp_path / ".20260101T000001Z-1-999999.tmp").write_bytes(b"To: half")
    assert box.scan() == []
    deliver(tmp_path, recovery("a@example.org", "req-new"))
    assert [m.request_id for m in box.scan()] == ["req-new"]
    assert "req-old" not in box.by_request


def test_a_missing_folder_is_an_empty_one(tmp_path: Path) -> None:
    box = Mailbox(tmp_path / "not-yet", ignore_existing=True)
    assert box.messages() == []


def test_each_file_is_read_once_however_many_there_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(500):
        deliver(tmp_path, notice(f"c{i}@example.org"))
    reads: list[Path] = []
    real = mail_module._read
    monkeypatch.setattr(mail_module, "_read", lambda p: reads.append(p) or real(p))
    box = Mailbox(tmp_path)
    assert len(box.scan()) == 500
    assert box.scan() == [] and box.to("c7@example.org") and len(box.messages()) == 500
    late = deliver(tmp_path, recovery("late@example.org", "req-late"))
    assert [m.path for m in box.scan()] == [late]
    assert len(reads) == 501 and len(set(reads)) == 501


async def test_wait_for_without_a_poller_finds_a_mail_that_arrives_later(tmp_path: Path) -> None:
    box = Mailbox(tmp_path, poll_s=0.02)
    before = box.snapshot()
    deliver(tmp_path, notice("x@example.org"))  # arrives before the wait, but not after `before`
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, deliver, tmp_path, notice("x@example.org", "second"))
    found = await box.wait_for(lambda m: "x@example.org" in str(m["To"]), timeout=10, after=before, count=2)
    assert [str(m["Subject"]) for m in found] == ["Tu clave cambió", "second"]
    after = box.snapshot()
    loop.call_later(0.1, deliver, tmp_path, notice("x@example.org", "third"))
    found = await box.wait_for(lambda m: "x@example.org" in str(m["To"]), timeout=10, after=after)
    assert [str(m["Subject"]) for m in found] == ["third"]


async def test_a_wait_that_is_not_met_fails_at_its_deadline_saying_what_it_found(tmp_path: Path) -> None:
    deliver(tmp_path, notice("x@example.org"))
    box = Mailbox(tmp_path, poll_s=0.02)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="1/2 matching e-mails"):
        await box.wait_for(lambda m: True, timeout=0.3, count=2)
    assert 0.3 <= time.monotonic() - t0 < 5
    with pytest.raises(TimeoutError, match="a recovery e-mail for req-none"):
        await box.recovery_mail("req-none", deadline=time.monotonic() + 0.2)


async def test_one_poller_serves_many_waiters(tmp_path: Path) -> None:
    async with Mailbox(tmp_path, ignore_existing=True, poll_s=0.02) as box:
        waiters = [asyncio.create_task(box.recovery_mail(f"req-{i}", timeout=30)) for i in range(20)]
        for i in reversed(range(20)):
            deliver(tmp_path, recovery(f"c{i}@example.org", f"req-{i}", token=f"t-{i}"))
        mails = await asyncio.gather(*waiters)
        assert [m.token for m in mails] == [f"t-{i}" for i in range(20)]
        await box.wait_until(lambda: len(box.mails) == 20, timeout=10)
        deliver(tmp_path, notice("c3@example.org"))
        await box.wait_until(lambda: "c3@example.org" in box.notices, timeout=10, what="the notice")


async def test_a_poller_that_dies_fails_its_waiters_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(path: Path) -> Any:
        raise PermissionError(f"cannot read {path.name}")

    box = Mailbox(tmp_path, poll_s=0.02)
    await box.start()
    try:
        monkeypatch.setattr(mail_module, "_read", broken)
        deliver(tmp_path, notice("x@example.org"))
        t0 = time.monotonic()
        with pytest.raises(PermissionError, match="cannot read"):
            await box.recovery_mail("req-1", timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        await box.stop()


def test_link_and_code_are_read_from_the_body() -> None:
    from email import message_from_bytes, policy

    msg = message_from_bytes(recovery("a@example.org", "req-9", token="tk"), policy=policy.default)
    assert extract_link(msg)[1:] == ("req-9", "tk")
    assert extract_code(msg) == "123456"  # type: ignore[arg-type]
    no_token = message_from_bytes(eml("a@x.org", "s", "http://h/recuperar?request_id=r"), policy=policy.default)
    with pytest.raises(ValueError, match="no token"):
        extract_link(no_token)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no recovery link"):
        extract_link(message_from_bytes(notice("a@x.org"), policy=policy.default))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- topics


class FakeConsumer:
    """What TopicWatcher asks of aiokafka's consumer; records are fed with `feed`."""

    instances: list[FakeConsumer] = []
    partitions = {"t.a": {0, 1}, "t.b": {0}}

    def __init__(self, **_kwargs: Any) -> None:
        self.assigned: list[TopicPartition] = []
        self.seeks: dict[TopicPartition, int] = {}
        self.at_end: list[TopicPartition] = []
        self.batches: asyncio.Queue[Any] = asyncio.Queue()
        self.stopped = False
        self._client = SimpleNamespace(force_metadata_update=self._metadata)
        FakeConsumer.instances.append(self)

    async def _metadata(self) -> None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.stopped = True

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self.partitions.get(topic)

    def assign(self, tps: list[TopicPartition]) -> None:
        self.assigned = list(tps)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks[tp] = offset

    async def seek_to_end(self, *tps: TopicPartition) -> None:
        self.at_end.extend(tps)

    async def position(self, tp: TopicPartition) -> int:
        return 0

    async def getmany(self, timeout_ms: int = 0) -> dict[TopicPartition, list[Any]]:
        try:
            item = await asyncio.wait_for(self.batches.get(), timeout_ms / 1000)
        except TimeoutError:
            return {}
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[no-any-return]

    def feed(self, *items: tuple[str, int, bytes, str | None]) -> None:
        batch: dict[TopicPartition, list[Any]] = {}
        for topic, partition, value, key in items:
            msg = SimpleNamespace(
                topic=topic,
                partition=partition,
                offset=len(batch.get(TopicPartition(topic, partition), [])),
                key=key.encode() if key else None,
                value=value,
                headers=[("content-type", b"application/cloudevents+json")],
                timestamp=1_700_000_000_000,
            )
            batch.setdefault(TopicPartition(topic, partition), []).append(msg)
        self.batches.put_nowait(batch)

    def fail(self, exc: Exception) -> None:
        self.batches.put_nowait(exc)


@pytest.fixture
def consumers(monkeypatch: pytest.MonkeyPatch) -> list[FakeConsumer]:
    FakeConsumer.instances = []
    monkeypatch.setattr(watch_module, "AIOKafkaConsumer", FakeConsumer)
    monkeypatch.setattr(watch_module, "client_kwargs", lambda _s: {})
    return FakeConsumer.instances


def event(rid: str, **data: Any) -> bytes:
    return json.dumps({"id": f"e-{rid}", "type": "t", "data": {"request_id": rid, **data}}).encode()


async def test_the_watcher_starts_at_the_end_and_keeps_what_follows(consumers: list[FakeConsumer]) -> None:
    seen: list[Rec] = []
    async with TopicWatcher(PlatformSettings(), ["t.a", "t.b"], on_record=seen.append) as w:
        (c,) = consumers
        assert (
            set(c.at_end)
            == set(c.assigned)
            == {TopicPartition("t.a", 0), TopicPartition("t.a", 1), TopicPartition("t.b", 0)}
        )
        waiter = asyncio.create_task(
            w.wait(lambda _t, _h, d: d.get("data", {}).get("request_id") == "r1", count=2, timeout=30)
        )
        c.feed(("t.a", 0, event("r1"), "k1"), ("t.b", 0, b"\xff not json", None))
        await w.wait_until(lambda: len(w.records) == 2, timeout=30)
        assert not waiter.done()  # one of two
        c.feed(("t.a", 1, event("r1", n=2), "k2"), ("t.a", 1, b"[1, 2]", None))
        docs = await waiter
        assert [d["data"].get("n") for d in docs] == [None, 2]
        assert [r.key for r in seen] == ["k1", None, "k2", None]  # the callback saw each, in order
        assert w.matching(lambda _t, _h, d: d.get("unparseable") is True) == [{"unparseable": True}] * 2
        keyed = await w.wait_records(lambda r: r.key == "k2", timeout=30)
        assert keyed[0].data == {"request_id": "r1", "n": 2} and keyed[0].headers["content-type"]
        assert keyed[0].value == event("r1", n=2)
    assert c.stopped


async def test_the_watcher_starts_at_given_offsets(consumers: list[FakeConsumer]) -> None:
    starts = {TopicPartition("t.a", 0): 7, TopicPartition("t.a", 1): 3}
    async with TopicWatcher(PlatformSettings(), starts=starts) as w:
        (c,) = consumers
        assert c.seeks == starts and c.at_end == [] and w.topics == ["t.a"]


async def test_an_unknown_topic_fails_the_start(consumers: list[FakeConsumer]) -> None:
    w = TopicWatcher(PlatformSettings(), ["t.a", "t.missing"])
    with pytest.raises(RuntimeError, match="t.missing has no partitions"):
        await w.start()
    assert consumers[0].stopped


async def test_broker_errors_are_noted_and_the_watcher_keeps_following(consumers: list[FakeConsumer]) -> None:
    async with TopicWatcher(PlatformSettings(), ["t.b"]) as w:
        c = consumers[0]
        c.fail(KafkaConnectionError())
        c.feed(("t.b", 0, event("r2"), None))
        await w.wait(lambda _t, _h, d: d["data"]["request_id"] == "r2", timeout=30)
        assert w.errors == ["KafkaConnectionError"]


async def test_a_broken_callback_fails_the_waiters_at_once(consumers: list[FakeConsumer]) -> None:
    def broken(rec: Rec) -> None:
        raise KeyError("bug in an index")

    async with TopicWatcher(PlatformSettings(), ["t.b"], on_record=broken) as w:
        consumers[0].feed(("t.b", 0, event("r3"), None))
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="stopped") as info:
            await w.wait_until(lambda: False, timeout=30)
        assert isinstance(info.value.__cause__, KeyError)
        assert time.monotonic() - t0 < 10
    with pytest.raises(RuntimeError, match="stopped"):  # reading what it saw fails too, after stop
        w.matching(lambda _t, _h, _d: True)


async def test_a_wait_on_a_watcher_that_is_not_running_fails_at_once(consumers: list[FakeConsumer]) -> None:
    w = TopicWatcher(PlatformSettings(), ["t.b"])
    with pytest.raises(RuntimeError, match="not running"):
        await w.wait_until(lambda: False, timeout=30)


async def test_a_wait_on_the_watcher_times_out_saying_how_many_it_found(consumers: list[FakeConsumer]) -> None:
    async with TopicWatcher(PlatformSettings(), ["t.b"]) as w:
        consumers[0].feed(("t.b", 0, event("r4"), None))
        with pytest.raises(TimeoutError, match=r"1/3 matching records on \['t.b'\]"):
            await w.wait(lambda _t, _h, d: True, timeout=0.5, count=3)


async def test_until_wakes_on_a_change_not_at_its_poll() -> None:
    changes, state = Changes(), {"done": False}

    def finish() -> None:
        state["done"] = True
        changes.notify()

    asyncio.get_running_loop().call_later(0.05, finish)
    t0 = time.monotonic()
    await until(lambda: state["done"], changes, time.monotonic() + 30, "done", poll_s=20)
    assert time.monotonic() - t0 < 10  # woken by notify, long before the 20 s re-check
