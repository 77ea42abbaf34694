"""The idempotent consumer's pipeline, with an in-memory store: every poison class is parked in
the topic's DLQ with its reason on its first delivery, the pipeline never raises on it, and the
real event behind it on the same partition is served. No stack: shared.consumer alone."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import bson
import pytest
from aiokafka import ConsumerRecord
from pymongo.errors import AutoReconnect

from services.tokens.app import invalid_reset
from shared import consumer
from shared.consumer import HANDLER_ATTEMPTS, EventPipeline, HandlerContext, InvalidAnswer, Route
from shared.crypto import SecretBox
from shared.envelope import BadInput, CloudEvent, DeadLetterReason, new_event
from shared.metrics import ServiceMetrics
from shared.schemas import RecoveryOutcome, ResetSubmitted
from shared.settings import PlatformSettings
from shared.store import DuplicateEvent, Outgoing
from shared.topics import RECOVERY_OUTCOMES, RECOVERY_RESETS, EventType, dlq
from tests.memory import apply_all

SETTINGS = PlatformSettings()
TOPIC = RECOVERY_RESETS
KEY = b"req-same-partition"
SECRET = "Secreto123-never-in-clear"


class FakeStore:
    """`ServiceStore.commit` and `ping` in memory. Like the real store, every outbox document is
    made (and BSON-encoded, as Mongo would) inside the commit."""

    def __init__(self) -> None:
        self.outbox: list[Outgoing] = []
        self.processed: set[tuple[str, str]] = set()
        self.up = True
        self.refuse: Callable[[list[Outgoing]], Exception | None] = lambda _o: None

    async def ping(self) -> bool:
        return self.up

    async def commit(
        self, *, consumer: str | None, event_id: str | None, writes: Any, outgoing: list[Outgoing]
    ) -> None:
        for o in outgoing:
            doc = o.to_document()
            bson.encode(doc)
            o.key.encode()  # what the relay sends
            for value in doc["headers"].values():
                str(value).encode()
        error = self.refuse(outgoing)
        if error is not None:
            raise error
        if consumer is not None and event_id is not None:
            if (consumer, event_id) in self.processed:
                raise DuplicateEvent(event_id)
            self.processed.add((consumer, event_id))
        await apply_all(writes)
        self.outbox.extend(outgoing)

    def letters(self) -> list[Outgoing]:
        return self.letters_in(self.outbox)

    @staticmethod
    def letters_in(outgoing: list[Outgoing]) -> list[Outgoing]:
        return [o for o in outgoing if o.topic == dlq(TOPIC)]


class Harness:
    def __init__(self, handler: Callable[..., Any] | None = None, answer: InvalidAnswer | None = None) -> None:
        self.store = FakeStore()
        self.served: list[str] = []
        self.offset = 0

        async def serve(ctx: HandlerContext, data: ResetSubmitted) -> None:
            self.served.append(data.request_id)

        self.pipeline = EventPipeline(
            service="tokens",
            topic=TOPIC,
            routes={EventType.RESET_SUBMITTED: Route(ResetSubmitted, handler or serve)},
            store=self.store,  # type: ignore[arg-type]
            settings=SETTINGS,
            metrics=ServiceMetrics("tokens"),
            on_committed=lambda: None,
            answer=answer,
        )

    def record(self, raw: bytes, key: bytes | None = KEY) -> ConsumerRecord[Any, Any]:
        self.offset += 1
        return ConsumerRecord(
            topic=TOPIC,
            partition=3,
            offset=self.offset,
            timestamp=0,
            timestamp_type=0,
            key=key,
            value=raw,
            checksum=None,
            serialized_key_size=len(key or b""),
            serialized_value_size=len(raw),
            headers=(),
        )

    async def deliver(self, raw: bytes, *, key: bytes | None = KEY, max_deliveries: int = 1) -> int:
        """Deliver one record as Kafka does (again after each exception); the delivery count
        that settled it. Fails if it is still not settled after `max_deliveries`."""
        record = self.record(raw, key)
        errors = []
        for n in range(1, max_deliveries + 1):
            try:
                await self.pipeline.process(record, raw)
                return n
            except Exception as exc:
                errors.append(exc.__class__.__name__)
        raise AssertionError(f"offset {record.offset} not settled after {max_deliveries} deliveries: {errors}")


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "backoff", lambda _streak: 0.0, raising=False)


def reset_doc(**data: Any) -> dict[str, Any]:
    fields = {"request_id": f"req-{uuid.uuid4().hex[:12]}", "token": "tok", "new_password": SECRET, **data}
    event = new_event(
        type=EventType.RESET_SUBMITTED, source="/portal/tests", data=fields, correlationid=fields["request_id"]
    )
    return json.loads(event.to_bytes())


def reset_bytes(**data: Any) -> bytes:
    return json.dumps(reset_doc(**data)).encode()


def with_data_field(name: str) -> bytes:
    doc = reset_doc()
    doc["data"][name] = "x"
    return json.dumps(doc).encode()  # ASCII escapes: a lone surrogate goes out as \udfff


DEPTH = 5000
POISON: dict[str, tuple[str, Callable[[], bytes]]] = {
    "deep_array": (DeadLetterReason.MALFORMED_JSON, lambda: b"[" * DEPTH + b"]" * DEPTH),
    "deep_array_in_event": (
        DeadLetterReason.MALFORMED_JSON,
        lambda: reset_bytes()[:-1] + b',"x":' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    ),
    "deep_object": (DeadLetterReason.MALFORMED_JSON, lambda: b'{"a":' * 3000 + b"1" + b"}" * 3000),
    "huge_integer": (DeadLetterReason.MALFORMED_JSON, lambda: b'{"specversion":"1.0","n":' + b"7" * 5000 + b"}"),
    "huge_integer_in_event": (
        DeadLetterReason.MALFORMED_JSON,
        lambda: reset_bytes()[:-1] + b',"n":' + b"7" * 5000 + b"}",
    ),
    "invalid_utf8": (DeadLetterReason.MALFORMED_JSON, lambda: b'{"specversion":"1.0","id":"\xff\xfe"}'),
    "lone_surrogate_correlationid": (
        DeadLetterReason.MALFORMED_JSON,
        lambda: json.dumps({**reset_doc(), "type": "ec.clave.nope.v1", "correlationid": "req-\ud800"}).encode(),
    ),
    "lone_surrogate_field_name": (
        DeadLetterReason.MALFORMED_JSON,
        lambda: with_data_field("\udfff"),
    ),
    "truncated": (DeadLetterReason.MALFORMED_JSON, lambda: reset_bytes()[:-3]),
    "empty": (DeadLetterReason.MALFORMED_JSON, lambda: b""),
    "not_cloudevent": (DeadLetterReason.NOT_CLOUDEVENT, lambda: json.dumps({"hello": SECRET}).encode()),
    "array_of_events": (DeadLetterReason.NOT_CLOUDEVENT, lambda: json.dumps([reset_doc()]).encode()),
    "wrong_specversion": (
        DeadLetterReason.WRONG_SPECVERSION,
        lambda: json.dumps({**reset_doc(), "specversion": "0.3"}).encode(),
    ),
    "unknown_type": (DeadLetterReason.UNKNOWN_TYPE, lambda: json.dumps({**reset_doc(), "type": "x.v1"}).encode()),
    "schema_invalid": (DeadLetterReason.SCHEMA_INVALID, lambda: reset_bytes(code="12ab")),
    "schema_invalid_odd_field_name": (
        DeadLetterReason.SCHEMA_INVALID,
        lambda: with_data_field("\u202e\x00\nñ" * 100),
    ),
    "too_large": (DeadLetterReason.TOO_LARGE, lambda: reset_bytes(new_password=SECRET + "x" * 70_000)),
    "too_large_near_broker_limit": (
        DeadLetterReason.TOO_LARGE,
        lambda: b'{"x":"' + b"y" * 1_000_000 + b'"}',
    ),
}


@pytest.mark.parametrize("case", sorted(POISON))
async def test_poison_is_parked_on_first_delivery_and_the_next_event_is_served(case: str) -> None:
    reason, make = POISON[case]
    h = Harness()
    raw = make()
    assert await h.deliver(raw) == 1  # settled at once: no exception, no redelivery
    real = reset_doc()
    assert await h.deliver(json.dumps(real).encode()) == 1
    assert h.served == [real["data"]["request_id"]]

    [letter] = h.store.letters()
    assert letter.headers["clave-dlq-reason"] == reason
    data = letter.event.data
    assert data["reason"] == reason and data["origin_topic"] == TOPIC and data["origin_offset"] == 1
    assert data["payload_bytes"] == len(raw)
    assert data["payload_sha256"] == hashlib.sha256(raw).hexdigest()
    sealed = SecretBox(SETTINGS.dlq_keys).open_bytes(data["sealed_payload"])
    assert raw.startswith(sealed) and len(sealed) == min(len(raw), SETTINGS.max_event_bytes)
    assert SECRET not in letter.event.to_bytes().decode()
    assert all(v.isascii() and v.isprintable() for v in letter.headers.values())
    # The letter must fit in a Kafka record (1 MiB by default) or the relay could never send it.
    assert len(letter.event.to_bytes()) < 200_000
    assert letter.key == KEY.decode()
    audits = [o for o in h.store.outbox if o.event.type == EventType.AUDIT]
    assert [a.event.data["action"] for a in audits] == ["message_dead_lettered"]


async def test_an_oversized_record_is_sealed_up_to_the_limit_and_says_so() -> None:
    h = Harness()
    raw = b'{"x":"' + b"y" * 1_000_000 + b'"}'
    await h.deliver(raw)
    data = h.store.letters()[0].event.data
    assert data["payload_bytes"] == len(raw)
    assert data["sealed_bytes"] == SETTINGS.max_event_bytes
    assert SecretBox(SETTINGS.dlq_keys).open_bytes(data["sealed_payload"]) == raw[: SETTINGS.max_event_bytes]


async def test_a_readable_correlation_id_is_carried_from_the_single_parse() -> None:
    h = Harness()
    doc = {**reset_doc(), "type": "ec.clave.nope.v1"}
    await h.deliver(json.dumps(doc).encode())
    [letter] = h.store.letters()
    assert letter.event.correlationid == doc["correlationid"]


async def test_an_unreadable_correlation_id_falls_back_to_the_origin() -> None:
    h = Harness()
    await h.deliver(b"[" * DEPTH + b"]" * DEPTH)
    await h.deliver(json.dumps({**reset_doc(), "type": "x.v1", "correlationid": "c\n" * 100}).encode())
    first, second = h.store.letters()
    assert first.event.correlationid == f"{TOPIC}/3/1"
    assert second.event.correlationid == f"{TOPIC}/3/2"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (None, f"{TOPIC}/3/1"),
        (b"", f"{TOPIC}/3/1"),
        (b"\xff\xfe1710034065", "\ufffd\ufffd1710034065"),
        (b"k" * 100_000, "k" * 256),
    ],
)
async def test_any_record_key_gives_a_bounded_letter_key(key: bytes | None, expected: str) -> None:
    h = Harness()
    assert await h.deliver(b"{", key=key) == 1
    assert h.store.letters()[0].key == expected


async def test_handler_error_after_three_failures_then_next_event_served() -> None:
    calls = 0

    async def broken(ctx: HandlerContext, data: ResetSubmitted) -> None:
        nonlocal calls
        calls += 1
        if data.request_id.startswith("req-bug"):
            raise ValueError(SECRET)

    h = Harness(broken)
    doc = reset_doc(request_id="req-bug-1")
    assert await h.deliver(json.dumps(doc).encode(), max_deliveries=HANDLER_ATTEMPTS) == HANDLER_ATTEMPTS
    [letter] = h.store.letters()
    assert letter.headers["clave-dlq-reason"] == DeadLetterReason.HANDLER_ERROR
    assert letter.headers["clave-dlq-detail"] == "handler raised ValueError"
    assert letter.event.correlationid == doc["correlationid"]
    assert h.pipeline._attempts == {}  # the count went with the record
    assert await h.deliver(reset_bytes()) == 1
    assert calls == HANDLER_ATTEMPTS + 1


@pytest.mark.parametrize(
    ("reason", "raised"),
    [
        (DeadLetterReason.UNDECRYPTABLE, BadInput(DeadLetterReason.UNDECRYPTABLE, "sealed secrets do not open")),
        (DeadLetterReason.DUPLICATE_EVENT, DuplicateEvent("x")),
    ],
)
async def test_handler_bad_input_is_parked_with_the_event_correlation(reason: str, raised: Exception) -> None:
    async def refuse(ctx: HandlerContext, data: ResetSubmitted) -> None:
        raise raised

    h = Harness(refuse)
    doc = reset_doc()
    assert await h.deliver(json.dumps(doc).encode()) == 1
    [letter] = h.store.letters()
    assert letter.headers["clave-dlq-reason"] == reason
    assert letter.event.correlationid == doc["correlationid"]


async def test_a_letter_the_store_refuses_is_replaced_by_a_minimal_one() -> None:
    h = Harness()
    # A deterministic refusal of any letter but the minimal one (a bug in the letter).
    h.store.refuse = lambda out: (
        ValueError("refused")
        if any(o in h.store.letters_in(out) and not o.headers["clave-dlq-detail"].startswith("dead") for o in out)
        else None
    )
    raw = reset_bytes(code="12ab")
    assert await h.deliver(raw) == 1
    [letter] = h.store.letters()
    assert letter.headers["clave-dlq-reason"] == DeadLetterReason.SCHEMA_INVALID
    assert "ValueError" in letter.headers["clave-dlq-detail"]
    assert letter.key == letter.event.correlationid == f"{TOPIC}/3/1"
    assert SecretBox(SETTINGS.dlq_keys).open_bytes(letter.event.data["sealed_payload"]) == raw
    assert await h.deliver(reset_bytes()) == 1 and len(h.served) == 1


async def test_parking_while_the_store_is_away_is_retried_not_lost() -> None:
    h = Harness()
    h.store.refuse = lambda _out: AutoReconnect("store away")
    record = h.record(b"{")
    for _ in range(30):
        with pytest.raises(AutoReconnect):
            await h.pipeline.process(record, b"{")
    assert h.store.letters() == []
    h.store.refuse = lambda _out: None
    await h.pipeline.process(record, b"{")
    assert [o.headers["clave-dlq-reason"] for o in h.store.letters()] == [DeadLetterReason.MALFORMED_JSON]


async def test_store_errors_during_a_real_outage_never_park_the_record() -> None:
    fail = True

    async def needs_store(ctx: HandlerContext, data: ResetSubmitted) -> None:
        if fail:
            raise AutoReconnect("store away")

    h = Harness(needs_store)
    h.store.up = False
    raw = reset_bytes()
    record = h.record(raw)
    for _ in range(3 * consumer.UNEXPLAINED_OUTAGE_ATTEMPTS):
        with pytest.raises(AutoReconnect):
            await h.pipeline.process(record, raw)
    assert h.store.letters() == []
    fail, h.store.up = False, True
    await h.pipeline.process(record, raw)
    assert h.store.letters() == [] and h.pipeline._attempts == {}


async def test_store_errors_while_the_store_answers_are_parked_in_the_end() -> None:
    """An 'outage' that only this record sees (the store answers its ping) is not retried forever."""

    async def always_timeout(ctx: HandlerContext, data: ResetSubmitted) -> None:
        if data.request_id.startswith("req-stuck"):
            raise TimeoutError

    h = Harness(always_timeout)
    limit = consumer.UNEXPLAINED_OUTAGE_ATTEMPTS
    assert await h.deliver(reset_bytes(request_id="req-stuck"), max_deliveries=limit) == limit
    assert [o.headers["clave-dlq-reason"] for o in h.store.letters()] == [DeadLetterReason.HANDLER_ERROR]
    assert await h.deliver(reset_bytes()) == 1


# ---- every reset gets an answer ---------------------------------------------------------------

RESET_ANSWER = InvalidAnswer("request_id", RECOVERY_OUTCOMES, EventType.RECOVERY_OUTCOME, invalid_reset)


def answers(h: Harness) -> list[Outgoing]:
    return [o for o in h.store.outbox if o.topic == RECOVERY_OUTCOMES]


@pytest.mark.parametrize("case", sorted(POISON))
async def test_a_reset_that_cannot_be_processed_is_answered_besides_its_letter(case: str) -> None:
    reason, make = POISON[case]
    h = Harness(answer=RESET_ANSWER)
    raw = make()
    await h.deliver(raw)
    assert len(h.store.letters()) == 1
    [answer] = answers(h)
    # Keyed by the request_id read from the record, else by its record key (the contract's key).
    try:
        readable = json.loads(raw)["data"]["request_id"]
    except Exception:
        readable = None
    expected = (
        readable if reason in ("schema_invalid", "unknown_type", "wrong_specversion") and readable else KEY.decode()
    )
    assert answer.key == expected and answer.event.correlationid == expected
    assert answer.event.data == {
        "request_id": expected,
        "stage": "reset",
        "status": "rejected",
        "reasons": ["reset_invalid"],
    }
    assert SECRET not in answer.event.to_bytes().decode()


async def test_the_request_id_in_the_data_wins_over_the_record_key() -> None:
    h = Harness(answer=RESET_ANSWER)
    await h.deliver(reset_bytes(request_id="req-in-data", code="12ab"), key=b"req-in-key")
    assert [a.key for a in answers(h)] == ["req-in-data"]


async def test_no_readable_id_no_answer_but_still_the_letter() -> None:
    h = Harness(answer=RESET_ANSWER)
    await h.deliver(b"[" * DEPTH + b"]" * DEPTH, key=b"not an id \xff")
    await h.deliver(json.dumps({"hello": 1}).encode(), key=None)
    assert len(h.store.letters()) == 2 and answers(h) == []


async def test_a_redelivered_event_is_not_answered_again() -> None:
    h = Harness(answer=RESET_ANSWER)
    raw = reset_bytes()
    await h.deliver(raw)
    await h.deliver(raw)  # same event id: duplicate_event
    [letter] = h.store.letters()
    assert letter.headers["clave-dlq-reason"] == DeadLetterReason.DUPLICATE_EVENT
    assert answers(h) == []


async def test_a_handler_that_keeps_failing_is_answered() -> None:
    async def broken(ctx: HandlerContext, data: ResetSubmitted) -> None:
        raise ValueError("bug")

    h = Harness(broken, answer=RESET_ANSWER)
    doc = reset_doc()
    await h.deliver(json.dumps(doc).encode(), max_deliveries=3)
    assert [a.event.data["request_id"] for a in answers(h)] == [doc["data"]["request_id"]]


# ---- replies sent at once -----------------------------------------------------------------------


async def test_a_reply_is_sent_at_once_after_the_commit_and_kept_in_the_outbox() -> None:
    sent: list[list[Outgoing]] = []

    async def answer(ctx: HandlerContext, data: ResetSubmitted) -> None:
        ctx.reply(RECOVERY_OUTCOMES, data.request_id, EventType.RECOVERY_OUTCOME, invalid_reset(data.request_id))
        await ctx.commit()

    async def send_now(outgoing: list[Outgoing]) -> None:
        assert all(o in h.store.outbox for o in outgoing), "sent before its commit"
        sent.append(outgoing)

    h = Harness(answer)
    h.pipeline.send_now = send_now
    await h.deliver(reset_bytes())
    [[reply]] = sent
    assert reply.topic == RECOVERY_OUTCOMES and reply in h.store.outbox  # the relay publishes it too


async def test_a_failed_immediate_reply_changes_nothing() -> None:
    async def answer(ctx: HandlerContext, data: ResetSubmitted) -> None:
        ctx.reply(RECOVERY_OUTCOMES, data.request_id, EventType.RECOVERY_OUTCOME, invalid_reset(data.request_id))

    async def broken(outgoing: list[Outgoing]) -> None:
        raise OSError("broker away")

    h = Harness(answer)
    h.pipeline.send_now = broken
    assert await h.deliver(reset_bytes()) == 1  # settled: the outbox copy will go
    assert [o.topic for o in h.store.outbox] == [RECOVERY_OUTCOMES] and h.store.letters() == []


def staged_context() -> HandlerContext:
    event = CloudEvent.model_validate(reset_doc())
    ctx = HandlerContext("tokens", f"tokens:{TOPIC}", TOPIC, event, FakeStore())  # type: ignore[arg-type]
    outcome = RecoveryOutcome(request_id="req-1", stage="reset", status="rejected", reasons=["token_invalid"])
    ctx.reply(RECOVERY_OUTCOMES, "req-1", EventType.RECOVERY_OUTCOME, outcome)
    ctx.audit("reset_rejected", "rejected")
    return ctx


def test_unstage_drops_the_staged_events_and_the_answer() -> None:
    ctx = staged_context()
    ctx.unstage()
    assert ctx.outgoing == [] and ctx.replies == []


def test_refuse_hands_what_was_staged_to_the_dead_letter() -> None:
    ctx = staged_context()
    staged = list(ctx.outgoing)
    bad = ctx.refuse(BadInput(DeadLetterReason.SCHEMA_INVALID, "refused"))
    assert bad.also == staged and len(staged) == 2
    assert ctx.outgoing == [] and ctx.replies == []
