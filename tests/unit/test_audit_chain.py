"""Audit chain: seal events as the outbox relay does (each producer with its own Ed25519 key),
then verify with public keys only and tamper with the log in every way."""

from __future__ import annotations

import gc
import json
import weakref
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from services.audit import domain
from shared.audit import (
    GENESIS,
    ChainVerifier,
    RecordedHead,
    Signer,
    audit_event,
    canonical,
    check_seal,
    parse_audit,
    seal,
    seal_legacy,
    verify_chain,
)
from shared.auditkeys import (
    AuditKeyError,
    KeyRing,
    PublicKey,
    PublicKeyEntry,
    dev_signing_key,
    kid_of,
    private_pem,
    signing_key_problems,
)
from shared.crypto import sha256_hex
from shared.schemas import AuditRecord

PRODUCERS = ("identity", "tokens", "notifier", "password", "audit")
KEYS = {name: Ed25519PrivateKey.generate() for name in PRODUCERS}
LEGACY_KEY = "legacy-audit-hmac-key-for-tests"


def public(producer: str, key: Ed25519PrivateKey, **validity: datetime | None) -> PublicKey:
    return PublicKey(producer, kid_of(key.public_key()), key.public_key(), validity.get("nb"), validity.get("na"))


RING = KeyRing(public(name, key) for name, key in KEYS.items())


class Relay:
    """Mimics `OutboxRelay._seal_audit`: one chain head per producer, persisted across batches."""

    def __init__(self, service: str, key: Ed25519PrivateKey | None = None) -> None:
        self.service = service
        self.signer = Signer(key or KEYS[service])
        self.seq = 0
        self.prev = GENESIS
        self.clock: datetime | None = None  # fixed event time, for validity tests

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
        value = out.to_document()["value"]
        if self.clock is not None:
            doc = json.loads(value)
            doc["time"] = self.clock.isoformat()
            value = canonical(doc)
        return bytes(value)

    def publish(self, action: str, n: int) -> bytes:
        self.seq += 1
        value, self.prev = seal(
            json.loads(self.outbox_value(action, n)),
            producer=self.service,
            seq=self.seq,
            prev=self.prev,
            signer=self.signer,
        )
        return value

    def publish_legacy(self, action: str, n: int) -> bytes:
        """As a relay did before signatures: HMAC with the shared key."""
        self.seq += 1
        value, self.prev = seal_legacy(
            json.loads(self.outbox_value(action, n)),
            producer=self.service,
            seq=self.seq,
            prev=self.prev,
            key=LEGACY_KEY,
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
    return str(doc["data"]["integrity"]["producer"])


def problems(breaks: list[Any]) -> list[str]:
    return [b.problem for b in breaks]


def verify(docs: list[dict[str, Any]], **kwargs: Any) -> tuple[int, list[Any]]:
    return verify_chain(docs, keys=kwargs.pop("keys", RING), **kwargs)


# ------------------------------------------------------------------ intact log


def test_intact_interleaved_log_verifies_with_public_keys_only() -> None:
    log = interleaved_log()
    count, breaks = verify(read(log))
    assert breaks == []
    assert count == len(log)


def test_sealed_event_is_a_valid_cloudevent_with_a_signature() -> None:
    log = interleaved_log(2)
    event = parse_audit(log[0])
    integrity = event.data["integrity"]
    assert set(integrity) == {"producer", "seq", "prev", "kid", "sig"}
    assert integrity["producer"] == "identity" and integrity["seq"] == 1
    assert integrity["prev"] == GENESIS
    assert integrity["kid"] == kid_of(KEYS["identity"].public_key()) and len(integrity["kid"]) == 16
    assert "mac" not in integrity
    # The bytes on the wire are the canonical form the chain hashes.
    assert canonical(json.loads(log[0])) == log[0]


def test_seal_does_not_mutate_input() -> None:
    doc = json.loads(Relay("identity").outbox_value("x", 1))
    before = json.dumps(doc, sort_keys=True)
    seal(doc, producer="identity", seq=1, prev=GENESIS, signer=Signer(KEYS["identity"]))
    assert json.dumps(doc, sort_keys=True) == before


def test_empty_log() -> None:
    assert verify([]) == (0, [])


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["identity", "tokens", "password", "notifier"]), max_size=30))
def test_any_interleaving_of_producers_verifies(order: list[str]) -> None:
    relays = {name: Relay(name) for name in set(order)}
    log = [relays[name].publish("act", i) for i, name in enumerate(order)]
    assert verify(read(log)) == (len(log), [])


