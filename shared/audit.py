"""Audit events and their tamper evidence.

Each service emits `ec.clave.audit.v1` events to `audit.events` through its
outbox. The outbox relay (the single writer per service) seals each one into
the service's chain before publishing:

    data.integrity = {producer, seq, prev, kid, sig}

`seq` counts 1, 2, 3... per producer; `prev` is the SHA-256 of the previous
sealed event of that producer; `sig` is the producer's Ed25519 signature over
a context label and the canonical JSON of the event with `sig` blank; `kid`
names the signing key (see shared/auditkeys.py), so keys can rotate. Only the
producer holds its private key: verifiers need only public keys, so whoever
can verify cannot forge. A modified event fails its signature; a deleted,
inserted or reordered one breaks `seq`/`prev`; a cut-off tail is found by
comparing with the heads the audit service recorded. Audit events are keyed
by producer, so one producer's chain lives in one partition, in order.

Legacy events (sealed before signatures) carry `mac` (HMAC-SHA256 with the
shared AUDIT_HMAC_KEY) instead of `kid`/`sig`. They are checked only when that
key is given, and otherwise reported as unverifiable, never as verified. They
may only begin a producer's chain: an HMAC-sealed event after a signed one of
the same producer is a break (anyone holding the old key could forge it).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.auditkeys import KeyRing, kid_of
from shared.crypto import constant_time_equal, mac, sha256_hex
from shared.envelope import CloudEvent, new_event
from shared.schemas import AuditRecord
from shared.store import Outgoing
from shared.topics import AUDIT_EVENTS, EventType

GENESIS = "0" * 64
# Domain separation: an audit signature can never be taken for any other signed message.
SIGNATURE_CONTEXT = b"clave.audit.event.v1\n"
# Exact redeliveries (a relay crash republishes at most one batch of 500) are recognised
# within this many recent sequence numbers per producer; see ChainVerifier.
RECENT = 2048
MAX_REPORTED = 100

# Every `action` an audit event may name (`clave audit replay --type` accepts these alone).
# Add a new one here when a service starts to audit it: tests/unit/test_audit_actions.py
# finds the actions the code names and fails on one missing here.
ACTIONS: frozenset[str] = frozenset(
    {
        # identity
        "recovery_requested",
        "account_locked",
        "account_slowed",
        "account_unlocked",
        "code_rejected",
        "account_imported",
        "account_updated",
        "operator_unlock",
        "operator_email_update",
        "operator_send_recovery",
        "operator_contact_update",
        "contact_updated",  # the citizen's own change after a login (the fields, never the values)
        "operator_command_refused",  # unsigned, forged, unknown operator, expired or replayed
        "operator_key_registered",
        "operator_key_revoked",
        "email_change_requested",
        "email_change_approved",
        "email_change_applied",
        "email_change_cancelled",  # by an operator, before it took effect
        "account_import_unchanged",
        "account_import_refused",
        # tokens
        "token_issued",
        "token_issue_skipped",
        "decoy_stored",
        "decoy_skipped",
        "token_reserved",
        "reset_rejected",
        "token_spent",
        "token_released",
        "token_release_refused",
        "tokens_revoked",
        "reservation_expired",
        # notifier
        "mail_sent",
        "mail_failed",
        # password
        "initial_key_set",
        "initial_key_skipped",
        "initial_key_refused",  # an initial key breaking the key policy (not a legacy import)
        "key_changed",
        "key_rejected",
        "key_change_unannounced",
        "key_checked",  # a credential check (login), never the key
        "key_checks_locked",
        "key_checks_slowed",
        # every consumer
        "message_dead_lettered",
    }
)


def audit_event(record: AuditRecord, *, correlationid: str, causationid: str | None, source: str) -> Outgoing:
    event = new_event(
        type=EventType.AUDIT,
        source=source,
        subject=record.action,
        data=record.model_dump(mode="json", exclude_none=True),
        correlationid=correlationid,
        causationid=causationid,
    )
    return Outgoing(topic=AUDIT_EVENTS, key=record.service, event=event)


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signed_bytes(doc: dict[str, Any]) -> bytes:
    """What the signature covers: the context label and the event with `sig` blank."""
    blank = json.loads(json.dumps(doc))
    blank["data"]["integrity"]["sig"] = ""
    return SIGNATURE_CONTEXT + canonical(blank)


class Signer:
    """A producer's private key, as the outbox relay holds it."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.kid = kid_of(key.public_key())

    def sign(self, message: bytes) -> str:
        return _b64(self._key.sign(message))


