"""`make demo`: one recovery end to end, played exactly as the portal would.

Imports the sample accounts as an operator would, publishes a recovery
request, waits for the e-mail in the mail catcher's folder, takes the link
from it, submits a new key, waits for the outcome and the "key changed" mail.
Prints each step with its time; exits non-zero if any step fails. Then, if the stack keeps
running after the demo (`make demo KEEP=1`, or a stack started by `make up`), prints commands
to look further, each one tried first: only those that work are printed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.acl import PORTAL
from tools.mail import Mailbox, extract_link
from tools.portal import Portal
from tools.testdata import new_citizen, new_key, write_jsonl
from tools.workbench import (
    SERVICES,
    WorkbenchSettings,
    as_principal,
    metrics_url,
    principal_properties,
    workbench_settings,
)


class Steps:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.n = 0

    def say(self, text: str) -> None:
        self.n += 1
        print(f"[{time.monotonic() - self.t0:7.2f}s] {self.n}. {text}", flush=True)


async def run() -> tuple[str, str]:
    settings = workbench_settings()
    steps = Steps()
    # A fresh citizen each run, so a second demo is not refused by the first one's limits.
    citizen = new_citizen()
    workdir = Path(tempfile.mkdtemp(prefix="clave-demo-"))
    accounts = write_jsonl([citizen], workdir / "accounts.jsonl")
    result = await asyncio.to_thread(
        subprocess.run,  # our own CLI, fixed arguments
        [sys.executable, "-m", "clave.cli", "accounts", "import", str(accounts), "--operator", "demo"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"import failed: {result.stdout}{result.stderr}")
    steps.say(f"operator imported citizen {citizen.national_id} ({result.stdout.strip()})")

    mailbox = Mailbox(settings.mail_dir, ignore_existing=True)  # this run's mail only
    portal = Portal(as_principal(settings, PORTAL))  # the portal's own Kafka principal
    await portal.start()
    try:
        request_id = await portal.request_recovery(
            national_id=citizen.national_id,
            email_address=citizen.email,
            # As a citizen types them: other case and spacing than on file.
            answers={k: f" {v.upper()} " for k, v in citizen.answers.items()},
        )
        steps.say(f"portal published recovery request {request_id} on recovery.requests")
        outcome = await portal.wait_outcome(request_id, "request", timeout=60)
        steps.say(f"portal read outcome: stage=request status={outcome['status']}")

        mail = await mailbox.recovery_mail(request_id, timeout=60)
        link, _, token = extract_link(mail.message)
        steps.say(f'recovery e-mail captured for {mail.to}: "{mail.subject}"')
        steps.say(f"citizen opened the link {link[:60]}...")

        await portal.submit_reset(request_id, new_key(), token=token)
        steps.say("portal published the new key on recovery.resets")
        outcome = await portal.wait_outcome(request_id, "reset", timeout=60)
        if outcome["status"] != "completed":
            raise RuntimeError(f"reset not completed: {outcome}")
        steps.say(f"portal read outcome: stage=reset status={outcome['status']}")

        address = citizen.email.lower()
        await mailbox.wait_until(lambda: address in mailbox.notices, timeout=60, what="the key-changed e-mail")
        steps.say(f'"key changed" e-mail captured: "{mailbox.notices[address][-1].subject}"')
    finally:
        await portal.stop()
    return request_id, citizen.national_id


def stack_stays_up() -> bool:
    """Whether the stack outlives the demo: `stack.sh run` stops only what it started for it,
    and lists that in started-by-ensure (empty or missing: it started nothing)."""
    started = Path(os.environ.get("VAR_DIR", "var")) / "run" / "started-by-ensure"
    try:
        return not started.read_text(encoding="utf-8").strip()
    except OSError:
        return True


def _rel(path: str | Path) -> str:
    return os.path.relpath(Path(path).resolve())


def cli_environment(settings: WorkbenchSettings) -> dict[str, str]:
    """What `clave` needs on this machine, beyond a principal's Kafka client settings."""
    return {
        "CLAVE_ENV": "development",
        "MONGODB_URI": settings.mongodb_uri,
        "AUDIT_PUBLIC_KEYS": _rel(os.environ.get("AUDIT_PUBLIC_KEYS", "var/secrets/audit/public")),
    }


def works(argv: list[str], env: dict[str, str], timeout: float = 30.0) -> bool:
    """Run a command the demo is about to print; True when it exits 0 (retried to the deadline:
    the audit read model may be a moment behind the log)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "CLAVE_", "MONGODB_", "AUDIT_"))}
    full.update(env)
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(argv, env=full, capture_output=True, text=True, check=False, timeout=120)  # noqa: S603
        if result.returncode == 0:
            return True
        if time.monotonic() > deadline:
            print(f"  (left out, it failed: {shlex.join(argv)}: {result.stderr.strip()[-200:]})")
            return False
        time.sleep(1)  # polling for the read model to catch up, until the deadline


def fetches(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - the stack's loopback endpoint
            return bool(response.status == 200)
    except OSError:
        return False


def summary(request_id: str, national_id: str) -> None:
    settings = workbench_settings()
    print()
    print(f"Captured e-mails: {_rel(settings.mail_dir)}/*.eml")
    if not stack_stays_up():
        print("The stack stops now (it was started for this demo). `make demo KEEP=1` leaves it running")
        print("and then prints commands to look further (audit timeline, metrics); `make down` stops it.")
        return
    env = cli_environment(settings)
    clave = _rel(Path(sys.executable).parent / "clave")
    auditor = {**env, "KAFKA_CLIENT_PROPERTIES": _rel(principal_properties("auditor"))}
    tried = [
        ("The audit trail of this recovery, across the services:", [clave, "audit", "timeline", request_id]),
        ("Everything audited for this citizen (by national ID):", [clave, "audit", "replay", "--account", national_id]),
    ]
    print("The stack keeps running (`make status` shows it, `make down` stops it). In this shell:")
    print(f"  export {' '.join(f'{k}={shlex.quote(v)}' for k, v in env.items())}")
    for text, argv in tried:
        if works(argv, auditor):
            print(f"  # {text}")
            print(f"  KAFKA_CLIENT_PROPERTIES={auditor['KAFKA_CLIENT_PROPERTIES']} {shlex.join(argv)}")
    answering = {s: metrics_url(settings, s) for s in SERVICES if fetches(metrics_url(settings, s))}
    if answering:
        print(f"  # Metrics (Prometheus text) of {', '.join(answering)}:")
        for url in answering.values():
            print(f"  curl -s {url} | grep '^clave_'")


def main() -> None:
    try:
        request_id, national_id = asyncio.run(run())
    except Exception as exc:  # a demo step failed: say which, exit non-zero
        print(f"DEMO FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
    print("Demo completed: the recovery went through every service.")
    summary(request_id, national_id)


if __name__ == "__main__":
    main()
