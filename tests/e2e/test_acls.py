"""Kafka principals and ACLs through the real broker: each principal can do what
shared/acl.py grants, and the broker itself refuses a sample of what it does not
(TopicAuthorizationFailed, GroupAuthorizationFailed, ClusterAuthorizationFailed).

Nothing here writes to a topic a service reads: every write attempted is one the broker
must refuse, so a passing run leaves no trace in the log."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    for_code,
)
from aiokafka.protocol.admin import CreateAclsRequest
from aiokafka.protocol.metadata import MetadataRequest

from shared import topics as t
from shared.acl import ADMIN, AUDITOR, OPERATOR, PORTAL, SERVICES, ResourceType, all_acls, group_id
from shared.kafka import client_kwargs, connection
from shared.settings import PlatformSettings
from tests.e2e.conftest import World
from tools.workbench import WorkbenchSettings, as_principal, principal_properties

pytestmark = pytest.mark.e2e

TIMEOUT_MS = 10_000
PROVISION_DIR = Path(__file__).resolve().parents[2] / "deploy" / "kafka"


async def produce(settings: PlatformSettings, topic: str) -> None:
    """One record, as Clave's own producers send (idempotent, acks=all)."""
    producer = AIOKafkaProducer(**client_kwargs(settings), enable_idempotence=True, request_timeout_ms=TIMEOUT_MS)
    try:
        await producer.start()
        await producer.send_and_wait(topic, b'{"acl-probe": "must be refused"}', key=b"acl-probe")
    finally:
        await producer.stop()


