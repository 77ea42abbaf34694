"""The CloudEvents 1.0 envelope (structured JSON mode) and its strict parser.

`parse_event` turns raw Kafka bytes into a `CloudEvent` or raises `BadInput`
with one of the stable DLQ reason codes below, so a consumer never crashes on
what a producer sent. The bytes are parsed once: a `BadInput` carries what the
dead letter needs from them (the correlation id, when one is readable), so
dead-lettering never parses the input again.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SPECVERSION = "1.0"
CONTENT_TYPE = "application/cloudevents+json; charset=UTF-8"
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# A \uD800-\uDFFF escape: the only way JSON text can hold a string that is not Unicode.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
CORRELATION_MAX = 128


class DeadLetterReason:
    """Why a message went to a `.dlq` topic (header `clave-dlq-reason`)."""

    TOO_LARGE = "too_large"
    MALFORMED_JSON = "malformed_json"
    NOT_CLOUDEVENT = "not_cloudevent"
    WRONG_SPECVERSION = "wrong_specversion"
    UNKNOWN_TYPE = "unknown_type"
    SCHEMA_INVALID = "schema_invalid"
    DUPLICATE_EVENT = "duplicate_event"
    UNDECRYPTABLE = "undecryptable"
    PLAINTEXT_REFUSED = "plaintext_refused"  # a secret in the clear under PORTAL_INPUT=sealed
    HANDLER_ERROR = "handler_error"
    # Operator commands (identity.commands): each must be signed by a registered operator key.
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    OPERATOR_UNKNOWN = "operator_unknown"
    COMMAND_EXPIRED = "command_expired"
    COMMAND_REPLAYED = "command_replayed"
    # Added: a sealed field made for another purpose or event, or past its lifetime, and an
    # event whose `source` is not the service that owns its topic.
    SEALED_CONTEXT_MISMATCH = "sealed_context_mismatch"
    SEALED_EXPIRED = "sealed_expired"
    WRONG_SOURCE = "wrong_source"


class BadInput(Exception):
    """A message that can never be processed; it goes to the DLQ with `reason`."""

    def __init__(
        self, reason: str, detail: str, *, correlationid: str | None = None, data: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.correlationid = correlationid  # the record's own, when readable: its dead letter carries it
        self.data = data  # the record's `data` object, when the parse got that far (an answer's id is read there)
        # Outgoing events (shared.store.Outgoing) committed with the dead letter, atomically: e.g. the
        # result an operator waits for when identity refuses a command, or the answer the portal waits
        # for when its input is refused for how its secrets came (plaintext_refused, sealed_invalid).
        self.also: list[Any] = []


class CloudEvent(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: str
    id: str = Field(min_length=1, max_length=128)
    source: str = Field(min_length=1, max_length=256)
    type: str = Field(min_length=1, max_length=128)
    time: datetime
    subject: str | None = Field(default=None, max_length=256)
    datacontenttype: str = "application/json"
    correlationid: str = Field(min_length=1, max_length=CORRELATION_MAX)
    causationid: str | None = Field(default=None, max_length=128)
    data: dict[str, Any]

    @field_validator("time")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("time must carry a timezone (RFC 3339)")
        return value

    @model_validator(mode="after")
    def _extensions(self) -> CloudEvent:
        # CloudEvents extension names are lowercase alphanumerics; values must be scalars.
        for name, value in (self.model_extra or {}).items():
            if not _EXTENSION_NAME.match(name) or not isinstance(value, str | int | bool):
                # The name is input too: never echoed (DLQ headers are not sealed).
                raise ValueError("invalid extension attribute (name or value)")
        return self

    def to_bytes(self) -> bytes:
        return json.dumps(
            self.model_dump(mode="json", exclude_none=True), separators=(",", ":"), ensure_ascii=False
        ).encode()


def new_event(
    *,
    type: str,
    source: str,
    data: dict[str, Any],
    correlationid: str,
    causationid: str | None = None,
    subject: str | None = None,
) -> CloudEvent:
    return CloudEvent(
        specversion=SPECVERSION,
        id=str(uuid.uuid4()),
        source=source,
        type=type,
        time=datetime.now(UTC),
        subject=subject,
        correlationid=correlationid,
        causationid=causationid,
        data=data,
    )


def parse_event(raw: bytes, *, max_bytes: int, known_types: set[str] | frozenset[str]) -> CloudEvent:
    if len(raw) > max_bytes:
        raise BadInput(DeadLetterReason.TOO_LARGE, f"{len(raw)} bytes > limit {max_bytes}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and over-long integers; RecursionError deep nesting.
        raise BadInput(DeadLetterReason.MALFORMED_JSON, f"not JSON: {exc.__class__.__name__}") from None
    if _SURROGATE_ESCAPE.search(raw) and not _all_unicode(doc):
        # Such a string cannot be encoded again (UTF-8, BSON): every later step would fail on it.
        raise BadInput(DeadLetterReason.MALFORMED_JSON, "not JSON: a string holds a lone surrogate")
    try:
        return _envelope(doc, known_types)
    except BadInput as bad:
        bad.correlationid = readable_correlation(doc)
        data = doc.get("data") if isinstance(doc, dict) else None
        bad.data = data if isinstance(data, dict) else None
        raise


def _envelope(doc: Any, known_types: set[str] | frozenset[str]) -> CloudEvent:
    if not isinstance(doc, dict) or not {"specversion", "id", "source", "type"} <= doc.keys():
        raise BadInput(DeadLetterReason.NOT_CLOUDEVENT, "missing specversion/id/source/type")
    # Input values are never echoed into the reason: DLQ headers are not sealed.
    if doc["specversion"] != SPECVERSION:
        raise BadInput(DeadLetterReason.WRONG_SPECVERSION, "specversion is not 1.0")
    if not isinstance(doc["type"], str):
        raise BadInput(DeadLetterReason.NOT_CLOUDEVENT, "type is not a string")
    if doc["type"] not in known_types:
        raise BadInput(DeadLetterReason.UNKNOWN_TYPE, "type not consumed on this topic")
    try:
        return CloudEvent.model_validate(doc)
    except ValidationError as exc:
        raise BadInput(DeadLetterReason.NOT_CLOUDEVENT, describe_errors(exc)) from None


def readable_correlation(doc: Any) -> str | None:
    """The document's correlation id, if it is one a dead letter can carry as it is."""
    value = doc.get("correlationid") if isinstance(doc, dict) else None
    if isinstance(value, str) and 0 < len(value) <= CORRELATION_MAX and value.isprintable():
        return value
    return None


def _all_unicode(doc: Any) -> bool:
    """No string (key or value) holds a lone surrogate. Iterative: the depth is the sender's."""
    pending = [doc]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def describe_errors(exc: ValidationError) -> str:
    """Field paths and messages only: never the offending input values (they may be secrets)."""
    parts = []
    for err in exc.errors(include_input=False, include_url=False)[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)
