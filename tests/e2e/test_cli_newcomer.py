"""`clave audit` as a newcomer uses it against the running stack: ids copied from a table work
in the next command, a citizen is found by national ID, `--json` comes in time order, and a
filter that matches nothing says so (exit 1) instead of printing an empty table."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

from tests.e2e.conftest import World, clave_cli
from tools.testdata import new_key


async def test_ids_from_the_table_national_ids_and_time_order(world: World) -> None:
    since = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    citizen = await world.citizen()
    request_id = await world.request(citizen)
    _, token = await world.recovery_mail(request_id)
    await world.portal.submit_reset(request_id, new_key(), token=token)
    assert (await world.portal.wait_outcome(request_id, "reset"))["status"] == "completed"
    changed = await world.audited(request_id, "key_changed")
    account_id = changed["account_id"]

    table = await asyncio.to_thread(clave_cli, "audit", "replay", "--since", since, "--request", request_id)
    assert request_id in table.stdout and account_id in table.stdout  # whole, copyable

    by_national_id = await asyncio.to_thread(
        clave_cli, "audit", "replay", "--since", since, "--account", citizen.national_id, "--json"
    )
    mine = [json.loads(line) for line in by_national_id.stdout.splitlines()]
    assert {e["data"]["account_id"] for e in mine} == {account_id}
    assert {"key_changed", "token_issued"} <= {e["data"]["action"] for e in mine}
    times = [e["time"] for e in mine]
    assert times == sorted(times), "--json is in time order"

    by_prefix = await asyncio.to_thread(
        clave_cli, "audit", "replay", "--since", since, "--account", account_id[:12], "--type", "key_changed", "--json"
    )
    assert [json.loads(line)["data"]["request_id"] for line in by_prefix.stdout.splitlines()] == [request_id]

    everything = await asyncio.to_thread(clave_cli, "audit", "replay", "--since", since, "--json")
    times = [json.loads(line)["time"] for line in everything.stdout.splitlines()]
    assert len(times) >= len(mine) and times == sorted(times)

    nothing = await asyncio.to_thread(
        clave_cli, "audit", "replay", "--since", since, "--request", "req-nobody", check=False
    )
    assert nothing.returncode == 1 and nothing.stderr.count("\n") == 1 and "no audit event matches" in nothing.stderr
