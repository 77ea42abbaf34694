"""The identity service as app.py wires it, on FastStream's TestKafkaBroker and the in-memory
store (tests/middle/inprocess.py): a recovery request goes in as a Kafka record and comes out
as events staged in the outbox; bad bytes of every class are dead-lettered with their reason
and the next record on the partition is served. No Kafka, no store server: seconds."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from services.identity.app import build
from services.identity.domain import normalize_answer
from services.identity.settings import IdentitySettings
from shared import consumer
from shared.crypto import SecretBox
from shared.envelope import DeadLetterReason, new_event
from shared.hashing import SecretHasher
from shared.topics import (
    IDENTITY_DECLINED,
    IDENTITY_VERIFIED,
    RECOVERY_OUTCOMES,
    RECOVERY_REQUESTS,
    TOKENS_CODE_REJECTED,
    EventType,
)
from tests.middle.inprocess import Cluster, Node, running, settings

SETTINGS: IdentitySettings = settings(IdentitySettings)
NATIONAL_ID = "1710034065"
ANSWERS = {"birth_date": "1984-03-09", "fingerprint_code": "V4443V4442", "mother_surname": "Andrade"}
SECRET_ANSWER = "Andrade"
KEY = NATIONAL_ID.encode()  # the contract's key: the national ID as typed


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "backoff", lambda _streak: 0.0)


async def seed_account(node: Node, account_id: str = "acc-1") -> None:
    """An account in identity's store, written through its own intent (create_account)."""
    hasher = SecretHasher(SETTINGS)
    try:
        hashes = {q: hasher.hash_sync(normalize_answer(a)) for q, a in ANSWERS.items()}
    finally:
        hasher.close()
    now = datetime.now(UTC)
    doc = {
        "_id": account_id,
        "national_id": NATIONAL_ID,
        "profile": "affiliate",
        "representative_id": None,
        "name": "María Pérez",
        "email": "maria.perez@example.org",
        "locale": "es",
        "answer_hashes": hashes,
        "created_at": now,
        "updated_at": now,
    }
    store: Any = node.service.store
    await store.commit(consumer=None, event_id=None, writes=[store.create_account(doc)], outgoing=[])


@pytest.fixture
async def identity() -> AsyncIterator[Cluster]:
    async with running(build(SETTINGS)) as cluster:
        await seed_account(cluster["identity"])
        yield cluster


def request(**data: Any) -> dict[str, Any]:
    fields = {
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "profile": "affiliate",
        "national_id": NATIONAL_ID,
        "email": "maria.perez@example.org",
        "answers": dict(ANSWERS),
        "captcha_passed": True,
        "client_ip": "203.0.113.9",
        **data,
    }
    event = new_event(
        type=EventType.RECOVERY_REQUESTED, source="/portal/tests", data=fields, correlationid=fields["request_id"]
    )
    doc: dict[str, Any] = json.loads(event.to_bytes())
    return doc


