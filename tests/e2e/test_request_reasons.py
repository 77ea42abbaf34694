"""Every request-stage rejection: the portal sees `accepted` every time, no recovery e-mail
is sent, and the real reason is in the audit log only."""

from __future__ import annotations

import uuid

import pytest

from clave.testdata import random_cedula
from tests.e2e.conftest import World

pytestmark = pytest.mark.e2e


async def assert_refused_quietly(world: World, rid: str, reason: str, to: str | None = None) -> dict:
    outcome = await world.portal.wait_outcome(rid, "request")
    assert outcome == {"request_id": rid, "stage": "request", "status": "accepted", "reasons": []}
    audit = await world.audited(rid)
    assert audit["outcome"] == "rejected"
    assert reason in audit["reasons"]
    if to is not None:
        assert not [m for m in world.mails_to(to) if rid in m.get_body(preferencelist=("plain",)).get_content()]
    return audit


async def test_invalid_check_digit_is_id_invalid(world: World) -> None:
    good = random_cedula()
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    rid = await world.portal.request_recovery(
        national_id=bad, email_address="x@example.org", answers={"birth_date": "2000-01-01"}
    )
    await assert_refused_quietly(world, rid, "id_invalid")


async def test_unknown_account(world: World) -> None:
    rid = await world.portal.request_recovery(
        national_id=random_cedula(), email_address="nobody@example.org", answers={"birth_date": "1990-01-01"}
    )
    audit = await assert_refused_quietly(world, rid, "account_unknown")
    assert "account_id" not in audit and len(audit["subject_ref"]) == 64  # a keyed hash, not the ID


async def test_wrong_answer(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c, answers={**c.answers, "mother_surname": "Otro"})
    await assert_refused_quietly(world, rid, "answers_wrong", to=c.email)


async def test_missing_answer_is_wrong(world: World) -> None:
    c = await world.citizen()
    answers = dict(c.answers)
    answers.pop("birth_date")
    rid = await world.request(c, answers=answers)
    await assert_refused_quietly(world, rid, "answers_wrong", to=c.email)


async def test_email_mismatch_and_the_typed_address_gets_nothing(world: World) -> None:
    c = await world.citizen()
    typed = f"attacker.{uuid.uuid4().hex[:8]}@example.net"
    rid = await world.request(c, email_address=typed)
    await assert_refused_quietly(world, rid, "email_mismatch", to=c.email)
    assert world.mails_to(typed) == []


async def test_captcha_missing(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c, captcha_passed=False)
    await assert_refused_quietly(world, rid, "captcha_missing", to=c.email)


async def test_employer_representative_must_match(world: World) -> None:
    c = await world.citizen(profile="employer")
    rid = await world.request(c, representative_id=random_cedula())
    await assert_refused_quietly(world, rid, "representative_mismatch", to=c.email)


async def test_mailbox_flood_limit_is_rate_limited(world: World) -> None:
    c = await world.citizen()
    limit = world.settings.recovery_mails_per_hour
    for _ in range(limit):
        rid = await world.request(c)
        await world.recovery_mail(rid)
    extra = await world.request(c)
    await assert_refused_quietly(world, extra, "rate_limited", to=c.email)


async def test_client_ip_rate_limit(world: World) -> None:
    ip = f"203.0.113.{uuid.uuid4().int % 250 + 1}"
    limit = world.settings.ip_max_requests
    for _ in range(limit):
        rid = await world.portal.request_recovery(
            national_id=random_cedula(), email_address="x@example.org", answers={}, client_ip=ip
        )
        await world.audited(rid)
    c = await world.citizen()
    rid = await world.request(c, client_ip=ip)  # even correct data is refused from that address
    await assert_refused_quietly(world, rid, "rate_limited", to=c.email)


async def test_same_request_id_twice_has_one_effect(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    await world.recovery_mail(rid)
    await world.request(c, request_id=rid)
    dup = await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("request_id") == rid and "duplicate_request" in d["data"].get("reasons", [])
    )
    assert dup
    await world.recovery_mail(rid)  # still exactly one e-mail for it
