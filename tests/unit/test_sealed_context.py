"""Every secret bound to its context, at its readers, and every internal event checked for its
source, in the consumer. In memory: the password and notifier handlers with fake stores, the
consumer pipeline with a fake outbox. A forged or replayed blob is refused with its own reason
before the handler reads or writes anything; the genuine one goes through."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from services.notifier.handlers import MailSender, NotifierHandlers
from services.notifier.settings import NotifierSettings
from services.password.domain import KeyHistory
from services.password.handlers import PasswordHandlers
from services.password.policy import policy_from_name
from services.password.settings import PasswordSettings
from services.password.store import Credential
from shared import consumer
from shared.consumer import EventPipeline, HandlerContext, Route
from shared.contract import SERVICES, expected_sources, source_of
from shared.crypto import (
    Purpose,
    SealError,
    SecretBox,
    initial_key_context,
    new_key_context,
    recovery_secrets_context,
)
from shared.envelope import BadInput, DeadLetterReason, new_event
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.schemas import AccountRegistered, PasswordUpdated, Recipient, TokensIssued, TokensRedeemed
from shared.store import Outgoing
from shared.topics import (
    AUDIT_EVENTS,
    IDENTITY_COMMANDS,
    IDENTITY_VERIFIED,
    PASSWORD_UPDATED,
    RECOVERY_REQUESTS,
    RECOVERY_RESETS,
    TOKENS_ISSUED,
    EventType,
    dlq,
)
from tests.memory import apply_all, staged, staged_many

PASSWORD = PasswordSettings(clave_env="development", argon2_memory_kib=1024, argon2_time_cost=1)
NOTIFIER = NotifierSettings(clave_env="development")
VICTIM = Recipient(email="victima@example.org", name="Víctima", locale="es")
ATTACKER = Recipient(email="atacante@example.org", name="Atacante", locale="es")


class Outbox:
    """ServiceStore.commit in memory: what was committed, in order."""

    def __init__(self) -> None:
        self.commits: list[list[Outgoing]] = []
        self.writes = 0

    async def commit(
        self, *, consumer: str | None, event_id: str | None, writes: Any, outgoing: list[Outgoing]
    ) -> None:
        if writes:
            await apply_all(writes)
            self.writes += 1
        self.commits.append(list(outgoing))

    async def ping(self) -> bool:
        return True


class Credentials(Outbox):
    """The password service's store, in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.saved: dict[str, KeyHistory] = {}
        self.names: dict[str, str] = {}  # login names (national IDs)
        self.used: set[str] = set()

    async def history(self, account_id: str) -> KeyHistory:
        return self.saved.get(account_id, KeyHistory())

    async def credential(self, account_id: str) -> Credential | None:
        found = self.saved.get(account_id)
        return None if found is None else Credential(account_id, self.names.get(account_id), found)

    @staged
    async def set_national_id(self, account_id: str, national_id: str) -> None:
        self.names[account_id] = national_id

    @staged_many
    async def clear_key_failures(self, principal: str) -> None:
        pass

    async def exists(self, account_id: str) -> bool:
        return account_id in self.saved

    async def token_used(self, token_id: str) -> bool:
        return token_id in self.used

    @staged_many
    async def save(
        self,
        account_id: str,
        history: KeyHistory,
        now: datetime,
        token_id: str | None = None,
        national_id: str | None = None,
        *,
        must_change: bool = False,
    ) -> None:
        self.saved[account_id] = history
        if national_id is not None:
            self.names[account_id] = national_id
        if token_id is not None:
            self.used.add(token_id)


def ctx_for(store: Any, service: str, topic: str, event_type: str, data: Any) -> HandlerContext:
    event = new_event(type=event_type, source=f"/clave/{service}", data=data.model_dump(mode="json"), correlationid="c")
    return HandlerContext(service, f"{service}:{topic}", topic, event, store)


@pytest.fixture
def password() -> tuple[Credentials, PasswordHandlers]:
    store = Credentials()
    handlers = PasswordHandlers(
        store,  # type: ignore[arg-type]
        SecretHasher(PASSWORD),
        policy_from_name("seed"),
        PASSWORD,
        ServiceMetrics("password"),
    )
    return store, handlers


def new_key_blob(token_id: str, account_id: str, request_id: str, key: str, at: int | None = None) -> str:
    return SecretBox(PASSWORD.password_keys).seal(
        {"new_password": key},
        purpose=Purpose.NEW_KEY,
        context=new_key_context(token_id=token_id, account_id=account_id, request_id=request_id),
        at=at,
    )