# ------------------------------------------------------------------ tampering


def test_modified_event_detected() -> None:
    docs = read(interleaved_log())
    docs[3]["data"]["outcome"] = "rejected"
    count, breaks = verify(docs)
    assert [b.position for b in breaks][:1] == [3]
    assert breaks[0].problem.startswith("signature invalid")
    assert breaks[0].event_id == docs[3]["id"]


@pytest.mark.parametrize(
    "path",
    [
        ("time",),
        ("subject",),
        ("data", "account_id"),
        ("data", "integrity", "seq"),
        ("data", "integrity", "prev"),
        ("data", "integrity", "producer"),
        ("data", "integrity", "kid"),
    ],
)
def test_any_field_change_detected(path: tuple[str, ...]) -> None:
    docs = read(interleaved_log())
    target = docs[2]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = 999 if path[-1] == "seq" else "tampered"
    _, breaks = verify(docs)
    assert breaks and breaks[0].position == 2


def test_added_field_detected() -> None:
    docs = read(interleaved_log())
    docs[1]["data"]["details"]["note"] = "added later"
    _, breaks = verify(docs)
    assert [b.position for b in breaks][:1] == [1]


@pytest.mark.parametrize("victim", [0, 2, 4])
def test_deleted_event_detected(victim: int) -> None:
    docs = read(interleaved_log())
    producer = producer_of(docs[victim])
    # Only a deletion followed by another event of the same producer shows in the chain
    # itself; a deleted last event is a cut-off tail (see the recorded-head tests below).
    assert any(producer_of(d) == producer for d in docs[victim + 1 :])
    del docs[victim]
    count, breaks = verify(docs)
    assert count == len(docs)
    assert len(breaks) == 1
    assert breaks[0].producer == producer
    assert "sequence" in breaks[0].problem


def test_deleted_first_event_detected_from_start() -> None:
    docs = read(interleaved_log())
    first_identity = next(i for i, d in enumerate(docs) if producer_of(d) == "identity")
    del docs[first_identity]
    _, breaks = verify(docs)
    assert [b.producer for b in breaks] == ["identity"]


def test_forged_event_signed_with_a_key_the_verifier_does_not_know() -> None:
    log = interleaved_log()
    forger = Relay("identity", key=Ed25519PrivateKey.generate())
    forger.seq, forger.prev = 1, sha256_hex(log[0])  # claims to follow the first event
    forged = forger.publish("recovery_requested", 99)
    docs = read([*log[:1], forged, *log[1:]])
    count, breaks = verify(docs)
    assert count == len(docs)
    assert [b.position for b in breaks] == [1]  # the forgery alone: it does not derail the chain
    assert breaks[0].problem == f"unknown key id {kid_of(forger.signer._key.public_key())!r} for producer 'identity'"  # noqa: SLF001


def test_forged_event_from_an_unknown_producer_fails_closed() -> None:
    forged = Relay("portal", key=Ed25519PrivateKey.generate()).publish("key_changed", 1)
    docs = read([*interleaved_log(), forged])
    _, breaks = verify(docs)
    assert problems(breaks) == ["unknown producer 'portal': no public key for it"]


def test_one_producers_key_cannot_sign_for_another() -> None:
    """The tokens service's key (if stolen) cannot write into identity's chain."""
    log = interleaved_log()
    impostor = Relay("identity", key=KEYS["tokens"])
    impostor.seq, impostor.prev = 1, sha256_hex(log[0])
    docs = read([*log[:1], impostor.publish("recovery_requested", 5), *log[1:]])
    _, breaks = verify(docs)
    assert [(b.position, b.problem.startswith("unknown key id")) for b in breaks] == [(1, True)]


def test_verifier_without_any_key_refuses_everything() -> None:
    docs = read(interleaved_log())
    count, breaks = verify(docs, keys=KeyRing())
    assert count == len(docs) and len(breaks) == len(docs)
    assert all(p.startswith("unknown producer") for p in problems(breaks))


