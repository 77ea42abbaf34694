"""Who may do what on Kafka: the one table the local stack and the production
provisioning script (deploy/kafka/provision.py) turn into broker ACLs.

Least privilege, derived from the topic contract (shared/topics.py):

- a service writes the topics it produces, the DLQ twin of each topic it consumes and
  `audit.events`; it reads only what it consumes, in its own consumer group `clave-<service>`;
- the portal writes the two portal inputs and reads `recovery.outcomes` (groups `portal…`);
- the operator writes `identity.commands` and reads `audit.events`, the only place where
  identity reports a command's result (no consumer group: the CLI reads by assignment);
- the auditor reads `audit.events` (groups `auditor…`);
- `admin` is a broker super user (topic and ACL administration, the test suite's observer)
  and gets no ACL here.

Everything not listed is refused: the brokers run with `allow.everyone.if.no.acl.found=false`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from shared import topics as t


@dataclass(frozen=True)
class ServiceTopics:
    consumes: tuple[str, ...]
    produces: tuple[str, ...]


# What each service process consumes (services/<name>/app.py) and emits (its handlers'
# outgoing events, through the outbox relay). tests/unit/test_acl.py checks both against
# the code, so a new subscription or event fails there until this table allows it.
SERVICES: dict[str, ServiceTopics] = {
    "identity": ServiceTopics(
        consumes=(t.RECOVERY_REQUESTS, t.PASSWORD_UPDATED, t.IDENTITY_COMMANDS),
        produces=(
            t.IDENTITY_VERIFIED,
            t.IDENTITY_LOCKED,
            t.IDENTITY_EMAIL_CHANGED,
            t.IDENTITY_ACCOUNT_REGISTERED,
            t.RECOVERY_OUTCOMES,  # "accepted" for every request
        ),
    ),
    "tokens": ServiceTopics(
        consumes=(
            t.IDENTITY_VERIFIED,
            t.RECOVERY_RESETS,
            t.PASSWORD_UPDATED,
            t.PASSWORD_REJECTED,
            t.IDENTITY_EMAIL_CHANGED,
        ),
        produces=(t.TOKENS_ISSUED, t.TOKENS_REDEEMED, t.RECOVERY_OUTCOMES),  # the reset's outcome
    ),
    "notifier": ServiceTopics(
        consumes=(t.TOKENS_ISSUED, t.PASSWORD_UPDATED, t.IDENTITY_LOCKED, t.IDENTITY_EMAIL_CHANGED),
        produces=(t.NOTIFIER_SENT, t.NOTIFIER_FAILED),
    ),
    "password": ServiceTopics(
        consumes=(t.TOKENS_REDEEMED, t.IDENTITY_ACCOUNT_REGISTERED),
        produces=(t.PASSWORD_UPDATED, t.PASSWORD_REJECTED),
    ),
    "audit": ServiceTopics(consumes=(t.AUDIT_EVENTS,), produces=()),
}

ADMIN = "admin"
PORTAL = "portal"
OPERATOR = "operator"
AUDITOR = "auditor"

# Every SCRAM principal Clave uses, one per process role.
PRINCIPALS: tuple[str, ...] = (ADMIN, PORTAL, OPERATOR, AUDITOR, *SERVICES)
SUPER_USERS: tuple[str, ...] = (ADMIN,)


def group_id(service: str) -> str:
    """The one consumer group of a service (shared.runtime.Service.group_id)."""
    return f"clave-{service}"


# Kafka's wire codes (org.apache.kafka.common.acl / resource); the names read as in kafka-acls.
class ResourceType(IntEnum):
    TOPIC = 2
    GROUP = 3
    CLUSTER = 4
    TRANSACTIONAL_ID = 5


class PatternType(IntEnum):
    LITERAL = 3
    PREFIXED = 4


class Operation(IntEnum):
    READ = 3
    WRITE = 4
    CREATE = 5
    DELETE = 6
    ALTER = 7
    DESCRIBE = 8
    IDEMPOTENT_WRITE = 12


ALLOW = 3  # AclPermissionType.ALLOW; nothing here ever needs DENY: no ACL means refused


@dataclass(frozen=True, order=True)
class Acl:
    """One ALLOW binding: `principal` may `operation` on the resource (from any host)."""

    principal: str  # the SCRAM user name; the broker's principal is User:<name>
    operation: Operation
    resource_type: ResourceType
    resource_name: str
    pattern: PatternType = PatternType.LITERAL

    @property
    def kafka_principal(self) -> str:
        return f"User:{self.principal}"

    def __str__(self) -> str:
        pattern = "" if self.pattern is PatternType.LITERAL else f" ({self.pattern.name.lower()})"
        return f"{self.kafka_principal} {self.operation.name} {self.resource_type.name} {self.resource_name}{pattern}"


def _topics(principal: str, operation: Operation, names: tuple[str, ...] | list[str]) -> list[Acl]:
    return [Acl(principal, operation, ResourceType.TOPIC, name) for name in names]


def service_acls(service: str) -> list[Acl]:
    """READ (implies DESCRIBE) on what it consumes; WRITE on what it produces, its DLQs and
    the audit log; READ on its own group (JoinGroup, OffsetCommit, and OffsetFetch for the
    lag monitor). WRITE on any topic also lets its producers be idempotent (KIP-679)."""
    spec = SERVICES[service]
    writes = sorted({*spec.produces, *(t.dlq(name) for name in spec.consumes), t.AUDIT_EVENTS})
    return [
        *_topics(service, Operation.READ, spec.consumes),
        *_topics(service, Operation.WRITE, writes),
        Acl(service, Operation.READ, ResourceType.GROUP, group_id(service)),
    ]


def user_acls() -> list[Acl]:
    """The three people-facing principals."""
    return [
        *_topics(PORTAL, Operation.WRITE, (t.RECOVERY_REQUESTS, t.RECOVERY_RESETS)),
        *_topics(PORTAL, Operation.READ, (t.RECOVERY_OUTCOMES,)),
        Acl(PORTAL, Operation.READ, ResourceType.GROUP, PORTAL, PatternType.PREFIXED),
        *_topics(OPERATOR, Operation.WRITE, (t.IDENTITY_COMMANDS,)),
        *_topics(OPERATOR, Operation.READ, (t.AUDIT_EVENTS,)),
        *_topics(AUDITOR, Operation.READ, (t.AUDIT_EVENTS,)),
        Acl(AUDITOR, Operation.READ, ResourceType.GROUP, AUDITOR, PatternType.PREFIXED),
    ]


def all_acls() -> list[Acl]:
    """Every ALLOW binding Clave needs, sorted (stable output for reports and diffs)."""
    return sorted({*(a for s in SERVICES for a in service_acls(s)), *user_acls()})


def writers(topic: str) -> set[str]:
    """Principals that may write `topic` (the owners a consumer may expect as `source`)."""
    return {a.principal for a in all_acls() if a.resource_name == topic and a.operation is Operation.WRITE}


def readers(topic: str) -> set[str]:
    return {a.principal for a in all_acls() if a.resource_name == topic and a.operation is Operation.READ}
