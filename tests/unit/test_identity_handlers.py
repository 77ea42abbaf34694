"""Identity's handlers over an in-memory store (a middle-layer test; the real store, broker and
services are driven in tests/e2e): what each request stages, and the re-decision when a
concurrent request changed the counters between the read and the write."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest

from services.identity.domain import (
    Account,
    AddressState,
    BlockState,
    Counters,
    PrincipalState,
    Record,
    normalize_answer,
)
from services.identity.handlers import IdentityHandlers
from services.identity.settings import IdentitySettings
from services.identity.store import CounterKeys, StaleCounters
from shared.consumer import HandlerContext
from shared.crypto import keyed_hash
from shared.envelope import new_event
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.schemas import CodeRejected, RecoveryRequested
from shared.store import Outgoing
from shared.topics import IDENTITY_DECLINED, IDENTITY_LOCKED, IDENTITY_VERIFIED, RECOVERY_OUTCOMES, EventType
from tests.memory import apply_all, staged, staged_many

SETTINGS = IdentitySettings(argon2_memory_kib=1024, argon2_time_cost=1, portal_input="any")  # fast hashes for the test
ANSWERS = {"birth_date": "1984-03-09", "fingerprint_code": "V4443V4442", "mother_surname": "Andrade"}


class MemoryStore:
    """The AccountStore operations the handlers use, in memory, with the same revision rule."""

    def __init__(self, hasher: SecretHasher) -> None:
        self.account = Account(
            account_id="acc-1",
            national_id="1710034065",
            profile="affiliate",
            name="María Pérez",
            email="maria.perez@example.org",
            locale="es",
            answer_hashes={q: hasher.hash_sync(normalize_answer(a)) for q, a in ANSWERS.items()},
        )
        self.principals: dict[str, PrincipalState] = {}
        self.blocks: dict[tuple[str, str], BlockState] = {}
        self.addresses: dict[str, AddressState] = {}
        self.requests: set[str] = set()
        self.races = 0  # how many reads are followed by someone else's write before ours
        self.commits: list[list[Outgoing]] = []

    async def request_seen(self, request_id: str) -> bool:
        return request_id in self.requests

    async def by_national_id(self, national_id: str) -> Account | None:
        return self.account if national_id == self.account.national_id else None

    async def by_id(self, account_id: str) -> Account | None:
        return self.account if account_id == self.account.account_id else None

    async def counters(self, keys: CounterKeys) -> Counters:
        found = Counters(
            self.principals.get(keys.principal, PrincipalState()),
            self.blocks.get((keys.principal, keys.block_ref or ""), BlockState()),
            self.addresses.get(keys.block_ref or "", AddressState()),
        )
        if self.races:
            self.races -= 1
            self._apply(keys, found, Record(principal_failure=True, block_failure=True), datetime.now().astimezone())
        return found

    @staged
    async def record_request(self, request_id: str, now: datetime) -> None:
        self.requests.add(request_id)

    @staged_many
    async def record_counters(self, keys: CounterKeys, seen: Counters, record: Record, now: datetime) -> None:
        if self.principals.get(keys.principal, PrincipalState()).rev != seen.principal.rev:
            raise StaleCounters(keys.principal)
        self._apply(keys, seen, record, now)

    def _apply(self, keys: CounterKeys, seen: Counters, record: Record, now: datetime) -> None:
        def push(times: tuple[datetime, ...], on: bool) -> tuple[datetime, ...]:
            return (*times, now) if on else times

        p = self.principals.get(keys.principal, PrincipalState())
        self.principals[keys.principal] = PrincipalState(
            p.rev + 1,
            push(p.failures, record.principal_failure),
            push(p.mails, record.mail),
            push(p.notices, record.notice),
        )
        if keys.block_ref is not None:
            b = self.blocks.get((keys.principal, keys.block_ref), BlockState())
            self.blocks[(keys.principal, keys.block_ref)] = replace(
                b, failures=push(b.failures, record.block_failure), locked_until=record.lock_until or b.locked_until
            )
            a = self.addresses.get(keys.block_ref, AddressState())
            self.addresses[keys.block_ref] = AddressState(push(a.failures, record.address_failure))

    @staged
    async def set_answer_hashes(self, account_id: str, hashes: dict[str, str]) -> None:
        self.account.answer_hashes.update(hashes)

    async def commit(self, *, consumer: str, event_id: str, writes: Any, outgoing: list[Outgoing]) -> None:
        await apply_all(writes)  # raises StaleCounters before anything is kept, as a transaction would
        self.commits.append(list(outgoing))


@pytest.fixture
def hasher() -> SecretHasher:
    h = SecretHasher(SETTINGS)
    yield h  # type: ignore[misc]
    h.close()


@pytest.fixture
def store(hasher: SecretHasher) -> MemoryStore:
    return MemoryStore(hasher)


@pytest.fixture
def handlers(store: MemoryStore, hasher: SecretHasher) -> IdentityHandlers:
    return IdentityHandlers(store, hasher, SETTINGS, ServiceMetrics("identity"))  # type: ignore[arg-type]


def context(store: MemoryStore, data: dict[str, Any], type: str = EventType.RECOVERY_REQUESTED) -> HandlerContext:
    event = new_event(type=type, source="/portal/tests", data=data, correlationid="req-1")
    return HandlerContext("identity", "identity:test", "recovery.requests", event, store)  # type: ignore[arg-type]


def request(**kw: Any) -> RecoveryRequested:
    base: dict[str, Any] = {
        "request_id": "req-1",
        "profile": "affiliate",
        "national_id": "171003406-5",
        "email": "maria.perez@example.org",
        "answers": dict(ANSWERS),
        "captcha_passed": True,
        "client_ip": "203.0.113.9",
    }
    return RecoveryRequested.model_validate({**base, **kw})


def staged(store: MemoryStore) -> list[tuple[str, str, dict[str, Any]]]:
    """(topic, key, event) of what the last commit queued."""
    return [(o.topic, o.key, json.loads(o.event.to_bytes())) for o in store.commits[-1]]


def topics(store: MemoryStore) -> list[str]:
    return [t for t, _, _ in staged(store)]


async def test_verified_request_stages_accepted_verified_and_its_audit(
    handlers: IdentityHandlers, store: MemoryStore
) -> None:
    req = request()
    await handlers.recovery_requested(context(store, req.model_dump()), req)
    assert topics(store) == [RECOVERY_OUTCOMES, IDENTITY_VERIFIED, "audit.events"]
    assert "req-1" in store.requests
    assert store.principals["a:acc-1"].mails and not store.principals["a:acc-1"].failures


async def test_unknown_id_is_declined_under_its_keyed_hash(handlers: IdentityHandlers, store: MemoryStore) -> None:
    req = request(national_id="0926687856")
    await handlers.recovery_requested(context(store, req.model_dump()), req)
    assert topics(store) == [RECOVERY_OUTCOMES, IDENTITY_DECLINED, "audit.events"]
    _, key, declined = staged(store)[1]
    ref = keyed_hash(SETTINGS.pseudonym_key, "0926687856")
    assert key == ref == declined["data"]["subject_ref"] and declined["data"]["account_id"] is None
    assert declined["data"]["client_ip"] == "203.0.113.9"
    assert store.principals[f"s:{ref}"].failures  # counted like a known account's failure


async def test_wrong_answer_is_declined_under_the_account(handlers: IdentityHandlers, store: MemoryStore) -> None:
    req = request(answers={**ANSWERS, "birth_date": "1900-01-01"})
    await handlers.recovery_requested(context(store, req.model_dump()), req)
    _, key, declined = staged(store)[1]
    assert key == "acc-1" == declined["data"]["account_id"]
    assert len(store.principals["a:acc-1"].failures) == 1


async def test_a_race_for_the_counters_decides_again_on_the_new_counters(
    handlers: IdentityHandlers, store: MemoryStore
) -> None:
    # Four failures are on record; a concurrent request records a fifth between our read and
    # our write. Our decision (made on four) is refused; the new one, made on five, locks.
    block_ref = keyed_hash(SETTINGS.pseudonym_key, "203.0.113.9")
    now = datetime.now().astimezone()
    store.principals["a:acc-1"] = PrincipalState(rev=4, failures=(now,) * 4)
    store.blocks[("a:acc-1", block_ref)] = BlockState(failures=(now,) * 3)
    store.races = 1
    req = request(answers={**ANSWERS, "birth_date": "1900-01-01"})
    ctx = context(store, req.model_dump())
    await handlers.recovery_requested(ctx, req)
    assert len(store.commits) == 1  # the first staging was dropped, not committed
    # The answer sent at once is the committed one alone (the dropped decision's is never sent).
    assert [r.event.id for r in ctx.replies] == [store.commits[0][0].event.id]
    assert topics(store) == [RECOVERY_OUTCOMES, IDENTITY_DECLINED, "audit.events", "audit.events", IDENTITY_LOCKED]
    assert len(store.blocks[("a:acc-1", block_ref)].failures) == 5
    assert store.blocks[("a:acc-1", block_ref)].locked_until is not None


async def test_endless_races_give_up_to_the_consumer(handlers: IdentityHandlers, store: MemoryStore) -> None:
    store.races = 10_000
    req = request()
    with pytest.raises(StaleCounters):
        await handlers.recovery_requested(context(store, req.model_dump()), req)
    assert store.commits == []


async def test_a_cheap_refusal_does_no_argon2_work(
    handlers: IdentityHandlers, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    async def verify(stored: str, secret: str) -> bool:
        calls.append(secret)
        return False

    monkeypatch.setattr(handlers.hasher, "verify", verify)
    for req in (
        request(request_id="req-a", captcha_passed=False),
        request(request_id="req-b", national_id="1710034066"),
    ):
        await handlers.recovery_requested(context(store, req.model_dump()), req)
        assert IDENTITY_DECLINED in topics(store)
    full = (datetime.now().astimezone(),) * SETTINGS.ip_max_requests
    store.addresses[keyed_hash(SETTINGS.pseudonym_key, "203.0.113.9")] = AddressState(full)
    req = request(request_id="req-c")
    await handlers.recovery_requested(context(store, req.model_dump()), req)
    assert staged(store)[2][2]["data"]["reasons"] == ["rate_limited"]
    assert calls == []
    store.addresses.clear()
    req = request(request_id="req-3", national_id="0926687856")
    await handlers.recovery_requested(context(store, req.model_dump()), req)
    assert len(calls) == len(SETTINGS.question_ids())  # an unknown ID pays the full price


async def test_a_wrong_code_counts_against_the_account_and_its_block(
    handlers: IdentityHandlers, store: MemoryStore
) -> None:
    evt = CodeRejected(request_id="req-9", account_id="acc-1", client_ip="::ffff:203.0.113.9")
    for _ in range(SETTINGS.lockout_max_failures):
        await handlers.code_rejected(context(store, evt.model_dump(), EventType.TOKENS_CODE_REJECTED), evt)
    block_ref = keyed_hash(SETTINGS.pseudonym_key, "203.0.113.9")  # the mapped form is the IPv4 block
    assert len(store.blocks[("a:acc-1", block_ref)].failures) == SETTINGS.lockout_max_failures
    assert topics(store) == ["audit.events", "audit.events", IDENTITY_LOCKED]  # the fifth locks it
    # The locked block is now refused, right answers and all.
    req = request(client_ip="203.0.113.9")
    await handlers.recovery_requested(context(store, req.model_dump()), req)
    audit = staged(store)[2][2]["data"]
    assert audit["reasons"] == ["locked"]


async def test_a_wrong_code_without_account_counts_for_the_subject(
    handlers: IdentityHandlers, store: MemoryStore
) -> None:
    evt = CodeRejected(request_id="req-9", subject_ref="f" * 64)
    await handlers.code_rejected(context(store, evt.model_dump(), EventType.TOKENS_CODE_REJECTED), evt)
    assert len(store.principals["s:" + "f" * 64].failures) == 1
    assert topics(store) == ["audit.events"]


async def test_unknown_id_wrong_answer_and_all_right_do_the_same_work(
    handlers: IdentityHandlers, store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No timing oracle in identity: the same store reads and writes, in the same order, the
    same argon2 verifies, and as many events of about the same size, on the three paths the
    portal cannot tell apart (issue 8: the enumeration test times them through the stack)."""
    work: list[str] = []
    for name in ("request_seen", "by_national_id", "by_id", "counters", "record_request", "record_counters"):
        original = getattr(store, name)

        def recorded(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
            work.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(store, name, recorded)
    verify = handlers.hasher.verify

    async def counted_verify(stored: str, secret: str) -> bool:
        work.append("argon2")
        return await verify(stored, secret)

    monkeypatch.setattr(handlers.hasher, "verify", counted_verify)
    paths = {
        "unknown": request(request_id="req-u", national_id="0926687856"),
        "wrong": request(request_id="req-w", answers={**ANSWERS, "birth_date": "1900-01-01"}),
        "right": request(request_id="req-r"),
    }
    seen: dict[str, tuple[list[str], list[int]]] = {}
    for name, req in paths.items():
        work.clear()
        ctx = context(store, req.model_dump())
        await handlers.recovery_requested(ctx, req)
        seen[name] = (list(work), [len(event.to_bytes()) for event in (o.event for o in store.commits[-1])])
        # On every path the answer is a reply (sent right after the commit, before the relay
        # publishes the token's or the decoy's event): the same path to the portal.
        assert [(r.topic, r.event.data["status"]) for r in ctx.replies] == [(RECOVERY_OUTCOMES, "accepted")]
        assert ctx.replies[0].event.id == store.commits[-1][0].event.id
    (unknown_work, unknown_sizes), (wrong_work, wrong_sizes), (right_work, right_sizes) = seen.values()
    assert unknown_work == wrong_work == right_work
    assert unknown_work.count("argon2") == len(SETTINGS.question_ids())
    assert len(unknown_sizes) == len(wrong_sizes) == len(right_sizes) == 3
    for sizes in (wrong_sizes, right_sizes):
        # Each event within 80 bytes of its unknown-ID twin: the texts differ (an unknown ID is
        # named by its 64-character keyed hash, an account by its id; the reasons).
        assert all(abs(a - b) <= 80 for a, b in zip(sizes, unknown_sizes, strict=True)), seen
