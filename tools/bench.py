"""`make bench`: what one recovery costs, and how close Clave gets to that cost.

A benchmark, not a test: it prints numbers and ratios and fails only when the stack
cannot be driven at all. Against the real local stack (`stack.sh run` starts it):

1. argon2id with the configured parameters (`shared.hashing.SecretHasher`): time per
   hash and per verify on one thread, hashes/s on `--threads` threads. From it the
   physical floor of one recovery: identity verifies one hash per configured security
   question; password verifies the new key against the key history (up to
   `PASSWORD_HISTORY` hashes; a freshly imported citizen has one) and hashes it once.
2. End to end: `--n` fresh citizens imported with `clave accounts import`, then driven
   `--concurrency` at a time exactly as the portal would (request -> recovery e-mail
   in the mail catcher -> reset with the link -> `completed` outcome). Throughput,
   latency percentiles, CPU time of every stack process per recovery, and the ratio of
   measured to the hashing floor.
3. `--dlq` malformed records on `recovery.requests`: events/s of one consumer pipeline
   on its cheapest path (parse, dead-letter through the outbox, audit), no argon2.
4. First of all (`--no-first-request` skips it): the services are restarted and, as soon
   as `stack.sh services-up` returns (every /readyz 200, as for `make up`), one request is
   timed to its e-mail: `first_request_to_mail_ms`.

The services' /metrics are read before and after; handler latency per topic comes
from the histogram deltas (interpolated within buckets, like histogram_quantile).

    deploy/local/stack.sh run -- .venv/bin/python -m tools.bench --n 200 --json bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import email.utils
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from shared.hashing import SecretHasher
from shared.kafka import client_kwargs
from shared.topics import IDENTITY_ACCOUNT_REGISTERED, RECOVERY_REQUESTS
from tools.portal import Portal, extract_link
from tools.testdata import Citizen, new_citizen, new_key, write_jsonl
from tools.workbench import RECOVERY_SERVICES, metrics_url, workbench_settings
from tools.workbench import WorkbenchSettings as Settings

SERVICES = RECOVERY_SERVICES
INFRA = ("kafka", "store", "mailcatcher")
OPTIONAL = ("audit",)  # the audit read model, when the stack runs it
STACK_SH = str(Path(__file__).resolve().parent.parent / "deploy" / "local" / "stack.sh")
console = Console(width=None if sys.stdout.isatty() else 120)


# ------------------------------------------------------------------------------ helpers


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of raw samples; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


# ------------------------------------------------------------------------------ 1. argon2


@dataclass
class Rate:
    ops: int
    wall_s: float
    cpu_s: float

    @property
    def per_op_s(self) -> float:
        return self.wall_s / self.ops

    @property
    def per_s(self) -> float:
        return self.ops / self.wall_s

    @property
    def cpu_per_op_s(self) -> float:
        """CPU time per operation: the cost itself, whatever else the machine is running."""
        return self.cpu_s / self.ops

    def as_dict(self) -> dict[str, float]:
        return {
            "ops": self.ops,
            "wall_s": self.wall_s,
            "cpu_s": self.cpu_s,
            "ms_per_op": self.per_op_s * 1000,
            "cpu_ms_per_op": self.cpu_per_op_s * 1000,
            "ops_per_s": self.per_s,
        }


def _loop(op: Callable[[int], object], seconds: float, min_ops: int) -> int:
    done, start = 0, time.perf_counter()
    while done < min_ops or time.perf_counter() - start < seconds:
        op(done)
        done += 1
    return done


def measure(op: Callable[[int], object], threads: int, seconds: float, min_ops: int = 5) -> Rate:
    """Run `op` on `threads` threads for about `seconds`; argon2-cffi releases the GIL."""
    cpu0, t0 = time.process_time(), time.perf_counter()
    if threads == 1:
        ops = _loop(op, seconds, min_ops)
    else:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            ops = sum(pool.map(lambda _: _loop(op, seconds, min_ops), range(threads)))
    return Rate(ops, time.perf_counter() - t0, time.process_time() - cpu0)


def bench_argon2(settings: Settings, threads: int, seconds: float) -> dict[str, Rate]:
    hasher = SecretHasher(settings, workers=1)
    try:
        stored = hasher.hash_sync("Clave12345678")
        hasher.hash_sync("warm-up")
        return {
            "hash_1t": measure(lambda i: hasher.hash_sync(f"Clave{i:08d}"), 1, seconds),
            "verify_1t": measure(lambda i: hasher._verify_sync(stored, f"Clave{i:08d}"), 1, seconds),  # noqa: SLF001
            f"hash_{threads}t": measure(lambda i: hasher.hash_sync(f"Clave{i:08d}"), threads, seconds),
        }
    finally:
        hasher.close()


# ------------------------------------------------------------------------------ stack probes


def var_dir() -> Path:
    return Path(os.environ.get("VAR_DIR", "var")).resolve()


def stack_cpu() -> dict[str, float]:
    """user+system CPU seconds of each stack process (from the stack's pid files)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for component in SERVICES + OPTIONAL + INFRA:
        try:
            pid = int((var_dir() / "run" / f"{component}.pid").read_text().strip())
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[component] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            continue
    return out


def scrape(settings: Settings, service: str) -> str:
    with urllib.request.urlopen(metrics_url(settings, service), timeout=5) as response:  # noqa: S310 - the stack's own loopback endpoint
        return response.read().decode()  # type: ignore[no-any-return]


async def scrape_all(settings: Settings) -> dict[str, str]:
    texts = await asyncio.gather(*(asyncio.to_thread(scrape, settings, s) for s in SERVICES))
    return dict(zip(SERVICES, texts, strict=True))


def sample_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]  # service, histogram, labels without le


