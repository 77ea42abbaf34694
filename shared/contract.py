"""Who publishes and consumes each topic, what each topic carries and how it is keyed.

The one table of the topic contract that is not in the topic names themselves
(shared/topics.py) or the payload models (shared/schemas.py). The AsyncAPI document
(docs/asyncapi.yaml, built by clave/asyncapi.py) and the Kafka ACLs (shared/acl.py, one
principal per service and per entry of `CLIENTS`) are both made from it: a topic a service
starts to consume or produce is granted on the broker once it is listed here.

Rules that are not listed per service, because they hold for every one:

- a service also writes the `.dlq` twin of every topic it consumes, and `audit.events`;
- a service consumes in one group, `clave-<service>`;
- a service names itself `/clave/<service>` as the CloudEvents `source` of what it emits, and
  consumers check it (`expected_sources`).

tests/unit/test_contract.py checks the table against the code: each service's
subscriptions and the event types it routes, the topics its modules name, and the
dead letters the consumer really writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from shared import topics as t
from shared.topics import EventType


@dataclass(frozen=True)
class ServiceTopics:
    consumes: tuple[str, ...]
    produces: tuple[str, ...]


# What each service process consumes (services/<name>/app.py) and emits through its outbox
# (besides its DLQs and audit events).
SERVICES: dict[str, ServiceTopics] = {
    "identity": ServiceTopics(
        consumes=(
            t.RECOVERY_REQUESTS,
            t.PASSWORD_UPDATED,
            t.IDENTITY_COMMANDS,
            t.TOKENS_CODE_REJECTED,
            t.PASSWORD_CONTACT_AUTHORIZED,  # a contact update whose key the password service checked
            t.IDENTITY_OPERATOR_KEYS,  # the registry of operator public keys (written by `admin` only)
        ),
        produces=(
            t.RECOVERY_OUTCOMES,  # "accepted" for every request ("rejected": a repeat, or unreadable)
            t.IDENTITY_VERIFIED,
            t.IDENTITY_DECLINED,  # every request not verified: the tokens service keeps a decoy
            t.IDENTITY_LOCKED,
            t.IDENTITY_EMAIL_CHANGED,
            t.IDENTITY_ACCOUNT_REGISTERED,  # the registry import (`clave accounts import`)
            t.IDENTITY_CONTACT_CHANGED,
            t.CONTACT_RESULTS,  # `updated`, or `rejected` for contact data that is not valid
            t.IDENTITY_EMAIL_CHANGE_REQUESTED,  # both addresses are told before a change takes effect
            t.IDENTITY_COMMAND_RESULTS,  # what became of each operator command, for the operator
        ),
    ),
    "tokens": ServiceTopics(
        consumes=(
            t.IDENTITY_VERIFIED,
            t.IDENTITY_DECLINED,
            t.RECOVERY_RESETS,
            t.PASSWORD_UPDATED,
            t.PASSWORD_REJECTED,
            t.IDENTITY_EMAIL_CHANGED,
            t.IDENTITY_CONTACT_CHANGED,  # revokes live tokens
        ),
        produces=(t.TOKENS_ISSUED, t.TOKENS_REDEEMED, t.TOKENS_CODE_REJECTED, t.RECOVERY_OUTCOMES),
    ),
    "notifier": ServiceTopics(
        consumes=(
            t.TOKENS_ISSUED,
            t.PASSWORD_UPDATED,
            t.IDENTITY_LOCKED,
            t.IDENTITY_EMAIL_CHANGED,
            t.IDENTITY_CONTACT_CHANGED,  # tells every old address
            t.IDENTITY_EMAIL_CHANGE_REQUESTED,
        ),
        produces=(t.NOTIFIER_SENT, t.NOTIFIER_FAILED),
    ),
    "password": ServiceTopics(
        consumes=(t.TOKENS_REDEEMED, t.IDENTITY_ACCOUNT_REGISTERED, t.LOGIN_CHECKS, t.CONTACT_UPDATES),
        produces=(
            t.PASSWORD_UPDATED,
            t.PASSWORD_REJECTED,
            t.LOGIN_RESULTS,
            t.ACCOUNT_KEY_CHANGED,
            t.PASSWORD_CONTACT_AUTHORIZED,  # the key checked: identity applies the change
            t.CONTACT_RESULTS,  # `rejected` for a wrong key
        ),
    ),
    "audit": ServiceTopics(consumes=(t.AUDIT_EVENTS,), produces=()),
}

# The people-facing parties (their Kafka principals, shared/acl.py): what they write and read.
CLIENTS: dict[str, ServiceTopics] = {
    "portal": ServiceTopics(
        consumes=(t.RECOVERY_OUTCOMES, t.LOGIN_RESULTS, t.ACCOUNT_KEY_CHANGED, t.CONTACT_RESULTS),
        produces=(t.RECOVERY_REQUESTS, t.RECOVERY_RESETS, t.LOGIN_CHECKS, t.CONTACT_UPDATES),
    ),
    # The `clave` command: signed commands; their results on a narrow topic (not the audit log).
    "operator": ServiceTopics(consumes=(t.IDENTITY_COMMAND_RESULTS,), produces=(t.IDENTITY_COMMANDS,)),
    "auditor": ServiceTopics(consumes=(t.AUDIT_EVENTS,), produces=()),
}

PORTAL_FACING = (
    t.RECOVERY_REQUESTS,
    t.RECOVERY_RESETS,
    t.RECOVERY_OUTCOMES,
    t.LOGIN_CHECKS,
    t.LOGIN_RESULTS,
    t.ACCOUNT_KEY_CHANGED,
    t.CONTACT_UPDATES,
    t.CONTACT_RESULTS,
)

# Written by the `admin` principal alone (a broker super user, which needs no ACL): no ACL lets
# anyone else write them. The operator key registry: only admin decides who is an operator.
ADMIN_ONLY = (t.IDENTITY_OPERATOR_KEYS,)


def group_id(service: str) -> str:
    """The one consumer group of a service (shared.runtime.Service.group_id)."""
    return f"clave-{service}"


def writes(service: str) -> tuple[str, ...]:
    """Every topic a service writes: what it produces, its DLQs and the audit log."""
    spec = SERVICES[service]
    dlqs = tuple(t.dlq(name) for name in spec.consumes)
    return tuple(dict.fromkeys((*spec.produces, *dlqs, t.AUDIT_EVENTS)))


def source_of(service: str) -> str:
    """The CloudEvents `source` of every event a service emits."""
    return f"/clave/{service}"


def expected_sources(topic: str) -> frozenset[str] | None:
    """The `source`s an event on `topic` may carry: those of the services that write it (for
    `audit.events`, every service). None for a topic a people-facing client writes (the portal,
    the operator's command) or `admin` alone (ADMIN_ONLY): they name themselves as they like, and
    the broker's ACLs are what prove them. A topic no one writes accepts no source."""
    if topic in ADMIN_ONLY or any(topic in spec.produces for spec in CLIENTS.values()):
        return None  # admin's operator key registry: its broker ACL (admin alone) is the proof
    return frozenset(source_of(service) for service in SERVICES if topic in writes(service))


@dataclass(frozen=True)
class TopicContract:
    types: tuple[str, ...]  # the CloudEvents `type` values it carries
    key: str  # what the Kafka record key is
    summary: str


TOPICS: dict[str, TopicContract] = {
    t.RECOVERY_REQUESTS: TopicContract(
        (EventType.RECOVERY_REQUESTED,),
        "The national ID as the citizen typed it (all of one citizen's requests in one partition).",
        "A citizen asks to recover their key.",
    ),
    t.RECOVERY_RESETS: TopicContract(
        (EventType.RESET_SUBMITTED,),
        "The `request_id`.",
        "A citizen submits the link's token (or the code) and a new key.",
    ),
    t.RECOVERY_OUTCOMES: TopicContract(
        (EventType.RECOVERY_OUTCOME,),
        "The `request_id`.",
        "Clave's answer to the portal: `accepted` for every request, `completed` or `rejected` for a reset; "
        "`rejected` for a request only when it repeats a `request_id` or cannot be processed (`request_invalid`).",
    ),
    t.LOGIN_CHECKS: TopicContract(
        (EventType.LOGIN_CHECK_REQUESTED,),
        "The national ID as the citizen typed it.",
        "The portal asks whether a key is the citizen's (a login): answered on `login.results` by `check_id`.",
    ),
    t.LOGIN_RESULTS: TopicContract(
        (EventType.LOGIN_RESULT,),
        "The `check_id`.",
        "The password service's answer to a credential check: `valid` or `invalid`, the same for an unknown ID "
        "as for a wrong key.",
    ),
    t.ACCOUNT_KEY_CHANGED: TopicContract(
        (EventType.ACCOUNT_KEY_CHANGED,),
        "The national ID (normalised: digits only).",
        "A citizen's key changed (a recovery, or the initial key from the registry): end their other sessions.",
    ),
    t.CONTACT_UPDATES: TopicContract(
        (EventType.CONTACT_UPDATE_REQUESTED,),
        "The national ID as the citizen typed it.",
        "A logged-in citizen changes their contact data (e-mail, backup e-mail, phone), with the current key "
        "(checked as a login is, same throttling).",
    ),
    t.CONTACT_RESULTS: TopicContract(
        (EventType.CONTACT_RESULT,),
        "The `update_id`.",
        "Clave's answer to a contact update: `updated`, or `rejected` with reasons.",
    ),
    t.PASSWORD_CONTACT_AUTHORIZED: TopicContract(
        (EventType.CONTACT_AUTHORIZED,),
        "The internal `account_id`.",
        "A contact update whose key the password service checked (the key is not in it): identity applies it.",
    ),
    t.IDENTITY_CONTACT_CHANGED: TopicContract(
        (EventType.IDENTITY_CONTACT_CHANGED,),
        "The internal `account_id`.",
        "An account's contact data changed: revoke live tokens, tell every address on file before.",
    ),
    t.IDENTITY_VERIFIED: TopicContract(
        (EventType.IDENTITY_VERIFIED,),
        "The internal `account_id`.",
        "A request passed every check (or an operator asked for a recovery e-mail): issue a token.",
    ),
    t.IDENTITY_LOCKED: TopicContract(
        (EventType.IDENTITY_LOCKED,),
        "The internal `account_id`.",
        "An account was locked after repeated failures: tell the citizen how to unblock it.",
    ),
    t.IDENTITY_EMAIL_CHANGED: TopicContract(
        (EventType.IDENTITY_EMAIL_CHANGED,),
        "The internal `account_id`.",
        "An operator changed an account's e-mail: revoke live tokens, tell the old and the new address.",
    ),
    t.IDENTITY_ACCOUNT_REGISTERED: TopicContract(
        (EventType.ACCOUNT_REGISTERED,),
        "The internal `account_id`.",
        "An account came from the registry import, with its initial key sealed for the password service.",
    ),
    t.IDENTITY_COMMANDS: TopicContract(
        (
            EventType.OPERATOR_EMAIL_UPDATE,
            EventType.OPERATOR_UNLOCK,
            EventType.OPERATOR_SEND_RECOVERY,
            EventType.OPERATOR_CONTACT_UPDATE,
            EventType.OPERATOR_APPROVE,
            EventType.OPERATOR_ACCOUNT_IMPORT,
            EventType.OPERATOR_CANCEL,
        ),
        "The national ID the command is about (an approval or a cancellation: the id of the command it "
        "approves or cancels).",
        "Operator commands from the `clave` command, each signed with the operator's Ed25519 key (with an "
        "operator id and a reason). Unsigned, badly signed, unknown-operator, expired or replayed commands are "
        "dead-lettered with their reason.",
    ),
    t.IDENTITY_OPERATOR_KEYS: TopicContract(
        (EventType.OPERATOR_KEY_REGISTERED, EventType.OPERATOR_KEY_REVOKED),
        "The operator id.",
        "The registry of operator public keys. Only the `admin` principal may write it (no ACL grants it to "
        "anyone else); identity audits each change. Kept forever.",
    ),
    t.IDENTITY_COMMAND_RESULTS: TopicContract(
        (EventType.OPERATOR_COMMAND_RESULT,),
        "The command id.",
        "What became of each operator command (done, refused with reasons, pending approval, applied): what the "
        "operator reads instead of the audit log.",
    ),
    t.IDENTITY_EMAIL_CHANGE_REQUESTED: TopicContract(
        (EventType.IDENTITY_EMAIL_CHANGE_REQUESTED, EventType.IDENTITY_EMAIL_CHANGE_CANCELLED),
        "The internal `account_id`.",
        "An e-mail change was requested: tell the old and the new address before it takes effect (after a "
        "second operator's approval and the cooling-off period). Or an operator cancelled a pending one: tell "
        "both addresses it will not take effect.",
    ),
    t.IDENTITY_DECLINED: TopicContract(
        (EventType.IDENTITY_DECLINED,),
        "The internal `account_id`, or the keyed hash of the national ID (`subject_ref`) when it names no account.",
        "A request that was not verified: the tokens service keeps a decoy, so a reset answers alike.",
    ),
    t.TOKENS_ISSUED: TopicContract(
        (EventType.TOKENS_ISSUED,),
        "The internal `account_id`.",
        "A link token and a code were issued, sealed for the notifier.",
    ),
    t.TOKENS_REDEEMED: TopicContract(
        (EventType.TOKENS_REDEEMED,),
        "The internal `account_id`.",
        "A token was reserved for a reset; the new key is sealed for the password service.",
    ),
    t.TOKENS_CODE_REJECTED: TopicContract(
        (EventType.TOKENS_CODE_REJECTED,),
        "The internal `account_id`, or the keyed hash of the national ID (`subject_ref`) for a decoy.",
        "A wrong code was typed: identity counts it towards the lockout.",
    ),
    t.PASSWORD_UPDATED: TopicContract(
        (EventType.PASSWORD_UPDATED,),
        "The internal `account_id`.",
        "A new key was stored: spend the token, unlock the account, tell the citizen.",
    ),
    t.PASSWORD_REJECTED: TopicContract(
        (EventType.PASSWORD_REJECTED,),
        "The internal `account_id`.",
        "A new key was refused, with every reason: release the token so the link works again.",
    ),
    t.NOTIFIER_SENT: TopicContract(
        (EventType.NOTIFIER_SENT,),
        "The internal `account_id`.",
        "An e-mail was accepted by the SMTP relay.",
    ),
    t.NOTIFIER_FAILED: TopicContract(
        (EventType.NOTIFIER_FAILED,),
        "The internal `account_id`.",
        "An e-mail could not be sent after every retry.",
    ),
    t.AUDIT_EVENTS: TopicContract(
        (EventType.AUDIT,),
        "The producing service (`identity`, `tokens`, ...): one service's hash chain stays in one partition, in order.",
        "The audit log of record: every state change of every service, hash-chained per service. Kept forever.",
    ),
}

DLQ_KEY = (
    "The original record's key (the `.dlq` twin keeps its partitioning), or `topic/partition/offset` "
    "of the original when it had none."
)


def carried_by(topic: str) -> tuple[str, ...]:
    """The event types on a topic: a `.dlq` twin carries dead letters only."""
    if topic.endswith(t.DLQ_SUFFIX):
        return (EventType.DEAD_LETTER,)
    return TOPICS[topic].types


def record_key(topic: str) -> str:
    return DLQ_KEY if topic.endswith(t.DLQ_SUFFIX) else TOPICS[topic].key


# ---- the dead letter ---------------------------------------------------------------------------


class DeadLetter(BaseModel):
    """A record its consumer could never process (shared/consumer.py): why, where it was, and its
    bytes sealed with DLQ_KEYS (they may hold what a citizen typed)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: str = Field(description="Why the record could not be processed (also the header `clave-dlq-reason`).")
    detail: str = Field(
        description="Field paths and messages, never the offending values; printable ASCII, at most 500 "
        "characters (as the header `clave-dlq-detail`)."
    )
    origin_topic: str = Field(description="The topic the record was read from.")
    origin_partition: int = Field(ge=0, description="Its partition.")
    origin_offset: int = Field(ge=0, description="Its offset.")
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the original bytes, hex.")
    payload_bytes: int = Field(ge=0, description="Length of the original bytes.")
    sealed_payload: str = Field(
        description="The original bytes, sealed with DLQ_KEYS (Fernet token); of a too_large record, its first "
        "MAX_EVENT_BYTES, so the letter always fits in a Kafka record."
    )
    sealed_bytes: int = Field(ge=0, description="How many of the original bytes `sealed_payload` holds.")


# Kafka record headers of a dead letter (besides `content-type`), what each holds.
DLQ_HEADERS: dict[str, str] = {
    "clave-dlq-reason": "The reason code (as `data.reason`).",
    "clave-dlq-detail": "The detail, printable ASCII, at most 500 characters, never an input value.",
    "clave-origin-topic": "The topic of the original record.",
    "clave-origin-partition": "Its partition, in decimal.",
    "clave-origin-offset": "Its offset, in decimal.",
}