def seal(doc: dict[str, Any], *, producer: str, seq: int, prev: str, signer: Signer) -> tuple[bytes, str]:
    """Add integrity fields to an audit event document; return its bytes and chain hash."""
    doc = json.loads(json.dumps(doc))  # deep copy
    doc["data"]["integrity"] = {"producer": producer, "seq": seq, "prev": prev, "kid": signer.kid, "sig": ""}
    doc["data"]["integrity"]["sig"] = signer.sign(_signed_bytes(doc))
    sealed = canonical(doc)
    return sealed, sha256_hex(sealed)


def seal_legacy(doc: dict[str, Any], *, producer: str, seq: int, prev: str, key: str) -> tuple[bytes, str]:
    """The old HMAC seal, kept only so tests can make the events a long-lived log still holds."""
    doc = json.loads(json.dumps(doc))
    doc["data"]["integrity"] = {"producer": producer, "seq": seq, "prev": prev, "mac": ""}
    doc["data"]["integrity"]["mac"] = mac(key, canonical(doc))
    sealed = canonical(doc)
    return sealed, sha256_hex(sealed)


# ---- one event: who sealed it -----------------------------------------------------------------


@dataclass(frozen=True)
class Seal:
    """The verdict on one event's seal, before its place in the chain is looked at."""

    authentic: bool  # signed by a known, valid key (or MAC-verified legacy)
    legacy: bool = False  # sealed with the old shared HMAC key
    problem: str | None = None  # why it is not authentic (None for an unverifiable legacy event)
    reason: str | None = None  # the same as a bounded code, for metrics


def _event_time(doc: dict[str, Any]) -> datetime | None:
    try:
        when = datetime.fromisoformat(str(doc.get("time")))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def check_seal(doc: dict[str, Any], keys: KeyRing, legacy_key: str | None = None) -> Seal:
    """Is this event sealed by the producer it names, under a key valid at its time?"""
    integrity = (doc.get("data") or {}).get("integrity")
    if not isinstance(integrity, dict) or not integrity:
        return Seal(False, problem="no integrity block", reason="no_integrity")
    producer = str(integrity.get("producer", ""))
    if "sig" in integrity or "kid" in integrity:
        return _check_signature(doc, integrity, producer, keys)
    if "mac" in integrity:
        if not legacy_key:
            return Seal(False, legacy=True)
        blank = json.loads(json.dumps(doc))
        blank["data"]["integrity"]["mac"] = ""
        if not constant_time_equal(mac(legacy_key, canonical(blank)), str(integrity.get("mac", ""))):
            return Seal(False, True, "MAC mismatch: legacy event altered or foreign", "mac_mismatch")
        return Seal(True, legacy=True)
    return Seal(False, problem="integrity block has neither signature nor MAC", reason="no_integrity")


def _check_signature(doc: dict[str, Any], integrity: dict[str, Any], producer: str, keys: KeyRing) -> Seal:
    kid = str(integrity.get("kid", ""))
    if not keys.knows(producer):
        return Seal(False, problem=f"unknown producer {producer!r}: no public key for it", reason="unknown_key")
    key = keys.get(producer, kid)
    if key is None:
        return Seal(False, problem=f"unknown key id {kid!r} for producer {producer!r}", reason="unknown_key")
    try:
        key.key.verify(_unb64(str(integrity.get("sig", ""))), _signed_bytes(doc))
    except (InvalidSignature, binascii.Error, ValueError):
        return Seal(False, problem=f"signature invalid: altered, or not signed by {producer!r}", reason="bad_signature")
    when = _event_time(doc)
    if when is None or not key.valid_at(when):
        return Seal(
            False,
            problem=f"key {kid} of {producer!r} not valid at {doc.get('time')} (valid {key.validity()})",
            reason="key_not_valid",
        )
    return Seal(True)


