"""Audit events and their tamper evidence.

Each service emits `ec.clave.audit.v1` events to `audit.events` through its
outbox. The outbox relay (the single writer per service) seals each one into
the service's hash chain before publishing:

    data.integrity = {producer, seq, prev, mac}

`seq` counts 1, 2, 3... per producer; `prev` is the SHA-256 of the previous
sealed event of that producer; `mac` is HMAC-SHA256 (AUDIT_HMAC_KEY) over the
canonical JSON of the event with `mac` blank. A modified event fails its MAC;
a deleted, inserted or reordered one breaks `seq`/`prev`. Audit events are
keyed by producer, so one producer's chain lives in one partition, in order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared.crypto import constant_time_equal, mac, sha256_hex
from shared.envelope import CloudEvent, new_event
from shared.schemas import AuditRecord
from shared.store import Outgoing
from shared.topics import AUDIT_EVENTS, EventType

GENESIS = "0" * 64


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


def seal(doc: dict[str, Any], *, producer: str, seq: int, prev: str, key: str) -> tuple[bytes, str]:
    """Add integrity fields to an audit event document; return its bytes and chain hash."""
    doc = json.loads(json.dumps(doc))  # deep copy
    doc["data"]["integrity"] = {"producer": producer, "seq": seq, "prev": prev, "mac": ""}
    doc["data"]["integrity"]["mac"] = mac(key, canonical(doc))
    sealed = canonical(doc)
    return sealed, sha256_hex(sealed)


@dataclass(frozen=True)
class Break:
    position: int
    event_id: str
    producer: str
    problem: str


def verify_chain(events: Iterable[dict[str, Any]], *, key: str, from_start: bool = True) -> tuple[int, list[Break]]:
    """Check MACs and per-producer chains over events in log order.

    Exact redeliveries of the same sealed event (same id, same bytes; an
    at-least-once artefact of a relay crash) are counted once. Returns the
    number of distinct events checked and the breaks found, first first.
    With `from_start`, every producer's chain must begin at seq 1 (a whole log).
    """
    heads: dict[str, tuple[int, str]] = {}
    seen: dict[str, str] = {}
    breaks: list[Break] = []
    count = 0
    for position, doc in enumerate(events):
        event_id = str(doc.get("id", "?"))
        integrity = (doc.get("data") or {}).get("integrity") or {}
        producer = str(integrity.get("producer", "?"))
        digest = sha256_hex(canonical(doc))
        if event_id in seen:
            if seen[event_id] != digest:
                breaks.append(Break(position, event_id, producer, "same id, different content"))
            continue
        seen[event_id] = digest
        count += 1
        if not integrity:
            breaks.append(Break(position, event_id, producer, "no integrity block"))
            continue
        blank = json.loads(json.dumps(doc))
        blank["data"]["integrity"]["mac"] = ""
        if not constant_time_equal(mac(key, canonical(blank)), str(integrity.get("mac", ""))):
            breaks.append(Break(position, event_id, producer, "MAC mismatch: event altered or foreign"))
            continue
        seq, prev = int(integrity.get("seq", 0)), str(integrity.get("prev", ""))
        last_seq, last_hash = heads.get(producer, (0, GENESIS))
        if producer not in heads and seq != 1 and not from_start:
            # A range that starts mid-chain: accept its first event as the anchor.
            heads[producer] = (seq, digest)
            continue
        if seq != last_seq + 1:
            breaks.append(
                Break(
                    position,
                    event_id,
                    producer,
                    f"sequence {seq} after {last_seq}: missing, inserted or reordered event",
                )
            )
        elif not constant_time_equal(prev, last_hash):
            breaks.append(Break(position, event_id, producer, "previous-hash mismatch"))
        heads[producer] = (seq, digest)
    return count, breaks


def parse_audit(raw: bytes) -> CloudEvent:
    return CloudEvent.model_validate_json(raw)