@pytest.mark.parametrize("claimed_seq", [1, 2, 3, 50])
def test_inserted_event_with_right_key_but_wrong_seq_detected(claimed_seq: int) -> None:
    """An insider with the producer's key still cannot insert without breaking the chain."""
    log = interleaved_log()
    docs = read(log)
    identity = [i for i, d in enumerate(docs) if producer_of(d) == "identity"]
    after = identity[1]
    insider = Relay("identity")
    insider.seq, insider.prev = claimed_seq - 1, sha256_hex(log[after])
    inserted = insider.publish("recovery_requested", 77)
    tampered = read([*log[: after + 1], inserted, *log[after + 1 :]])
    _, breaks = verify(tampered)
    assert breaks, "insertion went unnoticed"
    assert all(b.producer == "identity" for b in breaks)
    assert breaks[0].position in (after + 1, after + 2)


def test_reordered_events_of_one_producer_detected() -> None:
    docs = read(interleaved_log())
    identity = [i for i, d in enumerate(docs) if producer_of(d) == "identity"]
    i, j = identity[1], identity[2]
    docs[i], docs[j] = docs[j], docs[i]
    _, breaks = verify(docs)
    assert {b.position for b in breaks} >= {i}
    assert all(b.producer == "identity" for b in breaks)


def test_interleaving_across_producers_is_not_a_break() -> None:
    docs = read(interleaved_log())
    identity = [d for d in docs if producer_of(d) == "identity"]
    tokens = [d for d in docs if producer_of(d) == "tokens"]
    assert verify(tokens + identity) == (len(docs), [])


def test_event_without_integrity_block_flagged() -> None:
    docs = read(interleaved_log())
    del docs[0]["data"]["integrity"]
    _, breaks = verify(docs)
    assert breaks[0].problem == "no integrity block" and breaks[0].position == 0


# ------------------------------------------------------------------ redelivery


def test_exact_duplicate_counted_once_and_not_a_break() -> None:
    log = interleaved_log()
    # A relay crash republishes a batch: same bytes, later in the log.
    redelivered = [*log[:4], *log[2:4], *log[4:], log[0]]
    verifier = ChainVerifier(RING).feed_all(read(redelivered))
    assert verifier.breaks == []
    assert (verifier.count, verifier.redeliveries) == (len(log), 3)


def test_same_id_different_content_is_a_break() -> None:
    docs = read(interleaved_log())
    copy = json.loads(json.dumps(docs[1]))
    copy["data"]["outcome"] = "failed"
    docs.append(copy)
    count, breaks = verify(docs)
    assert count == len(docs) - 1
    assert problems(breaks) == ["same id, different content"]


def test_a_redelivery_beyond_the_window_is_reported_never_accepted() -> None:
    """The bounded duplicate check errs on the loud side."""
    relay = Relay("identity")
    log = [relay.publish("x", i) for i in range(10)]
    verifier = ChainVerifier(RING, window=4).feed_all(read([*log, log[2]]))
    assert [b.problem for b in verifier.breaks] == ["sequence 3 after 10: missing, inserted or reordered event"]
    verifier = ChainVerifier(RING, window=4).feed_all(read([*log, log[8]]))
    assert verifier.breaks == [] and verifier.redeliveries == 1


# ------------------------------------------------------------------ partial ranges


def test_mid_chain_range_needs_from_start_false() -> None:
    docs = read(interleaved_log(8))
    tail = docs[5:]
    assert {producer_of(d) for d in tail} == {"identity", "tokens"}
    assert all(d["data"]["integrity"]["seq"] > 1 for d in tail)
    count, breaks = verify(tail, from_start=False)
    assert (count, breaks) == (len(tail), [])
    _, breaks = verify(tail)
    assert {b.producer for b in breaks} == {"identity", "tokens"}


def test_mid_chain_range_still_detects_tampering_after_anchor() -> None:
    tail = read(interleaved_log(8))[5:]
    identity = [i for i, d in enumerate(tail) if producer_of(d) == "identity"]
    del tail[identity[1]]
    _, breaks = verify(tail, from_start=False)
    assert [b.producer for b in breaks] == ["identity"]


