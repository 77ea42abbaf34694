"""The forgery and replay paths of issue 9, through the real broker, store and SMTP catcher.

Each attack takes only what an attacker with produce rights (and a dump of an internal
topic) has, and must fail with no mail and no key change:

- a forged `identity.verified` naming a victim's account and the attacker's address: the
  portal's principal cannot even write it (ACL); a principal that can write it but does not
  name identity as its `source` is dead-lettered (`wrong_source`);
- the sealed new key of one's own `tokens.redeemed`, replayed in a forged one for a victim,
  published with the tokens service's own credentials: `sealed_context_mismatch`;
- a victim's `sealed_secrets` copied from `tokens.issued` and re-addressed to oneself, with
  the tokens service's own credentials: `sealed_context_mismatch`, no mail;
- a new key sealed for the victim's very event but older than its lifetime: `sealed_expired`.

Every "nothing happened" is concluded only after a later event on the same partition (the
same account) has visibly been served."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import TopicAuthorizationFailedError
from pymongo import AsyncMongoClient

from services.password.domain import hashable
from shared.acl import PORTAL
from shared.crypto import Purpose, SecretBox, new_key_context
from shared.envelope import CONTENT_TYPE, new_event
from shared.hashing import SecretHasher
from shared.kafka import client_kwargs
from shared.schemas import IdentityVerified, Recipient, TokensRedeemed
from shared.topics import IDENTITY_VERIFIED, PASSWORD_UPDATED, TOKENS_ISSUED, TOKENS_REDEEMED, EventType, dlq
from tests.e2e.conftest import World
from tools.mail import body_text
from tools.testdata import Citizen, new_citizen, new_key
from tools.watch import TopicWatcher
from tools.workbench import WorkbenchSettings, as_principal

pytestmark = pytest.mark.e2e

ATTACKER_DOMAIN = "atacante.example.org"


async def produce(
    settings: WorkbenchSettings,
    topic: str,
    key: str,
    event_type: str,
    data: dict[str, Any],
    *,
    source: str,
    correlationid: str,
) -> None:
    """One event, as a Kafka client holding `settings`' credentials sends it."""
    producer = AIOKafkaProducer(**client_kwargs(settings), enable_idempotence=True, request_timeout_ms=10_000)
    try:
        await producer.start()
        event = new_event(type=event_type, source=source, data=data, correlationid=correlationid)
        await producer.send_and_wait(
            topic, event.to_bytes(), key=key.encode(), headers=[("content-type", CONTENT_TYPE.encode())]
        )
    finally:
        await producer.stop()


@pytest.fixture
async def issued_events(world: World) -> AsyncIterator[TopicWatcher]:
    w = TopicWatcher(world.settings, [TOKENS_ISSUED, TOKENS_REDEEMED, PASSWORD_UPDATED])
    await w.start()
    yield w
    await w.stop()


def on(topic: str, **data: str) -> Any:
    """A TopicWatcher predicate: an event on `topic` whose data has these values."""
    return lambda t, _h, d: t == topic and all(d.get("data", {}).get(k) == v for k, v in data.items())


async def letter(world: World, topic: str, correlationid: str) -> dict[str, Any]:
    found = await world.dead_letters.wait(
        lambda t, _h, d: t == dlq(topic) and d.get("correlationid") == correlationid, timeout=60
    )
    assert len(found) == 1
    return found[0]


async def audited_dead_letter(world: World, origin: dict[str, Any], reason: str) -> None:
    await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "message_dead_lettered"
            and d["data"].get("reasons") == [reason]
            and d["data"]["details"].get("topic") == origin["origin_topic"]
            and d["data"]["details"].get("offset") == origin["origin_offset"]
            and d["data"]["details"].get("partition") == origin["origin_partition"]
        )
    )


