"""The four services as their app.py wire them, in one process on FastStream's TestKafkaBroker
and the in-memory store (tests/middle/inprocess.py): a whole recovery through the real outbox
relays, then each handler of the recovery's path (tokens, notifier, password) under store
faults: a transient error is retried and then served, a permanent one is dead-lettered with its
reason, and a commit whose reply was lost has its effect once. No Kafka, no store server."""

from __future__ import annotations

import json
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from pymongo.errors import AutoReconnect, OperationFailure

import shared.store
from services.identity.app import build as build_identity
from services.identity.settings import IdentitySettings
from services.notifier.app import build as build_notifier
from services.notifier.handlers import secrets_context
from services.notifier.settings import NotifierSettings
from services.password.app import build as build_password
from services.password.settings import PasswordSettings
from services.tokens.app import build as build_tokens
from services.tokens.settings import TokensSettings
from shared import consumer
from shared.consumer import HANDLER_ATTEMPTS
from shared.crypto import Purpose, SecretBox
from shared.envelope import DeadLetterReason, new_event
from shared.store import OUTBOX
from shared.topics import (
    IDENTITY_VERIFIED,
    PASSWORD_UPDATED,
    RECOVERY_OUTCOMES,
    RECOVERY_REQUESTS,
    RECOVERY_RESETS,
    TOKENS_ISSUED,
    TOKENS_REDEEMED,
    EventType,
)
from tests.middle.inprocess import Cluster, Node, NotSettled, running, settings, until
from tests.middle.test_broker_identity import KEY, raw, request, seed_account

NOTIFIER: NotifierSettings = settings(NotifierSettings)
NEW_KEY = "Andina2026Clave"


async def _no_sleep(_seconds: float) -> None:
    return None


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """No waiting between retries: the pipeline's backoff before a redelivery, and the store's
    between the attempts of a transaction (shared.store uses asyncio for nothing else)."""
    monkeypatch.setattr(consumer, "backoff", lambda _streak: 0.0)
    monkeypatch.setattr(shared.store, "asyncio", types.SimpleNamespace(sleep=_no_sleep))


@pytest.fixture
async def clave() -> AsyncIterator[Cluster]:
    services = (
        build_identity(settings(IdentitySettings)),
        build_tokens(settings(TokensSettings)),
        build_notifier(NOTIFIER),
        build_password(settings(PasswordSettings)),
    )
    async with running(*services) as cluster:
        await seed_account(cluster["identity"])
        yield cluster


async def forward(cluster: Cluster, source: str, topic: str, *, to: str, max_deliveries: int = 1) -> int:
    """Hand `source`'s outbox events on `topic` to service `to`, as its relay would (one by one)."""
    settled = 0
    for doc in cluster[source].outbox(topic):
        settled = await cluster.deliver(
            topic, bytes(doc["value"]), key=doc["key"].encode(), to=to, max_deliveries=max_deliveries
        )
    return settled


def the_secrets(issued: dict[str, Any]) -> dict[str, Any]:
    """The link token and code, as the notifier opens them for the mail."""
    data = issued["data"]
    bound = secrets_context(data["token_id"], data["account_id"], data["request_id"], data["recipient"]["email"])
    opened: dict[str, Any] = SecretBox(NOTIFIER.notifier_keys).open(
        data["sealed_secrets"], purpose=Purpose.RECOVERY_SECRETS, context=bound, ttl_s=None
    )
    return opened


def reset(request_id: str, token: str, new_password: str = NEW_KEY) -> bytes:
    data = {"request_id": request_id, "token": token, "new_password": new_password, "client_ip": "203.0.113.9"}
    return new_event(
        type=EventType.RESET_SUBMITTED, source="/portal/tests", data=data, correlationid=request_id
    ).to_bytes()


def outcomes(node: Node, request_id: str) -> list[tuple[str, str]]:
    return [
        (e["data"]["stage"], e["data"]["status"])
        for e in node.events(RECOVERY_OUTCOMES)
        if e["data"]["request_id"] == request_id
    ]


