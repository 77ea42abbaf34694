"""The notifier's sender against a real store and SMTP server, with one bad notification in
front of a good one: the bad one is failed with its reason (notifier.failed and an audit
`mail_failed` in the outbox, counted), never retried, and the good one is still sent."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from services.notifier.domain import State
from services.notifier.handlers import MailSender, secrets_context
from services.notifier.signing import Envelope
from shared.crypto import Purpose, SecretBox
from shared.store import OUTBOX
from tests.middle.test_relay import until
from tests.middle.test_sender import Catcher, Sender, notification, queue, running, settled_idle, smtp

__all__ = ["running", "smtp"]  # fixtures, used by name

NOTIFICATIONS = "notifications"


async def stored(s: Sender, nid: str) -> dict[str, Any]:
    doc = await s.store.db[NOTIFICATIONS].find_one({"_id": nid})
    assert doc is not None
    return doc


async def announced(s: Sender, nid: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The notifier.failed event and the audit event the sender put in its outbox for `nid`."""
    events = [json.loads(bytes(d["value"])) for d in await s.store.db[OUTBOX].find({}).to_list()]
    failed = [e for e in events if e["type"].endswith("notifier.failed.v1") and e["data"]["notification_id"] == nid]
    audits = [
        e
        for e in events
        if e["type"].startswith("ec.clave.audit.") and e["data"]["details"].get("notification_id") == nid
    ]
    assert len(failed) == 1 and len(audits) == 1, (failed, audits)
    return failed[0], audits[0]


def parked(sender: MailSender, reason: str) -> float:
    value = sender.metrics.registry.get_sample_value(
        "clave_loop_items_parked_total", {"loop": "mail-sender", "reason": reason}
    )
    return 0.0 if value is None else value


async def bad_then_good(s: Sender, catcher: Catcher, bad: dict[str, Any]) -> dict[str, Any]:
    """Queue `bad`, then a good mail; the good one is sent. Returns the bad one as stored."""
    await settled_idle(s)
    good = notification()
    good["to"] = "next@example.org"
    await queue(s, bad)
    await queue(s, good)
    await until(lambda: len(catcher.accepted) == 1, 10, "the next mail sent")
    assert b"next@example.org" in catcher.accepted[0][1]
    await until(lambda: _settled(s, good["_id"]), 10, "the next mail recorded")
    assert (await stored(s, good["_id"]))["state"] == State.SENT
    await until(lambda: _settled(s, bad["_id"]), 10, "the bad mail settled")
    return await stored(s, bad["_id"])


async def _settled(s: Sender, nid: str) -> bool:
    doc = await s.store.db[NOTIFICATIONS].find_one({"_id": nid})
    return doc is not None and doc["state"] in (State.FAILED, State.SENT)


async def test_a_template_error_fails_the_mail_with_its_reason_and_the_next_is_sent(
    running: Sender, smtp: tuple[Catcher, int]
) -> None:
    catcher, _ = smtp
    bad = notification()
    bad["context"] = {}  # the template needs `changed_at`: jinja2's StrictUndefined raises
    doc = await bad_then_good(running, catcher, bad)
    assert doc["state"] == State.FAILED and doc["last_error"] == "render failed: UndefinedError"
    assert doc["attempts"] == 1  # failed at once, never retried
    failed, audit = await announced(running, bad["_id"])
    assert failed["data"]["error"] == "render failed: UndefinedError"
    assert audit["data"]["action"] == "mail_failed" and audit["data"]["reasons"] == ["render_failed"]
    assert parked(running.sender, "render_failed") == 1
    assert len(catcher.accepted) == 1  # the bad one never reached SMTP


async def test_sealed_secrets_missing_the_code_fail_the_mail_not_the_sender(
    running: Sender, smtp: tuple[Catcher, int]
) -> None:
    catcher, _ = smtp
    bad = notification("recovery_link")
    bad.update(request_id="req-1", token_id="tok-1", context={"link_minutes": 30, "code_minutes": 10})
    bound = secrets_context("tok-1", bad["account_id"], "req-1", bad["to"])
    box = SecretBox(running.sender.settings.notifier_keys)
    bad["sealed"] = box.seal({"token": "t" * 43}, purpose=Purpose.RECOVERY_SECRETS, context=bound)
    doc = await bad_then_good(running, catcher, bad)
    assert doc["state"] == State.FAILED and doc["last_error"] == "render failed: KeyError"
    assert "sealed" not in doc  # the link is dropped with the failure, as with any settled mail
    _, audit = await announced(running, bad["_id"])
    assert audit["data"]["reasons"] == ["render_failed"]


async def test_an_unexpected_library_error_on_one_mail_fails_it_and_the_next_is_sent(
    running: Sender, smtp: tuple[Catcher, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    catcher, _ = smtp
    sender = running.sender
    real = sender._smtp_send

    async def library_bug(mail: Envelope) -> Any:
        if mail.recipients == ["maria@example.org"]:
            raise AttributeError("'NoneType' object has no attribute 'x'")
        return await real(mail)

    monkeypatch.setattr(sender, "_smtp_send", library_bug)
    doc = await bad_then_good(running, catcher, notification())
    assert doc["state"] == State.FAILED and doc["last_error"] == "send failed: AttributeError"
    _, audit = await announced(running, doc["_id"])
    assert audit["data"]["reasons"] == ["send_error"]
    assert parked(sender, "send_error") == 1


async def test_a_document_too_broken_to_announce_is_failed_in_place(running: Sender, smtp: tuple[Catcher, int]) -> None:
    catcher, _ = smtp
    bad = notification()
    del bad["kind"]  # neither renders nor makes a notifier.failed event
    doc = await bad_then_good(running, catcher, bad)
    assert doc["state"] == State.FAILED and doc["last_error"] == "render failed: KeyError"
    assert "claim" not in doc and "lease_until" not in doc
    events = [json.loads(bytes(d["value"])) for d in await running.store.db[OUTBOX].find({}).to_list()]
    assert not [e for e in events if e["data"].get("notification_id") == bad["_id"]]
    assert running.sender.metrics.registry.get_sample_value("clave_mails_failed_total", {"kind": "unknown"}) == 1


async def test_a_store_outage_is_not_blamed_on_the_mail(running: Sender, smtp: tuple[Catcher, int]) -> None:
    """The store failing while a mail is being settled propagates (the loop backs off and the
    claim runs out); the mail is not failed for it."""
    sender = running.sender
    running.task.cancel()  # drive deliver_due by hand
    with contextlib.suppress(asyncio.CancelledError):
        await running.task  # stopped, wherever it was in its turn
    doc = notification()
    await queue(running, doc)
    real = sender.store.mark_accepted
    calls = 0

    async def away(*args: Any) -> bool:
        nonlocal calls
        calls += 1
        raise AutoReconnect("store away")

    sender.store.mark_accepted = away  # type: ignore[method-assign,assignment]
    import services.notifier.handlers as handlers

    handlers_patience = handlers.RECORD_PATIENCE_S
    handlers.RECORD_PATIENCE_S = 0.2
    try:
        with pytest.raises(AutoReconnect):
            await sender.deliver_due()
    finally:
        handlers.RECORD_PATIENCE_S = handlers_patience
        sender.store.mark_accepted = real  # type: ignore[method-assign]
    assert calls >= 1
    stored_doc = await stored(running, doc["_id"])
    assert stored_doc["state"] == State.SENDING  # still claimed: retried after the lease, not failed
    assert parked(sender, "send_error") == 0 and parked(sender, "render_failed") == 0
