"""Auditors' tools on a real log: timeline, verify (and tampering caught), read-model rebuild."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from services.audit.app import make_store
from shared.audit import Signer, canonical, check_seal, seal
from shared.auditkeys import KeyRing
from shared.kafkaio import publish_raw
from shared.topics import AUDIT_EVENTS
from tests.e2e.conftest import World, clave_cli, fetch, metric_value, metrics_url
from tools.mail import body_text
from tools.testdata import new_key
from tools.workbench import RECOVERY_SERVICES

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]

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
    for service in RECOVERY_SERVICES:
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


def _since() -> str:
    """A --since for what a test is about to do. Whole-log checks would also see the forgeries
    this file publishes on purpose (the log keeps them forever), so each test verifies its
    own range: the first event of each chain in it anchors that chain (its signature must hold)."""
    return (datetime.now(UTC) - timedelta(seconds=1)).isoformat()


def auditor_env(**extra: str) -> dict[str, str]:
    """What an auditor's machine has: Kafka and store settings and the public keys. No secret."""
    wanted = ("CLAVE_ENV", "MONGODB_URI", "AUDIT_PUBLIC_KEYS", "PATH", "LANG", "HOME")
    env = {k: v for k, v in os.environ.items() if k in wanted or k.startswith("KAFKA_")}
    env.update(extra)
    secretish = [k for k in env if k != "AUDIT_PUBLIC_KEYS" and any(w in k for w in ("KEY", "PASSWORD", "SECRET"))]
    assert not secretish or set(secretish) <= {"KAFKA_SASL_PASSWORD"}, secretish  # the auditor's own Kafka login
    assert "AUDIT_SIGNING_KEY" not in env and "AUDIT_HMAC_KEY" not in env
    return env


def auditor_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clave.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env or auditor_env(),
        cwd=ROOT,
    )


def _write(path: Path, events: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in events), encoding="utf-8")
    return path


def _last_seqs(events: list[dict]) -> dict[str, int]:
    """Each producer's last authentic seq in a copy (forgeries published by these tests are
    in the log too, and must not count)."""
    keys = KeyRing.load(os.environ["AUDIT_PUBLIC_KEYS"])
    last: dict[str, int] = {}
    for e in events:
        integrity = e["data"].get("integrity") or {}
        if "producer" in integrity and check_seal(e, keys).authentic:
            last[integrity["producer"]] = max(last.get(integrity["producer"], 0), int(integrity["seq"]))
    return last


def recorded_heads() -> dict[str, dict]:
    result = auditor_cli("audit", "heads", "--json")
    assert result.returncode == 0, result.stderr
    return {h["producer"]: h for h in map(json.loads, result.stdout.splitlines())}


async def settled_export(since: str, timeout: float = 60) -> list[dict]:
    """An exported copy (`replay --json --since`) that the audit service has caught up with
    and nothing newer has reached: its heads are exactly the copy's last events. Polled, with
    a deadline (other tests' last events may still be trickling in)."""
    deadline = time.monotonic() + timeout
    while True:
        exported = await asyncio.to_thread(auditor_cli, "audit", "replay", "--json", "--since", since)
        assert exported.returncode == 0, exported.stderr
        events = [json.loads(line) for line in exported.stdout.splitlines()]
        last = _last_seqs(events)
        heads = await asyncio.to_thread(recorded_heads)
        start = datetime.fromisoformat(since)
        if all(heads.get(p, {}).get("seq") == seq for p, seq in last.items()) and all(
            datetime.fromisoformat(h["time"]) < start or p in last for p, h in heads.items()
        ):
            return events
        assert time.monotonic() < deadline, f"the read model never settled on the export: {last} vs heads"
        await asyncio.sleep(0.5)


def public_keys_without(producer: str, folder: Path) -> Path:
    """A copy of the stack's public keys (AUDIT_PUBLIC_KEYS) missing one producer's."""
    folder.mkdir()
    for entry in Path(os.environ["AUDIT_PUBLIC_KEYS"]).glob("*.json"):
        if not entry.name.startswith(f"{producer}-"):
            shutil.copy(entry, folder / entry.name)
    return folder


async def test_verify_needs_only_public_keys_and_fails_closed_on_an_unknown_key(world: World, tmp_path: Path) -> None:
    since = _since()
    await recover(world)
    ok = await asyncio.to_thread(auditor_cli, "audit", "verify", "--since", since)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK:" in ok.stdout and "chains intact" in ok.stdout and "tails reach the recorded heads" in ok.stdout

    # Without the tokens service's public key, its events are not taken on trust.
    partial = public_keys_without("tokens", tmp_path / "public")
    refused = await asyncio.to_thread(
        auditor_cli, "audit", "verify", "--since", since, env=auditor_env(AUDIT_PUBLIC_KEYS=str(partial))
    )
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "unknown producer 'tokens'" in refused.stderr

    # And with no public keys at all it verifies nothing and says why.
    none = await asyncio.to_thread(auditor_cli, "audit", "verify", env=auditor_env(AUDIT_PUBLIC_KEYS=""))
    assert none.returncode == 2 and "AUDIT_PUBLIC_KEYS: not set" in none.stderr


