"""Audit chain: seal events as the outbox relay does, then tamper with the log in every way."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.audit import GENESIS, audit_event, canonical, parse_audit, seal, verify_chain
from shared.crypto import sha256_hex
from shared.schemas import AuditRecord

KEY = "audit-hmac-key-for-tests"
WRONG_KEY = "some-other-key"


class Relay:
    """Mimics `OutboxRelay._seal_audit`: one chain head per producer, persisted across batches."""

    def __init__(self, service: str, key: str = KEY) -> None:
        self.service = service
        self.key = key
        self.seq = 0
        self.prev = GENESIS

    def outbox_value(self, action: str, n: int) -> bytes:
        record = AuditRecord(
            service=self.service,
            action=action,
            outcome="success",
            account_id=f"acc-{n}",
            request_id=f"req-{n}",
            details={"n": n},
        )
        out = audit_event(record, correlationid=f"req-{n}", causationid=None, source=f"/clave/{self.service}")
        assert out.key == self.service  # keyed by producer: one chain per partition
        return out.to_document()["value"]

    def publish(self, action: str, n: int) -> bytes:
        self.seq += 1
        value, self.prev = seal(
            json.loads(self.outbox_value(action, n)), producer=self.service, seq=self.seq, prev=self.prev, key=self.key
        )
        return value


def read(log: list[bytes]) -> list[dict[str, Any]]:
    """As `clave audit verify` reads audit.events: json.loads of each record value."""
    return [json.loads(v) for v in log]


def interleaved_log(n: int = 6) -> list[bytes]:
    a, b = Relay("identity"), Relay("tokens")
    log = []
    for i in range(n):
        log.append(a.publish("recovery_requested", i))
        if i % 2 == 0:
            log.append(b.publish("token_issued", i))
    return log


def producer_of(doc: dict[str, Any]) -> str:
    return doc["data"]["integrity"]["producer"]


def problems(breaks: list[Any]) -> list[str]:
    return [b.problem for b in breaks]


# ------------------------------------------------------------------ intact log


def test_intact_interleaved_log_verifies() -> None:
    log = interleaved_log()
    count, breaks = verify_chain(read(log), key=KEY)
    assert breaks == []
    assert count == len(log)


def test_sealed_event_is_a_valid_cloudevent_with_integrity() -> None:
    log = interleaved_log(2)
    event = parse_audit(log[0])
    integrity = event.data["integrity"]
    assert integrity["producer"] == "identity" and integrity["seq"] == 1
    assert integrity["prev"] == GENESIS
    assert len(integrity["mac"]) == 64
    # The bytes on the wire are the canonical form the chain hashes.
    assert canonical(json.loads(log[0])) == log[0]


def test_seal_does_not_mutate_input() -> None:
    doc = json.loads(Relay("identity").outbox_value("x", 1))
    before = json.dumps(doc, sort_keys=True)
    seal(doc, producer="identity", seq=1, prev=GENESIS, key=KEY)
    assert json.dumps(doc, sort_keys=True) == before


def test_empty_log() -> None:
    assert verify_chain([], key=KEY) == (0, [])


@settings(max_examples=30)
@given(st.lists(st.sampled_from(["identity", "tokens", "password", "notifier"]), max_size=30))
def test_any_interleaving_of_producers_verifies(order: list[str]) -> None:
    relays = {name: Relay(name) for name in set(order)}
    log = [relays[name].publish("act", i) for i, name in enumerate(order)]
    assert verify_chain(read(log), key=KEY) == (len(log), [])


# ------------------------------------------------------------------ tampering


def test_modified_event_detected() -> None:
    docs = read(interleaved_log())
    docs[3]["data"]["outcome"] = "rejected"
    count, breaks = verify_chain(docs, key=KEY)
    assert [b.position for b in breaks][:1] == [3]
    assert "MAC mismatch" in breaks[0].problem
    assert breaks[0].event_id == docs[3]["id"]


@pytest.mark.parametrize(
    "path",
    [("time",), ("subject",), ("data", "account_id"), ("data", "integrity", "seq"), ("data", "integrity", "producer")],
)
def test_any_field_change_detected(path: tuple[str, ...]) -> None:
    docs = read(interleaved_log())
    target = docs[2]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = 999 if path[-1] == "seq" else "tampered"
    _, breaks = verify_chain(docs, key=KEY)
    assert breaks and breaks[0].position == 2


def test_added_field_detected() -> None:
    docs = read(interleaved_log())
    docs[1]["data"]["details"]["note"] = "added later"
    _, breaks = verify_chain(docs, key=KEY)
    assert [b.position for b in breaks][:1] == [1]


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_deleted_event_detected(victim: int) -> None:
    docs = read(interleaved_log())
    producer = producer_of(docs[victim])
    # Only a deletion followed by another event of the same producer is detectable.
    assert any(producer_of(d) == producer for d in docs[victim + 1 :])
    del docs[victim]
    count, breaks = verify_chain(docs, key=KEY)
    assert count == len(docs)
    assert len(breaks) == 1
    assert breaks[0].producer == producer
    assert "sequence" in breaks[0].problem


def test_deleted_first_event_detected_from_start() -> None:
    docs = read(interleaved_log())
    first_identity = next(i for i, d in enumerate(docs) if producer_of(d) == "identity")
    del docs[first_identity]
    _, breaks = verify_chain(docs, key=KEY)
    assert [b.producer for b in breaks] == ["identity"]


def test_inserted_forgery_with_wrong_key_detected() -> None:
    log = interleaved_log()
    forger = Relay("identity", key=WRONG_KEY)
    forger.seq, forger.prev = 1, sha256_hex(log[0])  # claims to follow the first event
    forged = forger.publish("recovery_requested", 99)
    docs = read([*log[:1], forged, *log[1:]])
    count, breaks = verify_chain(docs, key=KEY)
    assert count == len(docs)
    assert [(b.position, b.problem.startswith("MAC mismatch")) for b in breaks] == [(1, True)]


@pytest.mark.parametrize("claimed_seq", [1, 2, 3, 50])
def test_inserted_event_with_right_key_but_wrong_seq_detected(claimed_seq: int) -> None:
    """An insider with the key still cannot insert without breaking the chain somewhere."""
    log = interleaved_log()
    docs = read(log)
    identity = [i for i, d in enumerate(docs) if producer_of(d) == "identity"]
    # Insert after the 2nd identity event, claiming seq `claimed_seq`, prev = that event's hash.
    after = identity[1]
    insider = Relay("identity")
    insider.seq, insider.prev = claimed_seq - 1, sha256_hex(log[after])
    inserted = insider.publish("recovery_requested", 77)
    tampered = read([*log[: after + 1], inserted, *log[after + 1 :]])
    _, breaks = verify_chain(tampered, key=KEY)
    assert breaks, "insertion went unnoticed"
    assert all(b.producer == "identity" for b in breaks)
    assert breaks[0].position in (after + 1, after + 2)


def test_reordered_events_of_one_producer_detected() -> None:
    docs = read(interleaved_log())
    identity = [i for i, d in enumerate(docs) if producer_of(d) == "identity"]
    i, j = identity[1], identity[2]
    docs[i], docs[j] = docs[j], docs[i]
    _, breaks = verify_chain(docs, key=KEY)
    assert {b.position for b in breaks} >= {i}
    assert all(b.producer == "identity" for b in breaks)


def test_interleaving_across_producers_is_not_a_break() -> None:
    # Partitions of different producers may be read in any relative order.
    docs = read(interleaved_log())
    identity = [d for d in docs if producer_of(d) == "identity"]
    tokens = [d for d in docs if producer_of(d) == "tokens"]
    assert verify_chain(tokens + identity, key=KEY) == (len(docs), [])


def test_wrong_key_flags_every_event() -> None:
    docs = read(interleaved_log())
    count, breaks = verify_chain(docs, key=WRONG_KEY)
    assert count == len(docs)
    assert [b.position for b in breaks] == list(range(len(docs)))
    assert all("MAC" in p for p in problems(breaks))


def test_event_without_integrity_block_flagged() -> None:
    docs = read(interleaved_log())
    del docs[0]["data"]["integrity"]
    _, breaks = verify_chain(docs, key=KEY)
    assert breaks[0].problem == "no integrity block" and breaks[0].position == 0


# ------------------------------------------------------------------ redelivery


def test_exact_duplicate_counted_once_and_not_a_break() -> None:
    log = interleaved_log()
    # A relay crash republishes a batch: same bytes, later in the log.
    redelivered = [*log[:4], *log[2:4], *log[4:], log[0]]
    count, breaks = verify_chain(read(redelivered), key=KEY)
    assert breaks == []
    assert count == len(log)


def test_same_id_different_content_is_a_break() -> None:
    docs = read(interleaved_log())
    copy = json.loads(json.dumps(docs[1]))
    copy["data"]["outcome"] = "failed"
    docs.append(copy)
    count, breaks = verify_chain(docs, key=KEY)
    assert count == len(docs) - 1
    assert problems(breaks) == ["same id, different content"]


# ------------------------------------------------------------------ partial ranges


def test_mid_chain_range_needs_from_start_false() -> None:
    log = interleaved_log(8)
    docs = read(log)
    tail = docs[5:]
    assert {producer_of(d) for d in tail} == {"identity", "tokens"}
    assert all(d["data"]["integrity"]["seq"] > 1 for d in tail)
    count, breaks = verify_chain(tail, key=KEY, from_start=False)
    assert (count, breaks) == (len(tail), [])
    # As a whole log it is missing its beginning.
    _, breaks = verify_chain(tail, key=KEY)
    assert {b.producer for b in breaks} == {"identity", "tokens"}


def test_mid_chain_range_still_detects_tampering_after_anchor() -> None:
    docs = read(interleaved_log(8))
    tail = docs[5:]
    identity = [i for i, d in enumerate(tail) if producer_of(d) == "identity"]
    del tail[identity[1]]
    _, breaks = verify_chain(tail, key=KEY, from_start=False)
    assert [b.producer for b in breaks] == ["identity"]


def test_mid_chain_anchor_must_itself_be_authentic() -> None:
    docs = read(interleaved_log(8))
    tail = docs[5:]
    tail[0]["data"]["reasons"] = ["forged"]
    _, breaks = verify_chain(tail, key=KEY, from_start=False)
    assert breaks[0].position == 0 and "MAC" in breaks[0].problem


def test_range_starting_at_seq_one_is_checked_against_genesis() -> None:
    docs = read(interleaved_log())
    # Re-seal with the right key so only the chain link is wrong.
    doc = json.loads(json.dumps(docs[0]))
    del doc["data"]["integrity"]
    value, _ = seal(doc, producer="identity", seq=1, prev="f" * 64, key=KEY)
    docs[0] = json.loads(value)
    for from_start in (True, False):
        _, breaks = verify_chain(docs, key=KEY, from_start=from_start)
        assert problems(breaks)[:1] == ["previous-hash mismatch"]