def test_mid_chain_anchor_must_itself_be_authentic() -> None:
    tail = read(interleaved_log(8))[5:]
    tail[0]["data"]["reasons"] = ["forged"]
    _, breaks = verify(tail, from_start=False)
    assert breaks[0].position == 0 and breaks[0].problem.startswith("signature invalid")


def test_range_starting_at_seq_one_is_checked_against_genesis() -> None:
    docs = read(interleaved_log())
    doc = json.loads(json.dumps(docs[0]))
    del doc["data"]["integrity"]
    value, _ = seal(doc, producer="identity", seq=1, prev="f" * 64, signer=Signer(KEYS["identity"]))
    docs[0] = json.loads(value)
    for from_start in (True, False):
        _, breaks = verify(docs, from_start=from_start)
        assert problems(breaks)[:1] == ["previous-hash mismatch"]


# ------------------------------------------------------------------ key rotation


T0 = datetime(2027, 1, 1, tzinfo=UTC)


def rotated_log() -> tuple[list[bytes], Ed25519PrivateKey, Ed25519PrivateKey]:
    """identity signs seq 1-3 with its old key, then switches (at T0) to a new one for 4-6."""
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    relay = Relay("identity", key=old)
    log = []
    for i in range(6):
        if i == 3:
            relay.signer = Signer(new)
        relay.clock = T0 + timedelta(minutes=i - 3)  # 3 before the switch, 3 after
        log.append(relay.publish("x", i))
    return log, old, new


def test_rotation_old_events_stay_verifiable_with_the_old_public_key() -> None:
    log, old, new = rotated_log()
    both = KeyRing([public("identity", old, na=T0), public("identity", new, nb=T0)])
    assert verify(read(log), keys=both) == (6, [])
    kids = [d["data"]["integrity"]["kid"] for d in read(log)]
    assert kids == [kid_of(old.public_key())] * 3 + [kid_of(new.public_key())] * 3


def test_rotation_a_new_key_not_yet_published_fails_closed() -> None:
    log, old, _ = rotated_log()
    _, breaks = verify(read(log), keys=KeyRing([public("identity", old)]))
    assert [b.position for b in breaks] == [3, 4, 5]
    assert all(p.startswith("unknown key id") for p in problems(breaks))


def test_rotation_a_retired_key_cannot_sign_new_events() -> None:
    """After the switch the old key's entry gets `not_after`: a leaked old key forging a
    later event is refused."""
    log, old, new = rotated_log()
    ring = KeyRing([public("identity", old, na=T0), public("identity", new, nb=T0)])
    late = Relay("identity", key=old)
    late.seq, late.prev, late.clock = 6, sha256_hex(log[-1]), T0 + timedelta(hours=1)
    _, breaks = verify(read([*log, late.publish("x", 9)]), keys=ring)
    assert len(breaks) == 1 and breaks[0].position == 6
    assert breaks[0].problem.startswith(f"key {kid_of(old.public_key())} of 'identity' not valid at")


# ------------------------------------------------------------------ legacy HMAC events


def legacy_then_signed() -> list[bytes]:
    relay = Relay("identity")
    return [relay.publish_legacy("x", i) for i in range(3)] + [relay.publish("x", i) for i in range(3, 6)]


def test_legacy_events_verify_only_with_the_old_hmac_key() -> None:
    docs = read(legacy_then_signed())
    with_key = ChainVerifier(RING, legacy_key=LEGACY_KEY).feed_all(docs)
    assert with_key.ok and (with_key.count, with_key.legacy_verified, with_key.legacy_unverified) == (6, 3, 0)
    without = ChainVerifier(RING).feed_all(docs)
    # Not a break (the chain is intact), but never reported as verified either.
    assert without.ok and (without.legacy_verified, without.legacy_unverified) == (0, 3)


def test_legacy_event_altered_is_caught_with_the_old_key() -> None:
    docs = read(legacy_then_signed())
    docs[1]["data"]["outcome"] = "rejected"
    _, breaks = verify(docs, legacy_key=LEGACY_KEY)
    # The altered event is not authentic, so its slot in the chain stays empty.
    assert problems(breaks) == [
        "MAC mismatch: legacy event altered or foreign",
        "sequence 3 after 1: missing, inserted or reordered event",
    ]


