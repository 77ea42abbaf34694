"""Every recovery request gets an answer: one that identity's consumer dead-letters is answered
`rejected` / `request_invalid` on recovery.outcomes besides its letter, keyed by the request_id
read from its data, never by its record key (the national ID), and decided before any lookup,
so a known and an unknown ID get the same answer. Identity's real wiring (REQUEST_ANSWER) on
the real pipeline, with an in-memory store. Also: login and contact-update answers are never
keyed by the national ID either."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from services.identity.app import REQUEST_ANSWER
from services.password.app import CHECK_ANSWER, UPDATE_ANSWER
from shared.consumer import EventPipeline, HandlerContext, InvalidAnswer, Route
from shared.envelope import DeadLetterReason, new_event
from shared.metrics import ServiceMetrics
from shared.schemas import ContactUpdateRequested, LoginCheckRequested, Payload, RecoveryRequested
from shared.store import Outgoing
from shared.topics import (
    CONTACT_RESULTS,
    CONTACT_UPDATES,
    LOGIN_CHECKS,
    LOGIN_RESULTS,
    RECOVERY_OUTCOMES,
    RECOVERY_REQUESTS,
    EventType,
    dlq,
)
from tests.unit.test_consumer import SETTINGS, FakeStore

KNOWN_ID = "1710034065"  # what an account would have
UNKNOWN_ID = "0926687856"
ANSWER = "Andrade-secret-answer"


def request_doc(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "profile": "affiliate",
        "national_id": KNOWN_ID,
        "email": "maria@example.org",
        "answers": {"mother_surname": ANSWER},
        "captcha_passed": True,
        "locale": "es",
        "client_ip": "10.1.2.3",
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    event = new_event(type=EventType.RECOVERY_REQUESTED, source="/portal/tests", data=data, correlationid="c")
    return json.loads(event.to_bytes())


def request_bytes(**overrides: Any) -> bytes:
    return json.dumps(request_doc(**overrides)).encode()


# Malformed requests of several classes, each with a readable request_id in its data.
READABLE: dict[str, tuple[str, Any]] = {
    "email_missing": (DeadLetterReason.SCHEMA_INVALID, lambda: request_bytes(email=None)),
    "bad_ip": (DeadLetterReason.SCHEMA_INVALID, lambda: request_bytes(client_ip="not-an-address")),
    "bad_profile": (DeadLetterReason.SCHEMA_INVALID, lambda: request_bytes(profile="robot")),
    "both_answer_forms": (DeadLetterReason.SCHEMA_INVALID, lambda: request_bytes(sealed_answers="AAAA")),
    "no_answers": (DeadLetterReason.SCHEMA_INVALID, lambda: request_bytes(answers=None)),
    "unknown_field": (DeadLetterReason.SCHEMA_INVALID, lambda: request_bytes(extra="x")),
    "national_id_too_long": (DeadLetterReason.SCHEMA_INVALID, lambda: request_bytes(national_id="1" * 40)),
    "wrong_specversion": (
        DeadLetterReason.WRONG_SPECVERSION,
        lambda: json.dumps({**request_doc(), "specversion": "0.3"}).encode(),
    ),
    "unknown_type": (DeadLetterReason.UNKNOWN_TYPE, lambda: json.dumps({**request_doc(), "type": "x.v1"}).encode()),
}


class Identity:
    """identity's recovery.requests consumer: its real answer, a handler that records calls."""

    def __init__(
        self,
        answer: InvalidAnswer = REQUEST_ANSWER,
        topic: str = RECOVERY_REQUESTS,
        route: tuple[str, type[Payload]] = (EventType.RECOVERY_REQUESTED, RecoveryRequested),
    ) -> None:
        self.store = FakeStore()
        self.served: list[str] = []
        self.offset = 0
        self.topic = topic

        async def serve(ctx: HandlerContext, data: Any) -> None:
            self.served.append(data.model_dump_json())

        self.pipeline = EventPipeline(
            service="identity",
            topic=topic,
            routes={route[0]: Route(route[1], serve)},
            store=self.store,  # type: ignore[arg-type]
            settings=SETTINGS,
            metrics=ServiceMetrics("identity"),
            on_committed=lambda: None,
            answer=answer,
        )

    async def deliver(self, raw: bytes, key: bytes = KNOWN_ID.encode()) -> None:
        self.offset += 1
        record: ConsumerRecord[Any, Any] = ConsumerRecord(
            topic=self.topic,
            partition=0,
            offset=self.offset,
            timestamp=0,
            timestamp_type=0,
            key=key,
            value=raw,
            checksum=None,
            serialized_key_size=len(key),
            serialized_value_size=len(raw),
            headers=(),
        )
        await self.pipeline.process(record, raw)

    def letters(self) -> list[Outgoing]:
        return [o for o in self.store.outbox if o.topic == dlq(self.topic)]

    def answers(self, topic: str = RECOVERY_OUTCOMES) -> list[Outgoing]:
        return [o for o in self.store.outbox if o.topic == topic]


