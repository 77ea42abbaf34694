"""Lockout, unlock (by operator and by a key change) and every operator command."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from clave.portal import body_text
from clave.testdata import Citizen, new_key
from tests.e2e.conftest import World, clave_cli

pytestmark = pytest.mark.e2e


async def lock(world: World, c: Citizen) -> None:
    """Fail the answers until the account locks; the owner gets a 'locked' e-mail."""
    for _ in range(world.settings.lockout_max_failures):
        rid = await world.request(c, answers={**c.answers, "birth_date": "1900-01-01"})
        assert "answers_wrong" in (await world.audited(rid))["reasons"]
    await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("action") == "account_locked" and d["data"].get("request_id") == rid
    )
    await world.mailbox.wait_for(lambda m: c.email in str(m["To"]) and "recuperar?" not in body_text(m))


async def test_lockout_then_operator_unlock(world: World) -> None:
    c = await world.citizen()
    await lock(world, c)
    locked_notices = len(world.mails_to(c.email))
    rid = await world.request(c)  # correct data, but locked
    assert (await world.audited(rid))["reasons"] == ["locked"]
    assert (await world.portal.wait_outcome(rid, "request"))["status"] == "accepted"
    # The real owner is told why nothing came (within the mailbox limit).
    await world.mailbox.wait_for(lambda m: c.email in str(m["To"]), count=locked_notices + 1)

    result = await asyncio.to_thread(
        clave_cli, "accounts", "unlock", c.national_id, "--operator", "op-17", "--reason", "ID checked at office"
    )
    assert "success" in result.stdout
    audit = await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "operator_unlock"
            and d["data"].get("actor") == "op-17"
            and d["data"].get("outcome") == "success"
        )
    )
    assert audit[-1]["data"]["details"]["reason"] == "ID checked at office"
    rid = await world.request(c)
    await world.recovery_mail(rid)


async def test_locked_account_unlocked_by_a_key_change(world: World) -> None:
    c = await world.citizen()
    await lock(world, c)
    # The office sends a recovery e-mail on the citizen's behalf; the key change unlocks.
    await asyncio.to_thread(
        clave_cli, "accounts", "send-recovery", c.national_id, "--operator", "op-9", "--reason", "case 4411"
    )
    sent = await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "operator_send_recovery"
            and d["data"].get("actor") == "op-9"
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
    rid2 = await world.request(c)
    await world.recovery_mail(rid2)


async def test_operator_updates_email_revokes_links_and_notifies_both(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, old_token = await world.recovery_mail(rid)
    new_email = f"nuevo.{uuid.uuid4().hex[:8]}@example.org"
    await asyncio.to_thread(
        clave_cli,
        "accounts",
        "update-email",
        c.national_id,
        new_email,
        "--operator",
        "op-3",
        "--reason",
        "in person, cédula checked",
    )
    await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "tokens_revoked" and d["data"].get("details", {}).get("cause") == "email_changed"
        )
    )
    old_mail = await world.mailbox.wait_for(lambda m: c.email in str(m["To"]) and "***" in body_text(m))
    assert new_email not in body_text(old_mail[0])  # only a masked form goes to the old address
    await world.mailbox.wait_for(lambda m: new_email in str(m["To"]))
    # The link sent to the old address is dead.
    await world.portal.submit_reset(rid, new_key(), token=old_token)
    assert (await world.portal.wait_outcome(rid, "reset"))["reasons"] == ["token_invalid"]
    # Recovery now needs, and mails to, the new address.
    refused = await world.request(c)
    assert "email_mismatch" in (await world.audited(refused))["reasons"]
    c.email = new_email
    rid2 = await world.request(c)
    mail, _ = await world.recovery_mail(rid2)
    assert mail["To"] == new_email


async def test_operator_command_for_unknown_citizen_is_refused_and_audited(world: World) -> None:
    from clave.testdata import random_cedula

    result = await asyncio.to_thread(
        clave_cli, "accounts", "unlock", random_cedula(), "--operator", "op-1", "--reason", "typo test", check=False
    )
    assert result.returncode == 1
    assert "account_unknown" in result.stdout


async def test_import_reports_bad_lines_and_is_idempotent(world: World, tmp_path) -> None:
    from clave.testdata import new_citizen, write_jsonl

    good = new_citizen()
    path = write_jsonl([good], tmp_path / "a.jsonl")
    with path.open("a", encoding="utf-8") as fh:
        fh.write('{"national_id": "1234567890", "profile": "affiliate"}\n')
        fh.write("not json\n")
    first = await asyncio.to_thread(clave_cli, "accounts", "import", str(path), check=False)
    assert first.returncode == 1
    assert "created 1" in first.stdout and "line 2" in first.stderr and "line 3" in first.stderr
    second = await asyncio.to_thread(clave_cli, "accounts", "import", str(path), check=False)
    assert "created 0, updated 1" in second.stdout
