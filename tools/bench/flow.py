"""2. End to end: citizens imported, then recoveries driven as the portal would; and the first
request after the services start."""

import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.topics import IDENTITY_ACCOUNT_REGISTERED
from tools.bench.common import STACK_SH, console, ratio
from tools.bench.probes import machine_cpu, sample_sum, scrape, scrape_all, stack_cpu
from tools.mail import Mailbox
from tools.portal import Portal
from tools.testdata import Citizen, new_citizen, new_key, write_jsonl
from tools.workbench import WorkbenchSettings as Settings

# ------------------------------------------------------------------------------ 2. end to end


@dataclass
class Recovery:
    citizen: Citizen
    request_id: str = ""
    started: float = 0.0  # monotonic
    to_mail_s: float | None = None  # request published -> e-mail file written (mtime)
    to_mail_seen_s: float | None = None  # ... -> the bench noticed it (adds polling delay)
    reset_s: float | None = None  # reset published -> `completed` outcome read
    finished: float | None = None  # monotonic, when `completed` was read
    status: str = "pending"
    error: str = ""


async def import_citizens(citizens: list[Citizen]) -> tuple[float, str]:
    workdir = Path(tempfile.mkdtemp(prefix="clave-bench-"))
    accounts = write_jsonl(citizens, workdir / "accounts.jsonl")
    t0 = time.perf_counter()
    result = await asyncio.to_thread(
        subprocess.run,  # our own CLI with fixed arguments  # noqa: S603
        [sys.executable, "-m", "clave.cli", "accounts", "import", str(accounts), "--operator", "bench"],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        raise RuntimeError(f"import failed: {result.stdout}{result.stderr}")
    return elapsed, result.stdout.strip()


async def wait_metric(
    settings: Settings, service: str, name: str, target: float, timeout: float, **labels: str
) -> float | None:
    """Poll a service's counter until it reaches `target`; seconds waited, or None on timeout."""
    t0 = time.perf_counter()
    while True:
        value = sample_sum(await asyncio.to_thread(scrape, settings, service), name, **labels)
        if value >= target:
            return time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            return None
        await asyncio.sleep(0.1)


def mailbox(settings: Settings) -> Mailbox:
    """One poller for the mail catcher's folder, shared by every driver (20 waiters polling
    it each would cost more CPU than the services); earlier runs' mail left out."""
    return Mailbox(settings.mail_dir, ignore_existing=True, poll_s=0.02)


async def drive(portal: Portal, mails: Mailbox, rec: Recovery, step_timeout: float) -> None:
    c = rec.citizen
    rec.started = time.monotonic()
    wall0 = time.time()
    try:
        rec.request_id = await portal.request_recovery(
            national_id=c.national_id,
            email_address=c.email,
            answers=c.answers,
            profile=c.profile,
            representative_id=c.representative_id,
            locale=c.locale,
        )
        mail = await mails.recovery_mail(rec.request_id, timeout=step_timeout)
        token, captured = mail.token or "", mail.captured
        rec.to_mail_seen_s = time.monotonic() - rec.started
        rec.to_mail_s = max(0.0, captured - wall0)
        t1 = time.monotonic()
        await portal.submit_reset(rec.request_id, new_key(), token=token)
        outcome = await portal.wait_outcome(rec.request_id, "reset", timeout=step_timeout)
        rec.finished = time.monotonic()
        rec.reset_s = rec.finished - t1
        rec.status = outcome["status"]
        if rec.status != "completed":
            rec.error = ",".join(outcome.get("reasons") or [])
    except TimeoutError:
        rec.status, rec.error = "timeout", "waited too long for the e-mail or the outcome"
    except Exception as exc:  # a benchmark reports what broke and goes on
        rec.status, rec.error = "error", f"{exc.__class__.__name__}: {exc}"


@dataclass
class EndToEnd:
    recoveries: list[Recovery]
    import_s: float
    import_report: str
    initial_keys_s: float | None
    wall_s: float  # first request -> last `completed`
    drain_s: float | None  # last `completed` -> every "key changed" mail captured
    cpu: dict[str, float]  # CPU seconds per component over the run (incl. drain)
    bench_cpu_s: float
    cpu_window_s: float  # how long the CPU figures were accumulated
    machine_busy: float | None  # share of all CPUs busy (any process) during the run
    serial: list[Recovery] = field(default_factory=list)  # one at a time, before the run
    metrics_before: dict[str, str] = field(default_factory=dict)
    metrics_after: dict[str, str] = field(default_factory=dict)

    @property
    def completed(self) -> list[Recovery]:
        return [r for r in self.recoveries if r.status == "completed"]

    @property
    def throughput(self) -> float | None:
        return len(self.completed) / self.wall_s if self.completed and self.wall_s > 0 else None


async def end_to_end(
    settings: Settings, n: int, concurrency: int, serial: int, step_timeout: float, budget_s: float
) -> EndToEnd:
    everyone = [new_citizen() for _ in range(n + serial)]
    serial_citizens, citizens = everyone[:serial], everyone[serial:]
    metrics_import = await scrape_all(settings)
    registered0 = sample_sum(
        metrics_import["password"], "clave_events_consumed_total", topic=IDENTITY_ACCOUNT_REGISTERED
    )
    with console.status(f"importing {n} citizens with `clave accounts import` ..."):
        import_s, report = await import_citizens(everyone)
        # The password service sets each initial key from identity.account_registered: wait for
        # all of them, so that the recoveries measured below do not share the CPU with the import.
        initial_keys_s = await wait_metric(
            settings,
            "password",
            "clave_events_consumed_total",
            registered0 + n + serial,
            timeout=60,
            topic=IDENTITY_ACCOUNT_REGISTERED,
        )
    console.print(
        f"imported {n + serial} citizens in {import_s:.1f}s ({report}); initial keys stored after "
        f"{'-' if initial_keys_s is None else f'{initial_keys_s:.1f}s'} more"
    )

    mails = mailbox(settings)
    portal = Portal(settings)
    await portal.start()
    await mails.start()
    recoveries = [Recovery(c) for c in citizens]
    queue: asyncio.Queue[Recovery] = asyncio.Queue()
    for rec in recoveries:
        queue.put_nowait(rec)

    async def worker() -> None:
        while not queue.empty():
            await drive(portal, mails, queue.get_nowait(), step_timeout)

    try:
        # One at a time first: the latency of an idle system, and a warm-up (consumer groups
        # settled, connections open) that the measured run below does not pay for.
        serial_runs = [Recovery(c) for c in serial_citizens]
        with console.status(f"{serial} recoveries one at a time ..."):
            for rec in serial_runs:
                await drive(portal, mails, rec, step_timeout)
        before = await scrape_all(settings)
        cpu0, bench_cpu0, machine0 = stack_cpu(), time.process_time(), machine_cpu()
        cpu_t0 = time.monotonic()
        t0 = time.monotonic()
        with console.status(f"{n} recoveries, {concurrency} at a time ..."):
            workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, n))]
            _, pending = await asyncio.wait(workers, timeout=budget_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for rec in recoveries:
            if rec.status == "pending":
                rec.status, rec.error = "timeout", f"not finished within the {budget_s:.0f}s budget"
        done = [r.finished for r in recoveries if r.finished is not None and r.status == "completed"]
        wall_s = (max(done) if done else time.monotonic()) - t0
        # The flow's last step, the "key changed" mail, is part of a recovery's cost too.
        wanted = {r.citizen.email.lower() for r in recoveries if r.status == "completed"}
        drain_t0, drain_s = time.monotonic(), None
        try:
            await mails.wait_until(lambda: wanted <= mails.notices.keys(), timeout=30, what="every key-changed mail")
            drain_s = time.monotonic() - drain_t0
        except TimeoutError:
            pass  # reported as no drain time
        await asyncio.sleep(0.5)  # let the last relays and commits finish before reading CPU
        cpu1, bench_cpu1, machine1 = stack_cpu(), time.process_time(), machine_cpu()
        cpu_window_s = time.monotonic() - cpu_t0
        after = await scrape_all(settings)
    finally:
        await mails.stop()
        await portal.stop()
    cpu = {k: cpu1[k] - cpu0[k] for k in cpu1 if k in cpu0}
    return EndToEnd(
        recoveries=recoveries,
        import_s=import_s,
        import_report=report,
        initial_keys_s=initial_keys_s,
        wall_s=wall_s,
        cpu_window_s=cpu_window_s,
        machine_busy=ratio(machine1[0] - machine0[0], machine1[1] - machine0[1]),
        serial=serial_runs,
        drain_s=drain_s,
        cpu=cpu,
        bench_cpu_s=bench_cpu1 - bench_cpu0,
        metrics_before=before,
        metrics_after=after,
    )


async def first_request_to_mail(settings: Settings, step_timeout: float) -> dict[str, Any]:
    """The first recovery after the services start, as right after `make up` returns: one
    citizen imported, the services restarted (`stack.sh services-down`, then `services-up`,
    which returns once every /readyz answers 200, as `make up` does), then at once one
    request, timed to its e-mail in the mail catcher (the file's mtime)."""
    citizen = new_citizen()
    consumed, topic = "clave_events_consumed_total", IDENTITY_ACCOUNT_REGISTERED
    registered0 = sample_sum(await asyncio.to_thread(scrape, settings, "password"), consumed, topic=topic)
    await import_citizens([citizen])
    await wait_metric(settings, "password", consumed, registered0 + 1, timeout=60, topic=topic)
    portal = Portal(settings)
    await portal.start()  # before the restart: the portal's own start-up is not the stack's
    mails = mailbox(settings)
    await mails.start()
    try:
        for command in ("services-down", "services-up"):
            t0 = time.perf_counter()
            result = await asyncio.to_thread(
                subprocess.run,  # our own stack script with fixed arguments  # noqa: S603
                ["bash", STACK_SH, command],  # noqa: S607
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(f"stack.sh {command} failed: {result.stdout}{result.stderr}")
        services_up_s = time.perf_counter() - t0
        rec = Recovery(citizen)
        rec.started, wall0 = time.monotonic(), time.time()
        rec.request_id = await portal.request_recovery(
            national_id=citizen.national_id,
            email_address=citizen.email,
            answers=citizen.answers,
            profile=citizen.profile,
            representative_id=citizen.representative_id,
            locale=citizen.locale,
        )
        captured = (await mails.recovery_mail(rec.request_id, timeout=step_timeout)).captured
    finally:
        await mails.stop()
        await portal.stop()
    return {"first_request_to_mail_ms": max(0.0, captured - wall0) * 1000, "services_up_s": services_up_s}