async def fetch(settings: PlatformSettings, topic: str) -> None:
    """Fetch `topic` from its start, without a group, as the CLI, the portal stand-in and the
    tests read. Raises what the broker answers: a topic the principal may not even describe
    fails at metadata, one it may describe but not read fails at the fetch."""
    consumer = AIOKafkaConsumer(**client_kwargs(settings), enable_auto_commit=False, request_timeout_ms=TIMEOUT_MS)
    try:
        await consumer.start()
        client = consumer._client  # noqa: SLF001 - the per-topic metadata error is not public
        response = await client.send(client.get_random_node(), MetadataRequest([topic], False))
        [(error, _name, _internal, partitions)] = [(e, n, i, p) for e, n, i, p in response.topics if n == topic]
        if error:
            raise for_code(error)(topic)
        tps = [TopicPartition(topic, p[1]) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        for _ in range(3):  # a refused fetch surfaces on the next poll
            await consumer.getmany(*tps, timeout_ms=300)
    finally:
        await consumer.stop()


async def join(settings: PlatformSettings, topic: str, group: str) -> None:
    """Join `group` subscribed to `topic` and poll once (FindCoordinator, JoinGroup)."""
    consumer = AIOKafkaConsumer(
        topic, **client_kwargs(settings), group_id=group, enable_auto_commit=False, request_timeout_ms=TIMEOUT_MS
    )
    try:
        await consumer.start()
        await consumer.getmany(timeout_ms=3000)
        assert consumer.assignment(), f"{group} got no partition of {topic}"
    finally:
        await consumer.stop()


def service_pid(settings: PlatformSettings, service: str) -> int:
    var_dir = Path(os.environ.get("VAR_DIR", "var"))
    return int((var_dir / "run" / f"{service}.pid").read_text().strip())


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_each_service_runs_as_its_own_principal(stack: WorkbenchSettings, service: str) -> None:
    environ = Path(f"/proc/{service_pid(stack, service)}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in environ if b"=" in item)
    assert env.get("KAFKA_SASL_USERNAME") == service
    assert env.get("KAFKA_SECURITY_PROTOCOL") == "SASL_PLAINTEXT"
    assert "KAFKA_CLIENT_PROPERTIES" not in env  # nothing may swap in another principal


def test_the_suite_plays_each_role_with_its_own_principal(stack: WorkbenchSettings, world: World) -> None:
    assert connection(stack).kafka_sasl_username == ADMIN  # the observer
    assert connection(world.portal.settings).kafka_sasl_username == PORTAL
    for principal in (OPERATOR, AUDITOR):
        text = principal_properties(principal).read_text()
        assert f"sasl.username={principal}\n" in text
        assert os.stat(principal_properties(principal)).st_mode & 0o077 == 0  # owner only


async def test_broker_holds_exactly_the_table(stack: WorkbenchSettings) -> None:
    """The ACLs on the broker are those of shared/acl.py, no more (provisioning is idempotent)."""
    sys.path.insert(0, str(PROVISION_DIR))
    import provision  # deploy/kafka/provision.py

    admin = AIOKafkaAdminClient(**client_kwargs(stack))
    await admin.start()
    try:
        have = await provision.current_acls(admin)
    finally:
        await admin.close()
    assert have == set(all_acls())


# What each principal may do, as its own clients do it (side-effect free: reads and joins).
MAY_READ = [
    *((service, topic) for service, spec in SERVICES.items() for topic in spec.consumes),
    (PORTAL, t.RECOVERY_OUTCOMES),
    (OPERATOR, t.IDENTITY_COMMAND_RESULTS),  # its commands' results, not the audit log
    (AUDITOR, t.AUDIT_EVENTS),
]


@pytest.mark.parametrize(("principal", "topic"), MAY_READ)
async def test_principal_may_read(stack: WorkbenchSettings, principal: str, topic: str) -> None:
    await fetch(as_principal(stack, principal), topic)


@pytest.mark.parametrize(
    ("principal", "topic", "group"),
    [
        (PORTAL, t.RECOVERY_OUTCOMES, f"portal-acl-{uuid.uuid4().hex[:8]}"),
        (AUDITOR, t.AUDIT_EVENTS, f"auditor-acl-{uuid.uuid4().hex[:8]}"),
    ],
)
async def test_principal_may_use_its_groups(stack: WorkbenchSettings, principal: str, topic: str, group: str) -> None:
    await join(as_principal(stack, principal), topic, group)


async def test_service_may_read_its_own_group_offsets(stack: WorkbenchSettings) -> None:
    """What the lag monitor does (OffsetFetch on clave-<service>)."""
    admin = AIOKafkaAdminClient(**client_kwargs(as_principal(stack, "tokens")))
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group_id("tokens"))
    finally:
        await admin.close()
    assert {tp.topic for tp in offsets} <= set(SERVICES["tokens"].consumes)


# What the broker must refuse.
REFUSED_WRITES = [
    (PORTAL, t.IDENTITY_VERIFIED),  # forged verification: a victim's account, the attacker's address
    (PORTAL, t.TOKENS_REDEEMED),  # a replayed sealed key
    (PORTAL, t.IDENTITY_COMMANDS),  # operator commands
    (PORTAL, t.AUDIT_EVENTS),
    ("tokens", t.IDENTITY_VERIFIED),  # another service's topic
    ("notifier", t.PASSWORD_UPDATED),
    ("password", t.TOKENS_ISSUED),
    ("identity", t.TOKENS_REDEEMED),
    ("audit", t.RECOVERY_OUTCOMES),
    (AUDITOR, t.AUDIT_EVENTS),  # auditors check the log, never write it
    (OPERATOR, t.RECOVERY_REQUESTS),
    (OPERATOR, t.AUDIT_EVENTS),
    # The operator key registry: admin alone (no operator registers itself, no service either).
    (OPERATOR, t.IDENTITY_OPERATOR_KEYS),
    (PORTAL, t.IDENTITY_OPERATOR_KEYS),
    ("identity", t.IDENTITY_OPERATOR_KEYS),
    (OPERATOR, t.IDENTITY_COMMAND_RESULTS),  # results come from identity only
]


@pytest.mark.parametrize(("principal", "topic"), REFUSED_WRITES)
async def test_broker_refuses_write(stack: WorkbenchSettings, principal: str, topic: str) -> None:
    # The auditor may write no topic at all, so even its idempotent producer id is refused.
    expected = ClusterAuthorizationFailedError if principal == AUDITOR else TopicAuthorizationFailedError
    with pytest.raises(expected):
        await produce(as_principal(stack, principal), topic)


REFUSED_READS = [
    (PORTAL, t.AUDIT_EVENTS),
    (PORTAL, t.TOKENS_ISSUED),  # sealed link and code
    (PORTAL, t.RECOVERY_REQUESTS),  # it writes it, may not read back other citizens' requests
    ("notifier", t.TOKENS_REDEEMED),  # sealed keys are for the password service only
    ("tokens", t.TOKENS_ISSUED),  # its own output: written, not read
    ("identity", t.RECOVERY_REQUESTS + t.DLQ_SUFFIX),  # DLQs: admin only
    (OPERATOR, t.RECOVERY_OUTCOMES),
    (OPERATOR, t.AUDIT_EVENTS),  # results on identity.command_results are all it needs
    (AUDITOR, t.RECOVERY_REQUESTS),
]


@pytest.mark.parametrize(("principal", "topic"), REFUSED_READS)
async def test_broker_refuses_read(stack: WorkbenchSettings, principal: str, topic: str) -> None:
    with pytest.raises(TopicAuthorizationFailedError):
        await fetch(as_principal(stack, principal), topic)


@pytest.mark.parametrize(
    ("principal", "topic", "group"),
    [
        ("tokens", t.IDENTITY_VERIFIED, group_id("identity")),  # another service's group
        ("notifier", t.PASSWORD_UPDATED, group_id("tokens")),
        (PORTAL, t.RECOVERY_OUTCOMES, group_id("tokens")),
        (PORTAL, t.RECOVERY_OUTCOMES, "auditor-x"),
        (AUDITOR, t.AUDIT_EVENTS, group_id("audit")),
        (OPERATOR, t.IDENTITY_COMMAND_RESULTS, "operator"),  # the operator reads by assignment only
    ],
)
async def test_broker_refuses_foreign_group(stack: WorkbenchSettings, principal: str, topic: str, group: str) -> None:
    with pytest.raises(GroupAuthorizationFailedError):
        await join(as_principal(stack, principal), topic, group)


async def test_broker_refuses_administration_to_non_admins(stack: WorkbenchSettings) -> None:
    portal = as_principal(stack, PORTAL)
    admin = AIOKafkaAdminClient(**client_kwargs(portal), request_timeout_ms=TIMEOUT_MS)
    await admin.start()
    try:
        created = await admin.create_topics([NewTopic(f"acl-probe-{uuid.uuid4().hex[:8]}", 1, 1)])
        assert [item[1] for item in created.topic_errors] == [TopicAuthorizationFailedError.errno]
        # Granting itself the audit log: CreateAcls needs ALTER on the cluster.
        client = admin._client  # noqa: SLF001 - aiokafka has no create_acls
        request = CreateAclsRequest(ResourceType.TOPIC, t.AUDIT_EVENTS, 3, f"User:{PORTAL}", "*", 3, 3)
        response = await client.send(client.get_random_node(), request)
        assert response.creation_responses[0][0] == ClusterAuthorizationFailedError.errno
    finally:
        await admin.close()


async def test_broker_refuses_a_wrong_password(stack: WorkbenchSettings) -> None:
    kwargs = client_kwargs(connection(as_principal(stack, PORTAL)))
    host, _, port = kwargs.pop("bootstrap_servers").split(",")[0].rpartition(":")
    kwargs["sasl_plain_password"] = "not-the-password"
    # One connection, so the broker's own answer shows (clients wrap it as "cannot bootstrap").
    with pytest.raises(SaslAuthenticationFailed):
        conn = await create_conn(host, int(port), request_timeout_ms=TIMEOUT_MS, **kwargs)
        conn.close()


def librdkafka_version() -> tuple[int, ...]:
    """The librdkafka of the machine's kcat, (0,) without kcat."""
    if shutil.which("kcat") is None:
        return (0,)
    out = subprocess.run(["kcat", "-V"], capture_output=True, text=True, timeout=10, check=False)  # noqa: S607
    found = re.search(r"librdkafka (\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    return tuple(int(x) for x in found.groups()) if found else (0,)


def kcat(principal: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = ["kcat", "-F", str(principal_properties(principal)), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)  # noqa: S603


@pytest.mark.skipif(shutil.which("kcat") is None, reason="kcat not installed (Debian: apt-get install kcat)")
@pytest.mark.parametrize("principal", [PORTAL, OPERATOR, AUDITOR, "tokens"])
def test_kcat_reads_the_properties_files(stack: WorkbenchSettings, principal: str) -> None:
    """librdkafka (kcat -F) takes every setting of the file: the SCRAM login as `principal`."""
    dump = kcat(principal, "-X", "dump")
    assert dump.returncode == 0, dump.stderr
    config = dict(line.split(" = ", 1) for line in dump.stdout.splitlines() if " = " in line)
    password = (Path(os.environ.get("VAR_DIR", "var")) / "secrets" / "kafka" / f"{principal}.password").read_text()
    assert config["security.protocol"] == "sasl_plaintext"
    assert config["sasl.mechanisms"] == "SCRAM-SHA-512"
    assert config["sasl.username"] == principal
    assert config["metadata.broker.list"] == connection(stack).kafka_bootstrap_servers
    assert config["sasl.password"] == password.strip()


# librdkafka before 2.6.1 computes SCRAM proofs that Kafka 4 rejects (librdkafka PR 4895):
# Debian 12's kcat (librdkafka 2.0.2) cannot log in to this broker at all.
@pytest.mark.skipif(
    librdkafka_version() < (2, 6, 1), reason="kcat's librdkafka < 2.6.1 cannot SCRAM-authenticate to Kafka 4"
)
async def test_kcat_is_refused_like_our_clients(world: World) -> None:
    await world.citizen()  # at least one audit event to read
    read = ("-C", "-t", t.AUDIT_EVENTS, "-o", "-1", "-e", "-q", "-m", "10")
    allowed = await asyncio.to_thread(kcat, AUDITOR, *read)
    assert allowed.returncode == 0, allowed.stderr
    assert '"specversion"' in allowed.stdout  # the last audit event of some partition
    refused = await asyncio.to_thread(kcat, PORTAL, *read)
    assert refused.returncode != 0
    assert "authoriz" in refused.stderr.lower()
