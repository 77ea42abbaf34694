"""Provision a Kafka cluster for Clave: its topics, then its ACLs (idempotent).

    python deploy/kafka/provision.py [--replication-factor N] [--describe]

The production deployments run it as a one-off job from the service image
(deploy/compose: the `kafka-provision` service; deploy/helm/clave: a pre-install and
pre-upgrade hook Job) with KAFKA_REPLICATION_FACTOR=3 and KAFKA_MIN_INSYNC_REPLICAS=2.
It connects with the KAFKA_* settings of shared/settings.py as a principal allowed to
create topics and ACLs (`admin`, a super user of the brokers).

1. Topics: every topic of shared/topics.py `all_topics`, with the documented retentions
   (portal inputs 1 h, internal topics and DLQs 7 days, `audit.events` forever),
   replication factor and `min.insync.replicas` (deploy/local/create_topics.py, which the
   local stack also uses). Existing topics are left alone; a difference is reported.
2. ACLs: every ALLOW binding of `all_acls()`; creating one that exists changes nothing.
   The brokers refuse whatever no ACL allows (`allow.everyone.if.no.acl.found=false`).

SCRAM users are not created here (aiokafka has no AlterUserScramCredentials): the
compose stack's `kafka-users` job does it with kafka-configs.sh; a Kubernetes cluster's
Kafka operator does it from `PRINCIPALS`.

TODO(integrator): the ACL table below stands in for the shared one of issue 9
("Every principal proven", shared/acl.py with its own deploy/kafka/provision.py). When that
lands it replaces this file: keep the names the deployment files and their tests use
(`PRINCIPALS`, `all_acls()`, the `--replication-factor` option, KAFKA_REPLICATION_FACTOR and
KAFKA_MIN_INSYNC_REPLICAS through create_topics.run).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

# Runnable as a file from any directory: the repository root holds `shared` (in the image
# it is installed), deploy/local the topic creation shared with the local stack.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import create_topics  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from aiokafka.protocol.admin import CreateAclsRequest  # noqa: E402

from shared import topics as t  # noqa: E402

# What each service consumes (services/<name>/app.py) and produces (through its outbox).
CONSUMES: dict[str, tuple[str, ...]] = {
    "identity": (t.RECOVERY_REQUESTS, t.PASSWORD_UPDATED, t.IDENTITY_COMMANDS),
    "tokens": (
        t.IDENTITY_VERIFIED,
        t.RECOVERY_RESETS,
        t.PASSWORD_UPDATED,
        t.PASSWORD_REJECTED,
        t.IDENTITY_EMAIL_CHANGED,
    ),
    "notifier": (t.TOKENS_ISSUED, t.PASSWORD_UPDATED, t.IDENTITY_LOCKED, t.IDENTITY_EMAIL_CHANGED),
    "password": (t.TOKENS_REDEEMED, t.IDENTITY_ACCOUNT_REGISTERED),
    "audit": (t.AUDIT_EVENTS,),
}
PRODUCES: dict[str, tuple[str, ...]] = {
    "identity": (
        t.IDENTITY_VERIFIED,
        t.IDENTITY_LOCKED,
        t.IDENTITY_EMAIL_CHANGED,
        t.IDENTITY_ACCOUNT_REGISTERED,
        t.RECOVERY_OUTCOMES,
    ),
    "tokens": (t.TOKENS_ISSUED, t.TOKENS_REDEEMED, t.RECOVERY_OUTCOMES),
    "notifier": (t.NOTIFIER_SENT, t.NOTIFIER_FAILED),
    "password": (t.PASSWORD_UPDATED, t.PASSWORD_REJECTED),
    "audit": (),
}
SERVICES = tuple(CONSUMES)
ADMIN, PORTAL, OPERATOR, AUDITOR = "admin", "portal", "operator", "auditor"
# Every SCRAM principal: admin (a super user: no ACL), the three people-facing ones, and
# one per service process.
PRINCIPALS: tuple[str, ...] = (ADMIN, PORTAL, OPERATOR, AUDITOR, *SERVICES)


class ResourceType(IntEnum):  # Kafka's wire codes
    TOPIC = 2
    GROUP = 3


class Operation(IntEnum):
    READ = 3
    WRITE = 4


class Pattern(IntEnum):
    LITERAL = 3
    PREFIXED = 4


ALLOW = 3
ANY_HOST = "*"


@dataclass(frozen=True, order=True)
class Acl:
    principal: str
    operation: Operation
    resource_type: ResourceType
    resource_name: str
    pattern: Pattern = Pattern.LITERAL

    def __str__(self) -> str:
        prefixed = " (prefixed)" if self.pattern is Pattern.PREFIXED else ""
        return f"User:{self.principal} {self.operation.name} {self.resource_type.name} {self.resource_name}{prefixed}"


def _topics(principal: str, operation: Operation, names: tuple[str, ...]) -> list[Acl]:
    return [Acl(principal, operation, ResourceType.TOPIC, name) for name in names]


def all_acls() -> list[Acl]:
    """Least privilege: a service reads what it consumes in its own group `clave-<service>`
    and writes what it produces, the DLQ twins of what it consumes and `audit.events`; the
    portal writes its two inputs and reads the outcomes; the operator writes commands and
    reads their audited results; the auditor reads the audit log."""
    acls: list[Acl] = []
    for service in SERVICES:
        # The DLQ twins of what it consumes (every topic of shared/topics.py DEAD_LETTERED has one).
        dlqs = {t.dlq(n) for n in CONSUMES[service] if n in t.DEAD_LETTERED}
        writes = tuple(sorted({*PRODUCES[service], *dlqs, t.AUDIT_EVENTS}))
        acls += _topics(service, Operation.READ, CONSUMES[service])
        acls += _topics(service, Operation.WRITE, writes)
        acls.append(Acl(service, Operation.READ, ResourceType.GROUP, f"clave-{service}"))
    acls += _topics(PORTAL, Operation.WRITE, (t.RECOVERY_REQUESTS, t.RECOVERY_RESETS))
    acls += _topics(PORTAL, Operation.READ, (t.RECOVERY_OUTCOMES,))
    acls.append(Acl(PORTAL, Operation.READ, ResourceType.GROUP, PORTAL, Pattern.PREFIXED))
    acls += _topics(OPERATOR, Operation.WRITE, (t.IDENTITY_COMMANDS,))
    acls += _topics(OPERATOR, Operation.READ, (t.AUDIT_EVENTS,))
    acls += _topics(AUDITOR, Operation.READ, (t.AUDIT_EVENTS,))
    acls.append(Acl(AUDITOR, Operation.READ, ResourceType.GROUP, AUDITOR, Pattern.PREFIXED))
    return sorted(set(acls))


async def provision_acls(describe: bool) -> int:
    settings = create_topics.load(create_topics.ClusterSettings)
    admin = AIOKafkaAdminClient(**create_topics.admin_kwargs(settings))
    await admin.start()
    failures: list[str] = []
    try:
        wanted = all_acls()
        for acl in wanted:
            request = CreateAclsRequest(
                acl.resource_type,
                acl.resource_name,
                acl.pattern,
                f"User:{acl.principal}",
                ANY_HOST,
                acl.operation,
                ALLOW,
            )
            response = await admin._send_request(request)  # noqa: SLF001 - aiokafka has no public ACL call
            code, message = response.creation_responses[0][:2]
            if code:
                failures.append(f"{acl}: error {code} {message or ''}".rstrip())
        print(f"acls: {len(wanted)} wanted, {len(wanted) - len(failures)} in place, {len(failures)} failed")
        for line in failures:
            print(f"  error: {line}", file=sys.stderr)
        if describe:
            for acl in wanted:
                print(f"  {acl}")
        return 1 if failures else 0
    finally:
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="Create Clave's Kafka topics and ACLs (idempotent).")
    parser.add_argument(
        "--replication-factor", type=int, default=None, help="for new topics (default: KAFKA_REPLICATION_FACTOR)"
    )
    parser.add_argument("--describe", action="store_true", help="also list every topic and every ACL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    topics = asyncio.run(create_topics.run(args.describe, args.replication_factor))
    if topics:
        return topics
    return asyncio.run(provision_acls(args.describe))


if __name__ == "__main__":
    sys.exit(main())
