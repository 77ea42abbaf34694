"""The portal's client library (clients/python, clave_portal) without a broker: what it sends is
what the contract's models accept, and answers are correlated by id within a deadline."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from clave_portal import ClaveError, ClaveTimeout, HpkeSealer, PortalClient, PortalSettings, Reason
from clave_portal import events as ev

from shared import topics as t
from shared.contract import CLIENTS, TOPICS
from shared.envelope import CONTENT_TYPE, parse_event
from shared.portal_input import InputRefused, PortalInput, make_key_pair
from shared.schemas import SCHEMAS, ContactResult, LoginResult, RecoveryOutcome
from shared.topics import EventType


class FakeProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []
        self.any_sent = asyncio.Event()

    async def send_and_wait(self, topic: str, value: bytes, key: bytes, headers: list[tuple[str, bytes]]) -> None:
        self.sent.append((topic, value, key, headers))
        self.any_sent.set()


def client(**kwargs: Any) -> tuple[PortalClient, FakeProducer]:
    c = PortalClient(PortalSettings(security_protocol="PLAINTEXT"), timeout=2.0, **kwargs)
    producer = FakeProducer()
    c._producer = producer  # type: ignore[assignment]
    return c, producer


def answer(c: PortalClient, topic: str, event_type: str, data: dict[str, Any], event_id: str | None = None) -> None:
    event = ev.cloud_event(event_type, data, source="/clave/tests", correlationid="x")
    if event_id:
        event["id"] = event_id
    c._answers._take(topic, json.dumps(event).encode())


def parsed(sent: tuple[str, bytes, bytes, list[tuple[str, bytes]]]) -> tuple[str, str, dict[str, Any]]:
    """The event as Clave's consumer reads it: envelope and payload validated by the contract."""
    topic, value, key, headers = sent
    assert dict(headers)["content-type"] == CONTENT_TYPE.encode()
    event = parse_event(value, max_bytes=65536, known_types=set(TOPICS[topic].types))
    SCHEMAS[event.type].model_validate(event.data)
    return topic, key.decode(), event.model_dump()


def test_the_client_speaks_exactly_the_portals_topics_and_types() -> None:
    portal = CLIENTS["portal"]
    assert {ev.RECOVERY_REQUESTS, ev.RECOVERY_RESETS, ev.LOGIN_CHECKS, ev.CONTACT_UPDATES} == set(portal.produces)
    assert {ev.RECOVERY_OUTCOMES, ev.LOGIN_RESULTS, ev.ACCOUNT_KEY_CHANGED, ev.CONTACT_RESULTS} == set(portal.consumes)
    assert ev.CONTACT_UPDATE_REQUESTED == EventType.CONTACT_UPDATE_REQUESTED
    assert ev.CONTACT_RESULT == EventType.CONTACT_RESULT
    assert ev.RECOVERY_REQUESTED == EventType.RECOVERY_REQUESTED
    assert ev.RESET_SUBMITTED == EventType.RESET_SUBMITTED
    assert ev.RECOVERY_OUTCOME == EventType.RECOVERY_OUTCOME
    assert ev.LOGIN_CHECK_REQUESTED == EventType.LOGIN_CHECK_REQUESTED
    assert ev.LOGIN_RESULT == EventType.LOGIN_RESULT
    assert ev.ACCOUNT_KEY_CHANGED_TYPE == EventType.ACCOUNT_KEY_CHANGED
    assert ev.CONTENT_TYPE == CONTENT_TYPE


async def test_a_recovery_request_is_a_valid_event_keyed_by_national_id() -> None:
    c, producer = client()
    rid = await c.request_recovery(
        national_id="1710034065",
        email="maria@example.org",
        answers={"birth_date": "1984-03-09"},
        client_ip="10.0.0.1",
        captcha_passed=True,
    )
    topic, key, event = parsed(producer.sent[0])
    assert (topic, key) == (t.RECOVERY_REQUESTS, "1710034065")
    assert event["data"]["request_id"] == rid == event["correlationid"]


