"""What a recovery costs its stores: at most 80 round trips, counted by every service's own
store client (`clave_store_commands_total`, pymongo's command monitoring), one recovery at a
time (the worst case: nothing is batched with another recovery). It used to be about 190."""

from __future__ import annotations

import asyncio
from collections import Counter

from services.audit.app import make_store
from tests.e2e.conftest import SERVICES, World, fetch, metrics_url
from tools.mail import body_text
from tools.testdata import new_key

NAME = "clave_store_commands_total"
TARGET = 80
RECOVERIES = 4


def commands(world: World) -> Counter[str]:
    """Store commands so far, by service and command name."""
    out: Counter[str] = Counter()
    for service in SERVICES:
        status, text = fetch(metrics_url(world.settings, service))
        assert status == 200
        for line in text.splitlines():
            if line.startswith(NAME + "{"):
                command = line.split('command="', 1)[1].split('"', 1)[0]
                out[f"{service}:{command}"] += float(line.rsplit(" ", 1)[1])  # type: ignore[assignment]
    return out


async def projected(world: World, request_ids: list[str]) -> None:
    """The audit read model holds both `mail_sent` events of every recovery: the last writes
    a recovery causes (the read model is fed last)."""
    store = make_store(world.settings)
    try:
        for _ in range(240):
            n = await store.db["events"].count_documents({"request_id": {"$in": request_ids}, "action": "mail_sent"})
            if n == 2 * len(request_ids):
                return
            await asyncio.sleep(0.25)
        raise AssertionError(f"the audit read model has {n} of {2 * len(request_ids)} mail_sent events")
    finally:
        await store.close()


async def test_a_recovery_costs_at_most_80_store_round_trips(world: World) -> None:
    citizens = [await world.citizen() for _ in range(RECOVERIES)]
    warm = await world.citizen()  # connections and consumer groups warm, not counted
    await world.recovery_mail(await world.request(warm))
    before = await asyncio.to_thread(commands, world)
    ids = []
    for c in citizens:
        rid = await world.request(c)
        ids.append(rid)
        _, token = await world.recovery_mail(rid)
        await world.portal.submit_reset(rid, new_key(), token=token)
        assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
        await world.mailbox.wait_for(lambda m, c=c: c.email in str(m["To"]) and "recuperar?" not in body_text(m))
    await projected(world, ids)
    after = await asyncio.to_thread(commands, world)
    spent = {k: (after[k] - before.get(k, 0)) / RECOVERIES for k in after if after[k] - before.get(k, 0)}
    per_recovery = sum(spent.values())
    breakdown = dict(sorted(((k, round(v, 1)) for k, v in spent.items()), key=lambda kv: -kv[1]))
    assert per_recovery <= TARGET, f"{per_recovery:.1f} store round trips per recovery: {breakdown}"
    # The count is real: every service that takes part used its store.
    assert {k.split(":")[0] for k in spent} >= set(SERVICES), breakdown
    print(f"{per_recovery:.1f} store round trips per recovery: {breakdown}")
