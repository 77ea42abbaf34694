"""The broker's own view of the topics: what citizens typed (the portal inputs) is off the disk
within 2 hours of being written, and deploy/local/create_topics.py brings an existing topic's
configs up to date."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from shared.kafka import client_kwargs
from shared.topics import HOUR_MS, PORTAL_INPUTS, RECOVERY_RESETS, all_topics
from tools.workbench import WorkbenchSettings

pytestmark = pytest.mark.e2e

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "local" / "create_topics.py"
KEYS = ("retention.ms", "segment.ms", "message.timestamp.type", "file.delete.delay.ms")


def create_topics_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("create_topics", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wanted(settings: WorkbenchSettings, name: str) -> dict[str, str]:
    specs = all_topics(
        settings.kafka_topic_partitions, settings.portal_topic_retention_ms, settings.internal_topic_retention_ms
    )
    return next(s for s in specs if s.name == name).configs()


@pytest.fixture
async def admin(stack: WorkbenchSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(**client_kwargs(stack))
    await client.start()
    yield client
    await client.close()


async def configs(admin: AIOKafkaAdminClient, kind: ConfigResourceType, name: str) -> dict[str, str]:
    [response] = await admin.describe_configs([ConfigResource(kind, name)])
    [resource] = response.resources
    assert resource[0] == 0, resource[1]  # error code, message
    return {entry[0]: entry[1] for entry in resource[4]}


def gone_within_ms(topic: dict[str, str], broker: dict[str, str]) -> int:
    """Latest time a record is on disk after it was written: retention, then its segment must
    close, the broker must check, and the files wait out the delete delay."""
    assert topic["message.timestamp.type"] == "LogAppendTime"  # else a producer's clock decides
    return (
        int(topic["retention.ms"])
        + int(topic["segment.ms"])
        + int(broker["log.retention.check.interval.ms"])
        + int(topic["file.delete.delay.ms"])
    )


async def test_portal_inputs_leave_the_disk_within_two_hours(
    admin: AIOKafkaAdminClient, stack: WorkbenchSettings
) -> None:
    nodes = (await admin.describe_cluster())["brokers"]
    broker = await configs(admin, ConfigResourceType.BROKER, str(nodes[0]["node_id"]))
    for name in PORTAL_INPUTS:
        topic = await configs(admin, ConfigResourceType.TOPIC, name)
        assert {k: topic[k] for k in KEYS} == wanted(stack, name)
        assert topic["retention.ms"] == str(stack.portal_topic_retention_ms)
        assert gone_within_ms(topic, broker) <= 2 * HOUR_MS, (name, {k: topic[k] for k in KEYS})


async def test_create_topics_updates_an_existing_topic(admin: AIOKafkaAdminClient, stack: WorkbenchSettings) -> None:
    alter = create_topics_module().IncrementalAlterConfigs
    # As on a cluster created before: the broker's defaults for the new settings.
    stale = {"segment.ms": str(7 * 24 * HOUR_MS), "message.timestamp.type": "CreateTime"}
    response = await admin._send_request(alter({RECOVERY_RESETS: stale}))  # noqa: SLF001 - no public call
    assert [r[0] for r in response.responses] == [0]
    before = await configs(admin, ConfigResourceType.TOPIC, RECOVERY_RESETS)
    assert {k: before[k] for k in stale} == stale
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    want = wanted(stack, RECOVERY_RESETS)
    line = f"updated {RECOVERY_RESETS}: segment.ms={want['segment.ms']}, message.timestamp.type=LogAppendTime"
    assert line in result.stdout, result.stdout
    after = await configs(admin, ConfigResourceType.TOPIC, RECOVERY_RESETS)
    assert {k: after[k] for k in KEYS} == want