async def test_a_reset_returns_its_own_outcome_not_an_earlier_or_anothers() -> None:
    c, producer = client()
    rid = "req-123"
    # Already here before the reset: the request's answer and an earlier reset's rejection.
    answer(c, ev.RECOVERY_OUTCOMES, ev.RECOVERY_OUTCOME, {"request_id": rid, "stage": "request", "status": "accepted"})
    answer(
        c,
        ev.RECOVERY_OUTCOMES,
        ev.RECOVERY_OUTCOME,
        {"request_id": rid, "stage": "reset", "status": "rejected", "reasons": ["password_reused"]},
    )
    task = asyncio.create_task(c.submit_reset(rid, token="tok", new_password="Nueva2024x"))
    await asyncio.sleep(0)  # the reset is sent; its waiter registered
    topic, key, event = parsed(producer.sent[0])
    assert (topic, key, event["data"]["token"]) == (t.RECOVERY_RESETS, rid, "tok")
    answer(
        c, ev.RECOVERY_OUTCOMES, ev.RECOVERY_OUTCOME, {"request_id": "other", "stage": "reset", "status": "completed"}
    )
    done = {"request_id": rid, "stage": "reset", "status": "completed"}
    RecoveryOutcome.model_validate(done)
    answer(c, ev.RECOVERY_OUTCOMES, ev.RECOVERY_OUTCOME, done)
    outcome = await asyncio.wait_for(task, 2)
    assert outcome.completed and outcome.request_id == rid and outcome.reasons == ()


async def test_a_request_clave_could_not_process_is_its_outcome_request_invalid() -> None:
    c, _ = client()
    rejected = {"request_id": "req-bad", "stage": "request", "status": "rejected", "reasons": ["request_invalid"]}
    RecoveryOutcome.model_validate(rejected)  # what identity sends (services/identity/app.py)
    answer(c, ev.RECOVERY_OUTCOMES, ev.RECOVERY_OUTCOME, rejected)
    outcome = await c.request_outcome("req-bad")
    assert outcome.status == "rejected" and outcome.reasons == (Reason.REQUEST_INVALID,)
    assert outcome.invalid and not outcome.accepted and not outcome.completed
    accepted = {"request_id": "req-ok", "stage": "request", "status": "accepted"}
    answer(c, ev.RECOVERY_OUTCOMES, ev.RECOVERY_OUTCOME, accepted)
    ok = await c.request_outcome("req-ok")
    assert ok.accepted and not ok.invalid
    repeat = {**rejected, "request_id": "req-again", "reasons": ["duplicate_request"]}
    answer(c, ev.RECOVERY_OUTCOMES, ev.RECOVERY_OUTCOME, repeat)
    assert not (await c.request_outcome("req-again")).invalid  # the first answer stands


def test_the_clients_reason_codes_are_the_contracts() -> None:
    """Every code clave_portal.Reason names is one the contract document lists for the portal."""
    from clave.asyncapi import reason_schemas

    schemas = reason_schemas()
    portal_codes = {
        code
        for name in ("RequestOutcomeReason", "ResetReason", "LoginReason", "ContactResultReason")
        for code in schemas[name]["enum"]
    }
    named = {v for k, v in vars(Reason).items() if k.isupper() and isinstance(v, str)}
    assert named <= portal_codes and Reason.REQUEST_INVALID in named
    assert Reason.INPUT_REFUSED <= named


async def test_no_answer_within_the_deadline_raises() -> None:
    c, _ = client()
    with pytest.raises(ClaveTimeout):
        await c.submit_reset("req-none", code="123456", new_password="Nueva2024x", timeout=0.2)


async def test_exactly_one_of_token_and_code() -> None:
    c, producer = client()
    with pytest.raises(ClaveError):
        await c.submit_reset("r", new_password="x", token="a", code="123456")
    with pytest.raises(ClaveError):
        await c.submit_reset("r", new_password="x")
    assert producer.sent == []


async def test_a_login_check_is_valid_input_and_its_result_is_correlated() -> None:
    c, producer = client()
    task = asyncio.create_task(c.login("1710034065", "Clave2024", client_ip="2001:db8::1", check_id="chk-1"))
    await asyncio.sleep(0)
    topic, key, event = parsed(producer.sent[0])
    assert (topic, key, event["data"]["check_id"]) == (t.LOGIN_CHECKS, "1710034065", "chk-1")
    result = {"check_id": "chk-1", "status": "invalid", "reasons": ["throttled"]}
    LoginResult.model_validate(result)
    answer(c, ev.LOGIN_RESULTS, ev.LOGIN_RESULT, result, event_id="e1")
    answer(c, ev.LOGIN_RESULTS, ev.LOGIN_RESULT, {**result, "status": "valid"}, event_id="e1")  # a redelivery
    got = await asyncio.wait_for(task, 2)
    assert not got.valid and got.reasons == ("throttled",)