async def test_a_whole_recovery_runs_through_the_real_relays(clave: Cluster) -> None:
    """Request -> identity -> relay -> tokens -> notifier; reset -> tokens -> password -> tokens."""
    await clave.start_relays()
    doc = request()
    rid = doc["data"]["request_id"]
    await clave.deliver(RECOVERY_REQUESTS, raw(doc), key=KEY)
    mails = clave["notifier"].collection("notifications")
    await until(lambda: mails.count_documents({"request_id": rid, "kind": "recovery_link"}) == 1, 10, "mail queued")
    [issued] = clave["tokens"].events(TOKENS_ISSUED)
    await clave.deliver(RECOVERY_RESETS, reset(rid, the_secrets(issued)["token"]), key=rid.encode())
    await until(lambda: ("reset", "completed") in outcomes(clave["tokens"], rid), 10, "reset completed")

    assert outcomes(clave["identity"], rid) == [("request", "accepted")]
    assert clave["password"].collection("credentials").count_documents({"_id": "acc-1"}) == 1
    await until(lambda: mails.count_documents({"request_id": rid}) == 2, 10, "key-changed mail queued")
    assert clave.failures == []
    for node in clave.nodes.values():
        assert [d for d in node.outbox() if "dlq" in d["topic"]] == [], node.name
    # Each event was produced once (lost or doubled events would show here).
    assert clave.published[IDENTITY_VERIFIED] == clave.published[TOKENS_ISSUED] == 1
    assert clave.published[TOKENS_REDEEMED] == clave.published[PASSWORD_UPDATED] == 1
    await until(
        lambda: all(not n.collection(OUTBOX).find_one({"sent": False}) for n in clave.nodes.values()),
        10,
        "outboxes published",
    )


# ---- each handler of the recovery's path, under store faults ----------------------------------


@dataclass(frozen=True)
class Stage:
    """One handler: the record it consumes (made by driving the services before it) and the
    count of its effect."""

    service: str
    topic: str
    record: Callable[[Cluster], Awaitable[tuple[bytes, bytes]]]
    effect: Callable[[Cluster], int]


async def _issued(c: Cluster) -> dict[str, Any]:
    doc = request()
    await c.deliver(RECOVERY_REQUESTS, raw(doc), key=KEY)
    await forward(c, "identity", IDENTITY_VERIFIED, to="tokens")
    [issued] = c["tokens"].events(TOKENS_ISSUED)
    return issued


async def issued_record(c: Cluster) -> tuple[bytes, bytes]:
    await _issued(c)
    [doc] = c["tokens"].outbox(TOKENS_ISSUED)
    return bytes(doc["value"]), doc["key"].encode()


async def reset_record(c: Cluster) -> tuple[bytes, bytes]:
    issued = await _issued(c)
    rid = issued["data"]["request_id"]
    return reset(rid, the_secrets(issued)["token"]), rid.encode()


async def redeemed_record(c: Cluster) -> tuple[bytes, bytes]:
    body, key = await reset_record(c)
    await c.deliver(RECOVERY_RESETS, body, key=key, to="tokens")
    [doc] = c["tokens"].outbox(TOKENS_REDEEMED)
    return bytes(doc["value"]), doc["key"].encode()


STAGES = {
    "notifier": Stage(
        "notifier",
        TOKENS_ISSUED,
        issued_record,
        lambda c: int(c["notifier"].collection("notifications").count_documents({"kind": "recovery_link"})),
    ),
    "tokens": Stage("tokens", RECOVERY_RESETS, reset_record, lambda c: len(c["tokens"].outbox(TOKENS_REDEEMED))),
    "password": Stage(
        "password", TOKENS_REDEEMED, redeemed_record, lambda c: len(c["password"].outbox(PASSWORD_UPDATED))
    ),
}


@pytest.mark.parametrize("name", sorted(STAGES))
async def test_the_happy_path(clave: Cluster, name: str) -> None:
    stage = STAGES[name]
    body, key = await stage.record(clave)
    assert stage.effect(clave) == 0
    assert await clave.deliver(stage.topic, body, key=key, to=stage.service) == 1
    assert stage.effect(clave) == 1
    assert clave[stage.service].letters(stage.topic) == []
    assert clave[stage.service].attempts(stage.topic) == {}


@pytest.mark.parametrize("name", sorted(STAGES))
async def test_a_transient_store_error_is_retried_then_served(clave: Cluster, name: str) -> None:
    stage = STAGES[name]
    node = clave[stage.service]
    body, key = await stage.record(clave)
    node.mongo.down()  # for the first delivery: every operation fails (a read, or the commit)

    def back(_n: int) -> None:
        node.mongo.back()

    assert await clave.deliver(stage.topic, body, key=key, to=stage.service, max_deliveries=3, after_failure=back) == 2
    assert stage.effect(clave) == 1
    assert node.letters(stage.topic) == []
    assert node.attempts(stage.topic) == {}  # the count went with the record