# ---- a producer's chain -----------------------------------------------------------------------


@dataclass
class ChainHead:
    seq: int
    hash: str
    signed: bool  # a signed event was seen: no HMAC-sealed event may follow
    recent: OrderedDict[int, tuple[str, str]] = field(default_factory=OrderedDict)  # seq -> (id, digest)

    def remember(self, seq: int, event_id: str, digest: str, window: int) -> None:
        self.recent[seq] = (event_id, digest)
        while len(self.recent) > window:
            self.recent.popitem(last=False)


@dataclass(frozen=True)
class Link:
    """Where an authentic event falls in its producer's chain."""

    problem: str | None
    reason: str | None
    advance: bool  # the event becomes the new head


def link(head_seq: int, head_hash: str, seq: int, prev: str) -> Link:
    """An authentic event after the head (seq, hash) of its chain."""
    if seq != head_seq + 1:
        problem = f"sequence {seq} after {head_seq}: missing, inserted or reordered event"
        return Link(problem, "sequence", advance=seq > head_seq)
    if not constant_time_equal(prev, head_hash or GENESIS):
        return Link("previous-hash mismatch", "previous_hash", advance=True)
    return Link(None, None, advance=True)


@dataclass(frozen=True)
class Break:
    position: int
    event_id: str
    producer: str
    problem: str


@dataclass(frozen=True)
class RecordedHead:
    """A chain head as the audit service recorded it: the last authentic event it saw."""

    producer: str
    seq: int
    hash: str
    time: str
    event_id: str
    event: str  # the sealed event itself (empty for heads recorded before signatures)


