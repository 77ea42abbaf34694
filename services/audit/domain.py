"""The audit read model: how an audit event becomes a queryable record, and how each
producer's chain is followed live. Pure; the same code serves the live consumer and
`clave audit rebuild`, so both must give exactly the same result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.audit import GENESIS, canonical
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


@dataclass(frozen=True)
class ChainStep:
    ok: bool
    problem: str | None
    head_seq: int
    head_hash: str


def follow(head_seq: int, head_hash: str, event: dict[str, Any]) -> ChainStep:
    """Advance a producer's chain head by one event (MACs are checked by `clave audit verify`,
    which holds the key; the read model checks order and links)."""
    integrity = (event.get("data") or {}).get("integrity") or {}
    seq, prev = int(integrity.get("seq", 0)), str(integrity.get("prev", ""))
    digest = sha256_hex(canonical(event))
    if seq == head_seq + 1 and prev == (head_hash or GENESIS):
        return ChainStep(True, None, seq, digest)
    problem = f"sequence {seq} after {head_seq}" if seq != head_seq + 1 else "previous-hash mismatch"
    return ChainStep(False, problem, max(seq, head_seq), digest)
