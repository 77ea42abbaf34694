"""Concurrent failures for one account: the same cédula spelled differently is another record
key, so its requests land on other partitions and identity handles them at the same time.
Every failure must still be counted, and the lock and slowed mode engage exactly as the
rules say (a decision is applied only to the counters it was made on)."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections import Counter
from collections.abc import Iterator

import pytest
from aiokafka.partitioner import DefaultPartitioner

from tests.e2e.conftest import World
from tools.mail import body_text
from tools.testdata import Citizen

pytestmark = pytest.mark.e2e


def typings(cedula: str) -> Iterator[str]:
    """Ways a person may type one cédula (spaces and dashes between digits)."""
    yield cedula
    for sep in ("-", " "):
        for i in range(1, len(cedula)):
            yield cedula[:i] + sep + cedula[i:]
    for i in range(1, len(cedula)):
        for j in range(i + 1, len(cedula)):
            yield f"{cedula[:i]}-{cedula[i:j]}-{cedula[j:]}"


def on_distinct_partitions(cedula: str, partitions: int) -> list[str]:
    """One spelling per partition the portal's producer would send it to (murmur2 of the key)."""
    every = list(range(partitions))
    found: dict[int, str] = {}
    for spelling in typings(cedula):
        found.setdefault(DefaultPartitioner()(spelling.encode(), every, every), spelling)
    return list(found.values())


def fresh_ipv4() -> str:
    return str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.1")) + secrets.randbelow(2**17 - 2)))


async def wrong_requests(world: World, c: Citizen, spellings: list[str], ips: list[str]) -> list[dict]:
    """All at once: request i uses spelling i mod len(spellings) and address ips[i]."""
    wrong = {**c.answers, "birth_date": "1900-01-01"}
    rids = await asyncio.gather(
        *(
            world.request(c, national_id=spellings[i % len(spellings)], answers=wrong, client_ip=ip)
            for i, ip in enumerate(ips)
        )
    )
    return list(await asyncio.gather(*(world.audited(r) for r in rids)))


def actions(world: World, action: str, account_id: str) -> list[dict]:
    return world.audit_log.matching(
        lambda _t, _h, d: d["data"].get("action") == action and d["data"].get("account_id") == account_id
    )


async def test_parallel_failures_from_one_block_under_two_spellings_lock_it_exactly_once(world: World) -> None:
    s = world.settings
    c = await world.citizen()
    spellings = on_distinct_partitions(c.national_id, s.kafka_topic_partitions)
    assert len(spellings) >= 2
    extra = 5
    stranger = fresh_ipv4()
    audits = await wrong_requests(world, c, spellings, [stranger] * (s.lockout_max_failures + extra))
    assert len({a["account_id"] for a in audits}) == 1  # every spelling named the one account
    account_id = audits[0]["account_id"]
    # The first failures are counted, the one that reaches the limit locks, the rest are refused.
    assert Counter(tuple(a["reasons"]) for a in audits) == {
        ("answers_wrong",): s.lockout_max_failures,
        ("locked",): extra,
    }
    assert len(actions(world, "account_locked", account_id)) == 1  # audited with its request
    # The owner, from elsewhere, gets the mail; once a later mail to someone else has arrived
    # too, a second notice would have: one only.
    rid = await world.request(c, client_ip=fresh_ipv4())
    await world.recovery_mail(rid)
    await world.mail_barrier()
    notices = [m for m in world.mails_to(c.email) if "recuperar?" not in body_text(m)]
    assert len(notices) == 1
    # The stranger's block is still locked out.
    rid = await world.request(c, national_id=spellings[-1], client_ip=stranger)
    assert (await world.audited(rid))["reasons"] == ["locked"]


async def test_parallel_failures_from_many_blocks_reach_the_account_cap_exactly(world: World) -> None:
    s = world.settings
    c = await world.citizen()
    spellings = on_distinct_partitions(c.national_id, s.kafka_topic_partitions)
    per_block = s.lockout_max_failures - 1  # no block locks: only the account cap can stop them
    blocks = [fresh_ipv4() for _ in range(-(-(s.account_max_failures + 1) // per_block))]
    # One failure per block first, in turn, so every block has had its guess this hour...
    for ip in blocks:
        assert [a["reasons"] for a in await wrong_requests(world, c, spellings, [ip])] == [["answers_wrong"]]
    # ...then all the rest at once, across spellings (partitions) and blocks.
    burst = await wrong_requests(world, c, spellings, [ip for ip in blocks for _ in range(per_block - 1)])
    total = len(blocks) * per_block
    # Exactly the cap is evaluated; every request past it is refused without evaluation.
    assert Counter(tuple(a["reasons"]) for a in burst) == {
        ("answers_wrong",): s.account_max_failures - len(blocks),
        ("rate_limited",): total - s.account_max_failures,
    }
    account_id = burst[0]["account_id"]
    assert len(actions(world, "account_slowed", account_id)) == 1
    assert actions(world, "account_locked", account_id) == []
