"""Nothing lost, nothing doubled: N recoveries end to end while parts of the stack fail.

`make test-faults` (FAULT_N, default 200).  All N citizens are imported first with the
operator CLI (one JSON-lines file).  Then the load runs with bounded concurrency: each
recovery is a request, its e-mail, the link's token, a new key, and the `completed`
outcome.  During the load, one after the other: SIGKILL + restart of each of the four
services, a Kafka broker restart, the store stopped for 10 s, the SMTP server answering
4xx for 10 s.  Each fault is injected while recoveries are in flight (the load is let
ahead chunk by chunk, so the faults are spread over it); the notifier is killed the moment
the mail catcher stores a message, its worst moment.

Afterwards, from the topics themselves (read again from the offsets taken before the
load) and the mail catcher's folder:
- exactly N recovery e-mails, one per request, N distinct tokens, and N key-changed
  e-mails; no duplicate by Message-ID or by request, except the one case SMTP cannot
  exclude (RFC 1047: the sender died between the server's acceptance and its record),
  which must be an identical copy audited as `in_doubt_resend`, at most one per notifier
  kill (FAULT_STRICT_MAIL=1: none at all);
- exactly one reset outcome per request, `completed` (a redelivered copy of the same
  event, same id and bytes, is counted apart: consumers dedupe by event id);
- every request's full audit trail, each action once; audit events distinct by id
  (an exact redelivery is allowed and counted; the same id with other bytes is not);
- `clave audit verify` passes; every dead letter is a `duplicate_event` (counted).
The summary table is printed at the end and written to $VAR_DIR/faults-report.json.

FAULT_PLAN chooses the faults, the checks stay the same:
- `faults` (the default, `make test-faults`): the sequence above;
- `scale` (`make test-scale`, with INSTANCES=2 or more): one instance of every service (the
  last, e.g. `tokens-2`) SIGKILLed mid-load and not restarted, so its partitions move to the
  instances left (a consumer-group rebalance) and the load ends on them;
- `none`: no fault, for throughput (`make scale-throughput`: INSTANCES=1, then 2).
The report gives the throughput: completed recoveries per second of load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from shared.acl import AUDITOR, OPERATOR, PORTAL
from shared.audit import canonical
from shared.crypto import keyed_hash
from shared.topics import AUDIT_EVENTS, CONSUMED, RECOVERY_OUTCOMES, dlq
from tests.faults import harness
from tests.faults.harness import RetryingPortal, stack, utc_now
from tools.mail import Mailbox
from tools.testdata import Citizen, new_citizen, new_key, write_jsonl
from tools.watch import Rec, TopicWatcher, end_offsets, read_from
from tools.workbench import (
    RECOVERY_SERVICES,
    WorkbenchSettings,
    as_principal,
    metrics_url,
    principal_properties,
    workbench_settings,
)

pytestmark = pytest.mark.faults

N = int(os.environ.get("FAULT_N", "200"))
CONCURRENCY = int(os.environ.get("FAULT_CONCURRENCY", "20"))
LOAD_TIMEOUT_S = float(os.environ.get("FAULT_LOAD_TIMEOUT_S", "420"))
# The whole test stays within this, whatever happens (the target: `make test-faults` < 10 min).
BUDGET_S = float(os.environ.get("FAULT_BUDGET_S", "500"))
IMPORT_TIMEOUT_S = float(os.environ.get("FAULT_IMPORT_TIMEOUT_S", "180"))
HOLD_S = 10.0  # how long the store stays down and the SMTP server answers 4xx
# A mail whose sender died between the SMTP server's acceptance and its record is sent
# again (same Message-ID, same link), flagged `in_doubt_resend` in its audit event: the
# documented residual of SMTP (RFC 1047). Allowed, counted and reported, at most one per
# notifier kill; FAULT_STRICT_MAIL=1 fails on it too.
STRICT_MAIL = os.environ.get("FAULT_STRICT_MAIL", "") not in ("", "0")
# Lines the services log when they recover from a fault: counted for the report.
LOG_MARKERS = {
    "notifier": {
        "in_doubt_resends": "sending it again",
        "accepted_then_recorded": "recording it as sent",
        "lost_claims": "claim taken over",
    },
    "*": {"commits_landed_reply_lost": "had landed before its reply was lost"},
}
SERVICES = RECOVERY_SERVICES
PLAN = os.environ.get("FAULT_PLAN", "faults")
PLANS = ("faults", "scale", "none")
INSTANCES = int(os.environ.get("INSTANCES", "1"))  # as the stack was started (deploy/local/stack.py)
TRAIL = ("recovery_requested", "token_issued", "token_reserved", "key_changed", "token_spent")
MAIL_KINDS = ("recovery_link", "password_changed")
DLQ_TOPICS = [dlq(t) for t in CONSUMED]


def ready(settings: WorkbenchSettings, service: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(metrics_url(settings, service, "/readyz"), timeout=2) as r:  # noqa: S310
            return bool(r.status == 200)
    except OSError:
        return False


async def wait_ready(settings: WorkbenchSettings, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while missing := [s for s in SERVICES if not await asyncio.to_thread(ready, settings, s)]:
        if time.monotonic() > deadline:
            pytest.fail(f"services not ready: {missing}. Run the suite with `make test-faults`.")
        await asyncio.sleep(0.5)  # polling /readyz until the deadline


def run_cli(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # Operators run `accounts`, auditors `audit`: each with its own Kafka principal.
    principal = {"accounts": OPERATOR, "audit": AUDITOR}[args[0]]
    env = {**os.environ, "KAFKA_CLIENT_PROPERTIES": str(principal_properties(principal).resolve())}
    return subprocess.run(
        [sys.executable, "-m", "clave.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env,
    )


def log_counts() -> Counter[str]:
    """How often the services logged each recovery marker so far (LOG_MARKERS)."""
    counts: Counter[str] = Counter()
    for service in SERVICES:
        try:
            text = (harness.var_dir() / "log" / f"{service}.log").read_text(errors="replace")
        except OSError:
            continue
        for scope in (service, "*"):
            for name, marker in LOG_MARKERS.get(scope, {}).items():
                counts[name] += text.count(marker)
    return counts


# ---------------------------------------------------------------------------- the faults


class Faults:
    """The faults, injected in sequence; each returns what it did and counted."""

    def __init__(self) -> None:
        self.flag = harness.var_dir() / "run" / "smtp-tempfail"
        self.catcher_log = harness.var_dir() / "log" / "mailcatcher.log"
        self.mail_dir = Path(workbench_settings().mail_dir)

    def plan(self) -> list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]]:
        if PLAN == "none":
            return []
        if PLAN == "scale":
            # The audit read model too: every service of the stack loses an instance.
            last = [f"{s}-{INSTANCES}" for s in (*SERVICES, "audit")]
            return [(f"SIGKILL {name}", lambda name=name: self.kill_instance(name)) for name in last]  # type: ignore[misc]
        plan: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            (f"SIGKILL {s} + restart", lambda s=s: self.kill_restart(s))
            for s in SERVICES  # type: ignore[misc]
        ]
        plan.append(("Kafka broker restart", self.kafka_restart))
        plan.append((f"store stopped {HOLD_S:.0f}s", self.store_outage))
        plan.append((f"SMTP 4xx for {HOLD_S:.0f}s", self.smtp_tempfail))
        return plan

    def _mail_dir_stamp(self) -> int:
        return os.stat(self.mail_dir).st_mtime_ns

    async def _while_mail_flows(self, timeout: float = 15.0) -> bool:
        """Return as soon as the mail catcher stores a new message (the notifier is then in
        the middle of its work), or after `timeout`."""
        stamp = self._mail_dir_stamp()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._mail_dir_stamp() != stamp:
                return True
            await asyncio.sleep(0.002)  # polling the folder's mtime, bounded by the deadline
        return False

    async def kill_restart(self, service: str) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        if service == "notifier":
            # The worst moment for the notifier: right after the SMTP server accepted a mail.
            extra["killed_as_mail_arrived"] = await self._while_mail_flows()
        killed = await stack("kill-service", service)
        t = time.monotonic()
        started = await stack("start-service", service)
        return {"action": f"{killed} / {started}", "down_s": round(time.monotonic() - t, 1), **extra}

    async def kill_instance(self, name: str) -> dict[str, Any]:
        """SIGKILL one instance, no restart: the others of its service take its partitions over."""
        extra: dict[str, Any] = {}
        if name.startswith("notifier"):
            extra["killed_as_mail_arrived"] = await self._while_mail_flows()
        t = time.monotonic()
        killed = await stack("kill-service", name)
        return {"action": killed.replace("\n", " / "), "down_s": round(time.monotonic() - t, 1), **extra}

    async def kafka_restart(self) -> dict[str, Any]:
        t = time.monotonic()
        out = await stack("kafka-restart")
        return {"action": out.replace("\n", " / "), "down_s": round(time.monotonic() - t, 1)}

    async def store_outage(self) -> dict[str, Any]:
        stopped = await stack("store-stop")
        t = time.monotonic()
        await asyncio.sleep(HOLD_S)  # the fault's duration is the point
        started = await stack("store-start")
        return {"action": f"{stopped} / {started}", "down_s": round(time.monotonic() - t, 1)}

    def _refusals(self) -> int:
        try:
            text = self.catcher_log.read_text(errors="replace")
        except OSError:
            return 0
        return sum(1 for line in text.splitlines() if "Temporary failure (injected)" in line)

    def restore(self) -> None:
        self.flag.unlink(missing_ok=True)

    async def smtp_tempfail(self) -> dict[str, Any]:
        before = self._refusals()
        self.flag.touch()
        t = time.monotonic()
        try:
            await asyncio.sleep(HOLD_S)  # the fault's duration is the point
        finally:
            self.flag.unlink(missing_ok=True)
        return {
            "action": f"created {self.flag}, removed after {HOLD_S:.0f}s",
            "down_s": round(time.monotonic() - t, 1),
            "smtp_4xx_answers": self._refusals() - before,
        }


# ---------------------------------------------------------------------------- the test


async def test_recoveries_survive_faults() -> None:  # noqa: C901 - one scenario, read top to bottom
    suite_t0 = time.monotonic()
    assert PLAN in PLANS, f"FAULT_PLAN={PLAN}: expected one of {PLANS}"
    if PLAN == "scale" and INSTANCES < 2:
        pytest.fail("FAULT_PLAN=scale kills one instance of each service: run it with INSTANCES=2 (make test-scale)")
    settings = workbench_settings()
    await wait_ready(settings)
    report: dict[str, Any] = {
        "n": N,
        "concurrency": CONCURRENCY,
        "plan": PLAN,
        "instances": INSTANCES,
        "started_at": utc_now(),
    }
    logs_before = log_counts()

    # Where every topic we read ends now: everything after is this run's.
    starts = await end_offsets(settings, [AUDIT_EVENTS, RECOVERY_OUTCOMES, *DLQ_TOPICS])
    audit_starts = {tp: o for tp, o in starts.items() if tp.topic == AUDIT_EVENTS}
    outcome_starts = {tp: o for tp, o in starts.items() if tp.topic == RECOVERY_OUTCOMES}
    dlq_starts = {tp: o for tp, o in starts.items() if tp.topic not in (AUDIT_EVENTS, RECOVERY_OUTCOMES)}

    # Live views: audit actions per request/account, reset outcomes per request.
    audit_by_rid: dict[str, dict[str, str]] = defaultdict(dict)  # rid -> event id -> action[:kind]
    imported: dict[str, str] = {}  # subject_ref -> account_id
    keys_set: set[str] = set()

    def on_audit(rec: Rec) -> None:
        data = (rec.doc or {}).get("data") or {}
        action = data.get("action")
        if action == "account_imported":
            imported[data.get("subject_ref")] = data.get("account_id")
        elif action == "initial_key_set":
            keys_set.add(data.get("account_id"))
        rid = data.get("request_id")
        if rid:
            kind = (data.get("details") or {}).get("kind")
            audit_by_rid[rid][str(rec.doc.get("id"))] = f"{action}:{kind}" if action == "mail_sent" else action  # type: ignore[union-attr]

    reset_outcomes: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def on_outcome(rec: Rec) -> None:
        data = (rec.doc or {}).get("data") or {}
        if data.get("stage") == "reset":
            reset_outcomes[data.get("request_id")].append(data)

    audit_tail = TopicWatcher(settings, starts=audit_starts, on_record=on_audit)
    outcome_tail = TopicWatcher(settings, starts=outcome_starts, on_record=on_outcome)
    mails = Mailbox(settings.mail_dir, ignore_existing=True)  # this run's mail only
    portal = RetryingPortal(as_principal(settings, PORTAL))
    await audit_tail.start()
    await outcome_tail.start()
    await mails.start()
    await portal.start()
    try:
        # ---- import all N citizens with the operator CLI, one file --------------------------
        citizens: list[Citizen] = [
            new_citizen(profile="employer" if i % 5 == 4 else "affiliate", locale="en" if i % 3 == 2 else "es")
            for i in range(N)
        ]
        # One more, outside the count: its recovery, requested once the load has settled, is the
        # later mail that the "nothing more arrived" counts wait for.
        witness = new_citizen()
        path = write_jsonl([*citizens, witness], Path(tempfile.mkdtemp(prefix="faults-")) / "accounts.jsonl")
        t = time.monotonic()
        result = await asyncio.to_thread(
            run_cli, "accounts", "import", str(path), "--operator", "op-1", "--wait", "280", timeout=300
        )
        assert result.returncode == 0, f"import failed: {result.stdout}{result.stderr}"
        refs = {keyed_hash(settings.pseudonym_key, c.national_id) for c in citizens}
        deadline = min(time.monotonic() + IMPORT_TIMEOUT_S, suite_t0 + BUDGET_S / 3)
        await audit_tail.wait_until(
            lambda: refs <= imported.keys(), deadline=deadline, what="account_imported for every citizen"
        )
        account_ids = {imported[r] for r in refs}
        await audit_tail.wait_until(
            lambda: account_ids <= keys_set, deadline=deadline, what="initial_key_set for every account"
        )
        report["import"] = {"accounts": N, "seconds": round(time.monotonic() - t, 1), "cli": result.stdout.strip()}

        # ---- the load, with the faults injected while it runs ---------------------------------
        faults = Faults()
        plan = faults.plan()
        # The load is let ahead chunk by chunk: fault k is injected once k chunks (and a few)
        # are done, with about `ahead` recoveries in flight, so the faults spread over the load.
        chunk = max(1, N // (len(plan) + 1))
        ahead = min(CONCURRENCY, chunk)
        state = {"allowed": min(N, chunk + ahead), "started": 0, "finished": 0}
        progress = asyncio.Condition()
        sem = asyncio.Semaphore(CONCURRENCY)
        load_t0 = time.monotonic()
        load_deadline = min(load_t0 + LOAD_TIMEOUT_S, suite_t0 + BUDGET_S - 100)
        runs: list[dict[str, Any]] = [{} for _ in range(N)]

        async def bump(key: str) -> None:
            async with progress:
                state[key] += 1
                progress.notify_all()

        async def recovery(i: int, c: Citizen) -> None:
            run = runs[i]
            async with progress:
                await progress.wait_for(lambda: i < state["allowed"])
            async with sem:
                await bump("started")
                run["t0"] = time.monotonic()
                try:
                    rid = await portal.request_recovery(
                        national_id=c.national_id,
                        email_address=c.email,
                        answers=dict(c.answers),
                        profile=c.profile,
                        representative_id=c.representative_id,
                        locale=c.locale,
                    )
                    run["rid"] = rid
                    mail = await mails.recovery_mail(rid, deadline=load_deadline)
                    run["t_mail"] = time.monotonic()
                    assert mail.token is not None
                    await portal.submit_reset(rid, new_key(), token=mail.token)
                    await outcome_tail.wait_until(
                        lambda: bool(reset_outcomes.get(rid)), deadline=load_deadline, what=f"outcome of {rid}"
                    )
                    run["status"] = reset_outcomes[rid][0]["status"]
                    run["reasons"] = reset_outcomes[rid][0]["reasons"]
                except Exception as exc:  # recorded and reported; the assertions come at the end
                    run["error"] = f"{exc.__class__.__name__}: {exc}"
                finally:
                    run["t_end"] = time.monotonic()
                    await bump("finished")

        async def inject() -> list[dict[str, Any]]:
            done: list[dict[str, Any]] = []
            for k, (name, fault) in enumerate(plan):
                target = min(N, k * chunk + ahead // 2)
                async with progress:
                    try:
                        await asyncio.wait_for(
                            progress.wait_for(lambda target=target: state["finished"] >= target),  # type: ignore[misc]
                            timeout=max(0.0, load_deadline - time.monotonic()),
                        )
                    except TimeoutError:
                        pass  # the load stalled: inject anyway, the report shows it
                    in_flight = state["started"] - state["finished"]
                    finished = state["finished"]
                entry: dict[str, Any] = {
                    "name": name,
                    "injected_at": utc_now(),
                    "t": time.monotonic(),
                    "wall": time.time(),
                    "in_flight": in_flight,
                    "finished_before": finished,
                }
                try:
                    entry.update(await fault())
                except Exception as exc:
                    # The test fails on it; first bring the stack back so the load can end.
                    entry["error"] = f"{exc.__class__.__name__}: {exc}"
                    faults.restore()
                    for command in ("infra-up", "services-up"):
                        try:
                            await stack(command)
                        except AssertionError as again:
                            entry["error"] += f"; restoring with {command}: {again}"
                entry["held_s"] = time.monotonic() - entry["t"]
                entry["restored_at"] = utc_now()
                done.append(entry)
                async with progress:
                    state["allowed"] = min(N, (k + 2) * chunk + ahead)
                    progress.notify_all()
            async with progress:
                state["allowed"] = N
                progress.notify_all()
            return done

        injector = asyncio.create_task(inject())
        await asyncio.gather(*(recovery(i, c) for i, c in enumerate(citizens)))
        fault_log = await injector
        load_end = time.monotonic()
        report["load_seconds"] = load_end - load_t0
        completed_n = sum(1 for r in runs if r.get("status") == "completed")
        report["throughput_per_s"] = round(completed_n / (load_end - load_t0), 2)
        # The machine's load over the last minute (2 shared cores: other stacks count too).
        report["loadavg_1m"] = round(os.getloadavg()[0], 1)

        # ---- let the tail of the work land: key-changed mails, full audit trails -------------
        rids = {r["rid"]: i for i, r in enumerate(runs) if "rid" in r}
        settle_deadline = min(time.monotonic() + 120, suite_t0 + BUDGET_S - 60)
        emails = {c.email for c in citizens}

        def changed_mails() -> int:
            return sum(1 for m in mails.mails if m.request_id is None and m.to in emails)

        with contextlib.suppress(TimeoutError):  # counted below
            await mails.wait_until(
                lambda: changed_mails() >= len(rids), deadline=settle_deadline, what="every key-changed e-mail"
            )

        def trails_complete() -> bool:
            need = {*TRAIL, *(f"mail_sent:{k}" for k in MAIL_KINDS)}
            return all(need <= set(audit_by_rid.get(rid, {}).values()) for rid in rids)

        with contextlib.suppress(TimeoutError):  # counted below
            await audit_tail.wait_until(trails_complete, deadline=settle_deadline, what="complete audit trails")
        # "No duplicate, no stray mail" is concluded only after a later mail has arrived: a
        # recovery for someone else, requested now (the notifier sends in queue order, so a
        # copy queued before it would be here too).
        report["witness_mail"] = False
        try:
            witness_rid = await portal.request_recovery(
                national_id=witness.national_id, email_address=witness.email, answers=dict(witness.answers)
            )
            await mails.recovery_mail(witness_rid, deadline=max(settle_deadline, time.monotonic() + 60))
            report["witness_mail"] = True
        except TimeoutError:
            pass  # reported below
        mails.scan()
    finally:
        await portal.stop()
        await mails.stop()
        await outcome_tail.stop()
        await audit_tail.stop()

    # ---- read everything again from the topics, and count ---------------------------------
    audit_recs = await read_from(settings, audit_starts)
    outcome_recs = await read_from(settings, outcome_starts)
    dlq_recs = await read_from(settings, dlq_starts)

    # Recoveries
    completed = [r for r in runs if r.get("status") == "completed"]
    failed = [r for r in runs if r.get("status") != "completed"]
    latencies = sorted(r["t_end"] - r["t0"] for r in runs if "t0" in r and "t_end" in r)
    report["recoveries"] = {
        "completed": len(completed),
        "failed": len(failed),
        "failures": [{k: r.get(k) for k in ("rid", "status", "reasons", "error")} for r in failed[:10]],
        "slowest": [
            {
                "rid": r.get("rid"),
                "started_at_s": round(r["t0"] - load_t0, 1),
                "to_mail_s": round(r.get("t_mail", r["t_end"]) - r["t0"], 1),
                "mail_to_outcome_s": round(r["t_end"] - r.get("t_mail", r["t_end"]), 1),
            }
            for r in sorted(
                (r for r in runs if "t0" in r and "t_end" in r), key=lambda r: r["t_end"] - r["t0"], reverse=True
            )[:5]
        ],
        "latency_s": {
            "p50": round(statistics.median(latencies), 2) if latencies else None,
            "p95": round(latencies[int(0.95 * (len(latencies) - 1))], 2) if latencies else None,
            "max": round(latencies[-1], 2) if latencies else None,
        },
    }

    # Outcomes
    outcome_ids: dict[str, bytes] = {}
    outcome_copies = outcome_conflicts = 0
    reset_by_rid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in outcome_recs:
        doc = rec.doc or {}
        data = doc.get("data") or {}
        if data.get("request_id") not in rids:
            continue
        eid = str(doc.get("id"))
        if eid in outcome_ids:
            outcome_copies += 1
            outcome_conflicts += outcome_ids[eid] != rec.value
            continue
        outcome_ids[eid] = rec.value
        if data.get("stage") == "reset":
            reset_by_rid[data["request_id"]].append(data)
    report["outcomes"] = {
        "completed": sum(1 for rid in rids if [o["status"] for o in reset_by_rid[rid]] == ["completed"]),
        "other": sum(1 for rid in rids if [o["status"] for o in reset_by_rid[rid]] != ["completed"]),
        "copies": outcome_copies,
        "conflicting_copies": outcome_conflicts,
    }

    # Audit
    audit_first: dict[str, str] = {}
    exact = conflicting = 0
    trail: dict[str, Counter[str]] = defaultdict(Counter)
    in_doubt: set[tuple[str, str]] = set()  # (request, mail kind) audited as an in-doubt resend
    redelivery_times: list[float] = []
    for rec in audit_recs:
        doc = rec.doc or {}
        eid = str(doc.get("id"))
        digest = canonical(doc).hex() if doc else rec.value.hex()
        if eid in audit_first:
            if audit_first[eid] == digest:
                exact += 1
                redelivery_times.append(rec.timestamp_ms / 1000)
            else:
                conflicting += 1
            continue
        audit_first[eid] = digest
        data = doc.get("data") or {}
        rid = data.get("request_id")
        if rid in rids:
            action = data.get("action")
            details = data.get("details") or {}
            kind = details.get("kind")
            trail[rid][f"{action}:{kind}" if action == "mail_sent" else str(action)] += 1
            if action == "mail_sent" and details.get("in_doubt_resend"):
                in_doubt.add((rid, str(kind)))
    expected = [*TRAIL, *(f"mail_sent:{k}" for k in MAIL_KINDS)]
    lost = {a: sum(1 for rid in rids if trail[rid][a] == 0) for a in expected}
    duplicated = {a: sum(trail[rid][a] - 1 for rid in rids if trail[rid][a] > 1) for a in expected}
    unexpected = Counter(a for rid in rids for a in trail[rid] if a not in expected)
    # This run's range: the log is kept forever and may hold forgeries the e2e tests published
    # on purpose; each chain's first event in the range anchors it (its signature must hold),
    # and every chain must reach the head the audit service recorded.
    verify = await asyncio.to_thread(run_cli, "audit", "verify", "--since", report["started_at"], timeout=180)
    verify_text = (verify.stdout + verify.stderr).strip().splitlines()
    report["audit"] = {
        "distinct": len(audit_first),
        "exact_redeliveries": exact,
        "conflicting": conflicting,
        "lost": sum(lost.values()),
        "lost_by_action": {a: n for a, n in lost.items() if n},
        "duplicated": sum(duplicated.values()),
        "duplicated_by_action": {a: n for a, n in duplicated.items() if n},
        "unexpected_actions": dict(unexpected),
        "verify": f"exit {verify.returncode}: {verify_text[-1] if verify_text else ''}",
    }

    # E-mails: one message per (request, kind); a second copy is acceptable only as the
    # flagged in-doubt resend of the same message (same Message-ID, same link).
    ours = [m for m in mails.mails if m.to in emails]
    rid_by_email = {citizens[i].email: r["rid"] for i, r in enumerate(runs) if "rid" in r}
    groups: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for m in ours:
        if m.request_id is not None:
            groups[(m.request_id, "recovery_link")].append(m)
        else:
            groups[(rid_by_email.get(m.to, m.to), "password_changed")].append(m)
    in_doubt_copies = 0
    unexplained: list[dict[str, Any]] = []
    for (rid, kind), copies in groups.items():
        if len(copies) == 1:
            continue
        identical = len({m.message_id for m in copies}) == 1 and len({m.token for m in copies}) == 1
        if len(copies) == 2 and identical and (rid, kind) in in_doubt:
            in_doubt_copies += 1
        else:
            unexplained.append({"request": rid, "kind": kind, "files": [str(m.path) for m in copies]})
    owners = defaultdict(set)
    for (rid, kind), copies in groups.items():
        for m in copies:
            owners[m.message_id].add((rid, kind))
    unexplained += [{"message_id": mid, "shared_by": sorted(o)} for mid, o in owners.items() if len(o) > 1]
    recovery_mails = [m for m in ours if m.request_id is not None]
    changed = [m for m in ours if m.request_id is None]
    by_msgid = Counter(m.message_id for m in ours)
    tokens = Counter(m.token for m in recovery_mails)
    notifier_kills = sum(1 for f in fault_log if f["name"].startswith("SIGKILL notifier"))
    report["mails"] = {
        "recovery": len({m.message_id for m in recovery_mails}),
        "recovery_files": len(recovery_mails),
        "recovery_requests": len({m.request_id for m in recovery_mails}),
        "tokens": len(tokens),
        "password_changed": len({m.message_id for m in changed}),
        "password_changed_files": len(changed),
        "dup_message_id": sum(n - 1 for n in by_msgid.values() if n > 1),
        "dup_request": sum(len(c) - 1 for c in groups.values()),
        "in_doubt_resends": in_doubt_copies,
        "in_doubt_allowed": 0 if STRICT_MAIL else notifier_kills,
        "unexplained_duplicates": unexplained[:10],
        "unknown_requests": sorted({m.request_id for m in recovery_mails} - set(rids))[:10],
    }

    # Dead letters
    dlq_reasons = Counter(r.headers.get("clave-dlq-reason", "?") for r in dlq_recs)
    report["dlq"] = {
        "by_reason": dict(dlq_reasons),
        "by_topic": dict(Counter(r.topic for r in dlq_recs)),
    }
    report["portal_resends"] = RetryingPortal.send_retries
    after = log_counts()
    report["recoveries_logged"] = {
        name: after[name] - logs_before[name] for scope in LOG_MARKERS.values() for name in scope
    }

    # Per fault: what happened between its injection and the next one (or the end of the load).
    for k, entry in enumerate(fault_log):
        t0, t1 = entry.pop("t"), fault_log[k + 1]["t"] if k + 1 < len(fault_log) else load_end
        w0 = entry.pop("wall")
        w1 = w0 + (t1 - t0)
        hit = [r for r in runs if "t0" in r and r["t0"] <= t0 <= r.get("t_end", 1e18)]
        counts: dict[str, Any] = {
            "in_flight": entry.pop("in_flight"),
            "finished_before": entry.pop("finished_before"),
            "completed_in_window": sum(
                1 for r in runs if t0 <= r.get("t_end", -1) < t1 and r.get("status") == "completed"
            ),
            "slowest_in_flight_s": round(max((r.get("t_end", load_end) - r["t0"] for r in hit), default=0.0), 1),
            "mails_in_window": sum(1 for m in ours if t0 <= m.seen < t1),
            "audit_redeliveries": sum(1 for ts in redelivery_times if w0 <= ts < w1),
            "dlq_in_window": dict(
                Counter(r.headers.get("clave-dlq-reason", "?") for r in dlq_recs if w0 <= r.timestamp_ms / 1000 < w1)
            ),
            "down_s": entry.pop("down_s", None),
        }
        for key in [k for k in entry if k not in ("name", "injected_at", "restored_at", "held_s", "action", "error")]:
            counts[key] = entry.pop(key)  # what the fault itself counted
        entry["counts"] = counts
    report["faults"] = fault_log
    report["suite_seconds"] = round(time.monotonic() - suite_t0, 1)
    report["finished_at"] = datetime.now(UTC).isoformat(timespec="milliseconds")

    out = harness.var_dir() / "faults-report.json"
    out.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")
    harness.LAST_SUMMARY = harness.format_table(report) + f"\nreport: {out}"
    print(harness.LAST_SUMMARY)

    # ---- the guarantees ---------------------------------------------------------------------
    problems = []
    if any("error" in f for f in fault_log):
        problems.append(f"a fault could not be injected: {[f for f in fault_log if 'error' in f]}")
    if failed:
        problems.append(f"{len(failed)} recoveries did not complete: {report['recoveries']['failures']}")
    if not report["witness_mail"]:
        problems.append("the witness's recovery e-mail (the later mail the counts wait for) did not arrive")
    m = report["mails"]
    if not (m["recovery"] == N and m["recovery_requests"] == N and m["tokens"] == N):
        problems.append(
            f"recovery e-mails: {m['recovery']} for {m['recovery_requests']} requests, {m['tokens']} tokens"
        )
    if m["password_changed"] != N:
        problems.append(f"key-changed e-mails: {m['password_changed']} (want {N})")
    if m["unexplained_duplicates"]:
        problems.append(f"duplicate e-mails: {m['unexplained_duplicates']}")
    if m["in_doubt_resends"] > m["in_doubt_allowed"]:
        problems.append(f"in-doubt resends: {m['in_doubt_resends']} (allowed {m['in_doubt_allowed']})")
    o = report["outcomes"]
    if o["completed"] != N or o["conflicting_copies"]:
        problems.append(f"reset outcomes: {o}")
    a = report["audit"]
    if a["lost"] or a["duplicated"] or a["conflicting"] or a["unexpected_actions"]:
        problems.append(f"audit trail: {a}")
    if verify.returncode != 0:
        problems.append(f"clave audit verify: {a['verify']}")
    if set(dlq_reasons) - {"duplicate_event"}:
        problems.append(f"dead letters other than duplicate_event: {dict(dlq_reasons)}")
    assert not problems, "\n".join(problems)
