"""Topic names and event types: the wire contract (see README, "Topic contract").

Portal-facing names are public and frozen; internal ones follow `<service>.<event>`.
Every consumed topic has a `.dlq` twin.
"""

from __future__ import annotations

from dataclasses import dataclass

# Portal-facing (public contract).
RECOVERY_REQUESTS = "recovery.requests"
RECOVERY_RESETS = "recovery.resets"
RECOVERY_OUTCOMES = "recovery.outcomes"

# Internal.
IDENTITY_VERIFIED = "identity.verified"
IDENTITY_LOCKED = "identity.locked"
IDENTITY_EMAIL_CHANGED = "identity.email_changed"
IDENTITY_ACCOUNT_REGISTERED = "identity.account_registered"
IDENTITY_COMMANDS = "identity.commands"
TOKENS_ISSUED = "tokens.issued"
TOKENS_REDEEMED = "tokens.redeemed"
PASSWORD_UPDATED = "password.updated"
PASSWORD_REJECTED = "password.rejected"
NOTIFIER_SENT = "notifier.sent"
NOTIFIER_FAILED = "notifier.failed"
AUDIT_EVENTS = "audit.events"

DLQ_SUFFIX = ".dlq"


def dlq(topic: str) -> str:
    return topic + DLQ_SUFFIX


# Topics some service consumes: each gets a DLQ twin.
CONSUMED = (
    RECOVERY_REQUESTS,
    RECOVERY_RESETS,
    IDENTITY_VERIFIED,
    IDENTITY_LOCKED,
    IDENTITY_EMAIL_CHANGED,
    IDENTITY_ACCOUNT_REGISTERED,
    IDENTITY_COMMANDS,
    TOKENS_ISSUED,
    TOKENS_REDEEMED,
    PASSWORD_UPDATED,
    PASSWORD_REJECTED,
    AUDIT_EVENTS,  # by the audit read model, which dead-letters what it cannot project
)

PRODUCED_ONLY = (RECOVERY_OUTCOMES, NOTIFIER_SENT, NOTIFIER_FAILED)

HOUR_MS = 3_600_000
WEEK_MS = 7 * 24 * HOUR_MS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int  # -1 = kept forever


def all_topics(partitions: int, portal_retention_ms: int, internal_retention_ms: int) -> list[TopicSpec]:
    """Every topic Clave needs, with its retention; `audit.events` is kept forever."""
    specs: list[TopicSpec] = []
    for name in CONSUMED + PRODUCED_ONLY:
        if name == AUDIT_EVENTS:
            retention = -1
        elif name in (RECOVERY_REQUESTS, RECOVERY_RESETS):
            # They carry what citizens typed in the clear: keep them briefly.
            retention = portal_retention_ms
        else:
            retention = internal_retention_ms
        specs.append(TopicSpec(name, partitions, retention))
    for name in CONSUMED:
        # A DLQ is kept as long as internal topics: long enough for an operator to act.
        specs.append(TopicSpec(dlq(name), partitions, internal_retention_ms))
    return specs


class EventType:
    """CloudEvents `type` values. Versioned: a breaking change gets a new `.vN`."""

    RECOVERY_REQUESTED = "ec.clave.recovery.requested.v1"
    RESET_SUBMITTED = "ec.clave.reset.submitted.v1"
    RECOVERY_OUTCOME = "ec.clave.recovery.outcome.v1"
    IDENTITY_VERIFIED = "ec.clave.identity.verified.v1"
    IDENTITY_LOCKED = "ec.clave.identity.locked.v1"
    IDENTITY_EMAIL_CHANGED = "ec.clave.identity.email_changed.v1"
    ACCOUNT_REGISTERED = "ec.clave.identity.account_registered.v1"
    OPERATOR_EMAIL_UPDATE = "ec.clave.operator.email_update.v1"
    OPERATOR_UNLOCK = "ec.clave.operator.unlock.v1"
    OPERATOR_SEND_RECOVERY = "ec.clave.operator.send_recovery.v1"
    TOKENS_ISSUED = "ec.clave.tokens.issued.v1"
    TOKENS_REDEEMED = "ec.clave.tokens.redeemed.v1"
    PASSWORD_UPDATED = "ec.clave.password.updated.v1"
    PASSWORD_REJECTED = "ec.clave.password.rejected.v1"
    NOTIFIER_SENT = "ec.clave.notifier.sent.v1"
    NOTIFIER_FAILED = "ec.clave.notifier.failed.v1"
    AUDIT = "ec.clave.audit.v1"
    DEAD_LETTER = "ec.clave.dead_letter.v1"