def raw(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def outcome(node: Node, request_id: str) -> dict[str, Any]:
    [event] = [e for e in node.events(RECOVERY_OUTCOMES) if e["data"]["request_id"] == request_id]
    data: dict[str, Any] = event["data"]
    return data


async def test_a_valid_request_stages_verified_and_accepted(identity: Cluster) -> None:
    node = identity["identity"]
    doc = request()
    rid = doc["data"]["request_id"]
    await identity.publish(RECOVERY_REQUESTS, raw(doc), key=KEY)  # the broker's own publish
    assert outcome(node, rid) == {"request_id": rid, "stage": "request", "status": "accepted", "reasons": []}
    [verified] = node.outbox(IDENTITY_VERIFIED)
    assert verified["key"] == "acc-1"
    assert verified["event"]["data"]["request_id"] == rid and verified["event"]["data"]["account_id"] == "acc-1"
    assert verified["event"]["correlationid"] == rid and verified["event"]["causationid"] == doc["id"]
    assert node.outbox(IDENTITY_DECLINED) == []
    assert node.collection("requests").find_one({"_id": rid}) is not None  # its intent landed
    assert node.processed() == 1
    assert node.attempts(RECOVERY_REQUESTS) == {}


async def test_a_wrong_answer_stages_a_decoy_and_the_same_accepted(identity: Cluster) -> None:
    """No oracle: the portal gets `accepted` either way; tokens keeps a decoy for the decline."""
    node = identity["identity"]
    doc = request(answers={**ANSWERS, "birth_date": "1900-01-01"})
    rid = doc["data"]["request_id"]
    await identity.deliver(RECOVERY_REQUESTS, raw(doc), key=KEY)
    assert outcome(node, rid)["status"] == "accepted"
    [declined] = node.events(IDENTITY_DECLINED)
    assert declined["data"]["request_id"] == rid and declined["data"]["account_id"] == "acc-1"
    assert node.outbox(IDENTITY_VERIFIED) == []
    counters = node.collection("counters").find_one({"_id": "p:a:acc-1"})
    assert len(counters["failures"]) == 1


async def test_a_redelivered_request_changes_nothing(identity: Cluster) -> None:
    node = identity["identity"]
    body = raw(request())
    await identity.deliver(RECOVERY_REQUESTS, body, key=KEY)
    before = len(node.outbox(IDENTITY_VERIFIED))
    await identity.deliver(RECOVERY_REQUESTS, body, key=KEY)  # the same event again (a new offset)
    assert len(node.outbox(IDENTITY_VERIFIED)) == before == 1
    [letter] = node.letters(RECOVERY_REQUESTS)
    assert letter["headers"]["clave-dlq-reason"] == DeadLetterReason.DUPLICATE_EVENT


DEPTH = 5000


def deep_array() -> bytes:
    return b"[" * DEPTH + b"]" * DEPTH


def deep_in_event() -> bytes:
    return raw(request())[:-1] + b',"x":' + b"[" * DEPTH + b"]" * DEPTH + b"}"


def huge_integer() -> bytes:
    return raw(request())[:-1] + b',"n":' + b"7" * 5000 + b"}"


def invalid_utf8() -> bytes:
    return raw(request()).replace(b"Andrade", b"Andr\xff\xfede")


def schema_invalid() -> bytes:
    return raw(request(client_ip="not-an-address", answers={"mother_surname": SECRET_ANSWER}))


def unknown_type() -> bytes:
    return raw({**request(), "type": "ec.clave.nope.v1"})


def not_cloudevent() -> bytes:
    return json.dumps({"answers": ANSWERS}).encode()


def too_large() -> bytes:
    return raw(request(email="m@example.org" + "x" * 70_000))


POISON: dict[str, tuple[str, Callable[[], bytes]]] = {
    "deep_array": (DeadLetterReason.MALFORMED_JSON, deep_array),
    "deep_array_in_event": (DeadLetterReason.MALFORMED_JSON, deep_in_event),
    "huge_integer": (DeadLetterReason.MALFORMED_JSON, huge_integer),
    "invalid_utf8": (DeadLetterReason.MALFORMED_JSON, invalid_utf8),
    "truncated": (DeadLetterReason.MALFORMED_JSON, lambda: raw(request())[:-5]),
    "not_cloudevent": (DeadLetterReason.NOT_CLOUDEVENT, not_cloudevent),
    "unknown_type": (DeadLetterReason.UNKNOWN_TYPE, unknown_type),
    "schema_invalid": (DeadLetterReason.SCHEMA_INVALID, schema_invalid),
    "too_large": (DeadLetterReason.TOO_LARGE, too_large),
}


@pytest.mark.parametrize("case", sorted(POISON))
async def test_bad_bytes_are_dead_lettered_and_the_next_request_is_served(identity: Cluster, case: str) -> None:
    node = identity["identity"]
    reason, make = POISON[case]
    bad = make()
    assert await identity.deliver(RECOVERY_REQUESTS, bad, key=KEY, partition=2) == 1  # settled at once
    doc = request()
    assert await identity.deliver(RECOVERY_REQUESTS, raw(doc), key=KEY, partition=2) == 1
    assert outcome(node, doc["data"]["request_id"])["status"] == "accepted"

    [letter] = node.letters(RECOVERY_REQUESTS)
    headers = letter["headers"]
    assert headers["clave-dlq-reason"] == reason
    assert (headers["clave-origin-partition"], headers["clave-origin-offset"]) == ("2", "0")
    assert letter["key"] == NATIONAL_ID
    sealed = letter["event"]["data"]["sealed_payload"]
    assert bad.startswith(SecretBox(SETTINGS.dlq_keys).open_bytes(sealed))
    text = bytes(letter["value"]).decode() + json.dumps(headers)
    assert SECRET_ANSWER not in text and "1984-03-09" not in text  # the letter holds it sealed only
    audits = [e["data"]["action"] for e in node.events("audit.events")]
    assert audits.count("message_dead_lettered") == 1
    assert node.attempts(RECOVERY_REQUESTS) == {}


async def test_two_bad_records_in_a_row_each_get_their_letter(identity: Cluster) -> None:
    node = identity["identity"]
    for make in (deep_array, invalid_utf8, huge_integer):
        await identity.deliver(RECOVERY_REQUESTS, make(), key=KEY)
    offsets = [d["headers"]["clave-origin-offset"] for d in node.letters(RECOVERY_REQUESTS)]
    assert offsets == ["0", "1", "2"]


def code_rejected(source: str) -> bytes:
    data = {"request_id": f"req-{uuid.uuid4().hex[:12]}", "account_id": "acc-1", "client_ip": "203.0.113.9"}
    event = new_event(type=EventType.TOKENS_CODE_REJECTED, source=source, data=data, correlationid=data["request_id"])
    return event.to_bytes()


async def test_an_event_from_a_service_that_does_not_produce_the_topic_is_dead_lettered(identity: Cluster) -> None:
    node = identity["identity"]
    await identity.deliver(TOKENS_CODE_REJECTED, code_rejected("/clave/notifier"), key=b"acc-1")
    [letter] = node.letters(TOKENS_CODE_REJECTED)
    assert letter["headers"]["clave-dlq-reason"] == DeadLetterReason.WRONG_SOURCE
    assert "/clave/tokens" in letter["headers"]["clave-dlq-detail"]  # names the expected, not the given
    assert node.collection("counters").count_documents({}) == 0  # no failure counted from it
    # The real producer's event on the same partition is served: a wrong code counts.
    await identity.deliver(TOKENS_CODE_REJECTED, code_rejected("/clave/tokens"), key=b"acc-1")
    assert len(node.letters(TOKENS_CODE_REJECTED)) == 1
    assert node.collection("counters").count_documents({}) >= 1
