"""Create every Clave topic on the broker, or bring an existing one's configs up to date; idempotent.

Run with the project's virtualenv once Kafka answers metadata (deploy/local/stack.py
does it after starting the broker):

    .venv/bin/python deploy/local/create_topics.py             # create what is missing
    .venv/bin/python deploy/local/create_topics.py --describe  # also list each topic's config

The topic list and configs come from `shared.topics.all_topics` with the values of
`shared.settings` (KAFKA_TOPIC_PARTITIONS, PORTAL_TOPIC_RETENTION_MS,
INTERNAL_TOPIC_RETENTION_MS). Retention -1 means "kept forever": such topics get
`retention.ms=-1` and `retention.bytes=-1`; the portal inputs also get `segment.ms`,
`message.timestamp.type` and `file.delete.delay.ms` (see shared/topics.py). An existing
topic whose configs differ gets the wanted values (IncrementalAlterConfigs: only those
keys are set, any other config stays as it is); a partition count that differs is only
reported (Kafka cannot lower it, and raising it would move keys between partitions).

Durability is the cluster's: KAFKA_REPLICATION_FACTOR and KAFKA_MIN_INSYNC_REPLICAS
(`min.insync.replicas` of every topic) are 1 for the single local broker; a production
cluster's provisioning job (deploy/kafka/provision.py) sets 3 and 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

# Runnable as a file from any directory: the repository root holds the `shared` package.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aiokafka.admin import AIOKafkaAdminClient, NewTopic  # noqa: E402
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType  # noqa: E402
from aiokafka.protocol.api import Request, RequestStruct, Response  # noqa: E402
from aiokafka.protocol.types import Array, Boolean, Int8, Int16, Int32, Schema, String  # noqa: E402

from shared.kafka import client_kwargs  # noqa: E402
from shared.settings import PlatformSettings, load  # noqa: E402
from shared.topics import TopicSpec, all_topics  # noqa: E402

TOPIC_ALREADY_EXISTS = 36
# Broker still booting: LEADER_NOT_AVAILABLE, REQUEST_TIMED_OUT, INVALID_REPLICATION_FACTOR
# (no broker registered yet), NOT_CONTROLLER.
RETRIABLE = {5, 7, 38, 41}
CREATE_DEADLINE_S = 60.0


class ClusterSettings(PlatformSettings):
    """Copies of each record: 1 on the local single broker, 3 (with 2 in sync for a write
    to succeed under acks=all) on a production cluster."""

    kafka_replication_factor: int = 1
    kafka_min_insync_replicas: int = 1


def admin_kwargs(s: PlatformSettings) -> dict[str, Any]:
    # The same TLS/SASL settings as the services (shared.kafka), plus a longer timeout.
    return {**client_kwargs(s), "client_id": "clave-create-topics", "request_timeout_ms": 30_000}


MANAGED = (
    "retention.ms",
    "retention.bytes",
    "segment.ms",
    "message.timestamp.type",
    "file.delete.delay.ms",
    "min.insync.replicas",
)


async def describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    """name -> {config: value} for the configs this script manages."""
    if not names:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, dict.fromkeys(MANAGED)) for name in names]
    result: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = resource[3], resource[4]
            result[name] = {entry[0]: entry[1] for entry in entries}
    return result


# IncrementalAlterConfigs (KIP-339), which aiokafka does not wrap: its AlterConfigs would
# replace every dynamic config of the topic, dropping any an operator set. Version 0 of the
# request, declared with aiokafka's own protocol types.
class _IncrementalAlterConfigsResponseV0(Response):
    API_KEY = 44
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "responses",
            Array(
                ("error_code", Int16),
                ("error_message", String("utf-8")),
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
            ),
        ),
    )


class _IncrementalAlterConfigsRequestV0(RequestStruct):
    API_KEY = 44
    API_VERSION = 0
    RESPONSE_TYPE = _IncrementalAlterConfigsResponseV0
    SCHEMA = Schema(
        (
            "resources",
            Array(
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
                ("configs", Array(("name", String("utf-8")), ("config_operation", Int8), ("value", String("utf-8")))),
            ),
        ),
        ("validate_only", Boolean),
    )


class IncrementalAlterConfigs(Request[_IncrementalAlterConfigsRequestV0]):
    API_KEY = 44
    SET = 0  # the operation: set the value (others: delete, append, subtract)

    def __init__(self, topics: dict[str, dict[str, str]]) -> None:
        self._resources = [
            (ConfigResourceType.TOPIC, name, [(key, self.SET, value) for key, value in configs.items()])
            for name, configs in topics.items()
        ]

    def build(self, request_struct_class: type[_IncrementalAlterConfigsRequestV0]) -> _IncrementalAlterConfigsRequestV0:
        return request_struct_class(self._resources, False)


async def alter(admin: AIOKafkaAdminClient, changes: dict[str, dict[str, str]]) -> dict[str, str]:
    """Set `changes` ({topic: {config: value}}) on existing topics; returns {topic: error}."""
    if not changes:
        return {}
    response = await admin._send_request(IncrementalAlterConfigs(changes))  # noqa: SLF001 - no public call
    return {name: f"error {code} {message or ''}".rstrip() for code, message, _type, name in response.responses if code}


async def partitions_of(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}


async def create(admin: AIOKafkaAdminClient, specs: list[TopicSpec], replication_factor: int) -> list[str]:
    """Create `specs`, retrying transient errors for a while; returns the failures."""
    pending = list(specs)
    deadline = time.monotonic() + CREATE_DEADLINE_S
    while True:
        errors: dict[str, tuple[int, str]] = {}
        if pending:
            response = await admin.create_topics(
                [
                    NewTopic(s.name, s.partitions, replication_factor, topic_configs=s.configs())
                    for s in pending
                ]
            )
            for item in response.topic_errors:
                # v0-v4: (topic, error_code[, error_message]); later versions start the same
                name, code = item[0], item[1]
                if code not in (0, TOPIC_ALREADY_EXISTS):
                    errors[name] = (code, item[2] if len(item) > 2 and item[2] else "")
        retry = [s for s in pending if s.name in errors and errors[s.name][0] in RETRIABLE]
        if not retry or time.monotonic() > deadline:
            return [f"{name}: error {code} {message}".rstrip() for name, (code, message) in errors.items()]
        pending = retry
        await asyncio.sleep(1.0)


async def run(describe_all: bool, replication_factor: int | None = None) -> int:
    settings = load(ClusterSettings)
    replicas = replication_factor or settings.kafka_replication_factor
    min_isr = settings.kafka_min_insync_replicas
    if not 1 <= min_isr <= replicas:
        print(f"error: min.insync.replicas {min_isr} must be 1 to the replication factor {replicas}", file=sys.stderr)
        return 2
    specs = all_topics(
        settings.kafka_topic_partitions,
        settings.portal_topic_retention_ms,
        settings.internal_topic_retention_ms,
        min_insync_replicas=min_isr,
    )
    admin = AIOKafkaAdminClient(**admin_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        present = [s for s in specs if s.name in existing]
        failed = await create(admin, missing, replicas)

        # Existing topics: wanted configs that differ are set; other differences reported.
        changes: dict[str, dict[str, str]] = {}
        mismatched: list[str] = []
        if present:
            configs = await describe(admin, [s.name for s in present])
            parts = await partitions_of(admin, [s.name for s in present])
            for s in present:
                have = configs.get(s.name, {})
                differ = {k: v for k, v in s.configs().items() if have.get(k) != v}
                if differ:
                    changes[s.name] = differ
                if parts.get(s.name) != s.partitions:
                    mismatched.append(f"{s.name}: partitions={parts.get(s.name)} (wanted {s.partitions})")
        refused = await alter(admin, changes)
        updated = {name: differ for name, differ in changes.items() if name not in refused}
        failed += [f"{name}: alter configs: {error}" for name, error in refused.items()]

        print(
            f"topics: {len(specs)} wanted, {len(missing) - len(failed) + len(refused)} created, "
            f"{len(present)} already present ({len(updated)} with configs updated), {len(failed)} failed, "
            f"replication factor {replicas} (bootstrap {settings.kafka_bootstrap_servers})"
        )
        for name, differ in updated.items():
            print(f"  updated {name}: " + ", ".join(f"{k}={v}" for k, v in differ.items()))
        for line in mismatched:
            print(f"  warning: existing topic differs, left alone: {line}")
        for line in failed:
            print(f"  error: {line}", file=sys.stderr)

        if describe_all:
            names = [s.name for s in specs]
            configs = await describe(admin, names)
            parts = await partitions_of(admin, names)
            width = max(len(n) for n in names)
            for name in names:
                c = configs.get(name, {})
                print(
                    f"  {name:<{width}}  partitions={parts.get(name)}  " + "  ".join(f"{k}={c.get(k)}" for k in MANAGED)
                )
        return 1 if failed else 0
    finally:
        await admin.close()


def main() -> int:
    parser = argparse.ArgumentParser(description="Create Clave's Kafka topics (idempotent).")
    parser.add_argument("--describe", action="store_true", help="list every topic's config")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args.describe))


if __name__ == "__main__":
    sys.exit(main())