async def key_history(settings: WorkbenchSettings, account_id: str) -> list[str]:
    """The password service's stored hashes of an account, newest first."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(settings.mongodb_uri)
    try:
        doc = await client[settings.db_name("password")]["credentials"].find_one({"_id": account_id})
    finally:
        await client.close()
    assert doc is not None
    return [doc["hash"], *doc.get("previous", [])]


async def matches(settings: WorkbenchSettings, hashes: list[str], key: str) -> list[bool]:
    hasher = SecretHasher(settings)
    try:
        return [await hasher.verify(h, hashable(key)) for h in hashes]
    finally:
        hasher.close()


async def recover(world: World, citizen: Citizen) -> tuple[str, str, str]:
    """A whole recovery by link: (request_id, the new key, its account_id)."""
    rid = await world.request(citizen)
    _, token = await world.recovery_mail(rid)
    key = new_key()
    await world.portal.submit_reset(rid, key, token=token)
    assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
    return rid, key, (await world.audited(rid, "token_reserved"))["account_id"]


def attacker_address() -> str:
    return f"eve.{uuid.uuid4().hex[:10]}@{ATTACKER_DOMAIN}"


# ------------------------------------------------------------------ forged identity.verified


def forged_verification(account_id: str, email: str) -> tuple[str, dict[str, Any]]:
    rid = f"req-forged-{uuid.uuid4().hex}"
    data = IdentityVerified(
        request_id=rid, account_id=account_id, recipient=Recipient(email=email, name="Eve", locale="es")
    )
    return rid, data.model_dump(mode="json")


async def test_a_forged_verification_from_the_portal_is_refused_by_the_broker(
    world: World, issued_events: TopicWatcher
) -> None:
    victim = new_citizen()
    (victim_id,) = await world.register(victim)
    eve = attacker_address()
    rid, data = forged_verification(victim_id, eve)
    with pytest.raises(TopicAuthorizationFailedError):
        await produce(
            as_principal(world.settings, PORTAL),
            IDENTITY_VERIFIED,
            victim_id,
            EventType.IDENTITY_VERIFIED,
            data,
            source="/clave/identity",  # claiming to be identity changes nothing: the broker decides
            correlationid=rid,
        )
    # Later, on the same partition: the victim's own request is served.
    real = await world.request(victim)
    await world.recovery_mail(real)
    await issued_events.wait(on(TOKENS_ISSUED, request_id=real, account_id=victim_id))
    assert issued_events.matching(on(TOKENS_ISSUED, request_id=rid)) == []
    assert world.mails_to(eve) == []


async def test_a_verification_without_identitys_source_is_dead_lettered(
    world: World, issued_events: TopicWatcher
) -> None:
    """Written by a principal that may write the topic (here the broker's admin: think of a
    mis-granted ACL), but not under identity's name: tokens issues nothing, nobody is mailed."""
    victim = new_citizen()
    (victim_id,) = await world.register(victim)
    eve = attacker_address()
    rid, data = forged_verification(victim_id, eve)
    await produce(
        world.settings,
        IDENTITY_VERIFIED,
        victim_id,
        EventType.IDENTITY_VERIFIED,
        data,
        source="/clave/portal",
        correlationid=rid,
    )
    parked = await letter(world, IDENTITY_VERIFIED, rid)
    assert parked["data"]["reason"] == "wrong_source"
    assert "/clave/identity" in parked["data"]["detail"] and "/clave/portal" not in parked["data"]["detail"]
    await audited_dead_letter(world, parked["data"], "wrong_source")
    # Later, on the same partition (keyed by the victim's account): the victim's own request is
    # served, and every mail queued before it has been sent.
    real = await world.request(victim)
    await world.recovery_mail(real)
    await issued_events.wait(on(TOKENS_ISSUED, request_id=real, account_id=victim_id))
    await world.mail_barrier()
    assert issued_events.matching(on(TOKENS_ISSUED, request_id=rid)) == []
    assert world.mails_to(eve) == []


# ------------------------------------------------------------------ a new key replayed


async def test_ones_own_sealed_new_key_replayed_for_a_victim_changes_no_key(
    world: World, issued_events: TopicWatcher
) -> None:
    attacker, victim = new_citizen(), new_citizen()
    _, victim_id = await world.register(attacker, victim)
    eve = attacker_address()
    # The attacker recovers their own account and reads their own tokens.redeemed.
    own_rid, own_key, _ = await recover(world, attacker)
    (own,) = issued_events.matching(on(TOKENS_REDEEMED, request_id=own_rid))
    # Replayed for the victim, under a fresh token and request (a used token would be refused
    # anyway), published with the tokens service's own credentials and name.
    rid = f"req-forged-{uuid.uuid4().hex}"
    forged = TokensRedeemed(
        request_id=rid,
        account_id=victim_id,
        token_id=uuid.uuid4().hex,
        recipient=Recipient(email=eve, name="Eve", locale="es"),
        sealed_new_key=own["data"]["sealed_new_key"],
    )
    await produce(
        as_principal(world.settings, "tokens"),
        TOKENS_REDEEMED,
        victim_id,
        EventType.TOKENS_REDEEMED,
        forged.model_dump(mode="json"),
        source="/clave/tokens",
        correlationid=rid,
    )
    parked = await letter(world, TOKENS_REDEEMED, rid)
    assert parked["data"]["reason"] == "sealed_context_mismatch"
    assert "account_id" in parked["data"]["detail"] and victim_id not in parked["data"]["detail"]
    await audited_dead_letter(world, parked["data"], "sealed_context_mismatch")
    # Later, on the same partition: the victim's own key change is served.
    real_rid, real_key, _ = await recover(world, victim)
    await issued_events.wait(on(PASSWORD_UPDATED, request_id=real_rid, account_id=victim_id))
    await world.mail_barrier()
    # The victim's keys are their initial one and the one they chose: the attacker's never was.
    history = await key_history(world.settings, victim_id)
    assert await matches(world.settings, history, real_key) == [True, False]
    assert await matches(world.settings, history, victim.password) == [False, True]
    assert await matches(world.settings, history, own_key) == [False, False]
    updates = issued_events.matching(on(PASSWORD_UPDATED, account_id=victim_id))
    assert [u["data"]["request_id"] for u in updates] == [real_rid]
    assert world.mails_to(eve) == []


