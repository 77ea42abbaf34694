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
import contextlib
import os
import subprocess
from collections.abc import AsyncIterator

import pytest

from tests.e2e.conftest import World, fetch_ok, metrics_url
from tools.testdata import Citizen, new_citizen, new_key

pytestmark = pytest.mark.e2e

STACK = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "local", "stack.sh")
# Short enough to wait for, long enough that the revocations land before any deadline even
# while the restarted tokens service's consumer group is still rebalancing (seconds each).
SHORT_TIMEOUT_S = 30
Links = dict[str, tuple[str, str]]  # name -> (request_id, link token)


def stack(command: str, service: str, **env: str) -> None:
    subprocess.run(  # noqa: S603 - our own script
        ["bash", STACK, command, service], env={**os.environ, **env}, check=True, capture_output=True, timeout=180
    )


@contextlib.asynccontextmanager
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


def trail(world: World, rid: str) -> list[tuple[str, str, list[str]]]:
    """What the services audited for a request (for a failure message)."""
    docs = world.audit_log.matching(lambda _t, _h, d: d["data"].get("request_id") == rid)
    return [(d["data"]["service"], d["data"]["action"], d["data"].get("reasons", [])) for d in docs]


async def hold_reservations_and_revoke(world: World, citizens: dict[str, Citizen], first: Links) -> None:
    """With the password service stopped: reserve all four (their key changes wait), revoke
    three of them by a new request while reserved, and let the timeout release the fourth."""
    keys = {"changed": new_key(), "refused": "password1", "timed": new_key(), "control": new_key()}
    for name in ("timed", "changed", "refused", "control"):  # "timed" first: its deadline passes first
        rid, token = first[name]
        await world.portal.submit_reset(rid, keys[name], token=token)
        await world.audited(rid, "token_reserved")
    second = {name: await world.request(citizens[name]) for name in ("changed", "refused", "timed")}
    for name, rid in second.items():
        issued = await world.audited(rid, "token_issued")
        assert issued["details"]["revoked_earlier"] == 1, name
    # The timeout releases the reservation nobody revoked: the sweep has run past every deadline.
    await world.audited(first["control"][0], "reservation_expired", timeout=SHORT_TIMEOUT_S + 60)
    revoked_rids = {first[name][0] for name in second}
    expired = world.audit_log.matching(
        lambda _t, _h, d: (
            d["data"].get("action") == "reservation_expired" and d["data"].get("request_id") in revoked_rids
        )
    )
    revoked_at = {
        name: (
            await world.audit_log.wait(
                lambda _t, _h, d, rid=rid: (
                    d["data"].get("request_id") == rid and d["data"].get("action") == "token_issued"
                )
            )
        )[0]["time"]
        for name, rid in second.items()
    }
    assert expired == [], f"a revoked reservation was released by the timeout: {expired} (revoked at {revoked_at})"
    # Revoked stays revoked: the old link is invalid, not live again.
    rid, token = first["timed"]
    await world.portal.submit_reset(rid, new_key(), token=token)
    assert (await world.portal.wait_outcome(rid, "reset"))["reasons"] == ["token_invalid"], trail(world, rid)


async def test_revocation_kills_reserved_tokens_and_a_key_change_made_stands(world: World) -> None:
    citizens = {name: new_citizen() for name in ("changed", "refused", "timed", "control")}
    await world.register(*citizens.values())  # needs the password service (initial keys)

    async with password_held(world):
        # Links asked for now, so they live through the whole hold (`make test` gives them 30 s).
        first: Links = {}
        for name, c in citizens.items():
            rid = await world.request(c)
            first[name] = (rid, (await world.recovery_mail(rid))[1])
        await hold_reservations_and_revoke(world, citizens, first)

    # The key change made with a token revoked meanwhile stands; the portal hears completed.
    rid, _ = first["changed"]
    assert (await world.portal.wait_outcome(rid, "reset", timeout=90))["status"] == "completed"
    spent = await world.audited(rid, "token_spent")
    assert spent["reasons"] == ["revoked_while_reserved"]
    # A refused key on a revoked token: token_invalid, and the link is not released.
    rid, token = first["refused"]
    refused_outcome = await world.portal.wait_outcome(rid, "reset", timeout=90)
    assert refused_outcome["reasons"] == ["token_invalid"], trail(world, rid)
    kept = await world.audited(rid, "token_release_refused")
    assert kept["reasons"] == ["password_blocklisted", "revoked_while_reserved"]
    await world.portal.submit_reset(rid, new_key(), token=token)
    again = await world.portal.wait_outcome(rid, "reset", count=2)
    # token_invalid, not token_expired: a revoked token says so even after its lifetime.
    assert again["reasons"] == ["token_invalid"], trail(world, rid)
    # The reservation the timeout released: its key change, made late, stands too.
    rid, _ = first["control"]
    assert (await world.portal.wait_outcome(rid, "reset", timeout=90))["status"] == "completed"
    spent = await world.audited(rid, "token_spent")
    assert spent["reasons"] == ["live_while_reserved"]
