"""Tokens' handlers over an in-memory store (a middle-layer test; the real store, broker and
services are driven in tests/e2e): what each path stages, decoys taking the real path, and the
re-decision when a concurrent reset, revocation or timeout moved the token first."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.tokens import domain
from services.tokens.domain import By, NewToken, State, TokenView
from services.tokens.handlers import TokenHandlers
from services.tokens.settings import TokensSettings
from services.tokens.store import StaleToken, to_view
from shared.consumer import HandlerContext
from shared.crypto import Purpose, SealMismatch, new_key_context, recovery_secrets_context
from shared.envelope import new_event
from shared.metrics import ServiceMetrics
from shared.schemas import (
    EmailChanged,
    IdentityDeclined,
    IdentityVerified,
    PasswordRejected,
    PasswordUpdated,
    Recipient,
    ResetSubmitted,
)
from shared.store import Outgoing
from shared.topics import RECOVERY_OUTCOMES, TOKENS_CODE_REJECTED, TOKENS_ISSUED, TOKENS_REDEEMED, EventType
from tests.memory import apply_all, staged

SETTINGS = TokensSettings(portal_input="any")
RECIPIENT = Recipient(email="maria.perez@example.org", name="María Pérez", locale="es")
Hook = Callable[["MemoryStore"], None]


class MemoryStore:
    """The TokenStore operations the handlers use, in memory, with the same conditional moves."""

    def __init__(self) -> None:
        self.tokens: dict[str, dict[str, Any]] = {}
        # (subject, the keys it counts under, when): as the store's code_failures documents.
        self.failures: list[tuple[str, tuple[str, ...], datetime]] = []
        self.commits: list[list[Outgoing]] = []
        # Someone else's write, committed between our read and our commit (the next commit's).
        self.race: Hook | None = None
        self.reads = 0  # the sweeper's reads
        self.park_fails: Exception | None = None  # parking a reservation raises this

    def _find(self, **match: Any) -> dict[str, Any] | None:
        return next((t for t in self.tokens.values() if all(t.get(k) == v for k, v in match.items())), None)

    async def by_hash(self, token_hash: str) -> TokenView | None:
        return self._view(self._find(token_hash=token_hash))

    async def by_request(self, request_id: str) -> TokenView | None:
        return self._view(self._find(request_id=request_id))

    async def by_id(self, token_id: str) -> TokenView | None:
        return self._view(self.tokens.get(token_id))

    @staticmethod
    def _view(doc: dict[str, Any] | None) -> TokenView | None:
        return to_view(copy.deepcopy(doc)) if doc else None

    async def revocable_count(self, account_id: str) -> int:
        return sum(t["account_id"] == account_id and domain.REVOKE.allows(t["state"]) for t in self.tokens.values())

    async def issue_facts(self, request_id: str, account_id: str) -> tuple[bool, int]:
        return self._find(request_id=request_id) is not None, len(self._earlier_real(account_id))

    def _earlier_real(self, account_id: str) -> list[dict[str, Any]]:
        return [
            t
            for t in self.tokens.values()
            if t["account_id"] == account_id and domain.REVOKE.allows(t["state"]) and not t["decoy"]
        ]

    async def code_failures(self, keys: tuple[str, ...], since: datetime) -> dict[str, int]:
        return {key: sum(key in ks and at >= since for _, ks, at in self.failures) for key in keys}

    @staged
    async def insert_token(self, token: NewToken) -> None:
        self.tokens[token.token_id] = {
            "_id": token.token_id,
            "account_id": token.account_id,
            "subject_ref": token.subject_ref,
            "request_id": token.request_id,
            "token_hash": token.token_hash,
            "code_hash": token.code_hash,
            "code_attempts": 0,
            "state": State.LIVE,
            "decoy": token.decoy,
            "link_expires_at": token.link_expires_at,
            "code_expires_at": token.code_expires_at,
            "recipient": token.recipient,
        }

    @staged
    async def revoke_earlier_tokens(self, account_id: str) -> int:
        hit = self._earlier_real(account_id)
        for t in hit:
            t["state"] = State.REVOKED
        return len(hit)

    @staged
    async def revoke_account(self, account_id: str) -> int:
        hit = [t for t in self.tokens.values() if t["account_id"] == account_id and domain.REVOKE.allows(t["state"])]
        for t in hit:
            t["state"] = State.REVOKED
        return len(hit)

    def _move(self, token_id: str, move: domain.Move, seen: str, **fields: Any) -> None:
        assert move.allows(seen)
        token = self.tokens.get(token_id)
        if token is None or token["state"] != seen:
            raise StaleToken(token_id)
        token.update(state=move.target, **fields)

    @staged
    async def reserve(self, token_id: str, by: By, until: datetime) -> None:
        self._move(token_id, domain.RESERVE, State.LIVE, reserved_by=by, reserved_until=until)

    @staged
    async def release(self, token_id: str) -> None:
        self._move(token_id, domain.RELEASE, State.RESERVED)

    @staged
    async def spend(self, token_id: str, seen: str, now: datetime) -> None:
        self._move(token_id, domain.SPEND, seen)

    @staged
    async def count_wrong_code(self, token_id: str, seen_attempts: int, kill: bool) -> None:
        token = self.tokens[token_id]
        if token["state"] != State.LIVE or token["code_attempts"] != seen_attempts:
            raise StaleToken(token_id)
        token["code_attempts"] += 1
        if kill:
            token["state"] = State.DEAD

    @staged
    async def record_code_failure(self, guard: domain.CodeGuard, now: datetime, keep_until: datetime) -> None:
        self.failures.append((guard.subject, guard.adds, now))

    @staged
    async def clear_code_failures(self, subject: str) -> None:
        self.failures = [f for f in self.failures if f[0] != subject]

    async def overdue_reservations(self, now: datetime) -> list[dict[str, Any]]:
        self.reads += 1
        return [
            copy.deepcopy(t)
            for t in self.tokens.values()
            if t["state"] == State.RESERVED and t.get("reserved_until", now) <= now and "sweep_parked" not in t
        ]

    async def next_reservation_end(self) -> datetime | None:
        self.reads += 1
        ends = [
            t["reserved_until"]
            for t in self.tokens.values()
            if t["state"] == State.RESERVED and "sweep_parked" not in t
        ]
        return min(ends, default=None)

    @staged
    async def park_reservation(self, token_id: Any, reason: str, now: datetime) -> None:
        if self.park_fails is not None:
            raise self.park_fails
        token = self.tokens.get(token_id)
        if token is not None and token["state"] == State.RESERVED:
            token.update(sweep_parked=reason, sweep_parked_at=now)

    async def commit(
        self,
        *,
        consumer: str | None,
        event_id: str | None,
        writes: Any,
        outgoing: list[Outgoing],
    ) -> None:
        if self.race is not None:
            self.race, race = None, self.race
            race(self)
        # All or nothing, as the transaction: a write that raises leaves no trace.
        saved = copy.deepcopy((self.tokens, self.failures))
        try:
            await apply_all(writes)
        except BaseException:
            self.tokens, self.failures = saved
            raise
        self.commits.append(list(outgoing))


def context(store: MemoryStore, topic: str, event_type: str, data: Any) -> HandlerContext:
    event = new_event(type=event_type, source="/tests", data=data.model_dump(mode="json"), correlationid="c")
    return HandlerContext("tokens", f"tokens:{topic}", topic, event, store)  # type: ignore[arg-type]


def staged(ctx: HandlerContext) -> list[tuple[str, str]]:
    """(topic, type) of what the handler staged, audit events as ('audit', action)."""
    return [
        ("audit", o.event.data["action"]) if o.topic == "audit.events" else (o.topic, o.event.type)
        for o in ctx.outgoing
    ]


def data_of(ctx: HandlerContext, topic: str) -> list[dict[str, Any]]:
    return [o.event.data for o in ctx.outgoing if o.topic == topic]


@pytest.fixture
def setup() -> tuple[MemoryStore, TokenHandlers]:
    store = MemoryStore()
    return store, TokenHandlers(store, SETTINGS, ServiceMetrics("tokens"))  # type: ignore[arg-type]


async def issue(
    h: TokenHandlers, store: MemoryStore, rid: str = "req-1", account: str = "acc-1"
) -> tuple[str, str, str]:
    """A real token through the handler: (token_id, link token, code), as the notifier reads them."""
    evt = IdentityVerified(request_id=rid, account_id=account, recipient=RECIPIENT)
    ctx = context(store, "identity.verified", EventType.IDENTITY_VERIFIED, evt)
    await h.identity_verified(ctx, evt)
    (issued,) = data_of(ctx, TOKENS_ISSUED)
    # Bound to this very event: its token, account, request and address.
    bound = recovery_secrets_context(
        token_id=issued["token_id"], account_id=account, request_id=rid, email=issued["recipient"]["email"]
    )
    opened = h.notifier_box.open(
        issued["sealed_secrets"], purpose=Purpose.RECOVERY_SECRETS, context=bound, ttl_s=SETTINGS.link_ttl_s
    )
    return issued["token_id"], opened["token"], opened["code"]


async def decline(h: TokenHandlers, store: MemoryStore, rid: str, account: str | None, ref: str) -> HandlerContext:
    evt = IdentityDeclined(request_id=rid, account_id=account, subject_ref=ref)
    ctx = context(store, "identity.declined", EventType.IDENTITY_DECLINED, evt)
    await h.identity_declined(ctx, evt)
    return ctx


async def reset(h: TokenHandlers, store: MemoryStore, **kw: Any) -> HandlerContext:
    evt = ResetSubmitted(new_password="Clave12345678", **kw)
    ctx = context(store, "recovery.resets", EventType.RESET_SUBMITTED, evt)
    await h.reset_submitted(ctx, evt)
    return ctx


def outcome(ctx: HandlerContext) -> dict[str, Any]:
    (found,) = data_of(ctx, RECOVERY_OUTCOMES)
    return found


# ------------------------------------------------------------------ races


async def test_a_reset_that_loses_the_race_is_decided_again_and_hears_token_used(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    token_id, _, code = await issue(h, store)

    def other_reset_wins(s: MemoryStore) -> None:
        s.tokens[token_id]["state"] = State.RESERVED

    store.race = other_reset_wins
    ctx = await reset(h, store, request_id="req-1", code=code)
    # What was staged for the lost decision (a tokens.redeemed) was dropped, not committed.
    assert staged(ctx) == [(RECOVERY_OUTCOMES, EventType.RECOVERY_OUTCOME), ("audit", "reset_rejected")]
    assert outcome(ctx)["reasons"] == ["token_used"]
    assert not any(o.topic == TOKENS_REDEEMED for commit in store.commits for o in commit)


async def test_racing_wrong_codes_are_both_counted(setup: tuple[MemoryStore, TokenHandlers]) -> None:
    store, h = setup
    token_id, _, code = await issue(h, store)

    def other_wrong_code_lands(s: MemoryStore) -> None:
        s.tokens[token_id]["code_attempts"] += 1
        s.failures.append(("acc-1", ("acc-1",), datetime.now(UTC)))

    store.race = other_wrong_code_lands
    ctx = await reset(h, store, request_id="req-1", code=f"{(int(code) + 1) % 10**6:06d}")
    assert outcome(ctx)["reasons"] == ["token_invalid"]
    assert store.tokens[token_id]["code_attempts"] == 2
    assert len(store.failures) == 2


async def test_a_reservation_revoked_before_the_timeout_commits_is_left_alone(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    token_id, _, _ = await issue(h, store)
    store.tokens[token_id]["state"] = State.RESERVED

    def revoked_meanwhile(s: MemoryStore) -> None:
        s.tokens[token_id]["state"] = State.REVOKED

    store.race = revoked_meanwhile
    commits = len(store.commits)
    await h.release_overdue()
    assert store.tokens[token_id]["state"] == State.REVOKED
    assert len(store.commits) == commits  # no "reservation_expired" audited either


async def test_a_reservation_that_cannot_be_released_is_parked_and_the_next_is_released(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    broken_id, _, _ = await issue(h, store, "req-1", "acc-1")
    good_id, _, _ = await issue(h, store, "req-2", "acc-2")
    for token_id in (broken_id, good_id):
        store.tokens[token_id]["state"] = State.RESERVED
    del store.tokens[broken_id]["account_id"]  # a document that no longer decodes (KeyError)
    commits = len(store.commits)
    assert await h.release_overdue() == 1
    assert store.tokens[good_id]["state"] == State.LIVE
    announced = [[o.event.data["action"] for o in c] for c in store.commits[commits:] if c]
    assert announced == [["reservation_expired"]]
    broken = store.tokens[broken_id]
    assert broken["state"] == State.RESERVED  # fail closed: still not usable
    assert broken["sweep_parked"] == "release failed: KeyError"  # parked by a staged write, committed
    parked = h.metrics.registry.get_sample_value(
        "clave_loop_items_parked_total", {"loop": "release-overdue-reservations", "reason": "release_failed"}
    )
    assert parked == 1
    assert not h.sweep_stuck
    # The next sweep no longer stumbles on it: nothing to do, nothing counted again.
    after = len(store.commits)
    assert await h.release_overdue() == 0
    assert len(store.commits) == after
    assert parked == h.metrics.registry.get_sample_value(
        "clave_loop_items_parked_total", {"loop": "release-overdue-reservations", "reason": "release_failed"}
    )
    # Nor does the sweeper wait for it: the earliest end is of the reservations still swept.
    assert await store.next_reservation_end() is None


async def test_a_reservation_that_cannot_even_be_parked_slows_the_sweeper_down(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    """Neither released nor parked, it stays the earliest end, in the past: the sweeper looks
    again after SWEEP_STUCK_S, not at once (it would spin on it)."""
    store, h = setup
    token_id, _, _ = await issue(h, store)
    store.tokens[token_id].update(state=State.RESERVED, reserved_until=datetime.now(UTC) - timedelta(seconds=1))
    del store.tokens[token_id]["account_id"]
    store.park_fails = ValueError("cannot write it")
    assert await h.release_overdue() == 0
    assert h.sweep_stuck
    assert "sweep_parked" not in store.tokens[token_id]
    store.park_fails = None
    await h.release_overdue()
    assert not h.sweep_stuck and "sweep_parked" in store.tokens[token_id]


async def test_a_store_outage_stops_the_sweep_without_parking_anything(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    from pymongo.errors import AutoReconnect

    store, h = setup
    token_id, _, _ = await issue(h, store)
    store.tokens[token_id]["state"] = State.RESERVED

    def store_away(s: MemoryStore) -> None:
        raise AutoReconnect("store away")

    store.race = store_away
    with pytest.raises(AutoReconnect):
        await h.release_overdue()  # the periodic loop retries it after its back-off
    assert "sweep_parked" not in store.tokens[token_id]
    await h.release_overdue()  # the store is back
    assert store.tokens[token_id]["state"] == State.LIVE


async def test_the_sweeper_sleeps_until_a_reservation_runs_out(setup: tuple[MemoryStore, TokenHandlers]) -> None:
    """Not a poll: idle, it reads nothing; a reservation wakes it, and it releases the
    reservation when it runs out (not at the next tick of a timer). A parked reservation,
    overdue for good, does not wake it."""
    store, h = setup
    parked_id, _, _ = await issue(h, store, "req-parked", "acc-parked")
    store.tokens[parked_id].update(
        state=State.RESERVED, reserved_until=datetime.now(UTC) - timedelta(minutes=5), sweep_parked="release failed"
    )
    token_id, _, _ = await issue(h, store)
    published = asyncio.Event()
    sweeper = asyncio.create_task(h.sweep_forever(on_outbox=published.set))
    try:
        await asyncio.sleep(0.3)
        assert store.reads == 2  # one look at start-up (overdue, next end), then asleep
        store.tokens[token_id].update(state=State.RESERVED, reserved_until=datetime.now(UTC) + timedelta(seconds=0.5))
        h.reserved.set()  # what the reservation's commit does
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(published.wait(), timeout=5)
        took = asyncio.get_running_loop().time() - t0
        assert store.tokens[token_id]["state"] == State.LIVE
        assert store.tokens[parked_id]["state"] == State.RESERVED  # still set aside
        assert 0.4 <= took < 2.0, took
        assert store.reads <= 6, store.reads  # woken (1), at the end (2), after (1)
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper


# ------------------------------------------------------------------ decoys


async def test_a_decoy_is_stored_without_mail_and_revokes_nothing(setup: tuple[MemoryStore, TokenHandlers]) -> None:
    store, h = setup
    real_id, _, _ = await issue(h, store)
    ctx = await decline(h, store, "req-2", "acc-1", "ref-1")
    assert staged(ctx) == [("audit", "decoy_stored")]  # no tokens.issued: never mailed
    assert store.tokens[real_id]["state"] == State.LIVE
    decoy = store._find(request_id="req-2")
    assert decoy is not None and decoy["decoy"] and decoy["recipient"] is None


async def test_a_wrong_code_stages_the_same_on_a_decoy_as_on_a_real_token(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    _, _, code = await issue(h, store, "req-1", "acc-1")
    await decline(h, store, "req-2", "acc-2", "ref-2")
    await decline(h, store, "req-3", None, "ref-3")
    wrong = f"{(int(code) + 1) % 10**6:06d}"
    ctxs = {
        rid: await reset(h, store, request_id=rid, code=wrong, client_ip="192.0.2.7")
        for rid in ("req-1", "req-2", "req-3")
    }
    shapes = {rid: staged(ctx) for rid, ctx in ctxs.items()}
    assert (
        shapes["req-1"]
        == shapes["req-2"]
        == shapes["req-3"]
        == [
            (RECOVERY_OUTCOMES, EventType.RECOVERY_OUTCOME),
            ("audit", "reset_rejected"),
            (TOKENS_CODE_REJECTED, EventType.TOKENS_CODE_REJECTED),
        ]
    )
    outcomes = [{k: v for k, v in outcome(c).items() if k != "request_id"} for c in ctxs.values()]
    assert outcomes[0] == outcomes[1] == outcomes[2]
    reported = {rid: data_of(ctx, TOKENS_CODE_REJECTED)[0] for rid, ctx in ctxs.items()}
    assert reported["req-1"]["account_id"] == "acc-1" and reported["req-1"]["subject_ref"] is None
    assert reported["req-2"]["account_id"] == "acc-2" and reported["req-2"]["subject_ref"] is None
    assert reported["req-3"]["account_id"] is None and reported["req-3"]["subject_ref"] == "ref-3"
    assert {r["client_ip"] for r in reported.values()} == {"192.0.2.7"}
    # Keyed by whose count it is.
    keys = {o.key for c in ctxs.values() for o in c.outgoing if o.topic == TOKENS_CODE_REJECTED}
    assert keys == {"acc-1", "acc-2", "ref-3"}


async def test_a_verified_request_revokes_the_accounts_real_tokens_and_leaves_its_decoys(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    """A decoy revoked by a later verified request would answer `token_invalid` for ever: wrong
    codes on it would tell whether that request (guessed answers) was verified."""
    store, h = setup
    earlier_real, _, _ = await issue(h, store, "req-1", "acc-1")
    await decline(h, store, "req-2", "acc-1", "ref-1")
    evt = IdentityVerified(request_id="req-3", account_id="acc-1", recipient=RECIPIENT)
    ctx = context(store, "identity.verified", EventType.IDENTITY_VERIFIED, evt)
    await h.identity_verified(ctx, evt)
    decoy = store._find(request_id="req-2")
    assert decoy is not None and decoy["state"] == State.LIVE
    assert store.tokens[earlier_real]["state"] == State.REVOKED
    (issued,) = [o.event.data for o in ctx.outgoing if o.topic == "audit.events"]
    assert issued["details"]["revoked_earlier"] == 1  # the real one only
    # Its code path is untouched: a wrong code counts as on a decoy nobody followed.
    wrong = await reset(h, store, request_id="req-2", code="000000", client_ip="192.0.2.9")
    assert outcome(wrong)["reasons"] == ["token_invalid"]
    assert store.tokens[decoy["_id"]]["code_attempts"] == 1


# ------------------------------------------------------------------ the account's code limit


async def test_the_account_limit_spans_tokens_and_a_key_change_by_link_clears_it(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    limit = SETTINGS.code_account_max_failures
    store.failures = [("acc-1", ("acc-1",), datetime.now(UTC) - timedelta(minutes=1))] * limit
    token_id, _, code = await issue(h, store)
    refused = await reset(h, store, request_id="req-1", code=code)
    assert outcome(refused)["reasons"] == ["code_attempts_exceeded"]
    assert not data_of(refused, TOKENS_CODE_REJECTED)  # not compared, not counted
    # The link works; once the key is changed by it, the count is gone.
    store.tokens[token_id].update(state=State.RESERVED, reserved_by="token")
    evt = PasswordUpdated(
        request_id="req-1", account_id="acc-1", token_id=token_id, recipient=RECIPIENT, changed_at=datetime.now(UTC)
    )
    ctx = context(store, "password.updated", EventType.PASSWORD_UPDATED, evt)
    await h.password_updated(ctx, evt)
    assert store.failures == []


async def test_a_strangers_wrong_codes_on_decoys_leave_the_owners_code_working(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    """Two failed requests for the owner's ID, the account limit's worth of wrong codes on
    them from one address; the owner's own request, from home, redeems its code."""
    store, h = setup
    per_token, limit = SETTINGS.code_max_attempts, SETTINGS.code_account_max_failures
    decoys = [f"req-d{n}" for n in range(-(-limit // per_token))]
    for rid in decoys:
        await decline(h, store, rid, "acc-1", "ref-1")
    for n in range(limit):
        await reset(h, store, request_id=decoys[n // per_token], code="000000", client_ip="203.0.113.9")
    assert len(store.failures) == limit
    # Each record has a real one's shape (two keys), none of them the account's.
    assert all(len(keys) == 2 and "acc-1" not in keys for _, keys, _ in store.failures)
    stranger_again = await decline(h, store, "req-d9", "acc-1", "ref-1")
    assert staged(stranger_again) == [("audit", "decoy_stored")]
    refused = await reset(h, store, request_id="req-d9", code="000000", client_ip="203.0.113.9")
    assert outcome(refused)["reasons"] == ["code_attempts_exceeded"]  # the stranger's block is stopped
    token_id, _, code = await issue(h, store, "req-owner", "acc-1")
    ctx = await reset(h, store, request_id="req-owner", code=code, client_ip="198.51.100.4")
    assert staged(ctx) == [(TOKENS_REDEEMED, EventType.TOKENS_REDEEMED), ("audit", "token_reserved")]
    assert store.tokens[token_id]["state"] == State.RESERVED


async def test_failures_older_than_the_window_do_not_count(setup: tuple[MemoryStore, TokenHandlers]) -> None:
    store, h = setup
    old = datetime.now(UTC) - timedelta(seconds=SETTINGS.code_account_window_s + 60)
    store.failures = [("acc-1", ("acc-1",), old)] * SETTINGS.code_account_max_failures
    token_id, _, code = await issue(h, store)
    ctx = await reset(h, store, request_id="req-1", code=code)
    assert staged(ctx) == [(TOKENS_REDEEMED, EventType.TOKENS_REDEEMED), ("audit", "token_reserved")]
    assert store.tokens[token_id]["state"] == State.RESERVED


async def test_the_new_key_is_sealed_for_its_token_account_and_request(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    token_id, token, _ = await issue(h, store, rid="req-1", account="acc-1")
    ctx = await reset(h, store, request_id="req-1", token=token)
    (redeemed,) = data_of(ctx, TOKENS_REDEEMED)
    bound = new_key_context(token_id=token_id, account_id="acc-1", request_id="req-1")
    opened = h.password_box.open(redeemed["sealed_new_key"], purpose=Purpose.NEW_KEY, context=bound, ttl_s=60)
    assert opened == {"new_password": "Clave12345678"}
    with pytest.raises(SealMismatch):  # the same blob in an event for another account
        h.password_box.open(
            redeemed["sealed_new_key"], purpose=Purpose.NEW_KEY, context={**bound, "account_id": "acc-2"}, ttl_s=60
        )


# ------------------------------------------------------------------ revocation and the saga


async def test_revocation_reaches_a_reserved_token(setup: tuple[MemoryStore, TokenHandlers]) -> None:
    store, h = setup
    token_id, _, _ = await issue(h, store)
    store.tokens[token_id]["state"] = State.RESERVED
    new = RECIPIENT.model_copy(update={"email": "nuevo@example.org"})
    evt = EmailChanged(
        command_id="cmd-1", account_id="acc-1", old_recipient=RECIPIENT, new_recipient=new, operator_id="op-1"
    )
    ctx = context(store, "identity.email_changed", EventType.IDENTITY_EMAIL_CHANGED, evt)
    await h.email_changed(ctx, evt)
    assert store.tokens[token_id]["state"] == State.REVOKED


async def test_a_refused_key_on_a_revoked_reservation_says_invalid_and_stays_revoked(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    token_id, _, _ = await issue(h, store)
    store.tokens[token_id]["state"] = State.REVOKED
    evt = PasswordRejected(request_id="req-1", account_id="acc-1", token_id=token_id, reasons=["password_reused"])
    ctx = context(store, "password.rejected", EventType.PASSWORD_REJECTED, evt)
    await h.password_rejected(ctx, evt)
    assert outcome(ctx)["reasons"] == ["token_invalid"]
    assert store.tokens[token_id]["state"] == State.REVOKED


async def test_a_key_change_on_a_revoked_reservation_stands_and_spends_it(
    setup: tuple[MemoryStore, TokenHandlers],
) -> None:
    store, h = setup
    token_id, _, _ = await issue(h, store)
    store.tokens[token_id]["state"] = State.REVOKED
    evt = PasswordUpdated(
        request_id="req-1", account_id="acc-1", token_id=token_id, recipient=RECIPIENT, changed_at=datetime.now(UTC)
    )
    ctx = context(store, "password.updated", EventType.PASSWORD_UPDATED, evt)
    await h.password_updated(ctx, evt)
    assert outcome(ctx)["status"] == "completed"
    (audit,) = [o.event.data for o in ctx.outgoing if o.topic == "audit.events"]
    assert audit["action"] == "token_spent" and audit["reasons"] == ["revoked_while_reserved"]
    assert store.tokens[token_id]["state"] == State.SPENT


async def test_a_link_answers_only_for_its_own_request(setup: tuple[MemoryStore, TokenHandlers]) -> None:
    store, h = setup
    token_id, token, _ = await issue(h, store)
    ctx = await reset(h, store, request_id="req-other", token=token)
    assert outcome(ctx)["reasons"] == ["token_invalid"]
    assert store.tokens[token_id]["state"] == State.LIVE
    ctx = await reset(h, store, request_id="req-1", token=token)
    assert (TOKENS_REDEEMED, EventType.TOKENS_REDEEMED) in staged(ctx)