@pytest.mark.parametrize("name", sorted(STAGES))
async def test_a_store_outage_is_waited_out_never_parked(clave: Cluster, name: str) -> None:
    stage = STAGES[name]
    node = clave[stage.service]
    body, key = await stage.record(clave)
    node.mongo.down()  # its ping fails too: a real outage, however long
    with pytest.raises(NotSettled):
        await clave.deliver(stage.topic, body, key=key, to=stage.service, max_deliveries=3 * HANDLER_ATTEMPTS)
    assert node.attempts(stage.topic) != {}  # still counted against the record, not parked
    node.mongo.back()
    offset = clave.offsets[(stage.topic, 0)] - 1
    assert await clave.deliver(stage.topic, body, key=key, to=stage.service, offset=offset) == 1
    assert stage.effect(clave) == 1 and node.letters(stage.topic) == []
    assert node.attempts(stage.topic) == {}


@pytest.mark.parametrize("name", sorted(STAGES))
async def test_a_permanent_error_is_dead_lettered_with_its_reason(clave: Cluster, name: str) -> None:
    stage = STAGES[name]
    node = clave[stage.service]
    body, key = await stage.record(clave)
    # Not an outage (a refusal that would be the same every time): counted out after three.
    node.mongo.fail_next("bulkWrite", OperationFailure("memory store: refused", code=2), times=HANDLER_ATTEMPTS)
    assert await clave.deliver(stage.topic, body, key=key, to=stage.service, max_deliveries=5) == HANDLER_ATTEMPTS
    assert stage.effect(clave) == 0
    [letter] = node.letters(stage.topic)
    assert letter["headers"]["clave-dlq-reason"] == DeadLetterReason.HANDLER_ERROR
    assert letter["headers"]["clave-dlq-detail"] == "handler raised OperationFailure"
    assert node.attempts(stage.topic) == {}
    if stage.topic == RECOVERY_RESETS:  # the portal still gets an answer for its reset
        rid = json.loads(body)["data"]["request_id"]
        assert outcomes(node, rid) == [("reset", "rejected")]


@pytest.mark.parametrize("name", sorted(STAGES))
async def test_a_lost_commit_reply_is_recognised_by_the_store_retry(clave: Cluster, name: str) -> None:
    """The commit lands, its reply is lost; the store's own retry runs it again and finds it
    landed: the record is settled at its first delivery, its effect once."""
    stage = STAGES[name]
    node = clave[stage.service]
    body, key = await stage.record(clave)
    commits, processed = node.mongo.commits, node.processed()
    node.mongo.lose_commit_replies(1)
    assert await clave.deliver(stage.topic, body, key=key, to=stage.service) == 1
    assert node.mongo.lost_replies == 0, "the fault was used"
    assert node.mongo.commits == commits + 1 and node.processed() == processed + 1
    assert stage.effect(clave) == 1 and node.letters(stage.topic) == []


@pytest.mark.parametrize("name", sorted(STAGES))
async def test_a_lost_commit_reply_then_redelivery_changes_nothing(clave: Cluster, name: str) -> None:
    """The commit lands, its reply is lost and the store stays away past the store's own
    retries: the handler fails, Kafka redelivers, the handler runs again on the new state and
    its commit is refused as a duplicate event: the effect stays single, nothing else staged."""

    stage = STAGES[name]
    node = clave[stage.service]
    body, key = await stage.record(clave)
    node.mongo.lose_commit_replies(1)
    node.mongo.fail_next("startTransaction", AutoReconnect("memory store: away"), times=7)  # the retries
    with pytest.raises(NotSettled):
        await clave.deliver(stage.topic, body, key=key, to=stage.service)
    assert stage.effect(clave) == 1  # it landed
    first = {d["_id"] for d in node.outbox()}
    offset = clave.offsets[(stage.topic, 0)] - 1
    assert await clave.deliver(stage.topic, body, key=key, to=stage.service, offset=offset) == 1
    assert stage.effect(clave) == 1
    [letter] = node.letters(stage.topic)
    assert letter["headers"]["clave-dlq-reason"] == DeadLetterReason.DUPLICATE_EVENT
    # The second run's decision (made on the state the first left) was not kept: only the
    # letter and its audit event were added.
    added = sorted(d["topic"] for d in node.outbox() if d["_id"] not in first)
    assert added == ["audit.events", f"{stage.topic}.dlq"]
    assert node.attempts(stage.topic) == {}
