"""No account enumeration by content or timing, and transparent argon2 rehashing."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import World
from tools.portal import body_text
from tools.testdata import Citizen, new_citizen, random_cedula, write_jsonl

pytestmark = pytest.mark.e2e

SAMPLES = 60  # of each kind: enough for a stable median on two shared cores
WARMUP = 1  # cycles not measured (connections, caches)
KINDS = ("unknown", "wrong", "right")
# The order: a de Bruijn cycle, so every kind follows every kind (itself included) equally
# often. What a request leaves running after its outcome (a relay's last write, the audit
# projection, a recovery mail) then weighs on every kind alike. A plain rotation does not
# do that: with (unknown, wrong, right) rotating, unknown follows right twice as often as
# wrong does and right never follows right, which alone made unknown IDs look 27 % slower.
CYCLE = ("unknown", "unknown", "wrong", "unknown", "right", "wrong", "wrong", "right", "right")


class Kinds:
    """Citizens enough for SAMPLES of each kind inside the per-account rules: a wrong answer
    at most 4 times per account (each from a new address), all right at most the mailbox limit."""

    def __init__(self, world: World, n: int) -> None:
        per_right = world.settings.recovery_mails_per_hour
        self.world = world
        self.wrong = [new_citizen() for _ in range(-(-n // 4))]
        self.right = [new_citizen() for _ in range(-(-n // per_right))]
        self.per_right = per_right
        self.used = dict.fromkeys(KINDS, 0)

    async def send(self, kind: str) -> str:
        i = self.used[kind]
        self.used[kind] += 1
        if kind == "unknown":  # an ID with no account, typing a real citizen's address
            c = self.wrong[i // 4]
            return await self.world.portal.request_recovery(
                national_id=random_cedula(), email_address=c.email, answers=dict(c.answers)
            )
        if kind == "wrong":
            c = self.wrong[i // 4]
            return await self.world.request(c, answers={**c.answers, "mother_surname": "Nadie"})
        return await self.world.request(self.right[i // self.per_right])


# Known gap (issue 8 stays open on it): the all-right path measures +4 % (quiet machine) to
# +7 % (loaded) over an unknown ID, around the 5 % limit, because tokens and the notifier start
# their work on the same two cores while the portal reads `accepted`. The test runs in every
# `make test` and reports XPASS/XFAIL with its medians until the cause is removed at its root.
@pytest.mark.xfail(reason="all-right path within 4-7 % of unknown IDs; the limit is 5 % (issue 8)", strict=False)
async def test_known_and_unknown_ids_look_and_cost_the_same_to_the_portal(world: World) -> None:
    """Timed as the portal sees it: from publishing the request to reading `accepted` on
    recovery.outcomes, one request at a time (a recovery mail is let out before the next
    request), in the balanced order of CYCLE."""
    per_cycle = CYCLE.count("unknown")
    cycles = -(-SAMPLES // per_cycle)
    kinds = Kinds(world, (cycles + WARMUP) * per_cycle)
    await world.register(*kinds.wrong, *kinds.right)
    timings: dict[str, list[float]] = {k: [] for k in KINDS}
    rids: dict[str, list[str]] = {k: [] for k in KINDS}
    for i in range(cycles + WARMUP):
        for kind in CYCLE:
            started = time.perf_counter()
            rid = await kinds.send(kind)
            outcome = await world.portal.wait_outcome(rid, "request")
            elapsed_ms = (time.perf_counter() - started) * 1000
            assert outcome == {"request_id": rid, "stage": "request", "status": "accepted", "reasons": []}
            await world.audited(rid)
            if kind == "right":  # let its mail go out before the next measurement
                await world.recovery_mail(rid)
            if i >= WARMUP:
                timings[kind].append(elapsed_ms)
                rids[kind].append(rid)

    audits = {k: await asyncio.gather(*(world.audited(r) for r in rids[k])) for k in KINDS}
    assert all(a["reasons"] == ["account_unknown"] for a in audits["unknown"])
    assert all(a["reasons"] == ["answers_wrong"] for a in audits["wrong"])
    assert all(a["outcome"] == "success" for a in audits["right"])

    medians = {k: statistics.median(v) for k, v in timings.items()}
    print(
        f"\npublish -> accepted, median of {cycles * per_cycle}: "
        + ", ".join(f"{k} {m:.1f} ms" for k, m in medians.items())
        + " (quartiles: "
        + ", ".join(f"{k} {statistics.quantiles(v, n=4)}" for k, v in timings.items())
        + ")"
    )
    for kind in ("wrong", "right"):
        gap = abs(medians[kind] - medians["unknown"]) / medians["unknown"]
        assert gap < 0.05, f"{kind}: {medians[kind]:.1f} ms vs unknown {medians['unknown']:.1f} ms ({gap:.1%})"

    # Mail only on the verified path: once a later mail to someone else has arrived, the
    # citizens whose IDs were used with wrong answers (or whose address an unknown ID typed)
    # have still received nothing.
    witness = await world.citizen()
    later = await world.request(witness)
    await world.recovery_mail(later)
    assert not [m for c in kinds.wrong for m in world.mails_to(c.email)]
    for c in kinds.right:
        assert all("recuperar?" in body_text(m) for m in world.mails_to(c.email))


async def test_answers_hashed_with_old_parameters_are_rehashed_on_success(world: World) -> None:
    c = new_citizen()
    await import_with_other_parameters(world, c)
    first = await world.request(c)
    assert (await world.audited(first))["details"]["answers_rehashed"] == len(world.settings.question_ids())
    await world.recovery_mail(first)
    second = await world.request(c)
    assert (await world.audited(second))["details"]["answers_rehashed"] == 0
    await world.recovery_mail(second)


async def import_with_other_parameters(world: World, c: Citizen) -> None:
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
