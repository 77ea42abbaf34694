"""Provision a Kafka cluster for Clave: its topics and its ACLs (idempotent).

    python deploy/kafka/provision.py [--replication-factor N] [--dry-run] [--prune] [--describe]

The production deployments run it as a one-off job from the service image
(deploy/compose: the `kafka-provision` service; deploy/helm/clave: a pre-install and
pre-upgrade hook Job) with KAFKA_REPLICATION_FACTOR=3 and KAFKA_MIN_INSYNC_REPLICAS=2; the
local stack runs it after each Kafka start (replication factor 1). It connects with the
admin client settings of the environment: KAFKA_CLIENT_PROPERTIES=FILE (librdkafka syntax:
bootstrap.servers, security.protocol=SASL_SSL, sasl.mechanism, sasl.username, sasl.password,
ssl.ca.location) or the KAFKA_* variables. The principal must be allowed to create topics and
ACLs (`admin`, a super user of the brokers, or CREATE and ALTER on the cluster).

1. Topics: every topic of shared/topics.py `all_topics`, with the documented retentions
   (portal inputs 1 h, internal topics and DLQs 7 days, `audit.events` forever), the
   replication factor (`--replication-factor`, else KAFKA_REPLICATION_FACTOR) and
   `min.insync.replicas` (KAFKA_MIN_INSYNC_REPLICAS), see deploy/local/create_topics.py,
   which the local stack also uses. Missing topics are created; an existing topic gets the
   wanted configs, a difference in partitions is only reported.
2. ACLs: every ALLOW binding of shared/acl.py (derived from the topic contract,
   shared/contract.py) that is missing. `--prune` also deletes ACLs of Clave's principals
   that the table no longer grants (otherwise they are only reported): a permission removed
   from the table is then removed from the cluster.

The brokers must run an authorizer that refuses what no ACL allows
(`allow.everyone.if.no.acl.found=false`), with SCRAM users for every principal of
shared.acl.PRINCIPALS. They are not created here (aiokafka has no
AlterUserScramCredentials): the local stack bootstraps them at format time, the compose
stack's `kafka-users` job runs kafka-configs.sh, a Kubernetes cluster's Kafka operator
makes them; see the README, "Kafka principals and ACLs".
Exit 0 when the cluster matches the table, 1 otherwise (2: the settings are inconsistent).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

# Runnable as a file from any directory: the repository root holds the `shared` package,
# deploy/local the topic creation shared with the local stack.
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "deploy" / "local"))

import create_topics  # noqa: E402
from aiokafka.admin import AIOKafkaAdminClient  # noqa: E402
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest, DescribeAclsRequest  # noqa: E402

from shared.acl import ALLOW, PRINCIPALS, Acl, Operation, PatternType, ResourceType, all_acls  # noqa: E402

ANY = 1  # the ANY filter value of resource type, pattern type, operation and permission
ANY_HOST = "*"


def admin_client() -> AIOKafkaAdminClient:
    settings = create_topics.load(create_topics.ClusterSettings)
    return AIOKafkaAdminClient(**{**create_topics.admin_kwargs(settings), "client_id": "clave-provision"})


async def _send(admin: AIOKafkaAdminClient, request: Any) -> Any:
    # aiokafka ships the ACL requests (CreateAcls/DescribeAcls/DeleteAcls v1, supported by
    # Kafka 2.0 to 4.x) but no admin method for them: send them to any broker, which forwards
    # them to the KRaft controller.
    return await admin._client.send(admin._client.get_random_node(), request)  # noqa: SLF001


async def current_acls(admin: AIOKafkaAdminClient) -> set[Acl | tuple[Any, ...]]:
    """Every ACL on the cluster: an `Acl` when it is an ALLOW from any host with codes we
    know, else the raw tuple (reported, never matched)."""
    response = await _send(admin, DescribeAclsRequest(ANY, None, ANY, None, None, ANY, ANY))
    if response.error_code:
        raise RuntimeError(f"DescribeAcls failed: error {response.error_code} {response.error_message or ''}")
    found: set[Acl | tuple[Any, ...]] = set()
    for resource_type, name, pattern, acls in response.resources:
        for principal, host, operation, permission in acls:
            try:
                if permission != ALLOW or host != ANY_HOST or not principal.startswith("User:"):
                    raise ValueError
                found.add(
                    Acl(
                        principal.removeprefix("User:"),
                        Operation(operation),
                        ResourceType(resource_type),
                        name,
                        PatternType(pattern),
                    )
                )
            except ValueError:
                found.add((principal, host, operation, permission, resource_type, name, pattern))
    return found


async def create_acl(admin: AIOKafkaAdminClient, acl: Acl) -> str | None:
    request = CreateAclsRequest(
        acl.resource_type, acl.resource_name, acl.pattern, acl.kafka_principal, ANY_HOST, acl.operation, ALLOW
    )
    response = await _send(admin, request)
    code, message = response.creation_responses[0]
    return None if code == 0 else f"{acl}: error {code} {message or ''}".rstrip()


async def delete_acl(admin: AIOKafkaAdminClient, acl: Acl) -> str | None:
    request = DeleteAclsRequest(
        acl.resource_type, acl.resource_name, acl.pattern, acl.kafka_principal, ANY_HOST, acl.operation, ALLOW
    )
    response = await _send(admin, request)
    code, message, _ = response.filter_responses[0]
    return None if code == 0 else f"{acl}: error {code} {message or ''}".rstrip()


async def wait_visible(admin: AIOKafkaAdminClient, wanted: list[Acl], deadline_s: float = 60.0) -> list[Acl]:
    """Wait until the broker itself answers with every wanted ACL; returns those still missing.

    CreateAcls is committed by the KRaft controller, but a broker authorises with its own copy
    of the metadata, which follows a moment later (seconds on a loaded machine). A service
    started in between is refused even its idempotent producer (ClusterAuthorizationFailed,
    seen on a loaded 2-core machine): so "created" is not "in force" until DescribeAcls on the
    broker shows it."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while True:
        have = await current_acls(admin)
        missing = [a for a in wanted if a not in have]
        if not missing or loop.time() >= end:
            return missing
        await asyncio.sleep(0.2)  # polling the broker's view, bounded by the deadline


