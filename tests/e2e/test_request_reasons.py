"""Every request-stage rejection: the portal sees `accepted` every time, no recovery e-mail
is sent, the real reason is in the audit log only, and identity declines the request on
`identity.declined` (so the tokens service keeps a decoy for it) exactly once."""

from __future__ import annotations

import ipaddress
import secrets
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.crypto import keyed_hash
from shared.topics import IDENTITY_DECLINED, IDENTITY_VERIFIED
from tests.e2e.conftest import World
from tools.mail import body_text
from tools.testdata import Citizen, new_citizen, random_cedula
from tools.watch import TopicWatcher
from tools.workbench import WorkbenchSettings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
async def decisions(stack: WorkbenchSettings) -> AsyncIterator[TopicWatcher]:
    """identity.declined and identity.verified, from now on (with each record's key: the
    contract keys identity.declined by account_id when the ID named an account, else by
    subject_ref)."""
    async with TopicWatcher(stack, [IDENTITY_DECLINED, IDENTITY_VERIFIED]) as w:
        yield w


class Witnesses:
    """Citizens whose recovery mails prove that mail is flowing: a "no mail" check is made
    only after a mail to one of them, requested later, has arrived."""

    def __init__(self) -> None:
        self.pool: list[Citizen] = []
        self.used = 0

    async def later_mail(self, world: World) -> None:
        per = world.settings.recovery_mails_per_hour
        if self.used == len(self.pool) * per:
            batch = [new_citizen() for _ in range(3)]
            await world.register(*batch)
            self.pool += batch
        c = self.pool[self.used // per]
        self.used += 1
        await world.recovery_mail(await world.request(c))


@pytest.fixture(scope="module")
def witnesses() -> Witnesses:
    return Witnesses()


def on(watcher: TopicWatcher, topic: str, rid: str) -> list[dict[str, Any]]:
    return watcher.matching(lambda t, _h, d: t == topic and d["data"].get("request_id") == rid)


async def assert_refused_quietly(
    world: World, decisions: TopicWatcher, rid: str, reason: str, account_of: Citizen | None = None
) -> dict[str, Any]:
    """Accepted for the portal, rejected in the audit, declined once on identity.declined."""
    outcome = await world.portal.wait_outcome(rid, "request")
    assert outcome == {"request_id": rid, "stage": "request", "status": "accepted", "reasons": []}
    audit = await world.audited(rid)
    assert audit["outcome"] == "rejected"
    assert reason in audit["reasons"]
    declined = await decisions.wait_records(lambda r: r.topic == IDENTITY_DECLINED and r.data["request_id"] == rid)
    assert len(declined) == 1
    data = declined[0].data
    assert data["client_ip"] and data["requested_at"]
    if account_of is not None:
        assert audit["account_id"] == data["account_id"] == declined[0].key
    else:
        assert "account_id" not in audit and data["account_id"] is None
        assert audit["subject_ref"] == data["subject_ref"] == declined[0].key
    assert on(decisions, IDENTITY_VERIFIED, rid) == []  # same transaction: it would be here already
    return audit


async def assert_no_mail(world: World, witnesses: Witnesses, to: str, already: int = 0) -> None:
    await witnesses.later_mail(world)
    assert len(world.mails_to(to)) == already


async def test_invalid_check_digit_is_id_invalid(world: World, decisions: TopicWatcher) -> None:
    good = random_cedula()
    bad = good[:-1] + str((int(good[-1]) + 1) % 10)
    rid = await world.portal.request_recovery(
        national_id=bad, email_address="x@example.org", answers={"birth_date": "2000-01-01"}
    )
    audit = await assert_refused_quietly(world, decisions, rid, "id_invalid")
    assert audit["subject_ref"] == keyed_hash(world.settings.pseudonym_key, bad)


async def test_unknown_account(world: World, decisions: TopicWatcher) -> None:
    cedula = random_cedula()
    rid = await world.portal.request_recovery(
        national_id=cedula[:9] + "-" + cedula[9],
        email_address="nobody@example.org",
        answers={"birth_date": "1990-07-15"},
    )
    audit = await assert_refused_quietly(world, decisions, rid, "account_unknown")
    assert audit["subject_ref"] == keyed_hash(world.settings.pseudonym_key, cedula)  # a keyed hash, not the ID


async def test_wrong_answer(world: World, decisions: TopicWatcher, witnesses: Witnesses) -> None:
    c = await world.citizen()
    rid = await world.request(c, answers={**c.answers, "mother_surname": "Otro"})
    await assert_refused_quietly(world, decisions, rid, "answers_wrong", account_of=c)
    await assert_no_mail(world, witnesses, c.email)


async def test_missing_answer_is_wrong(world: World, decisions: TopicWatcher, witnesses: Witnesses) -> None:
    c = await world.citizen()
    answers = dict(c.answers)
    answers.pop("birth_date")
    rid = await world.request(c, answers=answers)
    await assert_refused_quietly(world, decisions, rid, "answers_wrong", account_of=c)
    await assert_no_mail(world, witnesses, c.email)


async def test_email_mismatch_and_the_typed_address_gets_nothing(
    world: World, decisions: TopicWatcher, witnesses: Witnesses
) -> None:
    c = await world.citizen()
    typed = f"attacker.{uuid.uuid4().hex[:8]}@example.net"
    rid = await world.request(c, email_address=typed)
    await assert_refused_quietly(world, decisions, rid, "email_mismatch", account_of=c)
    await assert_no_mail(world, witnesses, c.email)
    assert world.mails_to(typed) == []


async def test_captcha_missing(world: World, decisions: TopicWatcher, witnesses: Witnesses) -> None:
    c = await world.citizen()
    rid = await world.request(c, captcha_passed=False)
    await assert_refused_quietly(world, decisions, rid, "captcha_missing", account_of=c)
    await assert_no_mail(world, witnesses, c.email)


async def test_employer_representative_must_match(world: World, decisions: TopicWatcher, witnesses: Witnesses) -> None:
    c = await world.citizen(profile="employer")
    rid = await world.request(c, representative_id=random_cedula())
    await assert_refused_quietly(world, decisions, rid, "representative_mismatch", account_of=c)
    await assert_no_mail(world, witnesses, c.email)


async def test_locked_block(world: World, decisions: TopicWatcher, witnesses: Witnesses) -> None:
    c = await world.citizen()
    ip = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.1")) + secrets.randbelow(2**17 - 2)))
    for _ in range(world.settings.lockout_max_failures):
        rid = await world.request(c, answers={**c.answers, "birth_date": "1900-01-01"}, client_ip=ip)
        await assert_refused_quietly(world, decisions, rid, "answers_wrong", account_of=c)
    rid = await world.request(c, client_ip=ip)
    audit = await assert_refused_quietly(world, decisions, rid, "locked", account_of=c)
    assert audit["reasons"] == ["locked"]
    await assert_no_mail(world, witnesses, c.email, already=1)  # the one lock notice
    assert "recuperar?" not in body_text(world.mails_to(c.email)[0])


async def test_mailbox_flood_limit_is_rate_limited(world: World, decisions: TopicWatcher, witnesses: Witnesses) -> None:
    c = await world.citizen()
    limit = world.settings.recovery_mails_per_hour
    for _ in range(limit):
        rid = await world.request(c)
        await world.recovery_mail(rid)
        assert len(on(decisions, IDENTITY_VERIFIED, rid)) == 1 and on(decisions, IDENTITY_DECLINED, rid) == []
    extra = await world.request(c)
    await assert_refused_quietly(world, decisions, extra, "rate_limited", account_of=c)
    await assert_no_mail(world, witnesses, c.email, already=limit)


async def test_client_ip_rate_limit(world: World, decisions: TopicWatcher, witnesses: Witnesses) -> None:
    ip = str(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.1")) + secrets.randbelow(2**17 - 2)))
    limit = world.settings.ip_max_requests
    for n in range(limit):
        # The address and its IPv4-mapped IPv6 spelling are one address.
        rid = await world.portal.request_recovery(
            national_id=random_cedula(),
            email_address="x@example.org",
            answers={},
            client_ip=[ip, f"::ffff:{ip}"][n % 2],
        )
        await world.audited(rid)
    c = await world.citizen()
    rid = await world.request(c, client_ip=ip)  # even correct data is refused from that address
    await assert_refused_quietly(world, decisions, rid, "rate_limited", account_of=c)
    await assert_no_mail(world, witnesses, c.email)


async def test_client_ip_rate_limit_counts_an_ipv6_64_as_one_address(world: World, decisions: TopicWatcher) -> None:
    prefix = f"2001:db8:{secrets.randbelow(65536):x}:{secrets.randbelow(65536):x}::"
    for n in range(world.settings.ip_max_requests):
        rid = await world.portal.request_recovery(
            national_id=random_cedula(), email_address="x@example.org", answers={}, client_ip=f"{prefix}{n + 1:x}"
        )
        await world.audited(rid)
    c = await world.citizen()
    rid = await world.request(c, client_ip=f"{prefix}beef:1")  # another host of the same /64
    await assert_refused_quietly(world, decisions, rid, "rate_limited", account_of=c)
    neighbour = ipaddress.IPv6Address(int(ipaddress.IPv6Address(prefix + "1")) + 2**64)
    rid = await world.request(c, client_ip=str(neighbour))  # the next /64 is not limited
    assert (await world.audited(rid))["outcome"] == "success"
    await world.recovery_mail(rid)


async def test_same_request_id_twice_has_one_effect(world: World, decisions: TopicWatcher) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    await world.recovery_mail(rid)
    await world.request(c, request_id=rid)
    dup = await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("request_id") == rid and "duplicate_request" in d["data"].get("reasons", [])
    )
    assert dup
    # A later request's decision has been published: the duplicate's would be there by now.
    later = await world.request(c, captcha_passed=False)
    await assert_refused_quietly(world, decisions, later, "captcha_missing", account_of=c)
    assert on(decisions, IDENTITY_DECLINED, rid) == [] and len(on(decisions, IDENTITY_VERIFIED, rid)) == 1
    await world.recovery_mail(rid)  # still exactly one e-mail for it
