"""The tokens store's revocations against a real store (secantusd-py), through the handlers:
issuing revokes the account's earlier real tokens (live or reserved) and never a decoy, so a
decoy's answers do not depend on later requests; a contact change revokes everything."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.tokens.domain import State
from services.tokens.handlers import TokenHandlers
from services.tokens.settings import TokensSettings
from services.tokens.store import TOKENS, TokenStore
from shared.consumer import HandlerContext
from shared.envelope import new_event
from shared.metrics import ServiceMetrics
from shared.schemas import ContactChange, ContactChanged, IdentityDeclined, IdentityVerified, Recipient
from shared.topics import EventType

RECIPIENT = Recipient(email="maria.perez@example.org", name="María Pérez", locale="es")


@pytest.fixture
async def tokens(store_uri: str, db_name: str) -> AsyncIterator[tuple[TokenStore, TokenHandlers]]:
    store = TokenStore(store_uri, db_name)
    await store.ensure_indexes()
    yield store, TokenHandlers(store, TokensSettings(portal_input="any"), ServiceMetrics("tokens"))
    await store.client.drop_database(db_name)
    await store.close()


def context(store: TokenStore, topic: str, event_type: str, data: Any) -> HandlerContext:
    event = new_event(type=event_type, source="/tests", data=data.model_dump(mode="json"), correlationid="c")
    return HandlerContext("tokens", f"tokens:{topic}", topic, event, store)


async def verified(h: TokenHandlers, store: TokenStore, rid: str, account: str) -> dict[str, Any]:
    """Issue through the handler; the `token_issued` audit record's details."""
    evt = IdentityVerified(request_id=rid, account_id=account, recipient=RECIPIENT)
    ctx = context(store, "identity.verified", EventType.IDENTITY_VERIFIED, evt)
    await h.identity_verified(ctx, evt)
    (audit,) = [o.event.data for o in ctx.outgoing if o.topic == "audit.events"]
    return dict(audit["details"])


async def declined(h: TokenHandlers, store: TokenStore, rid: str, account: str | None, ref: str) -> None:
    evt = IdentityDeclined(request_id=rid, account_id=account, subject_ref=ref)
    await h.identity_declined(context(store, "identity.declined", EventType.IDENTITY_DECLINED, evt), evt)


async def states(store: TokenStore) -> dict[str, str]:
    return {d["request_id"]: d["state"] async for d in store.db[TOKENS].find({}, {"request_id": 1, "state": 1})}


async def test_issuing_revokes_the_earlier_real_tokens_and_no_decoy(tokens: tuple[TokenStore, TokenHandlers]) -> None:
    store, h = tokens
    await verified(h, store, "real-live", "acc-1")
    await verified(h, store, "real-reserved", "acc-1")  # revokes real-live
    reserved = await store.by_request("real-reserved")
    assert reserved is not None
    until = datetime.now(UTC) + timedelta(seconds=60)
    await store.commit(
        consumer=None, event_id=None, writes=[store.reserve(reserved.token_id, "code", until)], outgoing=[]
    )
    await declined(h, store, "decoy-1", "acc-1", "ref-1")
    await declined(h, store, "decoy-other", "acc-2", "ref-2")
    # A document from before `decoy` was written on every token is a real one.
    legacy = await store.by_request("real-live")
    assert legacy is not None
    await store.db[TOKENS].update_one(
        {"_id": legacy.token_id}, {"$set": {"state": State.LIVE}, "$unset": {"decoy": ""}}
    )

    details = await verified(h, store, "real-new", "acc-1")

    assert details["revoked_earlier"] == 2  # the legacy live one and the reserved one, no decoy
    assert await states(store) == {
        "real-live": State.REVOKED,
        "real-reserved": State.REVOKED,
        "decoy-1": State.LIVE,  # answers codes as if nothing had happened
        "decoy-other": State.LIVE,
        "real-new": State.LIVE,
    }
    revoked = await store.by_request("real-reserved")
    assert revoked is not None
    assert "reserved_until" not in (await store.db[TOKENS].find_one({"_id": revoked.token_id}) or {})


async def test_a_contact_change_revokes_every_token_of_the_account_decoys_included(
    tokens: tuple[TokenStore, TokenHandlers],
) -> None:
    store, h = tokens
    await verified(h, store, "real", "acc-1")
    await declined(h, store, "decoy", "acc-1", "ref-1")
    await declined(h, store, "decoy-other", "acc-2", "ref-2")
    evt = ContactChanged(
        account_id="acc-1",
        change_id="chg-1",
        old_recipients=[RECIPIENT],
        changes=[ContactChange(field="email", masked="m***@example.org")],
    )
    await h.contact_changed(context(store, "identity.contact_changed", EventType.IDENTITY_CONTACT_CHANGED, evt), evt)
    assert await states(store) == {"real": State.REVOKED, "decoy": State.REVOKED, "decoy-other": State.LIVE}
