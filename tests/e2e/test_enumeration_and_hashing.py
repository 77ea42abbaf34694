"""No account enumeration by content or timing, and transparent argon2 rehashing."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from clave.testdata import new_citizen, random_cedula, write_jsonl
from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e

SAMPLES = 200


async def test_known_and_unknown_ids_look_and_cost_the_same(world: World) -> None:
    # Known accounts with a wrong answer (what an attacker without the answers can send)
    # against IDs with no account; failures stay under the lockout threshold per account.
    per_account = world.settings.lockout_max_failures - 1
    citizens = [new_citizen() for _ in range(SAMPLES // per_account)]
    await world.register(*citizens)
    known_rids, unknown_rids = [], []
    # One request at a time, alternating: each is measured alone, not queued behind others.
    for i in range(SAMPLES):
        c = citizens[i // per_account]
        rid = await world.request(c, answers={**c.answers, "mother_surname": "Nadie"})
        await world.audited(rid)
        known_rids.append(rid)
        rid = await world.portal.request_recovery(
            national_id=random_cedula(), email_address=c.email, answers=dict(c.answers)
        )
        await world.audited(rid)
        unknown_rids.append(rid)
    outcomes = await asyncio.gather(*(world.portal.wait_outcome(r, "request") for r in known_rids + unknown_rids))
    assert {(o["stage"], o["status"], tuple(o["reasons"])) for o in outcomes} == {("request", "accepted", ())}

    audits = await asyncio.gather(*(world.audited(r) for r in known_rids + unknown_rids))
    known = [a["details"]["elapsed_ms"] for a in audits[:SAMPLES]]
    unknown = [a["details"]["elapsed_ms"] for a in audits[SAMPLES:]]
    assert all("answers_wrong" in a["reasons"] for a in audits[:SAMPLES])
    assert all(a["reasons"] == ["account_unknown"] for a in audits[SAMPLES:])
    k, u = statistics.median(known), statistics.median(unknown)
    difference = abs(k - u) / max(k, u)
    print(f"\nidentity processing, median of {SAMPLES}: known {k:.2f} ms, unknown {u:.2f} ms, diff {difference:.1%}")
    assert difference < 0.05


async def test_answers_hashed_with_old_parameters_are_rehashed_on_success(world: World) -> None:
    c = new_citizen()
    path = write_jsonl([c], Path(tempfile.mkdtemp()) / "old.jsonl")
    # An import made under other argon2 parameters than the running service uses.
    env = {**os.environ, "ARGON2_TIME_COST": str(world.settings.argon2_time_cost + 1)}
    await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "clave.cli", "accounts", "import", str(path)],
        env=env,
        check=True,
        capture_output=True,
    )
    first = await world.request(c)
    assert (await world.audited(first))["details"]["answers_rehashed"] == len(world.settings.question_ids())
    await world.recovery_mail(first)
    second = await world.request(c)
    assert (await world.audited(second))["details"]["answers_rehashed"] == 0
    await world.recovery_mail(second)
