"""No record stalls a partition. On each kind of consumed topic (portal input, internal event,
operator command), poison records go ahead of a real event with the same record key, so on
the same partition: each poison lands in the topic's DLQ with its reason, and the real event
behind them is served."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid

import pytest

from shared.envelope import new_event
from shared.kafkaio import publish_raw
from shared.topics import IDENTITY_COMMANDS, IDENTITY_VERIFIED, RECOVERY_REQUESTS, RECOVERY_RESETS, dlq
from tests.e2e.conftest import World, clave_cli
from tools.testdata import new_citizen, new_key

pytestmark = pytest.mark.e2e


def poison(mark: str) -> dict[str, tuple[str, bytes]]:
    """name -> (expected reason, record value). Each value carries `mark`, so it is unique."""
    m = mark.encode()
    lone_surrogate = json.loads(
        new_event(type="ec.clave.nope.v1", source="/tests/poison", data={}, correlationid=mark).to_bytes()
    )
    lone_surrogate["correlationid"] = f"{mark}-\ud800"  # json.dumps writes it as a \ud800 escape
    return {
        "deep_array": ("malformed_json", b'{"m":"' + m + b'","a":' + b"[" * 5000 + b"]" * 5000 + b"}"),
        "deep_object": ("malformed_json", b'{"m":"' + m + b'","a":' + b'{"a":' * 3000 + b"1" + b"}" * 3001),
        "huge_integer": (
            "malformed_json",
            b'{"specversion":"1.0","correlationid":"' + m + b'","n":' + b"7" * 5000 + b"}",
        ),
        "invalid_utf8": ("malformed_json", b'{"m":"' + m + b'","x":"\xff\xfe\xc3\x28"}'),
        "lone_surrogate_correlationid": ("malformed_json", json.dumps(lone_surrogate).encode()),
        # Near the broker's 1 MiB record limit: its letter must still fit in one record.
        "too_large_near_broker_limit": ("too_large", b'{"m":"' + m + b'","x":"' + b"y" * 900_000 + b'"}'),
    }


async def publish_poison(world: World, topic: str, key: str) -> dict[str, tuple[str, str]]:
    """Publish every poison record to `topic` under `key`, in order; name -> (reason, sha256)."""
    sent = {}
    for name, (reason, value) in poison(uuid.uuid4().hex).items():
        await publish_raw(world.settings, topic, key.encode(), value)
        sent[name] = (reason, hashlib.sha256(value).hexdigest())
    return sent


async def assert_parked(world: World, topic: str, sent: dict[str, tuple[str, str]]) -> None:
    """Each poison record is in `<topic>.dlq` with its reason, once, all from one partition."""
    partitions = set()
    for name, (reason, digest) in sent.items():
        found = await world.dead_letters.wait(
            lambda t, _h, d, digest=digest: t == dlq(topic) and d.get("data", {}).get("payload_sha256") == digest,
            timeout=30,
        )
        assert [d["data"]["reason"] for d in found] == [reason], name
        headers = world.dead_letters.matching(
            lambda t, h, d, digest=digest, reason=reason: (
                t == dlq(topic)
                and d.get("data", {}).get("payload_sha256") == digest
                and h.get("clave-dlq-reason") == reason
                and h.get("clave-origin-topic") == topic
            )
        )
        assert headers, f"{name}: headers"
        partitions.add(found[0]["data"]["origin_partition"])
    assert len(partitions) == 1  # same key, same partition: they were ahead of the real event


async def test_poison_on_recovery_requests_then_the_request_is_served(world: World) -> None:
    c = await world.citizen()
    sent = await publish_poison(world, RECOVERY_REQUESTS, c.national_id)  # the portal's key
    rid = await world.request(c)
    await world.recovery_mail(rid)
    await assert_parked(world, RECOVERY_REQUESTS, sent)


async def test_poison_on_recovery_resets_then_the_reset_is_served(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    sent = await publish_poison(world, RECOVERY_RESETS, rid)  # the portal's key
    await world.portal.submit_reset(rid, new_key(), token=token)
    # Every reset gets an answer: each poison record a `reset_invalid` (by its record key), in
    # order on the partition, then the real reset its own.
    last = await world.portal.wait_outcome(rid, "reset", count=len(sent) + 1)
    assert last["status"] == "completed"
    earlier = [o for o in world.portal.outcomes(rid) if o["stage"] == "reset"][: len(sent)]
    assert [(o["status"], o["reasons"]) for o in earlier] == [("rejected", ["reset_invalid"])] * len(sent)
    await assert_parked(world, RECOVERY_RESETS, sent)


async def test_poison_on_an_internal_topic_then_the_event_is_served(world: World) -> None:
    c = new_citizen()
    [account_id] = await world.register(c)
    # identity.verified is keyed by account: the verified event of this request lands behind.
    sent = await publish_poison(world, IDENTITY_VERIFIED, account_id)
    rid = await world.request(c)
    await world.recovery_mail(rid)
    await assert_parked(world, IDENTITY_VERIFIED, sent)


async def test_poison_on_operator_commands_then_the_command_is_served(world: World) -> None:
    c = await world.citizen()
    sent = await publish_poison(world, IDENTITY_COMMANDS, c.national_id)  # the CLI's key
    result = await asyncio.to_thread(
        clave_cli,
        "accounts",
        "send-recovery",
        c.national_id,
        "--operator",
        "op-2",
        "--reason",
        "poison test",
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    done = await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("action") == "operator_send_recovery" and d["data"].get("actor") == "op-2"
    )
    await world.recovery_mail(done[-1]["data"]["request_id"])
    await assert_parked(world, IDENTITY_COMMANDS, sent)
