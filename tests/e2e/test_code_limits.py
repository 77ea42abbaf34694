"""Wrong codes are limited (CODE_ACCOUNT_MAX_FAILURES in CODE_ACCOUNT_WINDOW_S) per account
across its real tokens and per (account, address block) across all its tokens, in parallel
too; each one is reported on tokens.code_rejected for identity's lockout; a key changed by
link clears the counts. A stranger's wrong codes on decoys stop codes from the stranger's
own block only: the owner, from another address, redeems the mailed code.

Decoys of the account (published as identity.declined) stand in for failed requests: wrong
codes on them count for their block exactly as on real tokens typed from there, which is
what lets these tests push a count without mailing the citizen a dozen times."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from shared.crypto import keyed_hash
from shared.topics import TOKENS_CODE_REJECTED
from tests.e2e.conftest import Publisher, World
from tools.mail import extract_code
from tools.testdata import new_citizen, new_key
from tools.watch import TopicWatcher

pytestmark = pytest.mark.e2e


def new_rid() -> str:
    return f"req-{secrets.token_hex(12)}"


def wrong_of(code: str) -> str:
    return f"{(int(code) + 1) % 1_000_000:06d}"


def rejected_codes(events: TopicWatcher, account_id: str) -> list[dict[str, str]]:
    return [
        d["data"]
        for d in events.matching(
            lambda t, _h, d: t == TOKENS_CODE_REJECTED and d["data"].get("account_id") == account_id
        )
    ]


async def decoys_for(world: World, publisher: Publisher, national_id: str, account_id: str, n: int) -> list[str]:
    rids = [new_rid() for _ in range(n)]
    ref = keyed_hash(world.settings.pseudonym_key, national_id)
    for rid in rids:
        await publisher.declined(rid, subject_ref=ref, account_id=account_id)
    for rid in rids:
        await world.audited(rid, "decoy_stored")
    return rids


async def test_wrong_codes_count_per_account_across_tokens_until_a_link_is_used(
    world: World, publisher: Publisher, internal_events: TopicWatcher
) -> None:
    per_token, per_account = world.settings.code_max_attempts, world.settings.code_account_max_failures
    assert per_account > per_token, "the test needs the account limit above the token limit"
    c = new_citizen()
    (account_id,) = await world.register(c)
    rid = await world.request(c)
    mail, token = await world.recovery_mail(rid)
    code = extract_code(mail)

    # per_account - 1 wrong codes spread over the account's decoys, none reaching a token's limit.
    spread = per_token - 1
    decoys = await decoys_for(world, publisher, c.national_id, account_id, -(-(per_account - 1) // spread))
    ip = f"203.0.113.{secrets.randbelow(250) + 1}"
    sent = 0
    for decoy_rid in decoys:
        for n in range(1, min(spread, per_account - 1 - sent) + 1):
            await publisher.reset(decoy_rid, new_key(), code="000000", client_ip=ip)
            assert (await world.portal.wait_outcome(decoy_rid, "reset", count=n))["reasons"] == ["token_invalid"]
            sent += 1
    assert sent == per_account - 1
    # The last one allowed, on the real token (its own first): the account is at its limit.
    await publisher.reset(rid, new_key(), code=wrong_of(code), client_ip=ip)
    assert (await world.portal.wait_outcome(rid, "reset"))["reasons"] == ["code_attempts_exceeded"]
    # Now no code is accepted, not even the right one...
    await publisher.reset(rid, new_key(), code=code, client_ip=ip)
    assert (await world.portal.wait_outcome(rid, "reset", count=2))["reasons"] == ["code_attempts_exceeded"]
    # ...and each wrong code was reported for identity's lockout, with the address it came from.
    reported = await internal_events.wait(
        lambda t, _h, d: t == TOKENS_CODE_REJECTED and d["data"].get("account_id") == account_id,
        count=per_account,
    )
    assert len(reported) == per_account
    assert {r["data"]["client_ip"] for r in reported} == {ip}
    assert all(r["data"].get("subject_ref") is None for r in reported)
    assert {r["data"]["request_id"] for r in reported} == {*decoys, rid}

    # The link still works, and using it clears the count.
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset", count=3))["status"] == "completed"
    spent = await world.audited(rid, "token_spent")
    assert spent["details"]["code_failures_cleared"] is True
    (fresh,) = await decoys_for(world, publisher, c.national_id, account_id, 1)
    await publisher.reset(fresh, new_key(), code="000000", client_ip=ip)
    assert (await world.portal.wait_outcome(fresh, "reset"))["reasons"] == ["token_invalid"]


async def test_parallel_wrong_codes_on_every_partition_are_all_counted(
    world: World, publisher: Publisher, internal_events: TopicWatcher
) -> None:
    """One decoy per partition, so the account's wrong codes are handled by every consumer at
    once; a lost update would leave the count short and the limit would not be reached."""
    per_token, per_account = world.settings.code_max_attempts, world.settings.code_account_max_failures
    partitions = world.settings.kafka_topic_partitions
    c = new_citizen()
    (account_id,) = await world.register(c)
    ref = keyed_hash(world.settings.pseudonym_key, c.national_id)
    by_partition: dict[int, str] = {}
    while len(by_partition) < partitions:
        rid = new_rid()
        by_partition.setdefault(publisher.partition_of(rid), rid)
    decoys = [by_partition[p] for p in range(partitions)]
    for rid in decoys:
        await publisher.declined(rid, subject_ref=ref, account_id=account_id)
    for rid in decoys:
        await world.audited(rid, "decoy_stored")

    wrong = per_account - 1  # all but the last allowed, spread over the partitions
    share = [wrong // partitions + (1 if i < wrong % partitions else 0) for i in range(partitions)]
    assert max(share) < per_token, "the test needs no decoy to reach the token limit"
    await asyncio.gather(
        *(
            publisher.reset(rid, new_key(), code="000000")
            for rid, n in zip(decoys, share, strict=True)
            for _ in range(n)
        )
    )
    for rid, n in zip(decoys, share, strict=True):
        if n:
            outcome = await world.portal.wait_outcome(rid, "reset", count=n)
            assert outcome["reasons"] == ["token_invalid"]
    await internal_events.wait(
        lambda t, _h, d: t == TOKENS_CODE_REJECTED and d["data"].get("account_id") == account_id, count=wrong
    )
    # Every one counted: the next wrong code is the last allowed, and the one after is refused.
    last, refused = await decoys_for(world, publisher, c.national_id, account_id, 2)
    await publisher.reset(last, new_key(), code="000000")
    assert (await world.portal.wait_outcome(last, "reset"))["reasons"] == ["code_attempts_exceeded"]
    await publisher.reset(refused, new_key(), code="000000")
    assert (await world.portal.wait_outcome(refused, "reset"))["reasons"] == ["code_attempts_exceeded"]
    assert len(rejected_codes(internal_events, account_id)) >= per_account


async def test_wrong_codes_of_an_unknown_id_count_under_its_keyed_hash(
    world: World, publisher: Publisher, internal_events: TopicWatcher
) -> None:
    """No account, yet the same limits: the ID's keyed hash carries the count and the report."""
    stranger = new_citizen()  # never registered
    ref = keyed_hash(world.settings.pseudonym_key, stranger.national_id)
    rid = new_rid()
    await publisher.declined(rid, subject_ref=ref, account_id=None)
    await world.audited(rid, "decoy_stored")
    await publisher.reset(rid, new_key(), code="123456", client_ip="2001:db8::7")
    assert (await world.portal.wait_outcome(rid, "reset"))["reasons"] == ["token_invalid"]
    reported = await internal_events.wait(
        lambda t, _h, d: t == TOKENS_CODE_REJECTED and d["data"].get("request_id") == rid
    )
    assert reported[0]["data"]["subject_ref"] == ref
    assert reported[0]["data"].get("account_id") is None
    assert reported[0]["data"]["client_ip"] == "2001:db8::7"


