"""Create every Clave topic on the broker; idempotent (existing topics are left alone).

Run with the project's virtualenv once Kafka answers metadata (deploy/local/stack.sh
does it after starting the broker):

    .venv/bin/python deploy/local/create_topics.py             # create what is missing
    .venv/bin/python deploy/local/create_topics.py --describe  # also list each topic's config

The topic list and retentions come from `shared.topics.all_topics` with the values of
`shared.settings` (KAFKA_TOPIC_PARTITIONS, PORTAL_TOPIC_RETENTION_MS,
INTERNAL_TOPIC_RETENTION_MS). Retention -1 means "kept forever": such topics get
`retention.ms=-1` and `retention.bytes=-1`.  Existing topics are never altered; a
topic whose partitions or retention differ from the wanted ones is reported.
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

from shared.kafka import client_kwargs  # noqa: E402
from shared.settings import Settings, get_settings  # noqa: E402
from shared.topics import TopicSpec, all_topics  # noqa: E402

TOPIC_ALREADY_EXISTS = 36
# Broker still booting: LEADER_NOT_AVAILABLE, REQUEST_TIMED_OUT, INVALID_REPLICATION_FACTOR
# (no broker registered yet), NOT_CONTROLLER.
RETRIABLE = {5, 7, 38, 41}
CREATE_DEADLINE_S = 60.0
REPLICATION_FACTOR = 1  # the local broker is a single node


def admin_kwargs(s: Settings) -> dict[str, Any]:
    # The same TLS/SASL settings as the services (shared.kafka), plus a longer timeout.
    return {**client_kwargs(s), "client_id": "clave-create-topics", "request_timeout_ms": 30_000}


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    configs = {"retention.ms": str(spec.retention_ms)}
    if spec.retention_ms == -1:
        configs["retention.bytes"] = "-1"  # forever means forever: no size limit either
    return configs


async def describe(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, dict[str, str]]:
    """name -> {config: value} for retention.ms / retention.bytes."""
    if not names:
        return {}
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, {"retention.ms": None, "retention.bytes": None})
        for name in names
    ]
    result: dict[str, dict[str, str]] = {}
    for response in await admin.describe_configs(resources):
        for resource in response.resources:
            # (error_code, error_message, resource_type, resource_name, config_entries)
            name, entries = resource[3], resource[4]
            result[name] = {entry[0]: entry[1] for entry in entries}
    return result


async def partitions_of(admin: AIOKafkaAdminClient, names: list[str]) -> dict[str, int]:
    if not names:
        return {}
    return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(names)}


async def create(
    admin: AIOKafkaAdminClient, specs: list[TopicSpec], replication_factor: int = REPLICATION_FACTOR
) -> list[str]:
    """Create `specs`, retrying transient errors for a while; returns the failures."""
    pending = list(specs)
    deadline = time.monotonic() + CREATE_DEADLINE_S
    while True:
        errors: dict[str, tuple[int, str]] = {}
        if pending:
            response = await admin.create_topics(
                [NewTopic(s.name, s.partitions, replication_factor, topic_configs=topic_configs(s)) for s in pending]
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


async def run(describe_all: bool, replication_factor: int = REPLICATION_FACTOR) -> int:
    settings = get_settings()
    specs = all_topics(
        settings.kafka_topic_partitions,
        settings.portal_topic_retention_ms,
        settings.internal_topic_retention_ms,
    )
    admin = AIOKafkaAdminClient(**admin_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [s for s in specs if s.name not in existing]
        present = [s for s in specs if s.name in existing]
        failed = await create(admin, missing, replication_factor)

        # Report existing topics that do not match what the code wants (never altered).
        mismatched: list[str] = []
        if present:
            configs = await describe(admin, [s.name for s in present])
            parts = await partitions_of(admin, [s.name for s in present])
            for s in present:
                want = topic_configs(s)
                have = configs.get(s.name, {})
                diffs = [f"{k}={have.get(k)} (wanted {v})" for k, v in want.items() if have.get(k) != v]
                if parts.get(s.name) != s.partitions:
                    diffs.append(f"partitions={parts.get(s.name)} (wanted {s.partitions})")
                if diffs:
                    mismatched.append(f"{s.name}: " + ", ".join(diffs))

        print(
            f"topics: {len(specs)} wanted, {len(missing) - len(failed)} created, "
            f"{len(present)} already present, {len(failed)} failed "
            f"(bootstrap {settings.kafka_bootstrap_servers})"
        )
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
                    f"  {name:<{width}}  partitions={parts.get(name)}"
                    f"  retention.ms={c.get('retention.ms')}"
                    f"  retention.bytes={c.get('retention.bytes')}"
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
