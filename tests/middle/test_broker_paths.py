"""More of the recovery's paths through the services' wiring, in one process on TestKafkaBroker
and the in-memory store, with the real relays: a declined request gets a decoy, a lockout
mails the account, a weak new key is refused back to the portal, and a login check is answered
at once (the reply sent after the commit, before the relay's copy), and portal input that
cannot be processed is answered as each app.py wires it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from services.identity.app import build as build_identity
from services.identity.settings import IdentitySettings
from services.notifier.app import build as build_notifier
from services.notifier.settings import NotifierSettings
from services.password.app import build as build_password
from services.password.settings import PasswordSettings
from services.tokens.app import build as build_tokens
from services.tokens.settings import TokensSettings
from shared import consumer
from shared.crypto import Purpose, SecretBox, initial_key_context
from shared.envelope import DeadLetterReason, new_event
from shared.topics import (
    CONTACT_RESULTS,
    CONTACT_UPDATES,
    IDENTITY_ACCOUNT_REGISTERED,
    IDENTITY_DECLINED,
    IDENTITY_LOCKED,
    LOGIN_CHECKS,
    LOGIN_RESULTS,
    PASSWORD_REJECTED,
    RECOVERY_OUTCOMES,
    RECOVERY_REQUESTS,
    RECOVERY_RESETS,
    TOKENS_ISSUED,
    EventType,
)
from tests.middle.inprocess import Cluster, relay_producer, running, settings, until
from tests.middle.test_broker_identity import ANSWERS, KEY, NATIONAL_ID, raw, request, seed_account
from tests.middle.test_broker_recovery import outcomes, reset, the_secrets

IDENTITY: IdentitySettings = settings(IdentitySettings)
PASSWORD: PasswordSettings = settings(PasswordSettings)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer, "backoff", lambda _streak: 0.0)


@pytest.fixture
async def clave() -> AsyncIterator[Cluster]:
    services = (
        build_identity(IDENTITY),
        build_tokens(settings(TokensSettings)),
        build_notifier(settings(NotifierSettings)),
        build_password(PASSWORD),
    )
    async with running(*services) as cluster:
        await seed_account(cluster["identity"])
        await cluster.start_relays()
        yield cluster
        assert cluster.failures == []


def mails(c: Cluster, **query: str) -> int:
    return int(c["notifier"].collection("notifications").count_documents(query))


async def test_a_declined_request_gets_a_decoy_and_no_mail(clave: Cluster) -> None:
    doc = request(national_id="0926687856")  # valid, but no account has it
    rid = doc["data"]["request_id"]
    await clave.deliver(RECOVERY_REQUESTS, raw(doc), key=b"0926687856")
    tokens = clave["tokens"].collection("tokens")
    await until(lambda: tokens.count_documents({"request_id": rid}) == 1, 10, "decoy stored")
    assert tokens.find_one({"request_id": rid})["decoy"] is True
    assert outcomes(clave["identity"], rid) == [("request", "accepted")]  # as for a real account
    assert clave.published[IDENTITY_DECLINED] == 1 and clave.published[TOKENS_ISSUED] == 0
    assert mails(clave) == 0


async def test_a_lockout_mails_the_account_once(clave: Cluster) -> None:
    wrong = {**ANSWERS, "birth_date": "1900-01-01"}
    for _ in range(IDENTITY.lockout_max_failures):
        await clave.deliver(RECOVERY_REQUESTS, raw(request(answers=wrong)), key=KEY)
    await until(lambda: mails(clave, kind="account_locked") == 1, 10, "lock notice queued")
    assert clave.published[IDENTITY_LOCKED] == 1
    # Locked now: even the right answers are declined (and no second notice).
    doc = request()
    await clave.deliver(RECOVERY_REQUESTS, raw(doc), key=KEY)
    rid = doc["data"]["request_id"]
    await until(lambda: clave["tokens"].collection("tokens").count_documents({"request_id": rid}) == 1, 10, "decoy")
    assert clave["tokens"].collection("tokens").find_one({"request_id": rid})["decoy"] is True
    assert mails(clave, kind="account_locked") == 1 and mails(clave, kind="recovery_link") == 0


async def test_a_weak_new_key_is_refused_back_to_the_portal(clave: Cluster) -> None:
    doc = request()
    rid = doc["data"]["request_id"]
    await clave.deliver(RECOVERY_REQUESTS, raw(doc), key=KEY)
    await until(lambda: len(clave["tokens"].events(TOKENS_ISSUED)) == 1, 10, "token issued")
    [issued] = clave["tokens"].events(TOKENS_ISSUED)
    await clave.deliver(RECOVERY_RESETS, reset(rid, the_secrets(issued)["token"], "abc"), key=rid.encode())
    await until(lambda: ("reset", "rejected") in outcomes(clave["tokens"], rid), 10, "reset answered")
    [rejected] = clave["password"].events(PASSWORD_REJECTED)
    assert "password_too_short" in rejected["data"]["reasons"]
    assert clave["password"].collection("credentials").count_documents({}) == 0


async def test_a_login_check_is_answered_at_once_then_relayed(clave: Cluster) -> None:
    password = clave["password"]
    key = "Andina2026Clave"
    sealed = SecretBox(IDENTITY.password_keys).seal(
        {"password": key}, purpose=Purpose.INITIAL_KEY, context=initial_key_context(account_id="acc-1")
    )
    registered = new_event(
        type=EventType.ACCOUNT_REGISTERED,
        source="/clave/identity",
        data={"account_id": "acc-1", "national_id": NATIONAL_ID, "sealed_initial_key": sealed},
        correlationid="import-1",
    )
    await clave.deliver(IDENTITY_ACCOUNT_REGISTERED, registered.to_bytes(), key=b"acc-1")
    assert password.collection("credentials").count_documents({"_id": "acc-1"}) == 1

    await password.service.relay.stop()  # its relay away: the answer must not wait for it
    relay = password.service.relay
    relay._producer = relay_producer(clave, "password")  # send_now's producer, no relay loop
    results: dict[str, str] = {}
    for typed in (key, "Otra2026Clave"):
        check_id = f"chk-{uuid.uuid4().hex[:12]}"
        data = {"check_id": check_id, "national_id": NATIONAL_ID, "key": typed, "client_ip": "203.0.113.9"}
        event = new_event(
            type=EventType.LOGIN_CHECK_REQUESTED, source="/portal/tests", data=data, correlationid=check_id
        )
        await clave.deliver(LOGIN_CHECKS, event.to_bytes(), key=check_id.encode())
        [answer] = [e for e in password.events(LOGIN_RESULTS) if e["data"]["check_id"] == check_id]
        results[typed] = answer["data"]["status"]
    assert results == {key: "valid", "Otra2026Clave": "invalid"}
    assert clave.published[LOGIN_RESULTS] == 2, "sent at once after each commit"
    assert password.collection("outbox").count_documents({"topic": LOGIN_RESULTS, "sent": False}) == 2


# ---- portal input that cannot be processed is answered besides its letter ----------------------

# Topics keyed by the citizen's national ID never answer by the record key (it would echo
# the ID back): an unreadable record there gets its letter only.
KEYED_BY_NATIONAL_ID = {LOGIN_CHECKS, CONTACT_UPDATES}

ANSWERED = {
    # topic: (service, the id field, the answer's topic, the answer's data for id "in-1")
    RECOVERY_RESETS: (
        "tokens",
        "request_id",
        RECOVERY_OUTCOMES,
        {"request_id": "in-1", "stage": "reset", "status": "rejected", "reasons": ["reset_invalid"]},
    ),
    LOGIN_CHECKS: (
        "password",
        "check_id",
        LOGIN_RESULTS,
        {"check_id": "in-1", "status": "invalid", "reasons": ["check_invalid"], "must_change": False},
    ),
    CONTACT_UPDATES: (
        "password",
        "update_id",
        CONTACT_RESULTS,
        {"update_id": "in-1", "status": "rejected", "reasons": ["check_invalid"]},
    ),
}


@pytest.mark.parametrize("topic", sorted(ANSWERED))
async def test_unprocessable_portal_input_is_answered_as_wired(clave: Cluster, topic: str) -> None:
    """app.py wires each portal-input topic with its answer: a record dead-lettered there still
    gets one, keyed by the id it carries (else by its record key, unless that is the national ID)."""
    service, id_field, answer_topic, expected = ANSWERED[topic]
    node = clave[service]
    schema_invalid = new_event(
        type=SUBMITTED[topic], source="/portal/tests", data={id_field: "in-1", "x": 1}, correlationid="in-1"
    )
    await clave.deliver(topic, schema_invalid.to_bytes(), key=b"in-1")
    await clave.deliver(topic, b"[" * 5000 + b"]" * 5000, key=b"in-2")  # unreadable: the key
    reasons = [d["headers"]["clave-dlq-reason"] for d in node.letters(topic)]
    assert reasons == [DeadLetterReason.SCHEMA_INVALID, DeadLetterReason.MALFORMED_JSON]
    answers = [e["data"] for e in node.events(answer_topic)]
    by_key = [] if topic in KEYED_BY_NATIONAL_ID else [{**expected, id_field: "in-2"}]
    assert answers == [expected, *by_key]
    await until(lambda: clave.published[answer_topic] == len(answers), 10, "answers relayed")


SUBMITTED = {
    RECOVERY_RESETS: EventType.RESET_SUBMITTED,
    LOGIN_CHECKS: EventType.LOGIN_CHECK_REQUESTED,
    CONTACT_UPDATES: EventType.CONTACT_UPDATE_REQUESTED,
}