def redeemed(sealed: str, *, token_id: str, account_id: str, request_id: str) -> TokensRedeemed:
    return TokensRedeemed(
        request_id=request_id, account_id=account_id, token_id=token_id, recipient=VICTIM, sealed_new_key=sealed
    )


async def run_redeemed(store: Credentials, h: PasswordHandlers, evt: TokensRedeemed) -> HandlerContext:
    ctx = ctx_for(store, "tokens", "tokens.redeemed", EventType.TOKENS_REDEEMED, evt)
    await h.tokens_redeemed(ctx, evt)
    return ctx


# ------------------------------------------------------------------ password: the new key


async def test_a_new_key_sealed_for_its_event_changes_the_key(password: tuple[Credentials, PasswordHandlers]) -> None:
    store, h = password
    blob = new_key_blob("tok-1", "acc-1", "req-1", "Nueva2024x")
    ctx = await run_redeemed(store, h, redeemed(blob, token_id="tok-1", account_id="acc-1", request_id="req-1"))
    assert "acc-1" in store.saved and store.used == {"tok-1"}
    assert [o.topic for o in ctx.outgoing if o.topic != AUDIT_EVENTS] == [PASSWORD_UPDATED]


@pytest.mark.parametrize(
    "forged",
    [
        # The attacker's own key, replayed in a forged event for the victim's account...
        {"account_id": "acc-victim"},
        # ... for another of their tokens, or request.
        {"token_id": "tok-other"},
        {"request_id": "req-other"},
        {"account_id": "acc-victim", "token_id": "tok-other", "request_id": "req-other"},
    ],
)
async def test_a_new_key_replayed_into_another_event_is_dead_lettered_and_changes_nothing(
    password: tuple[Credentials, PasswordHandlers], forged: dict[str, str]
) -> None:
    store, h = password
    store.saved["acc-victim"] = KeyHistory(current="victim-hash")
    own = {"token_id": "tok-1", "account_id": "acc-1", "request_id": "req-1"}
    blob = new_key_blob(own["token_id"], own["account_id"], own["request_id"], "Robada2024x")
    evt = redeemed(blob, **{**own, **forged})
    with pytest.raises(BadInput) as info:
        await run_redeemed(store, h, evt)
    assert info.value.reason == DeadLetterReason.SEALED_CONTEXT_MISMATCH
    for field in forged:
        assert field in info.value.detail
    assert "acc-victim" not in info.value.detail and "Robada" not in info.value.detail
    assert store.saved == {"acc-victim": KeyHistory(current="victim-hash")} and store.used == set()
    assert store.commits == []


async def test_a_new_key_past_its_lifetime_is_dead_lettered(password: tuple[Credentials, PasswordHandlers]) -> None:
    store, h = password
    old = int(time.time()) - PASSWORD.sealed_new_key_ttl_s - 5
    blob = new_key_blob("tok-1", "acc-1", "req-1", "Nueva2024x", at=old)
    with pytest.raises(BadInput) as info:
        await run_redeemed(store, h, redeemed(blob, token_id="tok-1", account_id="acc-1", request_id="req-1"))
    assert info.value.reason == DeadLetterReason.SEALED_EXPIRED
    assert store.saved == {} and store.commits == []


async def test_an_initial_key_is_not_a_new_key(password: tuple[Credentials, PasswordHandlers]) -> None:
    store, h = password
    blob = SecretBox(PASSWORD.password_keys).seal(
        {"new_password": "Nueva2024x"}, purpose=Purpose.INITIAL_KEY, context=initial_key_context(account_id="acc-1")
    )
    with pytest.raises(BadInput) as info:
        await run_redeemed(store, h, redeemed(blob, token_id="tok-1", account_id="acc-1", request_id="req-1"))
    assert info.value.reason == DeadLetterReason.SEALED_CONTEXT_MISMATCH
    assert store.saved == {}


async def test_a_key_from_foreign_keys_is_still_undecryptable(password: tuple[Credentials, PasswordHandlers]) -> None:
    store, h = password
    foreign = SecretBox("x" * 43 + "=").seal(
        {"new_password": "Nueva2024x"},
        purpose=Purpose.NEW_KEY,
        context=new_key_context(token_id="tok-1", account_id="acc-1", request_id="req-1"),
    )
    with pytest.raises(BadInput) as info:
        await run_redeemed(store, h, redeemed(foreign, token_id="tok-1", account_id="acc-1", request_id="req-1"))
    assert info.value.reason == DeadLetterReason.UNDECRYPTABLE