def test_a_login_result_says_when_the_right_key_must_be_changed() -> None:
    from clave_portal.models import LoginResult as PortalLoginResult

    legacy = {"check_id": "chk-1", "status": "valid", "reasons": [], "must_change": True}
    LoginResult.model_validate(legacy)
    assert PortalLoginResult.from_event({"id": "e1", "data": legacy}).must_change
    # Never with an invalid answer, and an older Clave that does not send the field means False.
    invalid = {**legacy, "status": "invalid", "reasons": ["key_invalid"]}
    assert not PortalLoginResult.from_event({"id": "e2", "data": invalid}).must_change
    older = {"check_id": "chk-1", "status": "valid", "reasons": []}
    assert not PortalLoginResult.from_event({"id": "e3", "data": older}).must_change


async def answer_the_login(c: PortalClient, producer: FakeProducer, result: dict[str, Any]) -> None:
    """Wait for the client's login check, then answer it as Clave would (its own check_id)."""
    await asyncio.wait_for(producer.any_sent.wait(), 2)
    check_id = parsed(producer.sent[-1])[2]["data"]["check_id"]
    LoginResult.model_validate({"check_id": check_id, **result})
    answer(c, ev.LOGIN_RESULTS, ev.LOGIN_RESULT, {"check_id": check_id, **result}, event_id=f"e-{check_id}")


async def test_login_carries_must_change_and_check_credentials_stays_a_bool() -> None:
    must_change = {"status": "valid", "reasons": [], "must_change": True}
    c, producer = client()
    task = asyncio.create_task(c.login("1710034065", "abc", client_ip="2001:db8::1"))
    await answer_the_login(c, producer, must_change)
    got = await asyncio.wait_for(task, 2)
    assert got.valid and got.must_change and got.reasons == ()
    # The public bool is unchanged: a right key is True, must-change or not.
    c, producer = client()
    checked = asyncio.create_task(c.check_credentials("1710034065", "abc", client_ip="2001:db8::1"))
    await answer_the_login(c, producer, must_change)
    assert await asyncio.wait_for(checked, 2) is True
    c, producer = client()
    wrong = asyncio.create_task(c.login("1710034065", "abd", client_ip="2001:db8::1"))
    await answer_the_login(c, producer, {"status": "invalid", "reasons": ["key_invalid"], "must_change": False})
    got = await asyncio.wait_for(wrong, 2)
    assert not got.valid and not got.must_change