async def test_a_strangers_wrong_codes_on_failed_requests_leave_the_owners_code_working(
    world: World, publisher: Publisher, internal_events: TopicWatcher
) -> None:
    """The attack: failed recovery requests for a registered citizen's ID (wrong answers),
    then the account limit's worth of wrong codes on them from one address. The stranger's
    block is stopped; the owner, requesting properly from home, redeems the mailed code."""
    per_token, per_account = world.settings.code_max_attempts, world.settings.code_account_max_failures
    c = new_citizen()
    (account_id,) = await world.register(c)
    stranger_ip, owner_ip = "203.0.113.77", "198.51.100.23"
    wrong_answers = {k: v + "x" for k, v in c.answers.items()}
    failed = [await world.request(c, answers=wrong_answers, client_ip=stranger_ip) for _ in range(3)]
    for rid in failed:
        await world.audited(rid, "decoy_stored")

    typed = 0
    for rid in failed[:-1]:
        for n in range(1, per_token + 1):
            await publisher.reset(rid, new_key(), code=f"{typed:06d}", client_ip=stranger_ip)
            reasons = (await world.portal.wait_outcome(rid, "reset", count=n))["reasons"]
            last = n == per_token or typed + 1 >= per_account
            assert reasons == ["code_attempts_exceeded" if last else "token_invalid"], (rid, n, reasons)
            typed += 1
    assert typed >= per_account
    # Reported for identity's lockout as before (it counts per account and per block).
    await internal_events.wait(
        lambda t, _h, d: t == TOKENS_CODE_REJECTED and d["data"].get("account_id") == account_id, count=typed
    )
    # The stranger's own block is stopped: a fresh failed request answers its first code so.
    await publisher.reset(failed[-1], new_key(), code="123456", client_ip=stranger_ip)
    assert (await world.portal.wait_outcome(failed[-1], "reset"))["reasons"] == ["code_attempts_exceeded"]

    # The owner, from home: asks properly, gets the mail, and the code in it works.
    rid = await world.request(c, client_ip=owner_ip)
    mail, _ = await world.recovery_mail(rid)
    await publisher.reset(rid, new_key(), code=extract_code(mail), client_ip=owner_ip)
    outcome = await world.portal.wait_outcome(rid, "reset")
    assert outcome["status"] == "completed", outcome