# ------------------------------------------------------------------ password: the initial key


async def run_registered(store: Credentials, h: PasswordHandlers, account_id: str, blob: str) -> HandlerContext:
    evt = AccountRegistered(account_id=account_id, sealed_initial_key=blob)
    ctx = ctx_for(store, "identity", "identity.account_registered", EventType.ACCOUNT_REGISTERED, evt)
    await h.account_registered(ctx, evt)
    return ctx


def initial_blob(account_id: str) -> str:
    return SecretBox(PASSWORD.password_keys).seal(
        {"password": "Inicial2024"}, purpose=Purpose.INITIAL_KEY, context=initial_key_context(account_id=account_id)
    )


async def test_an_initial_key_is_set_only_for_its_own_account(password: tuple[Credentials, PasswordHandlers]) -> None:
    store, h = password
    await run_registered(store, h, "acc-1", initial_blob("acc-1"))
    assert set(store.saved) == {"acc-1"}
    with pytest.raises(BadInput) as info:
        await run_registered(store, h, "acc-2", initial_blob("acc-1"))
    assert info.value.reason == DeadLetterReason.SEALED_CONTEXT_MISMATCH
    assert set(store.saved) == {"acc-1"}


async def test_a_new_key_is_not_an_initial_key(password: tuple[Credentials, PasswordHandlers]) -> None:
    store, h = password
    with pytest.raises(BadInput) as info:
        await run_registered(store, h, "acc-1", new_key_blob("tok-1", "acc-1", "req-1", "Nueva2024x"))
    assert info.value.reason == DeadLetterReason.SEALED_CONTEXT_MISMATCH
    assert store.saved == {}


# ------------------------------------------------------------------ notifier: link and code


def issued(recipient: Recipient, *, sealed_for: Recipient = VICTIM, at: int | None = None) -> TokensIssued:
    now = datetime.now(UTC)
    blob = SecretBox(NOTIFIER.notifier_keys).seal(
        {"token": "tok-secret", "code": "123456"},
        purpose=Purpose.RECOVERY_SECRETS,
        context=recovery_secrets_context(
            token_id="tok-1", account_id="acc-victim", request_id="req-1", email=sealed_for.email
        ),
        at=at,
    )
    return TokensIssued(
        request_id="req-1",
        account_id="acc-victim",
        token_id="tok-1",
        recipient=recipient,
        link_expires_at=now + timedelta(minutes=30),
        code_expires_at=now + timedelta(minutes=10),
        sealed_secrets=blob,
    )


async def run_issued(evt: TokensIssued) -> tuple[Outbox, HandlerContext]:
    store = Outbox()
    queued: list[dict[str, Any]] = []

    class Mails:
        @staged_many
        async def add(self, docs: list[dict[str, Any]]) -> None:
            queued.extend(docs)

    h = NotifierHandlers(Mails(), NOTIFIER, lambda: None)  # type: ignore[arg-type]
    ctx = ctx_for(store, "tokens", TOKENS_ISSUED, EventType.TOKENS_ISSUED, evt)
    await h.tokens_issued(ctx, evt)
    store.commits.append([])  # marker: the handler got through
    ctx.queued = queued  # type: ignore[attr-defined]
    return store, ctx


async def test_link_and_code_for_their_own_recipient_are_queued() -> None:
    _, ctx = await run_issued(issued(VICTIM))
    (doc,) = ctx.queued  # type: ignore[attr-defined]
    assert doc["to"] == VICTIM.email and doc["token_id"] == "tok-1"
    # The sender opens them again against the queued mail itself, and renders the link.
    sender = MailSender(Outbox(), NOTIFIER, ServiceMetrics("notifier"), lambda: None)  # type: ignore[arg-type]
    rendered = sender._render_context(doc)
    assert rendered["code"] == "123456" and "tok-secret" in rendered["link"]
    mail = sender.renderer.render(doc["kind"], doc["locale"], **rendered)
    assert VICTIM.name in mail.text and "123456" in mail.text and "tok-secret" in mail.text