def test_an_hmac_event_after_the_switch_to_signatures_is_a_break() -> None:
    """Whoever holds the old shared key could forge one: it may only begin a chain."""
    log = legacy_then_signed()
    relay = Relay("identity")
    relay.seq, relay.prev = 6, sha256_hex(log[-1])
    docs = read([*log, relay.publish_legacy("x", 7)])
    _, breaks = verify(docs, legacy_key=LEGACY_KEY)
    assert problems(breaks) == ["HMAC-sealed event after the producer switched to signatures"]


# ------------------------------------------------------------------ cut-off tail, recorded heads


def head_of(log: list[bytes], index: int) -> RecordedHead:
    doc = json.loads(log[index])
    integrity = doc["data"]["integrity"]
    return RecordedHead(
        integrity["producer"], integrity["seq"], sha256_hex(log[index]), doc["time"], doc["id"], log[index].decode()
    )


def check_against(docs: list[dict[str, Any]], heads: list[RecordedHead], **kwargs: Any) -> ChainVerifier:
    verifier = ChainVerifier(RING, from_start=kwargs.pop("from_start", True))
    verifier.expect(heads)
    verifier.feed_all(docs)
    verifier.check_tails(heads, **kwargs)
    return verifier


def test_a_copy_reaching_the_recorded_heads_passes() -> None:
    log = interleaved_log()
    heads = [head_of(log, len(log) - 1), head_of(log, len(log) - 2)]
    assert {h.producer for h in heads} == {"identity", "tokens"}
    verifier = check_against(read(log), heads)
    assert verifier.ok and verifier.tails_compared == 2


def test_a_cut_off_tail_is_reported_with_the_missing_range() -> None:
    log = interleaved_log(8)
    docs = read(log)
    tokens = [i for i, d in enumerate(docs) if producer_of(d) == "tokens"]
    heads = [head_of(log, tokens[-1]), head_of(log, len(log) - 1)]
    cut = [d for i, d in enumerate(docs) if i not in tokens[-2:]]  # the last two tokens events
    verifier = check_against(cut, heads)
    assert [b.producer for b in verifier.breaks] == ["tokens"]
    assert verifier.breaks[0].problem == (
        "cut-off tail: the chain ends at seq 2, the audit service recorded seq 4 (seq 3..4 missing)"
    )
    # Without the recorded head the same copy looks intact: that is what the head is for.
    assert verify(cut) == (len(cut), [])


def test_a_producer_missing_entirely_is_a_cut_off_tail() -> None:
    log = interleaved_log()
    docs = read(log)
    tokens_head = head_of(log, max(i for i, d in enumerate(docs) if producer_of(d) == "tokens"))
    verifier = check_against([d for d in docs if producer_of(d) == "identity"], [tokens_head])
    assert [b.problem for b in verifier.breaks] == [
        "cut-off tail: the chain ends at seq 0, the audit service recorded seq 3 (seq 1..3 missing)"
    ]


def test_a_forged_recorded_head_is_refused() -> None:
    log = interleaved_log()
    head = head_of(log, len(log) - 1)
    forged = json.loads(head.event)
    forged["data"]["integrity"]["seq"] = 40
    bad = RecordedHead(
        head.producer, 40, sha256_hex(canonical(forged)), head.time, head.event_id, canonical(forged).decode()
    )
    verifier = check_against(read(log), [bad])
    assert verifier.breaks[0].problem.startswith("recorded head is not authentic: signature invalid")


def test_a_copy_disagreeing_with_the_recorded_head_is_a_fork() -> None:
    log = interleaved_log()
    other = Relay("identity")
    other.seq, other.prev = 5, sha256_hex(log[-3])  # an authentic but different seq 6
    fork_head = head_of([other.publish("x", 1)], 0)
    assert fork_head.seq == 6 and producer_of(json.loads(log[-1])) == "identity"
    verifier = check_against(read(log), [fork_head])
    assert problems(verifier.breaks) == ["seq 6 differs from the recorded head"]


