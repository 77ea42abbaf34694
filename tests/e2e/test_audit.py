"""Auditors' tools on a real log: timeline, verify (and tampering caught), read-model rebuild."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from clave.portal import body_text
from clave.testdata import new_key
from tests.e2e.conftest import World, clave_cli

pytestmark = pytest.mark.e2e

FULL_RECOVERY = [
    "recovery_requested",
    "token_issued",
    "mail_sent",
    "token_reserved",
    "key_changed",
    "token_spent",
]


async def recover(world: World) -> str:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
    await world.mailbox.wait_for(lambda m: c.email in str(m["To"]) and "recuperar?" not in body_text(m))
    await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("request_id") == rid and d["data"].get("action") == "mail_sent", count=2
    )
    return rid


async def test_timeline_shows_a_whole_recovery_across_services(world: World, tmp_path: Path) -> None:
    rid = await recover(world)
    page = tmp_path / "timeline.html"
    # The read model is fed asynchronously: poll the command until the last step shows (bounded).
    for _ in range(60):
        result = await asyncio.to_thread(clave_cli, "audit", "timeline", rid, "--html", str(page), check=False)
        if result.returncode == 0 and result.stdout.count("mail_sent") >= 2:
            break
        await asyncio.sleep(0.5)
    for action in FULL_RECOVERY:
        assert action in result.stdout, action
    for service in ("identity", "tokens", "notifier", "password"):
        assert service in result.stdout
    html = page.read_text(encoding="utf-8")
    assert rid in html and "key_changed" in html and "<table>" in html
    from_log = await asyncio.to_thread(clave_cli, "audit", "timeline", rid, "--from-log")
    for action in FULL_RECOVERY + ["mail_sent"]:  # the read model answers as the log does
        assert from_log.stdout.count(action) == result.stdout.count(action), action


async def test_replay_filters_by_request_as_json(world: World) -> None:
    rid = await recover(world)
    result = await asyncio.to_thread(clave_cli, "audit", "replay", "--request", rid, "--json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    actions = [e["data"]["action"] for e in events]
    assert set(FULL_RECOVERY) <= set(actions)
    assert all(rid in (e["data"].get("request_id"), e.get("correlationid")) for e in events)
    assert all("integrity" in e["data"] for e in events)


def _chain(events: list[dict], producer: str) -> list[int]:
    return [i for i, e in enumerate(events) if e["data"]["integrity"]["producer"] == producer]


async def test_verify_passes_on_the_real_log_and_catches_each_kind_of_tampering(world: World, tmp_path: Path) -> None:
    await recover(world)
    assert "OK" in (await asyncio.to_thread(clave_cli, "audit", "verify")).stdout
    exported = await asyncio.to_thread(clave_cli, "audit", "replay", "--json")
    events = [json.loads(line) for line in exported.stdout.splitlines()]
    tokens_chain = _chain(events, "tokens")
    assert len(tokens_chain) >= 4
    a, b, c = tokens_chain[1], tokens_chain[2], tokens_chain[3]

    def verify(copy: list[dict], name: str) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in copy), encoding="utf-8")
        result = clave_cli("audit", "verify", "--file", str(path), check=False)
        assert result.returncode == 1, f"{name} not detected: {result.stdout}"
        return result.stderr

    assert "OK" in clave_cli("audit", "verify", "--file", str(_write(tmp_path / "copy.jsonl", events))).stdout

    modified = json.loads(json.dumps(events))
    modified[b]["data"]["outcome"] = "rejected" if modified[b]["data"]["outcome"] == "success" else "success"
    assert modified[b]["id"] in verify(modified, "modified")

    deleted = [e for i, e in enumerate(events) if i != b]
    assert events[c]["id"] in verify(deleted, "deleted")

    forged = json.loads(json.dumps(events[b]))
    forged["id"] = "00000000-0000-4000-8000-000000000000"
    inserted = events[:c] + [forged] + events[c:]
    assert forged["id"] in verify(inserted, "inserted")

    reordered = list(events)
    reordered[a], reordered[b] = reordered[b], reordered[a]
    assert "BROKEN" in verify(reordered, "reordered")


def _write(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events), encoding="utf-8")
    return path


async def test_rebuilt_read_model_equals_the_live_one(world: World) -> None:
    await recover(world)
    result = await asyncio.to_thread(clave_cli, "audit", "rebuild")
    assert "identical to the live read model" in result.stdout
    assert "chain problems: 0" in result.stdout