def histograms(texts: dict[str, str]) -> dict[SeriesKey, dict[str, Any]]:
    out: dict[SeriesKey, dict[str, Any]] = {}
    for service, text in texts.items():
        for family in text_string_to_metric_families(text):
            if family.type != "histogram":
                continue
            for sample in family.samples:
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
                series = out.setdefault((service, family.name, labels), {"buckets": {}, "count": 0.0, "sum": 0.0})
                if sample.name.endswith("_bucket"):
                    series["buckets"][float(sample.labels["le"])] = sample.value
                elif sample.name.endswith("_count"):
                    series["count"] = sample.value
                elif sample.name.endswith("_sum"):
                    series["sum"] = sample.value
    return out


def bucket_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative bucket counts."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def histogram_deltas(before: dict[str, str], after: dict[str, str], wall_s: float) -> list[dict[str, Any]]:
    old, new = histograms(before), histograms(after)
    rows = []
    for key, series in sorted(new.items()):
        prev = old.get(key, {"buckets": {}, "count": 0.0, "sum": 0.0})
        count = series["count"] - prev["count"]
        if count <= 0:
            continue
        buckets = {le: v - prev["buckets"].get(le, 0.0) for le, v in series["buckets"].items()}
        service, name, labels = key
        rows.append(
            {
                "service": service,
                "histogram": name,
                "labels": dict(labels),
                "count": int(count),
                "mean_s": (series["sum"] - prev["sum"]) / count,
                "p50_s": bucket_quantile(0.5, buckets),
                "p95_s": bucket_quantile(0.95, buckets),
                # Share of the run this handler was busy (handler histograms only).
                "busy": (series["sum"] - prev["sum"]) / wall_s if name == "clave_handler_seconds" and wall_s else None,
            }
        )
    return rows


# ------------------------------------------------------------------------------ 2. end to end


