"""A notification whose mail cannot be rendered, through the real broker, store and SMTP
catcher: it is failed with its reason (notifier.failed, audit `mail_failed` with
`render_failed`), counted, and the notifier's sender goes on: a later recovery of the same
account is mailed, and the notifier stays healthy.

How the bad notification gets in without a code change or a test-only setting: through the
internal contract, as the tokens service would send it. `tokens.issued` is published with
the tokens service's own credentials and name, for a registered account, with secrets
sealed for the notifier (the development NOTIFIER_KEYS the local stack runs with) and bound
to this very event, so the consumer accepts and queues it; but the sealed payload lacks the
`code` the mail shows (a producer bug or a version skew), so building the mail fails at send
time, in the sender's loop. A broken template (TEMPLATES_DIR) would do the same, but for
every mail of its kind in the shared stack."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from shared.crypto import Purpose, SecretBox, recovery_secrets_context
from shared.schemas import Recipient, TokensIssued
from shared.topics import NOTIFIER_FAILED, NOTIFIER_SENT, TOKENS_ISSUED, EventType
from tests.e2e.conftest import World, fetch, metric_value, metrics_url
from tests.e2e.test_forgeries import on, produce
from tools.testdata import new_citizen
from tools.watch import TopicWatcher
from tools.workbench import as_principal

pytestmark = pytest.mark.e2e


@pytest.fixture
async def notifier_results(world: World) -> AsyncIterator[TopicWatcher]:
    w = TopicWatcher(world.settings, [NOTIFIER_SENT, NOTIFIER_FAILED])
    await w.start()
    yield w
    await w.stop()


def parked_render_failures(world: World) -> float:
    text = fetch(metrics_url(world.settings, "notifier"))[1]
    return metric_value(text, "clave_loop_items_parked_total", loop="mail-sender", reason="render_failed")


async def test_a_mail_that_cannot_be_rendered_is_failed_and_a_later_recovery_is_mailed(
    world: World, notifier_results: TopicWatcher
) -> None:
    citizen = new_citizen()
    (account_id,) = await world.register(citizen)
    parked_before = parked_render_failures(world)

    bad_rid, token_id = f"req-render-{uuid.uuid4().hex}", uuid.uuid4().hex
    now = datetime.now(UTC)
    sealed = SecretBox(world.settings.notifier_keys).seal(
        {"token": secrets.token_urlsafe(32)},  # no "code": the mail cannot be built
        purpose=Purpose.RECOVERY_SECRETS,
        context=recovery_secrets_context(
            token_id=token_id, account_id=account_id, request_id=bad_rid, email=citizen.email
        ),
    )
    bad = TokensIssued(
        request_id=bad_rid,
        account_id=account_id,
        token_id=token_id,
        recipient=Recipient(email=citizen.email, name=citizen.name, locale="es"),
        link_expires_at=now + timedelta(minutes=30),
        code_expires_at=now + timedelta(minutes=10),
        sealed_secrets=sealed,
        requested_at=now,
    )
    await produce(
        as_principal(world.settings, "tokens"),
        TOKENS_ISSUED,
        account_id,  # keyed as tokens keys it: the same partition as the account's real mails
        EventType.TOKENS_ISSUED,
        bad.model_dump(mode="json"),
        source="/clave/tokens",
        correlationid=bad_rid,
    )
    (failed,) = await notifier_results.wait(on(NOTIFIER_FAILED, request_id=bad_rid), timeout=60)
    assert failed["data"]["error"] == "render failed: KeyError"
    assert failed["data"]["attempts"] == 1  # failed at once, not retried
    audited = await world.audited(bad_rid, "mail_failed")
    assert audited["reasons"] == ["render_failed"]

    # The sender went on: a later recovery of the same account is mailed.
    later = await world.request(citizen)
    await world.recovery_mail(later)
    await notifier_results.wait(on(NOTIFIER_SENT, request_id=later), timeout=60)
    # Only the real recovery reached the citizen; the failed one was announced once.
    assert len(world.mails_to(citizen.email)) == 1
    assert len(notifier_results.matching(on(NOTIFIER_FAILED, request_id=bad_rid))) == 1
    assert notifier_results.matching(on(NOTIFIER_SENT, request_id=bad_rid)) == []
    assert parked_render_failures(world) == parked_before + 1
    status, body = fetch(metrics_url(world.settings, "notifier", "/healthz"))
    assert (status, body) == (200, "ok\n")