@pytest.mark.parametrize("case", sorted(READABLE))
async def test_a_request_that_fails_validation_is_answered_request_invalid(case: str) -> None:
    reason, make = READABLE[case]
    identity = Identity()
    raw = make()
    request_id = json.loads(raw)["data"]["request_id"]
    await identity.deliver(raw)
    [letter] = identity.letters()
    assert letter.headers["clave-dlq-reason"] == reason
    [answer] = identity.answers()
    assert answer.key == request_id and answer.event.correlationid == request_id
    assert answer.event.type == EventType.RECOVERY_OUTCOME and answer.event.source == "/clave/identity"
    assert answer.event.data == {
        "request_id": request_id,
        "stage": "request",
        "status": "rejected",
        "reasons": ["request_invalid"],
    }
    text = answer.event.to_bytes().decode()
    assert ANSWER not in text and KNOWN_ID not in text  # nothing the citizen typed is echoed
    assert identity.served == []  # decided before the handler (and so before any lookup)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"specversion": "1.0", "data": {"request_id": "req-x"',  # malformed JSON: nothing parsed
        json.dumps({"hello": "world"}).encode(),  # not a CloudEvent
        request_bytes(request_id="has spaces and / slashes", email=None),  # not an id's shape
        request_bytes(request_id=None, email=None),
    ],
)
async def test_no_readable_request_id_no_answer_and_never_the_record_key(raw: bytes) -> None:
    identity = Identity()
    await identity.deliver(raw, key=KNOWN_ID.encode())  # the contract's key: the national ID
    assert len(identity.letters()) == 1
    assert identity.answers() == []


async def test_the_answer_is_the_same_for_a_known_and_an_unknown_id() -> None:
    """No enumeration: everything in the answer but its event id and time is the same."""
    identity = Identity()
    shared_rid = "req-same-shape"
    for national_id in (KNOWN_ID, UNKNOWN_ID):
        await identity.deliver(
            request_bytes(request_id=shared_rid, national_id=national_id, email=None), key=national_id.encode()
        )
    first, second = identity.answers()
    assert (first.key, first.headers, first.event.data) == (second.key, second.headers, second.event.data)
    fields = ("type", "source", "subject", "correlationid", "causationid", "datacontenttype")
    assert [getattr(first.event, f) for f in fields] == [getattr(second.event, f) for f in fields]


async def test_a_valid_request_is_served_and_not_answered_by_the_pipeline() -> None:
    identity = Identity()
    raw = request_bytes()
    await identity.deliver(raw)
    assert [json.loads(s)["request_id"] for s in identity.served] == [json.loads(raw)["data"]["request_id"]]
    assert identity.letters() == [] and identity.answers() == []


async def test_a_redelivered_request_is_not_answered_again() -> None:
    identity = Identity()
    raw = request_bytes()
    await identity.deliver(raw)
    await identity.deliver(raw)  # the same event id: duplicate_event, the first copy was answered
    [letter] = identity.letters()
    assert letter.headers["clave-dlq-reason"] == DeadLetterReason.DUPLICATE_EVENT
    assert identity.answers() == []


@pytest.mark.parametrize(
    ("answer", "topic", "route", "answers_on", "id_field"),
    [
        (CHECK_ANSWER, LOGIN_CHECKS, (EventType.LOGIN_CHECK_REQUESTED, LoginCheckRequested), LOGIN_RESULTS, "check_id"),
        (
            UPDATE_ANSWER,
            CONTACT_UPDATES,
            (EventType.CONTACT_UPDATE_REQUESTED, ContactUpdateRequested),
            CONTACT_RESULTS,
            "update_id",
        ),
    ],
)
async def test_logins_and_contact_updates_are_never_answered_by_their_record_key(
    answer: InvalidAnswer, topic: str, route: tuple[str, type[Payload]], answers_on: str, id_field: str
) -> None:
    """Those topics are keyed by the national ID as well: a record with no readable id is
    dead-lettered without an answer made of the national ID; one with an id is answered by it."""
    password = Identity(answer, topic, route)
    await password.deliver(json.dumps({"hello": 1}).encode(), key=KNOWN_ID.encode())
    assert len(password.letters()) == 1 and password.answers(answers_on) == []
    bad = new_event(
        type=route[0],
        source="/portal/tests",
        data={id_field: "id-1", "national_id": KNOWN_ID, "key": "k", "client_ip": "not-an-address", "phone": "1"},
        correlationid="id-1",
    )
    await password.deliver(bad.to_bytes(), key=KNOWN_ID.encode())
    [result] = password.answers(answers_on)
    assert result.key == "id-1" and result.event.data["reasons"] == ["check_invalid"]
    assert KNOWN_ID not in result.event.to_bytes().decode()
