"""Lockout per account and address block, slowed mode, unlock (by operator and by a key
change), lock notices and every operator command."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from tests.e2e.conftest import World, clave_cli
from tools.mail import body_text
from tools.testdata import Citizen, new_key

pytestmark = pytest.mark.e2e


def ipv4() -> str:
    """A fresh documentation-range address: its own block."""
    return f"198.{18 + secrets.randbelow(2)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


def ipv6_block() -> str:
    """A fresh /64, as a prefix to which an interface id is appended ("...::1")."""
    return f"2001:db8:{secrets.randbelow(65536):x}:{secrets.randbelow(65536):x}::"


def is_notice(m: object) -> bool:
    return "recuperar?" not in body_text(m)  # type: ignore[arg-type]


async def wrong(world: World, c: Citizen, ip: str) -> dict:
    rid = await world.request(c, answers={**c.answers, "birth_date": "1900-01-01"}, client_ip=ip)
    return await world.audited(rid)


async def lock(world: World, c: Citizen, ip: str) -> str:
    """Fail the answers from one address until its block is locked out of the account;
    the owner gets one lock notice. Returns the request that locked it."""
    for _ in range(world.settings.lockout_max_failures):
        audit = await wrong(world, c, ip)
        assert audit["reasons"] == ["answers_wrong"]
    rid = audit["request_id"]
    locked = await world.audited(rid, action="account_locked")
    assert locked["details"]["scope"] == "address_block"
    await world.mailbox.wait_for(lambda m: c.email in str(m["To"]) and is_notice(m))
    return rid


async def test_a_stranger_locks_only_their_own_block_and_the_owner_still_gets_the_mail(world: World) -> None:
    c = await world.citizen()
    stranger = ipv4()
    await lock(world, c, stranger)
    # The stranger keeps trying, right answers included: their block stays locked out.
    for answers in ({**c.answers, "birth_date": "1900-01-01"}, dict(c.answers)):
        rid = await world.request(c, answers=answers, client_ip=stranger)
        assert (await world.audited(rid))["reasons"] == ["locked"]
        assert (await world.portal.wait_outcome(rid, "request"))["status"] == "accepted"
    # The same address spelled as IPv4-mapped IPv6 is the same block.
    rid = await world.request(c, client_ip=f"::ffff:{stranger}")
    assert (await world.audited(rid))["reasons"] == ["locked"]
    # The owner, from home, gets every recovery mail of the hour's quota: the lock notice
    # used none of it.
    home = ipv4()
    for _ in range(world.settings.recovery_mails_per_hour):
        rid = await world.request(c, client_ip=home)
        assert (await world.audited(rid))["outcome"] == "success"
        await world.recovery_mail(rid)
    # Once a later mail to someone else has arrived too: one lock notice, however often the
    # stranger tried (the notices and the recovery mails come through different topics).
    await world.mail_barrier()
    mails = world.mails_to(c.email)
    assert len([m for m in mails if is_notice(m)]) == 1
    assert len(mails) == 1 + world.settings.recovery_mails_per_hour


async def test_brute_force_from_many_blocks_slows_the_account_to_one_guess_per_block_an_hour(world: World) -> None:
    s = world.settings
    c = await world.citizen()
    blocks = -(-s.account_max_failures // (s.lockout_max_failures - 1))
    # Each block fails one short of its own lock (each time from another host of its /64):
    # only the per-account cap can stop them.
    attempts = [ipv6_block() for _ in range(blocks)]
    counted = 0
    for prefix in attempts:
        for host in range(1, s.lockout_max_failures):
            if counted == s.account_max_failures:
                break
            audit = await wrong(world, c, prefix + f"{host:x}")
            assert audit["reasons"] == ["answers_wrong"]
            counted += 1
    slowed = await world.audited(audit["request_id"], action="account_slowed")
    assert slowed["details"]["failures"] == s.account_max_failures
    # A new block: one evaluated guess; its second attempt within the hour (another host of
    # the same /64, right answers even) is refused without evaluation.
    fresh = ipv6_block()
    assert (await wrong(world, c, fresh + "1"))["reasons"] == ["answers_wrong"]
    rid = await world.request(c, client_ip=fresh + "beef")
    assert (await world.audited(rid))["reasons"] == ["rate_limited"]
    # A block that already had its guess this hour is refused too.
    rid = await world.request(c, client_ip=attempts[0] + "ffff")
    assert (await world.audited(rid))["reasons"] == ["rate_limited"]
    # The owner, from an address that has not tried this hour, gets the mail.
    rid = await world.request(c, client_ip=ipv4())
    assert (await world.audited(rid))["outcome"] == "success"
    await world.recovery_mail(rid)


async def test_lockout_then_operator_unlock(world: World) -> None:
    c = await world.citizen()
    ip = ipv4()
    await lock(world, c, ip)
    rid = await world.request(c, client_ip=ip)  # correct data, but from the locked block
    assert (await world.audited(rid))["reasons"] == ["locked"]
    assert (await world.portal.wait_outcome(rid, "request"))["status"] == "accepted"

    result = await asyncio.to_thread(
        clave_cli, "accounts", "unlock", c.national_id, "--operator", "op-1", "--reason", "ID checked at office"
    )
    assert "succeeded" in result.stdout
    audit = await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "operator_unlock"
            and d["data"].get("actor") == "op-1"
            and d["data"].get("outcome") == "success"
        )
    )
    assert audit[-1]["data"]["details"]["reason"] == "ID checked at office"
    rid = await world.request(c, client_ip=ip)
    await world.recovery_mail(rid)
    await world.mail_barrier()  # a later mail to someone else has arrived: a second notice would have
    # Only one lock notice was sent, the second `locked` request included (its own quota).
    assert len([m for m in world.mails_to(c.email) if is_notice(m)]) == 1


async def test_locked_account_unlocked_by_a_key_change(world: World) -> None:
    c = await world.citizen()
    ip = ipv4()
    await lock(world, c, ip)
    # The office sends a recovery e-mail on the citizen's behalf; the key change unlocks.
    await asyncio.to_thread(
        clave_cli, "accounts", "send-recovery", c.national_id, "--operator", "op-2", "--reason", "case 4411"
    )
    sent = await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "operator_send_recovery"
            and d["data"].get("actor") == "op-2"
            and d["data"].get("outcome") == "success"
        )
    )
    rid = sent[-1]["data"]["request_id"]
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
    await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("action") == "account_unlocked" and d["data"].get("request_id") == rid
    )
    rid2 = await world.request(c, client_ip=ip)
    await world.recovery_mail(rid2)


async def test_operator_command_for_unknown_citizen_is_refused_and_audited(world: World) -> None:
    from tools.testdata import random_cedula

    result = await asyncio.to_thread(
        clave_cli, "accounts", "unlock", random_cedula(), "--operator", "op-1", "--reason", "typo test", check=False
    )
    assert result.returncode == 1
    assert "account_unknown" in result.stdout


async def test_import_reports_bad_lines_and_is_idempotent(world: World, tmp_path) -> None:
    from tools.testdata import new_citizen, write_jsonl

    good = new_citizen()
    path = write_jsonl([good], tmp_path / "a.jsonl")
    with path.open("a", encoding="utf-8") as fh:
        fh.write('{"national_id": "1234567890", "profile": "affiliate"}\n')
        fh.write("not json\n")
    first = await asyncio.to_thread(clave_cli, "accounts", "import", str(path), check=False)
    assert first.returncode == 1
    assert "created 1" in first.stdout and "line 2" in first.stderr and "line 3" in first.stderr
    second = await asyncio.to_thread(clave_cli, "accounts", "import", str(path), check=False)
    # Signed commands again: the unchanged record is a no-op (tests/e2e/test_operator_commands.py).
    assert "created 0" in second.stdout and "unchanged 1" in second.stdout