async def test_link_and_code_readdressed_to_the_attacker_are_not_queued() -> None:
    with pytest.raises(BadInput) as info:
        await run_issued(issued(ATTACKER, sealed_for=VICTIM))
    assert info.value.reason == DeadLetterReason.SEALED_CONTEXT_MISMATCH
    assert "recipient" in info.value.detail and "atacante" not in info.value.detail


async def test_link_and_code_past_their_lifetime_are_not_queued() -> None:
    old = int(time.time()) - NOTIFIER.sealed_secrets_ttl_s - 5
    with pytest.raises(BadInput) as info:
        await run_issued(issued(VICTIM, at=old))
    assert info.value.reason == DeadLetterReason.SEALED_EXPIRED


async def test_the_sender_refuses_secrets_for_another_address_than_the_mail() -> None:
    _, ctx = await run_issued(issued(VICTIM))
    (doc,) = ctx.queued  # type: ignore[attr-defined]
    sender = MailSender(Outbox(), NOTIFIER, ServiceMetrics("notifier"), lambda: None)  # type: ignore[arg-type]
    with pytest.raises(SealError):
        sender._render_context({**doc, "to": ATTACKER.email})


# ------------------------------------------------------------------ the consumer: source


def test_internal_topics_expect_their_producers_and_client_topics_are_left_to_acls() -> None:
    assert expected_sources(TOKENS_ISSUED) == {"/clave/tokens"}
    assert expected_sources(IDENTITY_VERIFIED) == {"/clave/identity"}
    assert expected_sources(AUDIT_EVENTS) == {source_of(s) for s in SERVICES}
    for topic in (RECOVERY_REQUESTS, RECOVERY_RESETS, IDENTITY_COMMANDS):
        assert expected_sources(topic) is None
    assert expected_sources("no.such.topic") == frozenset()  # nobody writes it: nothing accepted


def pipeline(store: Outbox, served: list[str], topic: str = PASSWORD_UPDATED) -> EventPipeline:
    async def serve(ctx: HandlerContext, data: PasswordUpdated) -> None:
        served.append(data.request_id)

    return EventPipeline(
        service="notifier",
        topic=topic,
        routes={EventType.PASSWORD_UPDATED: Route(PasswordUpdated, serve)},
        store=store,  # type: ignore[arg-type]
        settings=PASSWORD,
        metrics=ServiceMetrics("notifier"),
        on_committed=lambda: None,
    )


def record(raw: bytes, offset: int) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(
        topic=PASSWORD_UPDATED,
        partition=0,
        offset=offset,
        timestamp=0,
        timestamp_type=0,
        key=b"acc-1",
        value=raw,
        checksum=None,
        serialized_key_size=5,
        serialized_value_size=len(raw),
        headers=(),
    )


def updated(source: str, request_id: str) -> bytes:
    data = PasswordUpdated(
        request_id=request_id, account_id="acc-1", token_id="tok-1", recipient=VICTIM, changed_at=datetime.now(UTC)
    )
    event = new_event(
        type=EventType.PASSWORD_UPDATED, source=source, data=data.model_dump(mode="json"), correlationid=request_id
    )
    return event.to_bytes()


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "backoff", lambda _streak: 0.0, raising=False)


@pytest.mark.parametrize(
    "source", ["/clave/portal", "/clave/identity", "/clave/password-impostor", "/tests/e2e", "urn:intruder"]
)
async def test_an_event_from_another_source_is_dead_lettered_unhandled(source: str) -> None:
    store, served = Outbox(), []
    p = pipeline(store, served)
    await p.process(record(updated(source, "req-forged"), 1), updated(source, "req-forged"))
    await p.process(record(updated("/clave/password", "req-real"), 2), updated("/clave/password", "req-real"))
    assert served == ["req-real"]  # the forged one was never handled; the real one behind it was
    letters = [o for commit in store.commits for o in commit if o.topic == dlq(PASSWORD_UPDATED)]
    (letter,) = letters
    assert letter.headers["clave-dlq-reason"] == DeadLetterReason.WRONG_SOURCE
    assert letter.event.correlationid == "req-forged"
    # The detail names what was expected, never the source given (an input value).
    assert "/clave/password" in letter.headers["clave-dlq-detail"]
    assert source not in json.dumps(letter.headers)
    audits = [o.event.data for commit in store.commits for o in commit if o.topic == AUDIT_EVENTS]
    assert any(a["action"] == "message_dead_lettered" and a["reasons"] == ["wrong_source"] for a in audits)