class MailWatch:
    """One poller for the mail catcher's folder (20 waiters polling it each would cost more
    CPU than the services): recovery e-mails by request_id, other mail by recipient.
    Capture time is the file's mtime (written, then renamed, by the mail catcher)."""

    def __init__(self, mail_dir: str) -> None:
        self.dir = Path(mail_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seen = {p.name for p in self.dir.glob("*.eml")}
        self.links: dict[str, asyncio.Future[tuple[str, float]]] = {}
        self.other: dict[str, float] = {}  # recipient -> capture time of the latest non-recovery mail
        self.parsed = 0

    def _link(self, request_id: str) -> asyncio.Future[tuple[str, float]]:
        fut = self.links.get(request_id)
        if fut is None:
            fut = self.links[request_id] = asyncio.get_running_loop().create_future()
        return fut

    def scan(self) -> None:
        with os.scandir(self.dir) as entries:
            fresh = sorted(
                (e.name, e.stat().st_mtime) for e in entries if e.name.endswith(".eml") and e.name not in self.seen
            )
        for name, mtime in fresh:
            self.seen.add(name)
            with (self.dir / name).open("rb") as fh:
                msg: EmailMessage = email.message_from_binary_file(fh, policy=email.policy.default)  # type: ignore[assignment]
            self.parsed += 1
            try:
                _, request_id, token = extract_link(msg)
            except (ValueError, KeyError):
                for _, address in email.utils.getaddresses([str(msg["To"] or "")]):
                    self.other[address.lower()] = mtime
                continue
            fut = self._link(request_id)
            if not fut.done():
                fut.set_result((token, mtime))

    async def run(self) -> None:
        while True:
            self.scan()
            await asyncio.sleep(0.02)

    async def link(self, request_id: str, timeout: float) -> tuple[str, float]:
        return await asyncio.wait_for(asyncio.shield(self._link(request_id)), timeout)


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


async def drive(portal: Portal, mails: MailWatch, rec: Recovery, step_timeout: float) -> None:
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
        token, captured = await mails.link(rec.request_id, step_timeout)
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


async def idle_cpu(seconds: float) -> dict[str, float]:
    """Share of one core each stack process uses with no traffic (background loops)."""
    cpu0, t0 = stack_cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, elapsed = stack_cpu(), time.monotonic() - t0
    return {k: (cpu1[k] - cpu0[k]) / elapsed for k in cpu1 if k in cpu0}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        values = [float(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
    total = sum(values[:8])
    return total - idle, total


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

    mails = MailWatch(settings.mail_dir)
    portal = Portal(settings)
    await portal.start()
    poller = asyncio.create_task(mails.run())
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
        while time.monotonic() - drain_t0 < 30:
            if wanted <= mails.other.keys():
                drain_s = time.monotonic() - drain_t0
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # let the last relays and commits finish before reading CPU
        cpu1, bench_cpu1, machine1 = stack_cpu(), time.process_time(), machine_cpu()
        cpu_window_s = time.monotonic() - cpu_t0
        after = await scrape_all(settings)
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
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
    mails = MailWatch(settings.mail_dir)
    poller = asyncio.create_task(mails.run())
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
        _, captured = await mails.link(rec.request_id, step_timeout)
    finally:
        poller.cancel()
        await asyncio.gather(poller, return_exceptions=True)
        await portal.stop()
    return {"first_request_to_mail_ms": max(0.0, captured - wall0) * 1000, "services_up_s": services_up_s}


# ------------------------------------------------------------------------------ 3. DLQ path


async def dlq_throughput(settings: Settings, count: int, timeout: float = 60.0) -> dict[str, Any]:
    """`count` records that are not CloudEvents on recovery.requests: identity parks each one
    in recovery.requests.dlq (sealed, through the outbox, audited). One pipeline, no argon2."""
    name, labels = "clave_dlq_messages_total", {"topic": RECOVERY_REQUESTS}
    before = sample_sum(await asyncio.to_thread(scrape, settings, "identity"), name, **labels)
    cpu0 = stack_cpu()
    producer = AIOKafkaProducer(**client_kwargs(settings), linger_ms=5)
    await producer.start()
    t0 = time.perf_counter()
    try:
        futures = [
            await producer.send(RECOVERY_REQUESTS, b'{"bench": "not a cloudevent", "n": %d}' % i, key=b"bench-%d" % i)
            for i in range(count)
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    published_s = time.perf_counter() - t0
    waited = await wait_metric(settings, "identity", name, before + count, timeout, **labels)
    elapsed = time.perf_counter() - t0
    cpu1 = stack_cpu()
    return {
        "messages": count,
        "published_s": published_s,
        "elapsed_s": elapsed if waited is not None else None,
        "events_per_s": count / elapsed if waited is not None else None,
        "identity_cpu_ms_per_event": (cpu1.get("identity", 0) - cpu0.get("identity", 0)) / count * 1000,
        "stack_cpu_ms_per_event": (sum(cpu1.values()) - sum(cpu0.values())) / count * 1000,
        "cpu_ms_per_event": {k: (cpu1[k] - cpu0[k]) / count * 1000 for k in cpu1 if k in cpu0},
    }


# ------------------------------------------------------------------------------ report


def floor_figures(settings: Settings, argon: dict[str, Rate], threads: int) -> dict[str, Any]:
    questions = len(settings.question_ids())
    # The floor is CPU time (contention-free); the parallel run shows what the machine gives now.
    per_hash_s = (argon["hash_1t"].cpu_per_op_s + argon["verify_1t"].cpu_per_op_s) / 2
    parallel = argon[f"hash_{threads}t"].per_s
    cases: dict[str, dict[str, float]] = {
        # Freshly imported citizens: one key (the initial one) in the history.
        "bench_citizen": {"identity_verifies": questions, "password_verifies": 1, "password_hashes": 1},
        "full_history": {
            "identity_verifies": questions,
            "password_verifies": settings.password_history,
            "password_hashes": 1,
        },
    }
    for case in cases.values():
        hashes = case["identity_verifies"] + case["password_verifies"] + case["password_hashes"]
        case["hashes"] = hashes
        case["cpu_ms_per_recovery"] = hashes * per_hash_s * 1000
        case["max_recoveries_per_s"] = threads / (hashes * per_hash_s)  # `threads` cores, hashing only
        case["max_recoveries_per_s_now"] = parallel / hashes  # with the measured parallel hash rate
    return {
        "argon2_cpu_ms_per_op": per_hash_s * 1000,
        "cores": threads,
        f"hashes_per_s_{threads}t_measured": parallel,
        "cases": cases,
    }


def print_report(results: dict[str, Any], e2e: EndToEnd | None, threads: int) -> None:
    env = results["environment"]
    console.rule("[bold]Clave benchmark")
    console.print(
        f"{env['cpus']} CPUs, load average {env['loadavg_start']} at start, Python {env['python']}; "
        f"argon2id m={env['argon2_memory_kib']} KiB t={env['argon2_time_cost']} p={env['argon2_parallelism']}; "
        f"{env['questions']} security questions; key history {env['password_history']}"
    )

    t = Table(title="1. argon2id with the configured parameters")
    for col in ("measure", "ops", "wall ms/op", "CPU ms/op", "ops/s", "CPU/wall"):
        t.add_column(col, justify="right" if col != "measure" else "left")
    for key, row in results["argon2"].items():
        t.add_row(
            key,
            str(row["ops"]),
            f"{row['ms_per_op']:.2f}",
            f"{row['cpu_ms_per_op']:.2f}",
            f"{row['ops_per_s']:.1f}",
            f"{row['cpu_s'] / row['wall_s']:.2f}",
        )
    console.print(t)
    console.print(
        "CPU/wall below the thread count means other processes took the CPU meanwhile: the floor "
        "below uses CPU ms/op, which does not depend on them."
    )

    floor = results["floor"]
    t = Table(title="Hashing floor of one recovery")
    for col in (
        "case",
        "identity verifies",
        "password verifies",
        "password hashes",
        "hashes",
        "argon2 CPU ms",
        f"max/s on {threads} cores",
        f"max/s at measured {threads}-thread rate",
    ):
        t.add_column(col, justify="right" if col != "case" else "left")
    for name, case in floor["cases"].items():
        t.add_row(
            name,
            str(case["identity_verifies"]),
            str(case["password_verifies"]),
            str(case["password_hashes"]),
            str(case["hashes"]),
            f"{case['cpu_ms_per_recovery']:.0f}",
            f"{case['max_recoveries_per_s']:.1f}",
            f"{case['max_recoveries_per_s_now']:.1f}",
        )
    console.print(t)

    if e2e is not None:
        r = results["end_to_end"]
        t = Table(title=f"2. End to end: {r['n']} recoveries, {r['concurrency']} at a time")
        t.add_column("measure")
        t.add_column("value", justify="right")
        t.add_row("completed / timeout / other", f"{r['completed']} / {r['timeouts']} / {r['other']}")
        t.add_row("import (CLI) + initial keys", f"{r['import_s']:.1f}s + {r['initial_keys_s'] or 0:.1f}s")
        t.add_row("wall, first request -> last completed", f"{r['wall_s']:.2f}s")
        t.add_row("throughput", f"{r['recoveries_per_s'] or 0:.2f} recoveries/s")
        for name, label in (
            ("to_mail", "request -> e-mail written"),
            ("to_mail_seen", "request -> e-mail read"),
            ("reset", "reset -> completed"),
        ):
            lat = r["latency_s"][name]
            t.add_row(f"{label} p50/p95/p99 ms", f"{ms(lat['p50'])} / {ms(lat['p95'])} / {ms(lat['p99'])}")
        t.add_row("drain: last 'key changed' mail after", f"{r['drain_s'] or 0:.2f}s")
        if r["serial"]["n"]:
            idle = r["serial"]
            t.add_row(
                f"idle system ({idle['n']} one at a time): e-mail / reset p50, max ms",
                f"{ms(idle['to_mail']['p50'])}, {ms(idle['to_mail']['max'])} / "
                f"{ms(idle['reset']['p50'])}, {ms(idle['reset']['max'])}",
            )
        if r["machine_busy"] is not None:
            t.add_row(
                "machine CPU busy during the run (all processes)",
                f"{r['machine_busy'] * 100:.0f}% (this stack: {r['stack_share_of_machine'] * 100:.0f}%)",
            )
        console.print(t)

        t = Table(title="CPU per recovery (over the run, incl. drain)")
        t.add_column("component")
        t.add_column("CPU s", justify="right")
        t.add_column("ms / recovery", justify="right")
        t.add_column("idle: % of a core", justify="right")
        t.add_column("ms / recovery above idle", justify="right")
        for comp, sec in r["cpu_s"].items():
            idle = r["idle_core_share"].get(comp)
            t.add_row(
                comp,
                f"{sec:.2f}",
                f"{r['cpu_ms_per_recovery'][comp]:.1f}",
                "-" if idle is None else f"{idle * 100:.0f}",
                f"{r['cpu_ms_per_recovery_above_idle'][comp]:.1f}",
            )
        t.add_row("[bold]services", f"{r['cpu_services_s']:.2f}", f"{r['cpu_ms_per_recovery_services']:.1f}")
        t.add_row("[bold]whole stack", f"{r['cpu_stack_s']:.2f}", f"{r['cpu_ms_per_recovery_stack']:.1f}")
        t.add_row("bench (portal stand-in)", f"{r['bench_cpu_s']:.2f}", "")
        console.print(t)

        eff = results["efficiency"]
        t = Table(title="Measured vs the hashing floor (bench citizens)")
        t.add_column("ratio")
        t.add_column("value", justify="right")
        t.add_row(f"floor: recoveries/s on {threads} cores", f"{eff['floor_recoveries_per_s']:.1f}")
        t.add_row("measured recoveries/s", f"{eff['measured_recoveries_per_s'] or 0:.2f}")
        t.add_row("throughput efficiency (measured / floor)", f"{(eff['throughput_efficiency'] or 0) * 100:.1f}%")
        t.add_row("argon2 CPU ms / recovery (floor)", f"{eff['floor_cpu_ms']:.0f}")
        t.add_row("services CPU ms / recovery", f"{eff['services_cpu_ms']:.0f}")
        t.add_row("whole-stack CPU ms / recovery", f"{eff['stack_cpu_ms']:.0f}")
        t.add_row("argon2 share of services CPU", f"{(eff['argon2_share_services'] or 0) * 100:.1f}%")
        t.add_row("argon2 share of whole-stack CPU", f"{(eff['argon2_share_stack'] or 0) * 100:.1f}%")
        t.add_row("CPU-bound ceiling: cores / stack CPU per recovery", f"{eff['cpu_ceiling_recoveries_per_s']:.1f}/s")
        console.print(t)

        t = Table(title="Handler and flow latency from /metrics (histogram deltas, bucket-interpolated)")
        numeric = ("n", "mean ms", "p50 ms", "p95 ms", "busy %")
        for col in ("service", "histogram", "labels", *numeric):
            t.add_column(col, justify="right" if col in numeric else "left")
        for row in results["metrics"]:
            t.add_row(
                row["service"],
                row["histogram"].removeprefix("clave_"),
                ",".join(f"{k}={v}" for k, v in row["labels"].items()),
                str(row["count"]),
                ms(row["mean_s"]),
                ms(row["p50_s"]),
                ms(row["p95_s"]),
                "" if row["busy"] is None else f"{row['busy'] * 100:.0f}",
            )
        console.print(t)
        console.print(
            "busy %: handler time / wall time of the run. Each topic is consumed by one consumer, one "
            "message at a time, so a topic near 100% is the ceiling of the whole flow."
        )
        failed = [x for x in e2e.recoveries if x.status != "completed"]
        for rec in failed[:5]:
            console.print(f"[red]{rec.status}[/red] {rec.request_id or rec.citizen.national_id}: {rec.error}")

    if "dlq" in results:
        print_dlq(results["dlq"])
    if e2e is not None:
        eff = results["efficiency"]
        busiest = max(
            (row for row in results["metrics"] if row["busy"] is not None), key=lambda row: row["busy"], default=None
        )
        console.print(
            f"[bold]Summary[/bold]: the hashing floor allows {eff['floor_recoveries_per_s']:.1f} recoveries/s on "
            f"{threads} cores; measured {eff['measured_recoveries_per_s'] or 0:.2f}/s; efficiency "
            f"{(eff['throughput_efficiency'] or 0) * 100:.0f}%; argon2 is "
            f"{(eff['argon2_share_stack'] or 0) * 100:.0f}% of the stack's CPU per recovery"
            + (
                f"; busiest consumer: {busiest['service']} on {busiest['labels'].get('topic')} "
                f"({busiest['busy'] * 100:.0f}% busy, mean {busiest['mean_s'] * 1000:.0f} ms)"
                if busiest
                else ""
            )
        )


def print_dlq(d: dict[str, Any]) -> None:
    if d["events_per_s"] is None:
        done = "not all dead-lettered within the timeout"
    else:
        done = f"all dead-lettered after {d['elapsed_s']:.2f}s -> {d['events_per_s']:.0f} events/s"
    console.print(
        f"3. DLQ path of recovery.requests: {d['messages']} malformed records published in "
        f"{d['published_s']:.2f}s, {done}; identity CPU {d['identity_cpu_ms_per_event']:.2f} ms/event, "
        f"whole stack {d['stack_cpu_ms_per_event']:.2f} ms/event"
    )


def serial_summary(runs: list[Recovery]) -> dict[str, Any]:
    done = [r for r in runs if r.status == "completed"]
    out: dict[str, Any] = {"n": len(runs), "completed": len(done)}
    for name in ("to_mail", "reset"):
        values = [v for r in done if (v := getattr(r, f"{name}_s")) is not None]
        out[name] = {"p50": percentile(values, 50), "max": max(values) if values else None}
    return out


def summarize_e2e(e2e: EndToEnd, n: int, concurrency: int, idle: dict[str, float]) -> dict[str, Any]:
    done = e2e.completed
    latency = {}
    for name in ("to_mail", "to_mail_seen", "reset"):
        values = [v for r in done if (v := getattr(r, f"{name}_s")) is not None]
        latency[name] = {f"p{q}": percentile(values, q) for q in (50, 95, 99)} | {
            "mean": sum(values) / len(values) if values else None
        }
    per = max(len(done), 1)
    services = sum(v for k, v in e2e.cpu.items() if k in SERVICES + OPTIONAL)
    stack = sum(e2e.cpu.values())
    return {
        "n": n,
        "concurrency": concurrency,
        "completed": len(done),
        "timeouts": sum(r.status == "timeout" for r in e2e.recoveries),
        "other": sum(r.status not in ("completed", "timeout") for r in e2e.recoveries),
        "import_s": e2e.import_s,
        "import_report": e2e.import_report,
        "initial_keys_s": e2e.initial_keys_s,
        "wall_s": e2e.wall_s,
        "recoveries_per_s": e2e.throughput,
        "latency_s": latency,
        "drain_s": e2e.drain_s,
        "cpu_s": e2e.cpu,
        "cpu_ms_per_recovery": {k: v / per * 1000 for k, v in e2e.cpu.items()},
        # What the process burns with no traffic at all (polling loops), taken out.
        "idle_core_share": idle,
        "cpu_ms_per_recovery_above_idle": {
            k: max(0.0, v - idle.get(k, 0.0) * e2e.cpu_window_s) / per * 1000 for k, v in e2e.cpu.items()
        },
        "cpu_services_s": services,
        "cpu_stack_s": stack,
        "cpu_ms_per_recovery_services": services / per * 1000,
        "cpu_ms_per_recovery_stack": stack / per * 1000,
        "bench_cpu_s": e2e.bench_cpu_s,
        "machine_busy": e2e.machine_busy,
        "stack_share_of_machine": stack / e2e.cpu_window_s / (os.cpu_count() or 1),
        "serial": serial_summary(e2e.serial),
        "failures": [
            {"request_id": r.request_id, "status": r.status, "error": r.error}
            for r in e2e.recoveries
            if r.status != "completed"
        ][:20],
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = workbench_settings()
    threads = args.threads
    results: dict[str, Any] = {
        "environment": {
            "cpus": os.cpu_count(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "argon2_memory_kib": settings.argon2_memory_kib,
            "argon2_time_cost": settings.argon2_time_cost,
            "argon2_parallelism": settings.argon2_parallelism,
            "questions": len(settings.question_ids()),
            "password_history": settings.password_history,
            "kafka": settings.kafka_bootstrap_servers,
            "var_dir": str(var_dir()),
        }
    }
    with console.status(f"argon2id: hashing on 1 and {threads} threads ..."):
        argon = await asyncio.to_thread(bench_argon2, settings, threads, args.argon2_seconds)
    results["argon2"] = {k: v.as_dict() for k, v in argon.items()}
    results["floor"] = floor_figures(settings, argon, threads)

    if args.first_request:
        with console.status("the first request after the services start ..."):
            first = await first_request_to_mail(settings, args.step_timeout)
        results["first_request_to_mail_ms"] = first["first_request_to_mail_ms"]
        results["first_request"] = first
        console.print(
            f"first request after the services start (stack.sh services-up took {first['services_up_s']:.1f}s): "
            f"e-mail after {first['first_request_to_mail_ms']:.0f} ms"
        )

    e2e = None
    idle: dict[str, float] = {}
    if args.idle_seconds > 0:
        with console.status(f"stack CPU with no traffic, {args.idle_seconds:.0f}s ..."):
            idle = await idle_cpu(args.idle_seconds)
        results["idle_core_share"] = idle
    if args.n > 0:
        e2e = await end_to_end(settings, args.n, args.concurrency, args.serial, args.step_timeout, args.budget)
        r = results["end_to_end"] = summarize_e2e(e2e, args.n, args.concurrency, idle)
        bench_case = results["floor"]["cases"]["bench_citizen"]
        floor_rate = bench_case["max_recoveries_per_s"]
        cores = os.cpu_count() or 1
        results["efficiency"] = {
            "floor_recoveries_per_s": floor_rate,
            "measured_recoveries_per_s": r["recoveries_per_s"],
            "throughput_efficiency": ratio(r["recoveries_per_s"], floor_rate),
            "floor_cpu_ms": bench_case["cpu_ms_per_recovery"],
            "services_cpu_ms": r["cpu_ms_per_recovery_services"],
            "stack_cpu_ms": r["cpu_ms_per_recovery_stack"],
            "argon2_share_services": ratio(bench_case["cpu_ms_per_recovery"], r["cpu_ms_per_recovery_services"]),
            "argon2_share_stack": ratio(bench_case["cpu_ms_per_recovery"], r["cpu_ms_per_recovery_stack"]),
            "cpu_ceiling_recoveries_per_s": cores * 1000 / r["cpu_ms_per_recovery_stack"]
            if r["cpu_ms_per_recovery_stack"]
            else 0.0,
        }
        results["metrics"] = histogram_deltas(e2e.metrics_before, e2e.metrics_after, e2e.wall_s)
    if args.dlq > 0:
        with console.status(f"{args.dlq} malformed records through the DLQ path ..."):
            results["dlq"] = await dlq_throughput(settings, args.dlq)
    results["environment"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_report(results, e2e, threads)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100, help="recoveries end to end (0: argon2 only) [100]")
    parser.add_argument("--serial", type=int, default=5, help="recoveries one at a time first: idle latency [5]")
    parser.add_argument("--concurrency", type=int, default=20, help="recoveries in flight at once [20]")
    parser.add_argument("--threads", type=int, default=2, help="threads for the parallel argon2 measure [2]")
    parser.add_argument("--argon2-seconds", type=float, default=1.5, help="duration of each argon2 measure [1.5]")
    parser.add_argument("--dlq", type=int, default=300, help="malformed records for the DLQ-path measure (0: skip)")
    parser.add_argument("--step-timeout", type=float, default=60, help="max seconds per wait in one recovery [60]")
    parser.add_argument("--budget", type=float, default=120, help="max seconds for the end-to-end phase [120]")
    parser.add_argument(
        "--idle-seconds", type=float, default=3, help="measure the stack's CPU with no traffic first (0: skip) [3]"
    )
    parser.add_argument(
        "--first-request",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="restart the services, then time the first request to its e-mail [on]",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.n < 0 or args.serial < 0 or args.dlq < 0 or args.concurrency < 1 or args.threads < 1:
        parser.error("--n, --serial, --dlq >= 0; --concurrency, --threads >= 1")
    started = time.perf_counter()
    try:
        results = asyncio.run(run(args))
    except Exception as exc:  # the stack could not be driven: say what, exit non-zero
        console.print(f"[red]BENCH FAILED[/red]: {exc.__class__.__name__}: {exc}")
        sys.exit(1)
    results["bench_seconds"] = time.perf_counter() - started
    console.print(f"bench took {results['bench_seconds']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        console.print(f"results written to {args.json}")
    if results.get("end_to_end", {}).get("completed", 1) == 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
