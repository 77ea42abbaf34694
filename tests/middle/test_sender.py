"""The notifier's sender against a real store (a private secantusd-py) and a real SMTP
server (aiosmtpd, in the test): it is woken by the handler that queues a mail and by its
own retry schedule, and costs the store almost nothing while idle."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from services.notifier.domain import State
from services.notifier.handlers import SAFETY_POLL_S, MailSender
from services.notifier.settings import NotifierSettings
from services.notifier.store import NOTIFICATIONS, NotificationStore
from shared.metrics import ServiceMetrics
from tests.middle.conftest import Commands, listen
from tests.middle.test_relay import until

IDLE_WINDOW_S = 8.0
BACKOFF_S = 1.5
CLOCKS_S = 0.01  # the store keeps milliseconds; wall and monotonic clocks read apart


@dataclass
class Catcher:
    """An SMTP server that answers 451 to the first `tempfail` messages, then accepts."""

    tempfail: int = 0
    accepted: list[tuple[float, bytes]] = field(default_factory=list)
    refused: list[float] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.tempfail > 0:
            self.tempfail -= 1
            self.refused.append(time.monotonic())
            return "451 4.3.0 try later"
        self.accepted.append((time.monotonic(), envelope.original_content or b""))
        return "250 OK"


@pytest.fixture
async def smtp() -> AsyncIterator[tuple[Catcher, int]]:
    catcher = Catcher()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(catcher, hostname="test", decode_data=False), host="127.0.0.1", port=0
    )
    port = server.sockets[0].getsockname()[1]
    yield catcher, port
    server.close()
    await server.wait_closed()


@dataclass
class Sender:
    store: NotificationStore
    sender: MailSender
    commands: Commands
    task: asyncio.Task[None]
    outbox_wakes: list[float]


@pytest.fixture
async def running(store_uri: str, db_name: str, smtp: tuple[Catcher, int]) -> AsyncIterator[Sender]:
    settings = NotifierSettings(
        clave_env="development", smtp_port=smtp[1], smtp_backoff_initial_s=BACKOFF_S, smtp_timeout_s=5
    )
    store = NotificationStore(store_uri, db_name)
    commands = await listen(store, store_uri)
    await store.ensure_indexes()
    wakes: list[float] = []
    sender = MailSender(store, settings, ServiceMetrics("notifier"), on_outbox=lambda: wakes.append(time.monotonic()))
    task = asyncio.create_task(sender.run_forever())
    yield Sender(store, sender, commands, task, wakes)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await store.close()


def notification(kind: str = "password_changed") -> dict[str, Any]:
    now = datetime.now(UTC)
    nid = f"evt-{time.monotonic_ns()}:{kind}"
    return {
        "_id": nid,
        "kind": kind,
        "to": "maria@example.org",
        "name": "María",
        "locale": "es",
        "context": {"changed_at": "2026-11-26 10:00 UTC"},
        "sealed": None,
        "account_id": "acc-1",
        "request_id": None,
        "correlationid": "corr-1",
        "causationid": "evt-1",
        "event_time": now,
        "state": State.PENDING,
        "attempts": 0,
        "next_attempt_at": now,
        "created_at": now,
        "purge_at": now + timedelta(days=1),
    }


async def queue(s: Sender, doc: dict[str, Any]) -> None:
    """What a notifier handler does: store the mail in a transaction, then wake the sender."""
    await s.store.commit(consumer=None, event_id=None, writes=s.store.add([doc]), outgoing=[])
    s.sender.wake.set()


async def settled_idle(s: Sender) -> None:
    """The sender has finished its first turn and gone to sleep: it looked for due mail (with
    the orphans: three claims) and read when the next one falls due (two reads: the next
    pending mail, the earliest claim's end); it sends nothing more until woken. A condition
    on what it did, not a quiet spell: under load a turn may pause longer than any spell."""

    def asleep() -> bool:
        return s.commands.on(NOTIFICATIONS, "find") >= 2

    await until(asleep, 10, "sender asleep")


async def test_an_idle_sender_costs_its_store_almost_nothing(running: Sender) -> None:
    await settled_idle(running)
    t0 = time.monotonic()
    await asyncio.sleep(IDLE_WINDOW_S)  # the measurement window itself, not a synchronisation
    idle = running.commands.since(t0)
    # Before: three findAndModify every 0.5 s (6 a second). Now: it sleeps until something is
    # due, at most SAFETY_POLL_S.
    assert SAFETY_POLL_S > IDLE_WINDOW_S
    assert sum(idle.values()) == 0, f"idle sender sent {dict(idle)}"


async def test_a_queued_mail_wakes_the_sender(running: Sender, smtp: tuple[Catcher, int]) -> None:
    catcher, _ = smtp
    await settled_idle(running)
    doc = notification()
    t0 = time.monotonic()
    await queue(running, doc)
    queued = time.monotonic()
    await until(lambda: len(catcher.accepted) == 1, 5, "mail accepted")
    # Woken (not found by its SAFETY_POLL_S backstop): its claim follows the wake at once. Timed
    # to the claim, the sender's first command after the wake, not to the SMTP conversation.
    claims = [t for t, name, _ in running.commands.log if t >= queued and name == "findAndModify"]
    assert claims and claims[0] - queued < 2.0, f"claimed {claims[0] - queued:.1f}s after the wake"
    await until(lambda: bool(running.outbox_wakes), 5, "relay woken by the sender's own commit")
    stored = await running.store.db[NOTIFICATIONS].find_one({"_id": doc["_id"]})
    assert stored is not None and stored["state"] == State.SENT
    assert running.outbox_wakes[0] >= t0


async def test_a_retry_is_sent_when_due_without_polling(running: Sender, smtp: tuple[Catcher, int]) -> None:
    """After a 451 the sender records the retry, reads when it falls due, sleeps until then
    and claims it: the exact command sequence between the refusal and the retry's acceptance
    shows that nothing polled meanwhile, however long each step took under load, and the
    wake is timed against the sender's own recorded due time (not against the refusal plus
    a grace period for the sender's writes, which a loaded machine can exceed)."""
    catcher, _ = smtp
    catcher.tempfail = 1
    await settled_idle(running)
    doc = notification()
    await queue(running, doc)
    await until(lambda: len(catcher.refused) == 1, 5, "first attempt refused")
    refused_at = catcher.refused[0]
    await until(lambda: len(catcher.accepted) == 1, BACKOFF_S + 5, "retry accepted")
    accepted_at = catcher.accepted[0][0]
    # Recorded as sent after the acceptance: waited for, like the acceptance itself.
    stored: dict[str, Any] = {}

    async def sent() -> bool:
        stored.update(await running.store.db[NOTIFICATIONS].find_one({"_id": doc["_id"]}) or {})
        return stored.get("state") == State.SENT

    await until(sent, 5, "retry recorded as sent")
    assert stored["attempts"] == 2, stored
    # The due time the sender recorded (wall clock, in the store), on the monotonic clock.
    due = stored["next_attempt_at"].timestamp() - (time.time() - time.monotonic())
    # The backoff counts from the refusal (the server's answer), not from the attempt's start.
    assert due >= refused_at + BACKOFF_S - CLOCKS_S, f"due {due - refused_at:.3f}s after the refusal"
    window = [(t, name) for t, name, target in running.commands.log if refused_at < t < accepted_at]
    names = [name for _, name in window]
    # The refusal's turn: record the retry, look once more for due mail, read the next due
    # time; then, after sleeping, the retry's turn: the claims after a timeout (mail accepted
    # but not recorded, mail in doubt, then the due one). A poll would add turns.
    assert names == ["update", "findAndModify", "find", "findAndModify", "findAndModify", "findAndModify"], window
    woke = window[3][0]
    # Woken by its own schedule: not before the due time, and soon after it (not by the
    # SAFETY_POLL_S backstop).
    assert due - CLOCKS_S <= woke <= due + 1.0, f"woke {woke - due:+.3f}s from its due time"
    assert SAFETY_POLL_S > BACKOFF_S + 1.0