def ours(acl: Acl | tuple[Any, ...]) -> bool:
    principal = acl.principal if isinstance(acl, Acl) else str(acl[0]).removeprefix("User:")
    return principal in PRINCIPALS


async def provision_acls(dry_run: bool, prune: bool, describe: bool) -> int:
    wanted = all_acls()
    admin = admin_client()
    await admin.start()
    try:
        have = await current_acls(admin)
        missing = [a for a in wanted if a not in have]
        extra = sorted((a for a in have if ours(a) and a not in wanted), key=str)
        failures: list[str] = []
        if not dry_run:
            for acl in missing:
                if (error := await create_acl(admin, acl)) is not None:
                    failures.append(error)
            if missing and not failures:
                failures.extend(f"{acl}: created but not in force on the broker after 60 s"
                                for acl in await wait_visible(admin, wanted))
            if prune:
                for acl in extra:
                    if not isinstance(acl, Acl):
                        failures.append(f"cannot prune {acl}: not an ALLOW from any host; remove it by hand")
                    elif (error := await delete_acl(admin, acl)) is not None:
                        failures.append(error)
        verb = "to create" if dry_run else "created"
        print(
            f"acls: {len(wanted)} wanted, {len(missing) - len(failures) if not dry_run else len(missing)} {verb}, "
            f"{len(wanted) - len(missing)} already present, {len(failures)} failed"
        )
        for acl in missing if dry_run else []:
            print(f"  would create: {acl}")
        for acl in extra:
            action = "would delete" if dry_run and prune else "deleted" if prune else "warning: not in the table"
            print(f"  {action}: {acl}")
        for line in failures:
            print(f"  error: {line}", file=sys.stderr)
        if describe:
            for acl in wanted:
                print(f"  {acl}")
        stale = bool(extra) and not (prune and not dry_run)
        return 1 if failures or stale or (dry_run and missing) else 0
    finally:
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="Create Clave's Kafka topics and ACLs (idempotent).")
    parser.add_argument(
        "--replication-factor", type=int, default=None, help="for new topics (default: KAFKA_REPLICATION_FACTOR)"
    )
    parser.add_argument("--dry-run", action="store_true", help="only report the ACLs that would change")
    parser.add_argument("--prune", action="store_true", help="delete ACLs of Clave's principals not in the table")
    parser.add_argument("--describe", action="store_true", help="also list every topic and every ACL")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    topics = 0 if args.dry_run else asyncio.run(create_topics.run(args.describe, args.replication_factor))
    acls = asyncio.run(provision_acls(args.dry_run, args.prune, args.describe))
    return topics or acls


if __name__ == "__main__":
    sys.exit(main())