def test_heads_newer_than_until_are_noted_not_compared() -> None:
    log = interleaved_log()
    docs = read(log)
    head = head_of(log, len(log) - 1)
    verifier = ChainVerifier(RING)
    verifier.expect([head])
    verifier.feed_all(docs[:-1])
    until = datetime.fromisoformat(head.time) - timedelta(seconds=1)
    notes = verifier.check_tails([head], until=until)
    assert verifier.ok and notes == ["identity: recorded head (seq 6) is after --until, tail not compared"]


# ------------------------------------------------------------------ streaming, bounded memory


class Doc(dict):  # type: ignore[type-arg]
    """A dict that can be weakly referenced, to count how many the verifier keeps alive."""


def generated(relays: list[Relay], n: int, refs: list[weakref.ref[Doc]]) -> Any:
    for i in range(n):
        doc = Doc(json.loads(relays[i % len(relays)].publish("x", i)))
        refs.append(weakref.ref(doc))
        yield doc


def test_verifier_keeps_no_event_and_bounded_state() -> None:
    refs: list[weakref.ref[Doc]] = []
    verifier = ChainVerifier(RING, window=64)
    relays = [Relay(name) for name in ("identity", "tokens", "notifier")]
    peak_alive = peak_recent = 0
    for i, doc in enumerate(generated(relays, 3000, refs)):
        verifier.feed(doc)
        del doc
        if i % 250 == 0:
            gc.collect()
            peak_alive = max(peak_alive, sum(1 for r in refs if r() is not None))
            peak_recent = max(peak_recent, sum(len(h.recent) for h in verifier.heads.values()))
    assert verifier.ok and verifier.count == 3000
    assert peak_alive <= 1  # at most the event being fed, never the log
    assert peak_recent <= 3 * 64  # per producer: a window, not the chain


def test_reported_breaks_are_capped_but_all_counted() -> None:
    docs = read([Relay("identity").publish("x", i) for i in range(300)])
    verifier = ChainVerifier(KeyRing(), max_reported=100).feed_all(docs)
    assert verifier.break_count == 300 and len(verifier.breaks) == 100


def test_exported_file_is_read_line_by_line(tmp_path: Path) -> None:
    from clave.auditlog import file_events

    log = interleaved_log()
    path = tmp_path / "copy.jsonl"
    path.write_bytes(b"\n".join(log) + b"\nnot json\n")
    events = file_events(path)
    assert iter(events) is events  # a generator, not a list
    verifier = ChainVerifier(RING).feed_all(events)
    assert verifier.count == len(log) + 1
    assert [(b.event_id, b.problem) for b in verifier.breaks] == [
        (f"unparseable line {len(log) + 1}", "no integrity block")
    ]


# ------------------------------------------------------------------ keys


def write_entry(path: Path, *entries: PublicKeyEntry) -> None:
    docs = [json.loads(e.model_dump_json(exclude_none=True)) for e in entries]
    path.write_text(json.dumps(docs[0] if len(docs) == 1 else docs), encoding="utf-8")


def test_public_keys_load_from_a_folder_or_a_file(tmp_path: Path) -> None:
    for name, key in KEYS.items():
        write_entry(tmp_path / f"{name}.json", PublicKeyEntry.of(name, key.public_key()))
    (tmp_path / "README.txt").write_text("ignored")
    ring = KeyRing.load(str(tmp_path))
    assert ring.producers() == set(PRODUCERS) and len(ring) == 5
    docs = read(interleaved_log())
    assert verify(docs, keys=ring) == (len(docs), [])
    single = tmp_path / "identity.json"
    assert KeyRing.load(str(single)).producers() == {"identity"}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[", "not JSON"),
        ('{"producer": "identity"}', "public_key: Field required"),
        ('{"producer": "identity", "public_key": "!!!"}', "not base64 of a raw Ed25519 key"),
        ('{"producer": "identity", "public_key": "AAAA", "color": "red"}', "color: Extra inputs"),
        ("KID", "does not match its key"),
        ("NAIVE", "needs a time zone"),
        ("TWICE", "listed twice"),
    ],
)
def test_bad_public_key_files_are_refused_by_name(tmp_path: Path, content: str, message: str) -> None:
    entry = json.loads(PublicKeyEntry.of("identity", KEYS["identity"].public_key()).model_dump_json(exclude_none=True))
    if content == "KID":
        content = json.dumps({**entry, "kid": "0" * 16})
    elif content == "NAIVE":
        content = json.dumps({**entry, "not_before": "2027-01-01T00:00:00"})
    elif content == "TWICE":
        content = json.dumps([entry, entry])
    path = tmp_path / "keys.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(AuditKeyError, match=message) as raised:
        KeyRing.load(str(path))
    assert str(path) in str(raised.value)


