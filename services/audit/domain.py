"""The audit read model: how an audit event becomes a queryable record, and how each
producer's chain is followed live. Pure; the same code serves the live consumer and
`clave audit rebuild`, so both must give exactly the same result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.audit import RecordedHead, canonical, check_seal, link
from shared.auditkeys import KeyRing
from shared.crypto import sha256_hex


def project(event: dict[str, Any]) -> dict[str, Any]:
    """One read-model document per audit event, keyed by the event id."""
    data = event.get("data") or {}
    integrity = data.get("integrity") or {}
    return {
        "_id": event["id"],
        "time": event["time"],
        "service": data.get("service"),
        "action": data.get("action"),
        "outcome": data.get("outcome"),
        "actor": data.get("actor"),
        "account_id": data.get("account_id"),
        "subject_ref": data.get("subject_ref"),
        "request_id": data.get("request_id"),
        "correlationid": event.get("correlationid"),
        "causationid": event.get("causationid"),
        "reasons": list(data.get("reasons") or []),
        "details": dict(data.get("details") or {}),
        "producer": integrity.get("producer"),
        "seq": integrity.get("seq"),
        "digest": sha256_hex(canonical(event)),
    }


# Why an event broke its chain: the `reason` label of clave_audit_chain_breaks_total.
BREAK_REASONS = (
    "no_integrity",
    "unknown_key",
    "bad_signature",
    "key_not_valid",
    "mac_mismatch",
    "legacy_unverifiable",
    "legacy_after_signed",
    "sequence",
    "previous_hash",
)


@dataclass(frozen=True)
class ChainStep:
    authentic: bool  # sealed by the producer it names (or an unverifiable legacy event)
    problem: str | None
    reason: str | None  # one of BREAK_REASONS when there is a problem
    head: dict[str, Any] | None  # the producer's new recorded head; None: unchanged


def recorded_head(event: dict[str, Any], digest: str, signed: bool) -> dict[str, Any]:
    """What the read model keeps of a chain's head: enough for anyone to check it with the
    producer's public key (the whole sealed event), and what `verify` compares tails with."""
    integrity = event["data"]["integrity"]
    return {
        "seq": int(integrity["seq"]),
        "hash": digest,
        "kid": integrity.get("kid"),
        "sig": integrity.get("sig"),
        "time": event.get("time"),
        "event_id": event.get("id"),
        "event": canonical(event).decode(),
        "signed": signed,
    }


def follow(head: dict[str, Any] | None, event: dict[str, Any], keys: KeyRing, legacy_key: str | None) -> ChainStep:
    """Check an event's seal and advance its producer's chain head by it. Only an authentic
    event moves the head: a forgery is counted but cannot push the chain off its track."""
    verdict = check_seal(event, keys, legacy_key)
    head_seq = int(head["seq"]) if head else 0
    head_hash = str(head["hash"]) if head else ""
    signed = bool(head.get("signed")) if head else False
    if verdict.legacy and signed:
        why = "HMAC-sealed event after the producer switched to signatures"
        return ChainStep(False, why, "legacy_after_signed", None)
    if verdict.problem is not None:
        return ChainStep(False, verdict.problem, verdict.reason, None)
    integrity = event["data"]["integrity"]
    try:
        seq = int(integrity.get("seq", 0))
    except (TypeError, ValueError):
        return ChainStep(False, "malformed sequence number", "sequence", None)
    step = link(head_seq, head_hash, seq, str(integrity.get("prev", "")))
    problem, reason = step.problem, step.reason
    if verdict.legacy and not verdict.authentic and problem is None:
        problem, reason = "legacy HMAC-sealed event, unverifiable without AUDIT_HMAC_KEY", "legacy_unverifiable"
    new_head = None
    if step.advance:
        new_head = recorded_head(event, sha256_hex(canonical(event)), signed or not verdict.legacy)
    return ChainStep(verdict.authentic, problem, reason, new_head)


def entry(doc: dict[str, Any], step: ChainStep) -> dict[str, Any]:
    """The read model's whole document for an event: its projection and what it did to its
    producer's chain (the new head, or the break). The live consumer and the rebuild both
    store exactly this."""
    out = dict(doc)
    if step.head is not None:
        out["chain_head"] = step.head
        out["head_seq"] = int(step.head["seq"])
    if step.problem is not None:
        out["chain_break"] = {"reason": step.reason or "", "problem": step.problem}
    return out


def as_recorded_head(producer: str, doc: dict[str, Any]) -> RecordedHead:
    return RecordedHead(
        producer=producer,
        seq=int(doc["seq"]),
        hash=str(doc["hash"]),
        time=str(doc.get("time") or ""),
        event_id=str(doc.get("event_id") or "?"),
        event=str(doc.get("event") or ""),
    )
