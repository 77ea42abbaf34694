"""The notifier against a misbehaving SMTP server, and the NIST password profile.

These tests change the shared stack for a moment (a fault flag read by the mail catcher;
the password service restarted with another policy) and always put it back."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import World, fetch, fetch_ok, metric_value, metrics_url
from tools.testdata import new_key

pytestmark = pytest.mark.e2e

RUN_DIR = Path(os.environ.get("VAR_DIR", "var")) / "run"
STACK = Path(__file__).resolve().parents[2] / "deploy" / "local" / "stack.sh"


@pytest.fixture
def smtp_flag() -> Iterator[Path]:
    created: list[Path] = []

    def make(name: str) -> Path:
        path = RUN_DIR / name
        path.touch()
        created.append(path)
        return path

    yield make  # type: ignore[misc]
    for path in created:
        path.unlink(missing_ok=True)


async def test_temporary_smtp_failure_is_retried_and_delivered_once(world: World, smtp_flag) -> None:
    c = await world.citizen()
    retried_before = metric_value(fetch(metrics_url(world.settings, "notifier"))[1], "clave_mails_retried_total")
    flag = smtp_flag("smtp-tempfail")
    rid = await world.request(c)
    deadline = asyncio.get_running_loop().time() + 60
    while (
        metric_value(fetch(metrics_url(world.settings, "notifier"))[1], "clave_mails_retried_total") <= retried_before
    ):
        assert asyncio.get_running_loop().time() < deadline, "no SMTP retry happened"
        await asyncio.sleep(0.2)
    flag.unlink()
    await world.recovery_mail(rid)  # exactly one, after the retries
    sent = await world.audited(rid, "mail_sent")
    assert sent["details"]["attempts"] >= 2


async def test_permanent_smtp_failure_is_not_retried(world: World, smtp_flag) -> None:
    c = await world.citizen()
    flag = smtp_flag("smtp-permfail")
    rid = await world.request(c)
    failed = await world.audited(rid, "mail_failed")
    assert failed["details"]["attempts"] == 1 and failed["reasons"] == ["smtp_gave_up"]
    flag.unlink()
    await world.mail_barrier()  # SMTP accepts again and a later mail arrived: a retry would have too
    assert world.mails_to(c.email) == []


def restart_password(policy: str) -> None:
    env = {**os.environ, "PASSWORD_POLICY": policy}
    subprocess.run(
        ["bash", str(STACK), "restart-service", "password"],
        env=env,
        check=True,  # noqa: S603
        capture_output=True,
        timeout=120,
    )


@pytest.fixture
async def nist_policy(world: World) -> AsyncIterator[None]:
    await asyncio.to_thread(restart_password, "nist")
    try:
        yield
    finally:
        await asyncio.to_thread(restart_password, os.environ.get("PASSWORD_POLICY", "seed"))
        assert fetch_ok(metrics_url(world.settings, "password", "/readyz"))


async def test_nist_profile_blocklist_and_passphrases(world: World, nist_policy: None) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, "contraseñasegura", token=token)
    assert (await world.portal.wait_outcome(rid, "reset", timeout=90))["reasons"] == ["password_blocklisted"]
    await world.portal.submit_reset(rid, new_key(), token=token)  # 13 characters: too short under NIST
    assert (await world.portal.wait_outcome(rid, "reset", count=2))["reasons"] == ["password_too_short"]
    await world.portal.submit_reset(rid, "mi casa azul junto al río Guayas", token=token)  # spaces, accents: fine
    assert (await world.portal.wait_outcome(rid, "reset", count=3))["status"] == "completed"