async def test_a_new_key_past_its_lifetime_changes_no_key(world: World, issued_events: TopicWatcher) -> None:
    """Sealed for exactly this event, with the real PASSWORD_KEYS (the development key the
    local stack runs with), but an hour ago: a replay from an old dump."""
    victim = new_citizen()
    (victim_id,) = await world.register(victim)
    rid, token_id, stale_key = f"req-stale-{uuid.uuid4().hex}", uuid.uuid4().hex, new_key()
    sealed = SecretBox(world.settings.password_keys).seal(
        {"new_password": stale_key},
        purpose=Purpose.NEW_KEY,
        context=new_key_context(token_id=token_id, account_id=victim_id, request_id=rid),
        at=int(time.time()) - 3600,
    )
    forged = TokensRedeemed(
        request_id=rid,
        account_id=victim_id,
        token_id=token_id,
        recipient=Recipient(email=victim.email, name=victim.name, locale="es"),
        sealed_new_key=sealed,
    )
    await produce(
        as_principal(world.settings, "tokens"),
        TOKENS_REDEEMED,
        victim_id,
        EventType.TOKENS_REDEEMED,
        forged.model_dump(mode="json"),
        source="/clave/tokens",
        correlationid=rid,
    )
    parked = await letter(world, TOKENS_REDEEMED, rid)
    assert parked["data"]["reason"] == "sealed_expired"
    await audited_dead_letter(world, parked["data"], "sealed_expired")
    real_rid, real_key, _ = await recover(world, victim)
    await issued_events.wait(on(PASSWORD_UPDATED, request_id=real_rid, account_id=victim_id))
    history = await key_history(world.settings, victim_id)
    assert await matches(world.settings, history, real_key) == [True, False]
    assert await matches(world.settings, history, stale_key) == [False, False]
    assert issued_events.matching(on(PASSWORD_UPDATED, request_id=rid)) == []


# ------------------------------------------------------------------ link and code re-addressed


async def test_a_victims_sealed_link_and_code_readdressed_to_oneself_are_not_mailed(
    world: World, issued_events: TopicWatcher
) -> None:
    victim = new_citizen()
    (victim_id,) = await world.register(victim)
    eve = attacker_address()
    rid = await world.request(victim)
    victim_mail, victim_token = await world.recovery_mail(rid)
    (issued,) = await issued_events.wait(on(TOKENS_ISSUED, request_id=rid))
    # The victim's tokens.issued, copied with the attacker's address, under the tokens
    # service's own credentials and name.
    data = {**issued["data"], "recipient": {"email": eve, "name": "Eve", "locale": "es"}}
    await produce(
        as_principal(world.settings, "tokens"),
        TOKENS_ISSUED,
        victim_id,
        EventType.TOKENS_ISSUED,
        data,
        source="/clave/tokens",
        correlationid=rid,
    )
    parked = await letter(world, TOKENS_ISSUED, rid)
    assert parked["data"]["reason"] == "sealed_context_mismatch"
    assert "recipient" in parked["data"]["detail"] and eve not in parked["data"]["detail"]
    await audited_dead_letter(world, parked["data"], "sealed_context_mismatch")
    # Later, on the same partition: the victim's next request is mailed, and every mail queued
    # before it has been sent.
    later = await world.request(victim)
    await world.recovery_mail(later)
    await world.mail_barrier()
    assert world.mails_to(eve) == []
    # Only the victim ever got the link.
    with_link = [m for _p, m in world.mailbox.messages() if victim_token in body_text(m)]
    assert [str(m["To"]) for m in with_link] == [victim.email]
    assert victim_mail in with_link