def test_missing_public_keys_fail_closed(tmp_path: Path) -> None:
    for location, message in [
        ("", "not set"),
        (str(tmp_path / "nope"), "no such file"),
        (str(tmp_path), r"no \*\.json"),
    ]:
        with pytest.raises(AuditKeyError, match=message):
            KeyRing.load(location)


def test_signing_key_problems(tmp_path: Path) -> None:
    good = tmp_path / "good.pem"
    good.write_bytes(private_pem(Ed25519PrivateKey.generate()))
    dev = tmp_path / "dev.pem"
    dev.write_bytes(private_pem(dev_signing_key()))
    ecdsa = tmp_path / "ec.pem"
    from cryptography.hazmat.primitives import serialization

    ecdsa.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    assert signing_key_problems(str(good)) == []
    assert signing_key_problems("") == ["not set (the development signing key is public in the source code)"]
    assert signing_key_problems(str(dev)) == ["a development key (public in the source code)"]
    assert signing_key_problems(str(ecdsa)) == [f"{ecdsa} is not an Ed25519 key"]
    assert signing_key_problems(str(tmp_path / "missing.pem"))[0].startswith("cannot read")
    (tmp_path / "text.pem").write_text("hello")
    assert "not an unencrypted PEM private key" in signing_key_problems(str(tmp_path / "text.pem"))[0]


def test_check_seal_names_each_verdict() -> None:
    doc = read(interleaved_log(1))[0]
    assert check_seal(doc, RING).authentic
    assert check_seal(doc, KeyRing()).reason == "unknown_key"
    legacy = json.loads(Relay("identity").publish_legacy("x", 1))
    assert (check_seal(legacy, RING).legacy, check_seal(legacy, RING).authentic) == (True, False)
    assert check_seal(legacy, RING, LEGACY_KEY).authentic


# ------------------------------------------------------------------ the read model follows live


def test_read_model_counts_a_forgery_without_moving_the_head() -> None:
    log = interleaved_log()
    docs = read(log)
    head = None
    for doc in (d for d in docs if producer_of(d) == "identity"):
        step = domain.follow(head, doc, RING, None)
        assert step.problem is None and step.head is not None
        head = step.head
    assert head is not None and head["seq"] == 6 and head["signed"]
    forger = Relay("identity", key=Ed25519PrivateKey.generate())
    forger.seq, forger.prev = 6, head["hash"]
    step = domain.follow(head, json.loads(forger.publish("x", 1)), RING, None)
    assert (step.authentic, step.reason, step.head) == (False, "unknown_key", None)
    assert step.reason in domain.BREAK_REASONS
    # The head recorded is the whole sealed event: anyone can check it with the public key.
    assert check_seal(json.loads(head["event"]), RING).authentic


def test_read_model_break_reasons() -> None:
    relay = Relay("tokens")
    first, second, third = (json.loads(relay.publish("x", i)) for i in range(3))
    head = domain.follow(None, first, RING, None).head
    gap = domain.follow(head, third, RING, None)
    assert (gap.reason, gap.head is not None) == ("sequence", True)  # authentic: the head moves on
    altered = json.loads(json.dumps(second))
    altered["data"]["outcome"] = "failed"
    assert domain.follow(head, altered, RING, None).reason == "bad_signature"
    legacy = json.loads(Relay("tokens").publish_legacy("x", 1))
    assert domain.follow(head, legacy, RING, LEGACY_KEY).reason == "legacy_after_signed"
    assert domain.follow(None, legacy, RING, None).reason == "legacy_unverifiable"
    assert domain.follow(None, legacy, RING, LEGACY_KEY).problem is None
