"""Two resets racing with one token: exactly one reservation, one key change, one
`completed`; every other copy hears `token_used`. Never two key changes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from shared.topics import PASSWORD_UPDATED, RECOVERY_RESETS, TOKENS_REDEEMED
from tests.e2e.conftest import Publisher, World, fetch, metric_value, metrics_url
from tools.mail import body_text, extract_code
from tools.testdata import new_key
from tools.watch import DocPredicate, TopicWatcher

pytestmark = pytest.mark.e2e


def reset_failures(world: World) -> float:
    text = fetch(metrics_url(world.settings, "tokens"))[1]
    return metric_value(text, "clave_handler_failures_total", topic=RECOVERY_RESETS)


async def one_key_change(world: World, events: TopicWatcher, rid: str, email: str, outcomes: int) -> None:
    found = await world.portal.watcher.wait(
        lambda _t, _h, d: d.get("data", {}).get("request_id") == rid and d["data"].get("stage") == "reset",
        count=outcomes,
    )
    # A later positive event before counting "only one": the key-changed mail has arrived.
    await world.mailbox.wait_for(lambda m: email in str(m["To"]) and "recuperar?" not in body_text(m))

    def on_topic(topic: str) -> DocPredicate:
        return lambda t, _h, d: t == topic and d["data"]["request_id"] == rid

    def key_changed(_t: str, _h: Any, d: dict[str, Any]) -> bool:
        return bool(d["data"].get("request_id") == rid and d["data"].get("action") == "key_changed")

    # The test's own consumers may trail the mail: each copy counted below is waited for first.
    for topic in (TOKENS_REDEEMED, PASSWORD_UPDATED):
        await events.wait(on_topic(topic))
    await world.audit_log.wait(key_changed)
    await world.mail_barrier()
    results = sorted((d["data"]["status"], tuple(d["data"]["reasons"])) for d in found)
    assert results == [("completed", ())] + [("rejected", ("token_used",))] * (outcomes - 1), results
    assert len(world.portal.outcomes(rid)) == outcomes + 1  # the request's `accepted`, then these
    for topic in (TOKENS_REDEEMED, PASSWORD_UPDATED):
        assert len(events.matching(on_topic(topic))) == 1, topic
    assert len(world.audit_log.matching(key_changed)) == 1
    assert len([m for m in world.mails_to(email) if "recuperar?" not in body_text(m)]) == 1


async def test_link_and_code_at_once_change_the_key_once(world: World, internal_events: TopicWatcher) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    mail, token = await world.recovery_mail(rid)
    await asyncio.gather(
        world.portal.submit_reset(rid, new_key(), token=token),
        world.portal.submit_reset(rid, new_key(), code=extract_code(mail)),
    )
    await one_key_change(world, internal_events, rid, c.email, outcomes=2)


async def test_one_link_on_every_partition_at_once_changes_the_key_once(
    world: World, publisher: Publisher, internal_events: TopicWatcher
) -> None:
    """The same link, published once on each partition (each copy its own event id), so every
    consumer of the tokens service redeems it at the same moment: a true race on the store."""
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    failures_before = reset_failures(world)
    partitions = world.settings.kafka_topic_partitions
    await asyncio.gather(*(publisher.reset(rid, new_key(), token=token, partition=p) for p in range(partitions)))
    await one_key_change(world, internal_events, rid, c.email, outcomes=partitions)
    # The losers were decided again on fresh state, not failed and redelivered.
    assert reset_failures(world) == failures_before