class ChainVerifier:
    """Checks audit events streamed in log order: each event's seal and each producer's chain.

    Memory does not grow with the log: per producer it keeps the head and the (id, digest)
    of its last RECENT sequence numbers, to tell an exact redelivery (same id, same bytes: an
    at-least-once artefact of a relay crash, counted once) from a conflicting copy. The trade-
    off: a redelivery arriving more than RECENT events of its producer after the original is
    not recognised and is reported as a sequence break (never the other way round: no
    copy is ever accepted without its bytes matching). The relay republishes at most one
    batch (500), so RECENT (2048) leaves room. Only the first MAX_REPORTED breaks are kept.

    With `from_start`, every chain must begin at seq 1 (a whole log); otherwise (a range)
    a producer's first authentic event anchors its chain.
    """

    def __init__(
        self,
        keys: KeyRing,
        *,
        legacy_key: str | None = None,
        from_start: bool = True,
        window: int = RECENT,
        max_reported: int = MAX_REPORTED,
    ) -> None:
        self.keys = keys
        self.legacy_key = legacy_key
        self.from_start = from_start
        self.window = window
        self.max_reported = max_reported
        self.heads: dict[str, ChainHead] = {}
        self.position = 0
        self.count = 0  # distinct events
        self.redeliveries = 0
        self.legacy_verified = 0
        self.legacy_unverified = 0
        self.break_count = 0
        self.breaks: list[Break] = []
        self.tails_compared = 0  # recorded heads the chains were compared with
        self._watch: dict[str, int] = {}  # producer -> seq whose digest a recorded head names
        self._seen_at_watch: dict[str, str] = {}

    @property
    def ok(self) -> bool:
        return self.break_count == 0

    def _break(self, position: int, event_id: str, producer: str, problem: str) -> None:
        self.break_count += 1
        if len(self.breaks) < self.max_reported:
            self.breaks.append(Break(position, event_id, producer, problem))

    def feed_all(self, docs: Iterable[dict[str, Any]]) -> ChainVerifier:
        for doc in docs:
            self.feed(doc)
        return self

    def feed(self, doc: dict[str, Any]) -> None:
        position = self.position
        self.position += 1
        event_id = str(doc.get("id", "?"))
        integrity = (doc.get("data") or {}).get("integrity") if isinstance(doc.get("data"), dict) else None
        if not isinstance(integrity, dict) or not integrity:
            self.count += 1
            self._break(position, event_id, "?", "no integrity block")
            return
        producer = str(integrity.get("producer", "?"))
        try:
            seq = int(integrity.get("seq", 0))
        except (TypeError, ValueError):
            seq = 0
        digest = sha256_hex(canonical(doc))
        head = self.heads.get(producer)
        if head is not None and seq <= head.seq and seq in head.recent:
            seen_id, seen_digest = head.recent[seq]
            if seen_digest == digest:
                self.redeliveries += 1
                return
            if seen_id == event_id:
                self._break(position, event_id, producer, "same id, different content")
                return
        self.count += 1
        verdict = check_seal(doc, self.keys, self.legacy_key)
        if verdict.legacy and head is not None and head.signed:
            self._break(position, event_id, producer, "HMAC-sealed event after the producer switched to signatures")
            return
        if verdict.problem is not None:
            self._break(position, event_id, producer, verdict.problem)
            return  # not authentic: it never moves the chain
        if verdict.legacy:
            if verdict.authentic:
                self.legacy_verified += 1
            else:
                self.legacy_unverified += 1
        if head is None and not self.from_start and seq != 1:
            head = self.heads[producer] = ChainHead(seq, digest, signed=not verdict.legacy)
        else:
            if head is None:
                head = self.heads[producer] = ChainHead(0, GENESIS, signed=False)
            step = link(head.seq, head.hash, seq, str(integrity.get("prev", "")))
            if step.problem is not None:
                self._break(position, event_id, producer, step.problem)
            if step.advance:
                head.seq, head.hash = seq, digest
            head.signed = head.signed or not verdict.legacy
        head.remember(seq, event_id, digest, self.window)
        if self._watch.get(producer) == seq:
            self._seen_at_watch[producer] = digest

    # ---- the tail: does each chain reach the head the audit service recorded? ---------------

    def expect(self, heads: Iterable[RecordedHead]) -> list[RecordedHead]:
        """Recorded heads to compare the tails with (call before feeding)."""
        heads = list(heads)
        self._watch = {h.producer: h.seq for h in heads}
        return heads

    def check_tails(
        self, heads: Iterable[RecordedHead], *, since: datetime | None = None, until: datetime | None = None
    ) -> list[str]:
        """Report each chain that ends before the head the audit service recorded (a cut-off
        tail) or disagrees with it. Returns notes on heads that could not be compared."""
        notes: list[str] = []
        position = self.position
        for head in heads:
            when = _event_time({"time": head.time})
            if until is not None and (when is None or when > until):
                notes.append(f"{head.producer}: recorded head (seq {head.seq}) is after --until, tail not compared")
                continue
            if head.event:
                verdict = check_seal(json.loads(head.event), self.keys, self.legacy_key)
                if not verdict.authentic or sha256_hex(canonical(json.loads(head.event))) != head.hash:
                    why = verdict.problem or "its event does not match its hash"
                    self._break(position, head.event_id, head.producer, f"recorded head is not authentic: {why}")
                    continue
            else:
                notes.append(f"{head.producer}: recorded head predates signed heads, compared by seq only")
            mine = self.heads.get(head.producer)
            if mine is None and since is not None and when is not None and when < since:
                continue  # nothing of this producer in the range, and nothing expected
            self.tails_compared += 1
            last = mine.seq if mine is not None else 0
            if last < head.seq:
                missing = f"{last + 1}" if last + 1 == head.seq else f"{last + 1}..{head.seq}"
                self._break(
                    position,
                    head.event_id,
                    head.producer,
                    f"cut-off tail: the chain ends at seq {last}, the audit service recorded seq {head.seq} "
                    f"(seq {missing} missing)",
                )
            elif head.producer in self._seen_at_watch and self._seen_at_watch[head.producer] != head.hash:
                self._break(position, head.event_id, head.producer, f"seq {head.seq} differs from the recorded head")
        return notes


def verify_chain(
    events: Iterable[dict[str, Any]], *, keys: KeyRing, legacy_key: str | None = None, from_start: bool = True
) -> tuple[int, list[Break]]:
    """Verify a sequence of events; the number of distinct events and the breaks, first first."""
    verifier = ChainVerifier(keys, legacy_key=legacy_key, from_start=from_start).feed_all(events)
    return verifier.count, verifier.breaks


def parse_audit(raw: bytes) -> CloudEvent:
    return CloudEvent.model_validate_json(raw)
