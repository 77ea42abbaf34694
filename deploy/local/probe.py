"""Readiness probes for the local stack (deploy/local/stack.py calls `wait_for` with these checks).

    probe.py kafka BOOTSTRAP          metadata answers: a broker is registered, topics listed
    probe.py store URI                MongoDB-protocol ping succeeds (prints version, replica set)
    probe.py smtp HOST PORT           SMTP greeting + EHLO succeed
    probe.py http URL [URL...]        GET of every URL answers 200

Options: --timeout S (total deadline; 0 = a single attempt), --pid PID (give up at
once when that process has exited, so a crashed start fails fast instead of waiting
for the deadline), --quiet.  Exit 0 when ready, 1 when not ready by the deadline,
2 when the watched process died.  On success prints a one-line detail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import smtplib
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

ATTEMPT_TIMEOUT_S = 3.0
INTERVAL_S = 0.5


def probe_kafka(bootstrap: str, properties: str = "") -> str:
    from aiokafka.admin import AIOKafkaAdminClient

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from shared.kafka import client_kwargs
    from shared.settings import PlatformSettings

    # SASL as the properties file says (the stack: the admin's), else as the environment says.
    settings = PlatformSettings(kafka_bootstrap_servers=bootstrap)
    if properties:
        settings = settings.model_copy(update={"kafka_client_properties": properties})
    kwargs = client_kwargs(settings)

    async def run() -> str:
        admin = AIOKafkaAdminClient(
            **kwargs,
            request_timeout_ms=int(ATTEMPT_TIMEOUT_S * 1000),
            client_id="clave-stack-probe",
        )
        try:
            await asyncio.wait_for(admin.start(), ATTEMPT_TIMEOUT_S)
            cluster = await asyncio.wait_for(admin.describe_cluster(), ATTEMPT_TIMEOUT_S)
            topics = await asyncio.wait_for(admin.list_topics(), ATTEMPT_TIMEOUT_S)
        finally:
            with contextlib.suppress(Exception):
                await admin.close()
        # A KRaft broker answers metadata before it has registered (unfenced) itself;
        # topics cannot be created until it is listed as a broker.
        if not cluster.get("brokers"):
            raise RuntimeError("metadata answers but no broker is registered yet")
        user_topics = [t for t in topics if not t.startswith("__")]
        return f"metadata OK, {len(cluster['brokers'])} broker(s), {len(user_topics)} topics"

    return asyncio.run(run())


def probe_store(uri: str) -> str:
    from pymongo import MongoClient

    ms = int(ATTEMPT_TIMEOUT_S * 1000)
    client: MongoClient = MongoClient(
        uri, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms
    )
    try:
        client.admin.command("ping")
        version = client.admin.command("buildInfo").get("secantusVersion", "?")
        set_name = client.admin.command("hello").get("setName", "none")
    finally:
        client.close()
    return f"ping OK, SecantusDB {version}, replica set {set_name}"


def probe_smtp(host: str, port: int) -> str:
    with smtplib.SMTP(host, port, local_hostname="clave-probe", timeout=ATTEMPT_TIMEOUT_S) as smtp:
        code, _ = smtp.ehlo()
        if code != 250:
            raise RuntimeError(f"EHLO answered {code}")
        smtp.noop()
    return "SMTP EHLO OK"


def probe_http(urls: list[str]) -> str:
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"not an http URL: {url}")
        # urlopen raises HTTPError for any status >= 400, e.g. 503 from /readyz
        with urllib.request.urlopen(url, timeout=ATTEMPT_TIMEOUT_S) as resp:  # noqa: S310
            if resp.status != 200:
                raise RuntimeError(f"{url}: HTTP {resp.status}")
    paths = " ".join(urllib.parse.urlsplit(u).path for u in urls)
    return f"{paths} 200"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) still answers kill(0): look at its state.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(check: Callable[[], str], timeout: float, pid: int = 0) -> tuple[int, str]:
    """Run `check` until it succeeds or `timeout` s have passed (0: once): (0, its detail) when
    ready, (1, "not ready: ...") at the deadline, (2, ...) as soon as process `pid` has exited."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while True:
        try:
            return 0, check()
        except Exception as exc:  # any failure just means "not ready yet"
            last_error = f"{type(exc).__name__}: {exc}".strip()
        if pid and not alive(pid):
            return 2, f"process {pid} exited (last probe error: {last_error})"
        if time.monotonic() + INTERVAL_S > deadline:
            return 1, f"not ready: {last_error}"
        time.sleep(INTERVAL_S)  # the next attempt, bounded by the deadline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["kafka", "store", "smtp", "http"])
    parser.add_argument("target", nargs="+")
    parser.add_argument("--timeout", type=float, default=0.0)
    parser.add_argument("--pid", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    # Connection errors while the broker boots are expected: keep the output to one line.
    logging.basicConfig(level=logging.CRITICAL)

    checks: dict[str, Callable[[], str]] = {
        "kafka": lambda: probe_kafka(args.target[0]),
        "store": lambda: probe_store(args.target[0]),
        "smtp": lambda: probe_smtp(args.target[0], int(args.target[1])),
        "http": lambda: probe_http(args.target),
    }
    rc, detail = wait_for(checks[args.kind], args.timeout, args.pid)
    if not args.quiet:
        print(detail)
    return rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
