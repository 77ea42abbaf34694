"""Topic names and event types: the wire contract (see README, "Topic contract").

Portal-facing names are public and frozen; internal ones follow `<service>.<event>`.
Every consumed topic has a `.dlq` twin.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# Portal-facing (public contract).
RECOVERY_REQUESTS = "recovery.requests"
RECOVERY_RESETS = "recovery.resets"
RECOVERY_OUTCOMES = "recovery.outcomes"
LOGIN_CHECKS = "login.checks"  # portal -> password: is this the citizen's key?
LOGIN_RESULTS = "login.results"  # password -> portal: valid / invalid, keyed by check_id
ACCOUNT_KEY_CHANGED = "account.key_changed"  # password -> portal: end the citizen's other sessions
CONTACT_UPDATES = "account.contact_updates"
CONTACT_RESULTS = "account.contact_results"

# Internal.
IDENTITY_VERIFIED = "identity.verified"
IDENTITY_LOCKED = "identity.locked"
IDENTITY_EMAIL_CHANGED = "identity.email_changed"
IDENTITY_ACCOUNT_REGISTERED = "identity.account_registered"
IDENTITY_COMMANDS = "identity.commands"
IDENTITY_DECLINED = "identity.declined"
IDENTITY_CONTACT_CHANGED = "identity.contact_changed"
PASSWORD_CONTACT_AUTHORIZED = "password.contact_authorized"
# Operators (issue 9): the registry of their public keys (written by `admin` alone), the results
# of their commands (read by the operator), and the notice of a requested e-mail change.
IDENTITY_OPERATOR_KEYS = "identity.operator_keys"
IDENTITY_COMMAND_RESULTS = "identity.command_results"
IDENTITY_EMAIL_CHANGE_REQUESTED = "identity.email_change_requested"
TOKENS_ISSUED = "tokens.issued"
TOKENS_REDEEMED = "tokens.redeemed"
TOKENS_CODE_REJECTED = "tokens.code_rejected"
PASSWORD_UPDATED = "password.updated"
PASSWORD_REJECTED = "password.rejected"
NOTIFIER_SENT = "notifier.sent"
NOTIFIER_FAILED = "notifier.failed"
AUDIT_EVENTS = "audit.events"

DLQ_SUFFIX = ".dlq"


def dlq(topic: str) -> str:
    return topic + DLQ_SUFFIX


# Topics some service consumes: each gets a DLQ twin (`audit.events` too: without its twin, the
# audit service's relay could never publish a letter of the audit read model).
CONSUMED = (
    RECOVERY_REQUESTS,
    RECOVERY_RESETS,
    IDENTITY_VERIFIED,
    IDENTITY_LOCKED,
    IDENTITY_EMAIL_CHANGED,
    IDENTITY_ACCOUNT_REGISTERED,
    IDENTITY_COMMANDS,
    IDENTITY_DECLINED,
    IDENTITY_CONTACT_CHANGED,
    CONTACT_UPDATES,
    PASSWORD_CONTACT_AUTHORIZED,
    IDENTITY_OPERATOR_KEYS,
    IDENTITY_EMAIL_CHANGE_REQUESTED,
    TOKENS_ISSUED,
    TOKENS_REDEEMED,
    TOKENS_CODE_REJECTED,
    PASSWORD_UPDATED,
    PASSWORD_REJECTED,
    AUDIT_EVENTS,  # by the audit read model, which dead-letters what it cannot project
    LOGIN_CHECKS,
)

PRODUCED_ONLY = (
    RECOVERY_OUTCOMES,
    NOTIFIER_SENT,
    NOTIFIER_FAILED,
    LOGIN_RESULTS,
    ACCOUNT_KEY_CHANGED,
    CONTACT_RESULTS,
    IDENTITY_COMMAND_RESULTS,
)
# Kept forever: the audit log, and the operator key registry (its log of record, small).
KEPT_FOREVER = (AUDIT_EVENTS, IDENTITY_OPERATOR_KEYS)

# What citizens typed, in the clear: short retention, off the disk soon after (portal_input).
PORTAL_INPUTS = (RECOVERY_REQUESTS, RECOVERY_RESETS, LOGIN_CHECKS, CONTACT_UPDATES)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
WEEK_MS = 7 * 24 * HOUR_MS

# Kafka deletes whole segments: one goes once its newest record is past retention.ms, at the
# broker's next retention check (log.retention.check.interval.ms, 5 min), and its files
# file.delete.delay.ms later. So a record lives at most retention.ms + segment.ms + check
# interval + delete delay: with the broker's default segment.ms (7 days) a busy portal input
# topic kept what citizens typed for days. Portal inputs roll a segment every half retention
# and count time by the broker's clock (a producer's timestamp cannot keep a record longer):
# 1 h + 30 min + 5 min + 1 min, gone within 1 h 36 min of being written.
PORTAL_FILE_DELETE_DELAY_MS = MINUTE_MS
RETENTION_CHECK_INTERVAL_MS = 5 * MINUTE_MS  # the broker's, set in deploy/local/stack.py


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_ms: int  # -1 = kept forever
    segment_ms: int | None = None  # None: the broker's default (7 days)
    broker_time: bool = False  # message.timestamp.type=LogAppendTime
    file_delete_delay_ms: int | None = None  # None: the broker's default (1 min)
    # In-sync copies an acks=all write needs: the cluster's (KAFKA_MIN_INSYNC_REPLICAS), None:
    # the broker's default.
    min_insync_replicas: int | None = None

    def configs(self) -> dict[str, str]:
        """The Kafka topic configs this spec sets (and create_topics.py keeps set)."""
        configs = {"retention.ms": str(self.retention_ms)}
        if self.retention_ms == -1:
            configs["retention.bytes"] = "-1"  # forever means forever: no size limit either
        if self.segment_ms is not None:
            configs["segment.ms"] = str(self.segment_ms)
        if self.broker_time:
            configs["message.timestamp.type"] = "LogAppendTime"
        if self.file_delete_delay_ms is not None:
            configs["file.delete.delay.ms"] = str(self.file_delete_delay_ms)
        if self.min_insync_replicas is not None:
            configs["min.insync.replicas"] = str(self.min_insync_replicas)
        return configs

    def kept_at_most_ms(self) -> int | None:
        """How long after it was written a record is gone from disk at the latest (None: unbounded
        by this spec: the broker's default segment.ms applies)."""
        if self.retention_ms < 0 or self.segment_ms is None or not self.broker_time:
            return None
        delay = PORTAL_FILE_DELETE_DELAY_MS if self.file_delete_delay_ms is None else self.file_delete_delay_ms
        return self.retention_ms + self.segment_ms + RETENTION_CHECK_INTERVAL_MS + delay


def portal_input(name: str, partitions: int, retention_ms: int) -> TopicSpec:
    """A topic carrying what citizens typed in the clear: off the disk soon after retention."""
    return TopicSpec(
        name,
        partitions,
        retention_ms,
        segment_ms=max(retention_ms // 2, MINUTE_MS),
        broker_time=True,
        file_delete_delay_ms=PORTAL_FILE_DELETE_DELAY_MS,
    )


def all_topics(
    partitions: int, portal_retention_ms: int, internal_retention_ms: int, min_insync_replicas: int | None = None
) -> list[TopicSpec]:
    """Every topic Clave needs, with its retention; `audit.events` is kept forever. With
    `min_insync_replicas`, every topic sets it (the provisioning passes the cluster's)."""
    specs: list[TopicSpec] = []
    for name in CONSUMED + PRODUCED_ONLY:
        if name in KEPT_FOREVER:
            specs.append(TopicSpec(name, partitions, -1))
        elif name in PORTAL_INPUTS:
            specs.append(portal_input(name, partitions, portal_retention_ms))
        else:
            specs.append(TopicSpec(name, partitions, internal_retention_ms))
    for name in CONSUMED:
        # A DLQ is kept as long as internal topics: long enough for an operator to act.
        specs.append(TopicSpec(dlq(name), partitions, internal_retention_ms))
    return [replace(s, min_insync_replicas=min_insync_replicas) for s in specs]


class EventType:
    """CloudEvents `type` values. Versioned: a breaking change gets a new `.vN`."""

    RECOVERY_REQUESTED = "ec.clave.recovery.requested.v1"
    RESET_SUBMITTED = "ec.clave.reset.submitted.v1"
    RECOVERY_OUTCOME = "ec.clave.recovery.outcome.v1"
    IDENTITY_VERIFIED = "ec.clave.identity.verified.v1"
    IDENTITY_LOCKED = "ec.clave.identity.locked.v1"
    IDENTITY_EMAIL_CHANGED = "ec.clave.identity.email_changed.v1"
    ACCOUNT_REGISTERED = "ec.clave.identity.account_registered.v1"
    IDENTITY_DECLINED = "ec.clave.identity.declined.v1"
    OPERATOR_EMAIL_UPDATE = "ec.clave.operator.email_update.v1"
    OPERATOR_UNLOCK = "ec.clave.operator.unlock.v1"
    OPERATOR_SEND_RECOVERY = "ec.clave.operator.send_recovery.v1"
    OPERATOR_CONTACT_UPDATE = "ec.clave.operator.contact_update.v1"
    CONTACT_UPDATE_REQUESTED = "ec.clave.account.contact_update_requested.v1"
    CONTACT_RESULT = "ec.clave.account.contact_result.v1"
    CONTACT_AUTHORIZED = "ec.clave.password.contact_authorized.v1"
    IDENTITY_CONTACT_CHANGED = "ec.clave.identity.contact_changed.v1"
    OPERATOR_APPROVE = "ec.clave.operator.approve.v1"
    OPERATOR_ACCOUNT_IMPORT = "ec.clave.operator.account_import.v1"
    OPERATOR_KEY_REGISTERED = "ec.clave.operator.key_registered.v1"
    OPERATOR_KEY_REVOKED = "ec.clave.operator.key_revoked.v1"
    OPERATOR_COMMAND_RESULT = "ec.clave.operator.command_result.v1"
    IDENTITY_EMAIL_CHANGE_REQUESTED = "ec.clave.identity.email_change_requested.v1"
    # Added: an operator cancels a pending e-mail change; both addresses are told (on the topic
    # of the request notice, keyed alike, so it follows that notice).
    OPERATOR_CANCEL = "ec.clave.operator.cancel.v1"
    IDENTITY_EMAIL_CHANGE_CANCELLED = "ec.clave.identity.email_change_cancelled.v1"
    TOKENS_ISSUED = "ec.clave.tokens.issued.v1"
    TOKENS_REDEEMED = "ec.clave.tokens.redeemed.v1"
    TOKENS_CODE_REJECTED = "ec.clave.tokens.code_rejected.v1"
    PASSWORD_UPDATED = "ec.clave.password.updated.v1"
    PASSWORD_REJECTED = "ec.clave.password.rejected.v1"
    NOTIFIER_SENT = "ec.clave.notifier.sent.v1"
    NOTIFIER_FAILED = "ec.clave.notifier.failed.v1"
    LOGIN_CHECK_REQUESTED = "ec.clave.login.check_requested.v1"
    LOGIN_RESULT = "ec.clave.login.result.v1"
    ACCOUNT_KEY_CHANGED = "ec.clave.account.key_changed.v1"
    AUDIT = "ec.clave.audit.v1"
    DEAD_LETTER = "ec.clave.dead_letter.v1"
