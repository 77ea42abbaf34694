"""Who may do what on Kafka: the broker ACLs that the local stack and the production
provisioning script (deploy/kafka/provision.py) create.

Derived from the one table of who consumes and produces what, shared/contract.py
(`SERVICES`, `CLIENTS`), never listed twice. Least privilege:

- a service reads only what it consumes, in its own consumer group `clave-<service>`, and
  writes `contract.writes(service)`: what it produces, the DLQ twin of each topic it
  consumes and `audit.events`;
- a people-facing principal (`CLIENTS`) writes what it produces and reads what it consumes:
  the portal writes the two portal inputs and reads `recovery.outcomes`, the operator writes
  `identity.commands` and reads `audit.events` (the only place where identity reports a
  command's result), the auditor reads `audit.events`. The portal and the auditor consume in
  groups named with their own prefix (`portal…`, `auditor…`); the operator's CLI reads by
  assignment and gets no group;
- `admin` is a broker super user (topic and ACL administration, the test suite's observer)
  and gets no ACL here.

Everything not listed is refused: the brokers run with `allow.everyone.if.no.acl.found=false`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from shared.contract import CLIENTS, SERVICES, group_id, writes

ADMIN = "admin"
PORTAL = "portal"
OPERATOR = "operator"
AUDITOR = "auditor"
# The people-facing principals that consume in consumer groups of their own prefix.
GROUPED_CLIENTS: tuple[str, ...] = (PORTAL, AUDITOR)

# Every SCRAM principal Clave uses, one per process role.
PRINCIPALS: tuple[str, ...] = (ADMIN, *CLIENTS, *SERVICES)
SUPER_USERS: tuple[str, ...] = (ADMIN,)


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


def _topics(principal: str, operation: Operation, names: tuple[str, ...]) -> list[Acl]:
    return [Acl(principal, operation, ResourceType.TOPIC, name) for name in names]


def service_acls(service: str) -> list[Acl]:
    """READ (implies DESCRIBE) on what it consumes; WRITE on what it produces, its DLQs and
    the audit log; READ on its own group (JoinGroup, OffsetCommit, and OffsetFetch for the
    lag monitor). WRITE on any topic also lets its producers be idempotent (KIP-679)."""
    return [
        *_topics(service, Operation.READ, SERVICES[service].consumes),
        *_topics(service, Operation.WRITE, writes(service)),
        Acl(service, Operation.READ, ResourceType.GROUP, group_id(service)),
    ]


def client_acls(client: str) -> list[Acl]:
    """A people-facing principal: WRITE on what it produces, READ on what it consumes, and
    READ on the consumer groups of its own prefix if it consumes in groups."""
    spec = CLIENTS[client]
    groups = [Acl(client, Operation.READ, ResourceType.GROUP, client, PatternType.PREFIXED)]
    return [
        *_topics(client, Operation.WRITE, spec.produces),
        *_topics(client, Operation.READ, spec.consumes),
        *(groups if client in GROUPED_CLIENTS else []),
    ]


def all_acls() -> list[Acl]:
    """Every ALLOW binding Clave needs, sorted (stable output for reports and diffs)."""
    return sorted({*(a for s in SERVICES for a in service_acls(s)), *(a for c in CLIENTS for a in client_acls(c))})


def writers(topic: str) -> set[str]:
    """Principals that may write `topic` (the owners a consumer may expect as `source`)."""
    return {a.principal for a in all_acls() if a.resource_name == topic and a.operation is Operation.WRITE}


def readers(topic: str) -> set[str]:
    return {a.principal for a in all_acls() if a.resource_name == topic and a.operation is Operation.READ}