async def test_the_sealing_seam_sees_every_payload_before_it_is_sent() -> None:
    class Sealer:
        def __init__(self) -> None:
            self.types: list[str] = []

        def seal(self, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
            self.types.append(event_type)
            return {**data, "key": "sealed"} if "key" in data else dict(data)

    sealer = Sealer()
    c, producer = client(sealer=sealer)
    with pytest.raises(ClaveTimeout):
        await c.login("1710034065", "Clave2024", client_ip="10.0.0.1", timeout=0.05)
    assert sealer.types == [EventType.LOGIN_CHECK_REQUESTED]
    assert json.loads(producer.sent[0][1])["data"]["key"] == "sealed"


async def test_not_started_is_a_clear_error() -> None:
    c = PortalClient(PortalSettings())
    with pytest.raises(ClaveError, match="not started"):
        await c.login("1710034065", "k", client_ip="10.0.0.1")


def test_settings_from_the_principals_properties_file(tmp_path: Path) -> None:
    path = tmp_path / "portal.properties"
    path.write_text(
        "bootstrap.servers=b1:9093\nsecurity.protocol=sasl_plaintext\nsasl.mechanism=SCRAM-SHA-512\n"
        "sasl.username=portal\nsasl.password=s3cret\n# comment\n"
    )
    s = PortalSettings.from_properties(path)
    assert (s.bootstrap_servers, s.security_protocol, s.sasl_username) == ("b1:9093", "SASL_PLAINTEXT", "portal")
    assert "s3cret" not in repr(s)
    assert s.kafka_kwargs()["sasl_plain_password"] == "s3cret"
    path.write_text("ssl.certificate.location=/x\n")
    with pytest.raises(ValueError, match="unsupported property") as info:
        PortalSettings.from_properties(path)
    assert "/x" not in str(info.value)


def test_key_change_groups_must_be_the_portals() -> None:
    c, _ = client()
    with pytest.raises(ClaveError):
        c.key_changes(group_id="other-group")
    c.key_changes(group_id="portal-sessions")


async def test_a_contact_update_is_valid_input_and_its_result_is_correlated() -> None:
    c, producer = client()
    task = asyncio.create_task(
        c.update_contact("1710034065", "Clave2024", client_ip="10.0.0.1", phone="0991234567", update_id="upd-1")
    )
    await asyncio.sleep(0)
    topic, key, event = parsed(producer.sent[0])
    assert (topic, key) == (t.CONTACT_UPDATES, "1710034065")
    assert event["data"] == {
        "update_id": "upd-1",
        "national_id": "1710034065",
        "key": "Clave2024",
        "client_ip": "10.0.0.1",
        "phone": "0991234567",
    }
    answer(c, ev.CONTACT_RESULTS, ev.CONTACT_RESULT, {"update_id": "upd-0", "status": "updated"})
    result = {"update_id": "upd-1", "status": "rejected", "reasons": ["key_invalid"]}
    ContactResult.model_validate(result)
    answer(c, ev.CONTACT_RESULTS, ev.CONTACT_RESULT, result)
    got = await asyncio.wait_for(task, 2)
    assert not got.updated and got.reasons == ("key_invalid",)
    with pytest.raises(ClaveError):
        await c.update_contact("1710034065", "k", client_ip="10.0.0.1")


async def test_the_hpke_sealer_seals_every_secret_so_that_clave_opens_it(tmp_path: Path) -> None:
    """What the client seals, Clave's services open (shared/portal_input.py); in the clear no
    secret is left, and each sealed field is bound to its record."""
    private, public = tmp_path / "sealing.pem", tmp_path / "public.pem"
    make_key_pair(private, public)
    opener = PortalInput("sealed", str(private))
    c, producer = client(sealer=HpkeSealer.from_file(public))
    answers = {"birth_date": "1984-03-09", "mother_surname": "Ándrade"}
    await c.request_recovery(
        national_id="1710034065", email="m@example.org", answers=answers, client_ip="10.0.0.1", captcha_passed=True
    )
    for call in (
        c.submit_reset("req-1", token="tok", new_password="Nueva2024x", timeout=0.01),
        c.login("1710034065", "Clave2024", client_ip="10.0.0.1", check_id="chk-1", timeout=0.01),
        c.update_contact("1710034065", "Clave2025", client_ip="10.0.0.1", phone="", update_id="upd-1", timeout=0.01),
    ):
        with pytest.raises(ClaveTimeout):
            await call
    events = [parsed(sent)[2]["data"] for sent in producer.sent]
    text = json.dumps(events, ensure_ascii=False)
    for secret in ("1984-03-09", "Ándrade", "Nueva2024x", "Clave2024", "Clave2025"):
        assert secret not in text
    request, reset, check, update = events
    rid = request["request_id"]
    assert opener.answers(None, request["sealed_answers"], topic=t.RECOVERY_REQUESTS, ref=rid) == answers
    assert opener.secret(None, reset["sealed_new_password"], topic=t.RECOVERY_RESETS, field="new_password", ref="req-1")
    assert opener.secret(None, check["sealed_key"], topic=t.LOGIN_CHECKS, field="key", ref="chk-1") == "Clave2024"
    assert opener.secret(None, update["sealed_key"], topic=t.CONTACT_UPDATES, field="key", ref="upd-1") == "Clave2025"
    with pytest.raises(InputRefused):  # bound to its record: not another's
        opener.secret(None, update["sealed_key"], topic=t.CONTACT_UPDATES, field="key", ref="upd-2")


async def test_two_waiters_on_one_id_both_get_their_answer() -> None:
    c, _ = client()
    rid = "req-both"
    first = asyncio.create_task(c.request_outcome(rid, timeout=2))
    second = asyncio.create_task(c.request_outcome(rid, timeout=2))
    await asyncio.sleep(0)
    answer(c, ev.RECOVERY_OUTCOMES, ev.RECOVERY_OUTCOME, {"request_id": rid, "stage": "request", "status": "accepted"})
    assert [o.status for o in await asyncio.gather(first, second)] == ["accepted", "accepted"]
