"""Revocation kills reserved tokens too.

A token is `reserved` while its key change is at the password service. A new request (or an
e-mail change) revokes it all the same: a later `password.rejected` answers the portal
`token_invalid` and never releases it, and the reservation timeout never revives it. A key
change already made stands (it was authorised when the token was reserved): the token is
spent and the audit says it was revoked meanwhile.

To hold tokens in `reserved`, the password service is stopped for a moment, and the tokens
service runs with a short reservation timeout; both are put back afterwards."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import AsyncIterator

import pytest

from clave.testdata import new_citizen, new_key
from tests.e2e.conftest import World, fetch_ok, metrics_url

pytestmark = pytest.mark.e2e

STACK = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "local", "stack.sh")
SHORT_TIMEOUT_S = 8


def stack(command: str, service: str, **env: str) -> None:
    subprocess.run(  # noqa: S603 - our own script
        ["bash", STACK, command, service], env={**os.environ, **env}, check=True, capture_output=True, timeout=180
    )


@pytest.fixture
async def password_held(world: World) -> AsyncIterator[None]:
    """Tokens with a short reservation timeout, the password service stopped; restored after."""
    await asyncio.to_thread(stack, "restart-service", "tokens", RESERVATION_TIMEOUT_S=str(SHORT_TIMEOUT_S))
    try:
        await asyncio.to_thread(stack, "stop-service", "password")
        yield
    finally:
        await asyncio.to_thread(stack, "start-service", "password")
        await asyncio.to_thread(stack, "restart-service", "tokens")
        for service in ("tokens", "password"):
            assert fetch_ok(metrics_url(world.settings, service, "/readyz")), service


async def test_revocation_kills_reserved_tokens_and_a_key_change_made_stands(
    world: World, request: pytest.FixtureRequest
) -> None:
    changed, refused, timed, control = (new_citizen() for _ in range(4))
    await world.register(changed, refused, timed, control)
    first: dict[str, tuple[str, str]] = {}
    for name, c in (("changed", changed), ("refused", refused), ("timed", timed), ("control", control)):
        rid = await world.request(c)
        first[name] = (rid, (await world.recovery_mail(rid))[1])

    request.getfixturevalue("password_held")
    # Reserve all four (their key changes wait at the stopped password service). "refused"
    # sends a key the policy refuses; the others acceptable ones.
    keys = {"changed": new_key(), "refused": "password1", "timed": new_key(), "control": new_key()}
    for name in ("timed", "changed", "refused", "control"):  # "timed" first: its deadline passes first
        rid, token = first[name]
        await world.portal.submit_reset(rid, keys[name], token=token)
        await world.audited(rid, "token_reserved")
    # Revoke three of them by a new request, while reserved ("control" is left reserved).
    second = {
        name: await world.request(c) for name, c in (("changed", changed), ("refused", refused), ("timed", timed))
    }
    for name, rid in second.items():
        issued = await world.audited(rid, "token_issued")
        assert issued["details"]["revoked_earlier"] == 1, name
    # The timeout releases the reservation nobody revoked: the sweep has run past every deadline.
    await world.audited(first["control"][0], "reservation_expired", timeout=60)
    expired = world.audit_log.matching(
        lambda _t, _h, d: (
            d["data"].get("action") == "reservation_expired"
            and d["data"].get("request_id") in {first[n][0] for n in second}
        )
    )
    assert expired == [], "a revoked reservation was released by the timeout"
    # Revoked stays revoked: the old link is invalid, not live again.
    rid, token = first["timed"]
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset"))["reasons"] == ["token_invalid"]

    await asyncio.to_thread(stack, "start-service", "password")
    # The key change made with a token revoked meanwhile stands; the portal hears completed.
    rid, token = first["changed"]
    assert (await world.portal.wait_outcome(rid, "reset", timeout=90))["status"] == "completed"
    spent = await world.audited(rid, "token_spent")
    assert spent["reasons"] == ["revoked_while_reserved"]
    # A refused key on a revoked token: token_invalid, and the link is not released.
    rid, token = first["refused"]
    refused_outcome = await world.portal.wait_outcome(rid, "reset", timeout=90)
    assert refused_outcome["reasons"] == ["token_invalid"]
    kept = await world.audited(rid, "token_release_refused")
    assert kept["reasons"] == ["password_blocklisted", "revoked_while_reserved"]
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset", count=2))["reasons"] == ["token_invalid"]
    # The newer links work.
    for name in ("refused", "timed"):
        rid = second[name]
        _, token = await world.recovery_mail(rid)
        await world.portal.submit_reset(rid, new_key(), token=token)
        assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed", name