async def test_verify_catches_each_kind_of_tampering_in_a_copy(world: World, tmp_path: Path) -> None:
    since = _since()
    await recover(world)
    events = await settled_export(since)
    tokens_chain = _chain(events, "tokens")
    assert len(tokens_chain) >= 3  # issued, reserved, spent; the first anchors the range
    a, b, c = tokens_chain[0], tokens_chain[1], tokens_chain[2]

    def verify(copy: list[dict], name: str) -> str:
        result = auditor_cli(
            "audit", "verify", "--since", since, "--file", str(_write(tmp_path / f"{name}.jsonl", copy))
        )
        assert result.returncode == 1, f"{name} not detected: {result.stdout}"
        return result.stderr

    intact = auditor_cli("audit", "verify", "--since", since, "--file", str(_write(tmp_path / "copy.jsonl", events)))
    assert intact.returncode == 0 and "OK" in intact.stdout, intact.stdout + intact.stderr

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


async def test_a_cut_off_tail_in_an_exported_copy_is_reported(world: World, tmp_path: Path) -> None:
    since = _since()
    await recover(world)
    events = await settled_export(since)
    tokens_chain = _chain(events, "tokens")
    seqs = [events[i]["data"]["integrity"]["seq"] for i in tokens_chain]
    assert len(seqs) >= 3
    cut = [e for i, e in enumerate(events) if i not in tokens_chain[-2:]]  # the last two tokens events
    # The copy is intact in itself: only the head the audit service recorded shows the cut.
    no_heads = auditor_cli(
        "audit", "verify", "--since", since, "--no-heads", "--file", str(_write(tmp_path / "c.jsonl", cut))
    )
    assert no_heads.returncode == 0, no_heads.stdout + no_heads.stderr
    result = auditor_cli("audit", "verify", "--since", since, "--file", str(tmp_path / "c.jsonl"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "producer tokens" in result.stderr
    assert f"cut-off tail: the chain ends at seq {seqs[-3]}, the audit service recorded seq {seqs[-1]}" in result.stderr
    assert f"(seq {seqs[-2]}..{seqs[-1]} missing)" in result.stderr


def forge(template: dict, **integrity: object) -> bytes:
    """An audit event as an attacker with produce rights on audit.events would write it."""
    doc = json.loads(json.dumps(template))
    doc["id"] = str(uuid.uuid4())
    doc["time"] = datetime.now(UTC).isoformat()
    doc["data"]["action"] = "key_changed"
    doc["data"]["integrity"] = {**doc["data"]["integrity"], **integrity}
    return canonical(doc)


async def test_the_live_read_model_counts_forged_events(world: World) -> None:
    since = _since()
    await recover(world)
    events = await settled_export(since)
    template = events[_chain(events, "tokens")[-1]]
    head = recorded_heads()["tokens"]

    def breaks(reason: str) -> float:
        return metric_value(
            fetch(metrics_url(world.settings, "audit"))[1], "clave_audit_chain_breaks_total", reason=reason
        )

    before = {r: breaks(r) for r in ("unknown_key", "bad_signature", "sequence", "previous_hash")}
    # 1. Signed, in the right place of tokens' chain, but with a key nobody published.
    stranger = Ed25519PrivateKey.generate()
    doc = json.loads(forge(template))
    del doc["data"]["integrity"]
    unknown, _ = seal(doc, producer="tokens", seq=head["seq"] + 1, prev=head["hash"], signer=Signer(stranger))
    # 2. A real event, altered (its signature no longer holds), under a new id.
    altered = forge(template)
    for value in (unknown, altered):
        await publish_raw(world.settings, AUDIT_EVENTS, b"tokens", value)

    deadline = time.monotonic() + 60
    while (breaks("unknown_key"), breaks("bad_signature")) != (before["unknown_key"] + 1, before["bad_signature"] + 1):
        assert time.monotonic() < deadline, (
            f"forgeries not counted: {before} -> {breaks('unknown_key')}, {breaks('bad_signature')}"
        )
        await asyncio.sleep(0.5)
    # Recorded with the event id and why.
    store = make_store(world.settings)
    try:
        recorded = await store.breaks_for([json.loads(unknown)["id"], json.loads(altered)["id"]])
    finally:
        await store.close()
    assert recorded[json.loads(unknown)["id"]] == "unknown_key"
    assert recorded[json.loads(altered)["id"]] == "bad_signature"
    # The forgeries did not move tokens' chain: its next real events follow on without a break.
    assert recorded_heads()["tokens"]["event_id"] == head["event_id"]
    await recover(world)
    await settled_export(since)
    assert recorded_heads()["tokens"]["seq"] > head["seq"]
    assert breaks("sequence") == before["sequence"] and breaks("previous_hash") == before["previous_hash"]


async def test_rebuilt_read_model_equals_the_live_one(world: World) -> None:
    await recover(world)
    result = await asyncio.to_thread(clave_cli, "audit", "rebuild")
    assert "identical to the live read model" in result.stdout
    # The same breaks as the live model found (the forgeries above, if they ran), no more.
    found = re.search(r"chain problems: (\d+) \(live model: (\d+)\)", result.stdout)
    assert found is not None and found.group(1) == found.group(2), result.stdout
