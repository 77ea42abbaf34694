"""`make demo`: one recovery end to end, played exactly as the portal would.

Imports the sample accounts as an operator would, publishes a recovery
request, waits for the e-mail in the mail catcher's folder, takes the link
from it, submits a new key, waits for the outcome and the "key changed" mail.
Prints each step with its time; exits non-zero if any step fails.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shared.acl import PORTAL
from tools.portal import Mailbox, Portal, body_text, extract_link
from tools.testdata import new_citizen, new_key, write_jsonl
from tools.workbench import as_principal, workbench_settings


class Steps:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.n = 0

    def say(self, text: str) -> None:
        self.n += 1
        print(f"[{time.monotonic() - self.t0:7.2f}s] {self.n}. {text}", flush=True)


async def run() -> str:
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

    mailbox = Mailbox(settings.mail_dir)
    before = mailbox.snapshot()
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

        mails = await mailbox.wait_for(lambda m: request_id in body_text(m), timeout=60, after=before)
        link, _, token = extract_link(mails[0])
        steps.say(f'recovery e-mail captured for {mails[0]["To"]}: "{mails[0]["Subject"]}"')
        steps.say(f"citizen opened the link {link[:60]}...")

        await portal.submit_reset(request_id, new_key(), token=token)
        steps.say("portal published the new key on recovery.resets")
        outcome = await portal.wait_outcome(request_id, "reset", timeout=60)
        if outcome["status"] != "completed":
            raise RuntimeError(f"reset not completed: {outcome}")
        steps.say(f"portal read outcome: stage=reset status={outcome['status']}")

        changed = await mailbox.wait_for(
            lambda m: citizen.email in str(m["To"]) and "recuperar?" not in body_text(m),
            timeout=60,
            after=before,
        )
        steps.say(f'"key changed" e-mail captured: "{changed[-1]["Subject"]}"')
    finally:
        await portal.stop()
    return request_id


def summary(request_id: str) -> None:
    settings = workbench_settings()
    print()
    print(f"Captured e-mails: {os.path.abspath(settings.mail_dir)}")
    print(
        f"Metrics: http://{settings.metrics_host}:{settings.identity_metrics_port}/metrics (identity), "
        f":{settings.tokens_metrics_port} (tokens), :{settings.notifier_metrics_port} (notifier), "
        f":{settings.password_metrics_port} (password)"
    )
    print(f"Audit trail of this recovery: .venv/bin/clave audit timeline {request_id}")


def main() -> None:
    try:
        request_id = asyncio.run(run())
    except Exception as exc:  # a demo step failed: say which, exit non-zero
        print(f"DEMO FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
    summary(request_id)
    print("Demo completed: the recovery went through every service.")


if __name__ == "__main__":
    main()
