"""The outbox relay's lease on the in-memory store: two relays of one service (two instances),
their producer into TestKafkaBroker so the events reach the notifier's wiring. One holds the
lease and publishes; the other publishes nothing meanwhile; when the holder dies its lease runs
out and the other takes over, each event published once and the audit chain unbroken.
(The change-stream wake-ups and the lease's cost in store round trips are tested against a
real store: tests/middle/test_relay.py.)"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.notifier.app import build as build_notifier
from services.notifier.settings import NotifierSettings
from services.tokens.app import build as build_tokens
from services.tokens.settings import TokensSettings
from shared import audit
from shared import relay as relay_module
from shared.envelope import new_event
from shared.metrics import ServiceMetrics
from shared.relay import OutboxRelay
from shared.store import LEASES, OUTBOX
from shared.topics import IDENTITY_VERIFIED, TOKENS_ISSUED, EventType
from tests.middle.inprocess import Cluster, relay_producer, running, settings

LEASE_S = 1.0  # the relay's lease, shortened so a handover is seen in about a second


@pytest.fixture
async def cluster(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    monkeypatch.setattr(relay_module, "LEASE_S", LEASE_S)
    monkeypatch.setattr(relay_module, "RENEW_S", LEASE_S / 3)
    tokens: TokensSettings = settings(TokensSettings)
    async with running(build_tokens(tokens), build_notifier(settings(NotifierSettings))) as c:
        yield c


def instances(c: Cluster) -> tuple[OutboxRelay, OutboxRelay]:
    """Two relays of the tokens service on its one store, as two instances on two hosts would
    have (neither can tell whether the other's process is alive: only expiry hands over)."""
    node = c["tokens"]
    a = node.service.relay
    b = OutboxRelay("tokens", node.service.store, node.service.settings, ServiceMetrics("tokens"))
    a.owner, b.owner = "host-a:101:aaaa", "host-b:202:bbbb"
    # Driven cycle by cycle (publish_pending), not by their loops: the test decides who runs.
    a._producer, b._producer = relay_producer(c, "tokens-a"), relay_producer(c, "tokens-b")
    return a, b


async def verified(c: Cluster) -> None:
    """One identity.verified handled by tokens: a token issued, tokens.issued and audit staged."""
    rid = f"req-{uuid.uuid4().hex[:12]}"
    data = {
        "request_id": rid,
        "account_id": "acc-1",
        "recipient": {"email": "maria.perez@example.org", "name": "María Pérez", "locale": "es"},
    }
    event = new_event(type=EventType.IDENTITY_VERIFIED, source="/clave/identity", data=data, correlationid=rid)
    await c.deliver(IDENTITY_VERIFIED, event.to_bytes(), key=b"acc-1", to="tokens")


def mails(c: Cluster) -> int:
    return int(c["notifier"].collection("notifications").count_documents({}))


def unsent(c: Cluster) -> int:
    return int(c["tokens"].collection(OUTBOX).count_documents({"sent": False}))


def holder(c: Cluster) -> str | None:
    lease = c["tokens"].collection(LEASES).find_one({"_id": "relay"})
    return None if lease is None else str(lease["owner"])


async def test_one_relay_holds_the_lease_and_expiry_hands_it_over(cluster: Cluster) -> None:
    a, b = instances(cluster)
    await verified(cluster)
    taken = time.monotonic()  # A's lease runs from (no earlier than) here
    assert await a.publish_pending() > 0
    assert a.holding and holder(cluster) == a.owner
    assert unsent(cluster) == 0 and mails(cluster) == 1  # the notifier got tokens.issued

    await verified(cluster)
    assert await b.publish_pending() == 0, "the lease is A's: B publishes nothing"
    assert unsent(cluster) > 0 and mails(cluster) == 1

    # A dies without giving its lease back. B takes over once the lease has run out.
    deadline = time.monotonic() + 10 * LEASE_S
    while await b.publish_pending() == 0:
        assert time.monotonic() < deadline, "B never took over"
        await asyncio.sleep(0.05)
    assert time.monotonic() - taken >= 0.9 * LEASE_S, "taken over before A's lease could have run out"
    assert holder(cluster) == b.owner and unsent(cluster) == 0 and mails(cluster) == 2

    # A comes back: the lease is B's now, and B alone publishes.
    await verified(cluster)
    assert await a.publish_pending() == 0 and not a.holding
    assert await b.publish_pending() > 0
    assert unsent(cluster) == 0 and mails(cluster) == 3
    assert cluster.published[TOKENS_ISSUED] == 3, "each event published once"
    assert cluster.failures == []
    assert_chain(cluster)


def assert_chain(c: Cluster) -> None:
    """The audit events both relays sealed form one chain: 1, 2, 3... each linked to the last."""
    docs: list[dict[str, Any]] = list(c["tokens"].collection(OUTBOX).find({"is_audit": True}).sort("_id"))
    assert docs and all(d["sealed"] and d["sent"] for d in docs)
    prev = audit.GENESIS
    for seq, doc in enumerate(docs, start=1):
        integrity = json.loads(bytes(doc["value"]))["data"]["integrity"]
        assert (integrity["seq"], integrity["prev"]) == (seq, prev)
        prev = audit.sha256_hex(bytes(doc["value"]))
