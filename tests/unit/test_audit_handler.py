"""The audit read model's handler over an in-memory store: one write per event, the producer's
head read only when this process cannot know it (first sight, or a gap in the partition's
offsets), and a redelivery recorded once."""

from __future__ import annotations

import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.audit.handlers import AuditHandlers
from shared.audit import GENESIS, Signer, audit_event, seal
from shared.auditkeys import KeyRing, LiveKeyRing, PublicKey, kid_of
from shared.consumer import HandlerContext
from shared.envelope import parse_event
from shared.metrics import ServiceMetrics
from shared.schemas import AuditRecord
from shared.topics import EventType

KEY = Ed25519PrivateKey.generate()


class Store:
    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Any]] = {}
        self.head_reads = 0

    async def head(self, producer: str) -> dict[str, Any] | None:
        self.head_reads += 1
        heads = [e for e in self.entries.values() if e.get("producer") == producer and "head_seq" in e]
        return max(heads, key=lambda e: e["head_seq"])["chain_head"] if heads else None

    async def projected(self, event_id: str) -> dict[str, Any] | None:
        return self.entries.get(event_id)

    async def record(self, entry: dict[str, Any]) -> None:
        self.entries[entry["_id"]] = entry

    async def old_head(self, producer: str) -> dict[str, Any] | None:
        return None  # no older version of the read model wrote here


def chain(n: int) -> list[bytes]:
    prev, out = GENESIS, []
    for i in range(n):
        record = AuditRecord(service="tokens", action="token_issued", outcome="success", details={"i": i})
        value = audit_event(record, correlationid="c", causationid=None, source="/clave/tokens").to_document()["value"]
        sealed, prev = seal(json.loads(bytes(value)), producer="tokens", seq=i + 1, prev=prev, signer=Signer(KEY))
        out.append(sealed)
    return out


async def feed(h: AuditHandlers, store: Store, raw: bytes, offset: int) -> None:
    event = parse_event(raw, max_bytes=1 << 20, known_types={EventType.AUDIT})
    ctx = HandlerContext(
        "audit", "audit:audit.events", "audit.events", event, store, raw=raw, partition=0, offset=offset
    )  # type: ignore[arg-type]
    await h.audit_event(ctx, AuditRecord.model_validate(event.data))
    assert ctx.committed


def handlers(store: Store) -> AuditHandlers:
    ring = KeyRing([PublicKey("tokens", kid_of(KEY.public_key()), KEY.public_key(), None, None)])
    keys = LiveKeyRing("")
    keys.ring = ring
    return AuditHandlers(store, ServiceMetrics("audit"), keys, None)  # type: ignore[arg-type]


async def test_heads_are_read_once_per_unbroken_run_of_offsets() -> None:
    store = Store()
    h = handlers(store)
    log = chain(6)
    for offset, raw in enumerate(log[:4]):
        await feed(h, store, raw, offset)
    assert store.head_reads == 1
    await feed(h, store, log[4], 10)  # a gap (a rebalance, a seek): read again
    await feed(h, store, log[5], 11)
    assert store.head_reads == 2
    assert [e["head_seq"] for e in store.entries.values()] == [1, 2, 3, 4, 5, 6]
    assert not any("chain_break" in e for e in store.entries.values())


async def test_a_redelivered_event_is_kept_once_and_is_no_break() -> None:
    store = Store()
    h = handlers(store)
    log = chain(3)
    for offset, raw in enumerate(log):
        await feed(h, store, raw, offset)
    await feed(h, store, log[1], 1)  # redelivered after a crash
    await feed(h, store, log[2], 2)
    assert len(store.entries) == 3
    assert not any("chain_break" in e for e in store.entries.values())
