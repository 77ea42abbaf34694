"""Reset-stage reasons reach the portal on recovery.outcomes; the token saga keeps single use."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from tests.e2e.conftest import World, fetch, metric_value, metrics_url
from tools.mail import extract_code
from tools.testdata import new_key

pytestmark = pytest.mark.e2e


async def test_unknown_token_is_invalid(world: World) -> None:
    rid = f"req-{secrets.token_hex(8)}"
    await world.portal.submit_reset(rid, new_key(), token=secrets.token_urlsafe(32))
    outcome = await world.portal.wait_outcome(rid, "reset")
    assert outcome["status"] == "rejected" and outcome["reasons"] == ["token_invalid"]


async def test_token_is_single_use(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
    await world.portal.submit_reset(rid, new_key(), token=token)
    second = await world.portal.wait_outcome(rid, "reset", count=2)
    assert second["status"] == "rejected" and second["reasons"] == ["token_used"]


async def test_policy_rejection_lists_every_reason_and_releases_the_token(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, "a b!", token=token)
    first = await world.portal.wait_outcome(rid, "reset")
    assert first["status"] == "rejected"
    assert set(first["reasons"]) == {
        "password_too_short",
        "password_not_alphanumeric",
        "password_needs_letter_and_digit",
    }
    await world.portal.submit_reset(rid, "x" * 16 + "1", token=token)
    second = await world.portal.wait_outcome(rid, "reset", count=2)
    assert second["reasons"] == ["password_too_long"]
    # Released each time: the same link still works with an acceptable key.
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset", count=3))["status"] == "completed"


async def test_seed_policy_refuses_a_blocklisted_key(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, "password1", token=token)  # letters and digits, yet the first key tried
    assert (await world.portal.wait_outcome(rid, "reset"))["reasons"] == ["password_blocklisted"]
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset", count=2))["status"] == "completed"


async def test_reusing_a_recent_key_is_refused(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, c.password, token=token)  # the current (imported) key
    outcome = await world.portal.wait_outcome(rid, "reset")
    assert outcome["reasons"] == ["password_reused"]
    first_new = new_key()
    await world.portal.submit_reset(rid, first_new, token=token)
    assert (await world.portal.wait_outcome(rid, "reset", count=2))["status"] == "completed"
    # Next recovery: the key just set is now in the history too.
    rid2 = await world.request(c)
    _, token2 = await world.recovery_mail(rid2)
    await world.portal.submit_reset(rid2, first_new, token=token2)
    assert (await world.portal.wait_outcome(rid2, "reset"))["reasons"] == ["password_reused"]


async def test_wrong_codes_then_attempts_exceeded(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    mail, token = await world.recovery_mail(rid)
    code = extract_code(mail)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    limit = world.settings.code_max_attempts
    for n in range(1, limit + 1):
        await world.portal.submit_reset(rid, new_key(), code=wrong)
        outcome = await world.portal.wait_outcome(rid, "reset", count=n)
        expected = "code_attempts_exceeded" if n == limit else "token_invalid"
        assert outcome["reasons"] == [expected], n
    # Dead now, even with the right code, and the link dies with it.
    await world.portal.submit_reset(rid, new_key(), code=code)
    assert (await world.portal.wait_outcome(rid, "reset", count=limit + 1))["reasons"] == ["code_attempts_exceeded"]
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset", count=limit + 2))["reasons"] == ["token_invalid"]


async def test_expired_link_and_code(world: World) -> None:
    _, text = fetch(metrics_url(world.settings, "tokens"))
    link_ttl = metric_value(text, "clave_tokens_ttl_seconds", kind="link")
    code_ttl = metric_value(text, "clave_tokens_ttl_seconds", kind="code")
    if max(link_ttl, code_ttl) > 60:
        pytest.skip(
            f"the running stack has long token lifetimes ({link_ttl:.0f}s/{code_ttl:.0f}s); "
            "`make test` starts it with short ones"
        )
    c = await world.citizen()
    rid = await world.request(c)
    mail, token = await world.recovery_mail(rid)
    code = extract_code(mail)
    issued = await world.audited(rid, "token_issued")
    assert issued
    await asyncio.sleep(max(link_ttl, code_ttl) + 1)  # the rule under test is about elapsed time
    await world.portal.submit_reset(rid, new_key(), code=code)
    assert (await world.portal.wait_outcome(rid, "reset"))["reasons"] == ["token_expired"]
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset", count=2))["reasons"] == ["token_expired"]
