"""The outbox relay: publishes a service's outbox to Kafka, in order.

One relay per service is active at a time (a lease in the service's store), so
two instances of a service share consumption but never interleave the audit
chain. A lease whose holder crashed is waited out (LEASE_S), except when that
holder was a process of this host that is gone (a service killed and
restarted): then the new relay takes over at once. A crash after publishing
but before marking `sent` republishes the same events with the same ids;
consumers drop them as duplicates, and audit readers count an identical
redelivery once.

Nothing polls while idle (each poll is a store round trip, and an idle stack must
cost its store almost nothing):
- the relay is woken by its own process's commits (`wake()`: the consumer pipeline,
  the periodic jobs and the notifier's sender call it) and, for commits made by any
  other process (a second instance of the service), by a
  change stream on the outbox: one getMore that waits up to WATCH_AWAIT_S in the store;
- it holds the lease only while it has work: it takes it when woken, renews it at most
  every RENEW_S while busy (not on every cycle), and gives it back after LINGER_S
  without work, so an idle relay writes nothing, and whichever instance is woken next
  can take it at once. A busy holder's outbox reads cover every instance's events,
  and the change stream wakes it for those committed after its last read;
- a slow safety poll (SAFETY_POLL_S; FALLBACK_POLL_S when the store has no change
  streams) catches whatever a wake missed.

No outbox event stops the relay (shared/loops.py): one that cannot be published (not a
well-formed outbox document, an audit event that does not parse, a record the broker or
the client refuses as such: too large, an invalid topic) is parked in place, `sent: null`
with `parked` (the reason) and `parked_at`, counted and logged, and the events after it go
out. An unsealed audit event is parked before it takes a place in the chain, so the chain
stays whole; an audit event parked after sealing leaves a gap that auditors see. A broker
or store outage is retried with a back-off; any other error keeps the relay running, after
a back-off, and is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
)
from bson import ObjectId
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from shared import audit
from shared.auditkeys import load_signing_key
from shared.envelope import CONTENT_TYPE
from shared.loops import describe, is_outage
from shared.metrics import ServiceMetrics
from shared.producer import PRODUCER_BROKEN, Producer, started_kafka_producer
from shared.settings import PlatformSettings
from shared.store import DUPLICATE_KEY, LEASES, OUTBOX, Outgoing, ServiceStore, Write

log = logging.getLogger(__name__)

LEASE_S = 10
RENEW_S = LEASE_S / 3  # a busy holder renews this often; a publish cycle starts with >= 2/3 of the lease left
LINGER_S = 2.0  # keep the lease this long after the last work: a burst of commits pays for it once
SAFETY_POLL_S = 30.0  # while the change stream runs: only a backstop
FALLBACK_POLL_S = 5.0  # no change stream (a store without them, or it is being reopened)
WATCH_AWAIT_S = 10.0  # how long one change-stream getMore may wait in the store
WATCH_MIN_GAP_S = 1.0  # between two getMores that came back empty (see _watch)
SEEN_MAX = 20_000  # outbox ids this relay already read, so their change events wake nobody
BATCH = 500
REPLY_WAIT_S = 5.0  # a batch waits this long at most for a reply in flight (the consumer's own bound)
CHAIN_ID = "audit-chain"
# The store cannot run change streams (a standalone server): no use retrying them.
NO_CHANGE_STREAMS = frozenset({40573, 40324, 115})
# PRODUCER_BROKEN (shared.producer): what leaves aiokafka's idempotent producer unusable; after
# a broker restart the password relay met OutOfOrderSequenceNumber and retried it for ever, so
# the relay replaces its producer then (Producer.recover).
__all__ = ["PRODUCER_BROKEN", "OutboxRelay", "owner_is_dead", "unpublishable"]
# Broker or client refusals of one record as such: retrying the same bytes cannot help.
RECORD_REFUSED = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidTopicError, CorruptRecordException)


def owner_is_dead(owner: str) -> bool:
    """Is this lease owner ("host:pid:nonce") a process of this host that is gone? Only a
    sure answer counts: another host, a live pid (even a reused one) or a zombie say no."""
    host, _, rest = owner.partition(":")
    pid_text, _, nonce = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit() or not nonce:
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # an earlier run with our pid (a container's pid 1): not us, so gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class OutboxRelay:
    def __init__(self, service: str, store: ServiceStore, settings: PlatformSettings, metrics: ServiceMetrics):
        self.service = service
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.signer = audit.Signer(load_signing_key(settings.audit_signing_key))  # this service's key alone
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._producer: Producer | None = None
        self._sent_with: Any = None  # the aiokafka producer of the last publish (the one that failed)
        self._stopping = False
        self._held_until = 0.0  # loop time until which our lease is valid (0: not ours)
        self._other_until = 0.0  # loop time until which another relay's lease was seen valid
        self._watching = False  # the change stream is open: the safety poll can be slow
        self._released = asyncio.Event()  # set when this relay gives its lease back
        self._seen: OrderedDict[ObjectId, None] = OrderedDict()
        self._unparkable: set[Any] = set()  # outbox ids whose parking itself failed: skipped
        # Replies (send_now): those in flight, which the relay waits for before publishing
        # anything of theirs (the answer leaves before the work it causes), and those the
        # broker acknowledged, whose outbox copies are marked sent without a second record.
        self._replying: dict[str, asyncio.Future[None]] = {}
        self._replied: OrderedDict[str, None] = OrderedDict()
        self._work_known = False  # woken by a commit of this process: there is something to publish
        # The audit chain's head (seq, hash) as this relay last wrote it: valid only while it
        # holds the lease and no sealing failed (nobody else seals meanwhile), so a seal needs
        # no read of it.
        self._chain: tuple[int, str] | None = None

    def tasks(self) -> list[tuple[asyncio.Task[None], bool]]:
        """The relay's tasks, each with whether it must run for ever (for the supervisor; the
        watcher ends by itself on a store without change streams)."""
        return [(t, forever) for t, forever in ((self._task, True), (self._watcher, False)) if t is not None]

    def wake(self) -> None:
        """Look at the outbox (maybe nothing is there: a look costs one read, no lease write)."""
        self._wake.set()

    def committed(self) -> None:
        """This process has just committed outbox events: publish them (no look first)."""
        self._work_known = True
        self._wake.set()

    @property
    def holding(self) -> bool:
        return self._held_until > self._now()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def start(self, producer: Any = None, new_producer: Callable[[], Awaitable[Any]] | None = None) -> None:
        """Start publishing (and watching the outbox). `producer`, `new_producer`: tests pass
        a stand-in and what replaces it when it breaks."""
        self._producer = Producer(
            new_producer or self._kafka_producer,
            name=f"{self.service}-relay",
            on_event=self.metrics.count_producer_event,
            first=producer,
        )
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-relay")
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.service}-relay-watch")

    async def _kafka_producer(self) -> Any:
        return await started_kafka_producer(
            self.settings,
            client_id=f"clave-{self.service}-relay",
            enable_idempotence=True,  # forces acks=all
            linger_ms=2,
        )

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in (self._watcher, self._task):
            if task is not None:
                task.cancel()
                # A task that died has been reported (shared.loops.TaskSupervisor): stop anyway.
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._producer is not None:
            await self._producer.stop()
        with contextlib.suppress(PyMongoError):
            await self.store.db[LEASES].delete_one({"_id": "relay", "owner": self.owner})

    # ---- when to look ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                # Cleared before looking, so a wake during the cycle makes the wait return at once.
                self._wake.clear()
                if await self.publish_pending() >= BATCH:
                    backoff = 0.1
                    continue  # more may be waiting
                # Published what there was: a commit made meanwhile has set the wake, so the
                # linger below returns at once for it; no read to find out there is nothing.
                backoff = 0.1
                if self.holding:
                    if await self._sleep(LINGER_S):
                        continue
                    await self._release()  # idle: an idle relay writes nothing
                await self._sleep(self._idle_timeout())
            except asyncio.CancelledError:
                raise
            except (PyMongoError, KafkaError, OSError) as exc:
                self.metrics.relay_errors.inc()
                log.warning("relay: %s; retrying in %.1fs", exc.__class__.__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                if self._producer is not None:
                    # A new producer (new producer id, sequences from 0) for one that broke; what
                    # the old one had not had acknowledged is published again (consumers drop
                    # redeliveries by id). The broker still away: the next round tries again.
                    await self._producer.recover(exc, self._sent_with)  # unless a reply (send_now) did
            except Exception as exc:
                # Not an item's (those are parked in publish_pending) and not an outage: a bug.
                # The relay must outlive it, loudly, or every later event would wait for ever.
                self.metrics.relay_errors.inc()
                self.metrics.loop_errors.labels("relay", "error").inc()
                log.error("relay: %s; retrying in %.1fs", describe(exc), backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _idle_timeout(self) -> float:
        timeout = SAFETY_POLL_S if self._watching else FALLBACK_POLL_S
        other = self._other_until - self._now()
        if other > 0:  # another relay holds the lease: look again when it would have run out
            timeout = min(timeout, other + 0.1)
        return timeout

    async def _sleep(self, timeout: float) -> bool:
        """Wait for a wake or the timeout; True when woken."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)
            return True
        return False

    async def _watch(self) -> None:
        """Wake the relay for outbox inserts made by any process (other instances, the CLI).

        Paused while this relay holds the lease: it is busy then, and each of its reads
        covers every instance's events; what is inserted after its last read is seen when
        it gives the lease back (at most LINGER_S later), since the stream's cursor keeps
        its place. So a busy service pays nothing for the stream.

        secantusd-py answers a waiting getMore as soon as anything at all is written to the
        store, often with nothing for us; such empty answers are spaced WATCH_MIN_GAP_S apart
        so a busy store does not turn the stream into a poll loop (an insert is still seen,
        at the next getMore). Stores that wait for a matching event (mongod, secantusd-rs)
        answer empty only every WATCH_AWAIT_S."""
        backoff = 1.0
        pipeline: list[dict[str, Any]] = [{"$match": {"operationType": "insert"}}, {"$project": {"documentKey": 1}}]
        while not self._stopping:
            try:
                async with await self.store.db[OUTBOX].watch(
                    pipeline, max_await_time_ms=int(WATCH_AWAIT_S * 1000)
                ) as stream:
                    self._watching = True
                    self.wake()  # whatever was inserted while the stream was not open
                    backoff = 1.0
                    while not self._stopping:
                        await self._until_not_holding()
                        asked = self._now()
                        change = await stream.try_next()
                        if change is not None:
                            if change.get("documentKey", {}).get("_id") not in self._seen:
                                self.wake()
                            continue
                        await asyncio.sleep(max(0.0, WATCH_MIN_GAP_S - (self._now() - asked)))
            except asyncio.CancelledError:
                raise
            except PyMongoError as exc:
                self._watching = False
                if isinstance(exc, OperationFailure) and exc.code in NO_CHANGE_STREAMS:
                    log.warning(
                        "relay: the store has no change streams (%s); polling every %.0fs", exc.code, FALLBACK_POLL_S
                    )
                    return
                log.warning("relay: outbox change stream: %s; reopening in %.0fs", exc.__class__.__name__, backoff)
                self.wake()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 8.0)
            except Exception as exc:
                # A change the driver could not decode, a library bug: reopen rather than die
                # (the relay would then only see other processes' commits at its safety poll).
                self._watching = False
                self.metrics.loop_errors.labels("relay-watch", "error").inc()
                log.error("relay: outbox change stream: %s; reopening in %.0fs", describe(exc), backoff)
                self.wake()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 8.0)
            finally:
                self._watching = False

    async def _until_not_holding(self) -> None:
        while (left := self._held_until - self._now()) > 0:
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._released.wait(), timeout=left)

    # ---- the lease ---------------------------------------------------------------------------

    async def _ensure_lease(self) -> bool:
        now = self._now()
        if self._held_until - now > LEASE_S - RENEW_S:
            return True  # taken or renewed less than RENEW_S ago
        if not self.holding and now < self._other_until:
            return False  # another relay's lease is still running: it publishes our events too
        return await self._acquire_lease()

    async def _acquire_lease(self) -> bool:
        started = self._now()
        now = datetime.now(UTC)
        lease = {"$set": {"owner": self.owner, "expires_at": now + timedelta(seconds=LEASE_S)}}
        try:
            await self.store.db[LEASES].update_one(
                {"_id": "relay", "$or": [{"owner": self.owner}, {"expires_at": {"$lt": now}}]}, lease, upsert=True
            )
            return self._took(started)
        except DuplicateKeyError:
            pass
        # Held by another owner. If that owner was a process of this host that no longer
        # exists (the service was killed and restarted), its lease need not be waited out.
        self._lost()
        held = await self.store.db[LEASES].find_one({"_id": "relay"}, {"owner": 1, "expires_at": 1})
        if held is None or not owner_is_dead(str(held.get("owner", ""))):
            if held is not None and isinstance(held.get("expires_at"), datetime):
                left = (held["expires_at"] - datetime.now(UTC)).total_seconds()
                self._other_until = self._now() + min(max(left, 0.0), LEASE_S)
            return False
        result = await self.store.db[LEASES].update_one({"_id": "relay", "owner": held["owner"]}, lease)
        if result.modified_count == 1:
            log.warning("relay: took over the lease of %s (that process is gone)", held["owner"])
            return self._took(started)
        return False

    def _took(self, started: float) -> bool:
        # Counted from before the request: the store's clock started the lease no earlier.
        self._held_until = started + LEASE_S
        self._other_until = 0.0
        return True

    async def _release(self) -> None:
        await self.store.db[LEASES].delete_one({"_id": "relay", "owner": self.owner})
        self._lost()

    def _lost(self) -> None:
        self._held_until = 0.0
        self._chain = None
        self._released.set()

    # ---- publishing ----------------------------------------------------------------------------

    async def send_now(self, outgoing: list[Outgoing]) -> None:
        """Send committed events at once, outside the outbox order (replies someone waits for:
        HandlerContext.reply). Their outbox copies go through the relay as usual, with the same
        ids, so a failure here loses nothing: a copy whose reply the broker acknowledged is
        marked sent without being published again, and a batch holding a reply still in flight
        waits for it. Not for audit events (they are sealed in order)."""
        if self._producer is None:
            return
        replies = [o for o in outgoing if not o.event.type.startswith("ec.clave.audit.")]
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for o in replies:  # before any await: a relay cycle starting now sees them
            self._replying[o.event.id] = done
        producer = self._producer.current
        try:
            futures = [
                await self._producer.send(
                    o.topic,
                    o.event.to_bytes(),
                    key=o.key.encode(),
                    headers=[
                        ("content-type", CONTENT_TYPE.encode()),
                        *((k, v.encode()) for k, v in o.headers.items()),
                    ],
                )
                for o in replies
            ]
            await asyncio.gather(*futures)
            for o in replies:
                self._replied[o.event.id] = None
            while len(self._replied) > SEEN_MAX:  # copies another relay published are never looked for
                self._replied.popitem(last=False)
        except PRODUCER_BROKEN as exc:
            await self._producer.recover(exc, producer)  # the outbox copies go with the new one
            raise
        finally:
            for o in replies:
                self._replying.pop(o.event.id, None)
            done.set_result(None)

    async def _after_replies(self, docs: list[dict[str, Any]]) -> None:
        """Wait (bounded) for the replies of these documents still in flight, so that what a
        handler committed with its reply reaches the broker after it: for an accepted recovery
        request, the answer is on its way before the mail it causes can start being made (a
        portal timing answers must not see that work: no enumeration in timing)."""
        waiting = {id(f): f for d in docs if (f := self._replying.get(d.get("event_id", ""))) is not None}
        if waiting:
            await asyncio.wait(list(waiting.values()), timeout=REPLY_WAIT_S)

    async def publish_pending(self) -> int:
        """Publish one batch of the outbox; the number published. Without the lease, look
        first: a wake or a timer with nothing to publish then costs one read, no write (and
        no lease write that would wake every change stream of a store like secantusd-py)."""
        known, self._work_known = self._work_known, False
        if not self.holding and not known:
            if await self.store.db[OUTBOX].find_one({"sent": False}, {"_id": 1}) is None:
                self.metrics.outbox_pending.set(0)
                return 0
        if not await self._ensure_lease():
            return 0
        docs = await self.store.db[OUTBOX].find({"sent": False}).sort("_id", 1).limit(BATCH).to_list()
        self._remember(d["_id"] for d in docs)
        if not docs:
            self.metrics.outbox_pending.set(0)
            return 0
        read = len(docs)
        docs = await self._set_aside(docs)
        if any(d["is_audit"] and not d.get("sealed") for d in docs):
            docs = await self._seal_audit(docs)
        published, outage = await self._send(docs)
        if published:
            await self.store.db[OUTBOX].update_many(
                {"_id": {"$in": [d["_id"] for d in published]}},
                {"$set": {"sent": True, "sent_at": datetime.now(UTC)}},
            )
            self.metrics.outbox_published.inc(len(published))
        if outage is not None:
            raise outage  # what was not acknowledged is published again after the back-off
        self.metrics.outbox_pending.set(
            await self.store.db[OUTBOX].count_documents({"sent": False}) if read == BATCH else 0
        )
        return read

    # ---- what cannot be published is parked -----------------------------------------------------

    async def _set_aside(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The documents that can be published; the others are parked (before sealing: an
        unreadable audit event takes no place in the chain)."""
        kept = []
        for doc in docs:
            if doc.get("_id") in self._unparkable:
                continue
            reason = unpublishable(doc)
            if reason is None:
                kept.append(doc)
            else:
                await self._park(doc, reason, None)
        return kept

    async def _send(self, docs: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], BaseException | None]:
        """Send each document; park those refused as records. Returns what the broker
        acknowledged, and the first outage error (the rest is published again later)."""
        assert self._producer is not None
        self._sent_with = self._producer.current
        sending: list[tuple[dict[str, Any], Any]] = []
        outage: BaseException | None = None
        await self._after_replies(docs)
        replied: list[dict[str, Any]] = []
        for doc in docs:
            if doc.get("event_id") in self._replied:
                del self._replied[doc["event_id"]]
                replied.append(doc)  # on the topic already as a reply (same event id): no second record
                continue
            headers = [(k, str(v).encode()) for k, v in doc["headers"].items()]
            try:
                future = await self._producer.send(
                    doc["topic"], bytes(doc["value"]), key=doc["key"].encode(), headers=headers
                )
            except Exception as exc:
                if is_outage(exc) and not isinstance(exc, RECORD_REFUSED):
                    outage = exc  # this one and the rest again after the back-off
                    break
                await self._park(doc, "record_refused", exc)
                continue
            sending.append((doc, future))
        results = await asyncio.gather(*(f for _, f in sending), return_exceptions=True)
        published = replied
        for (doc, _), result in zip(sending, results, strict=True):
            if not isinstance(result, BaseException):
                published.append(doc)
            elif isinstance(result, RECORD_REFUSED) or not is_outage(result):
                await self._park(doc, "record_refused", result)
            elif outage is None:
                outage = result
        return published, outage

    async def _park(self, doc: dict[str, Any], reason: str, exc: BaseException | None) -> None:
        """Leave the document in the outbox, out of the relay's way (`sent: null`), with why."""
        oid = doc.get("_id")
        how = describe(exc) if exc is not None else reason
        park = self.store.update(
            OUTBOX,
            {"_id": oid, "sent": False},
            {"$set": {"sent": None, "parked": reason, "parked_error": how, "parked_at": datetime.now(UTC)}},
        )
        try:
            await self.store.apply([park])
        except PyMongoError as err:
            if is_outage(err):
                raise
            self._unparkable.add(oid)  # skipped by this relay from now on, and logged below
        self.metrics.items_parked.labels("relay", reason).inc()
        log.error("relay: outbox event %s parked (%s: %s); publishing the next ones", oid, reason, how)

    def _remember(self, ids: Any) -> None:
        for i in ids:
            self._seen[i] = None
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)

    async def _seal_audit(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Give each unsealed audit event its place in the chain, durably, before publishing.

        While this relay holds the lease it knows the chain's head (it wrote it last): the
        seals are one bulk write and the commit, each write conditional (an event not sealed
        yet, the head still where this relay left it). If a condition fails (a previous
        attempt's commit landed although its reply was lost), the slow path reads everything
        again inside the transaction, so nothing is sealed twice (that would skip sequence
        numbers in the chain)."""
        if self._chain is not None:
            try:
                return await self._seal_known_head(docs, *self._chain)
            except _ChainMoved:
                log.warning("relay: the audit chain moved under a seal (a lost reply had landed); reading it again")
            except BaseException:
                self._chain = None
                raise
        self._chain = None
        return await self._seal_read_head(docs)

    def _seals(
        self, docs: list[dict[str, Any]], seq: int, prev: str
    ) -> tuple[list[dict[str, Any]], list[Write], int, str]:
        out, writes = [], []
        for doc in docs:
            if doc["is_audit"] and not doc.get("sealed"):
                seq += 1
                value, prev = audit.seal(
                    json.loads(bytes(doc["value"])), producer=self.service, seq=seq, prev=prev, signer=self.signer
                )
                writes.append(
                    self.store.update(
                        OUTBOX,
                        {"_id": doc["_id"], "sealed": {"$ne": True}},
                        {"$set": {"value": value, "sealed": True}},
                        stale=_ChainMoved,
                        must_match=True,
                    )
                )
                doc = {**doc, "value": value, "sealed": True}
            out.append(doc)
        return out, writes, seq, prev

    async def _seal_known_head(self, docs: list[dict[str, Any]], seq0: int, hash0: str) -> list[dict[str, Any]]:
        out, writes, seq, prev = self._seals(docs, seq0, hash0)
        writes.append(
            self.store.update(
                LEASES,
                {"_id": CHAIN_ID, "seq": seq0},
                {"$set": {"seq": seq, "hash": prev}},
                upsert=True,  # the very first seal creates it; another seq collides on _id
                stale=_ChainMoved,
                must_match=True,
                race_codes=frozenset({DUPLICATE_KEY}),
            )
        )

        async def work(session: AsyncClientSession) -> None:
            await self.store.apply(writes, session)

        await self.store.in_transaction(work)
        self._chain = (seq, prev)
        return out

    async def _seal_read_head(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = [d["_id"] for d in docs]

        async def work(session: AsyncClientSession) -> tuple[list[dict[str, Any]], int, str]:
            head = await self.store.db[LEASES].find_one({"_id": CHAIN_ID}, session=session) or {
                "seq": 0,
                "hash": audit.GENESIS,
            }
            seq0 = int(head["seq"])
            current = {
                d["_id"]: d for d in await self.store.db[OUTBOX].find({"_id": {"$in": ids}}, session=session).to_list()
            }
            out, writes, seq, prev = self._seals([current[i] for i in ids if i in current], seq0, str(head["hash"]))
            writes.append(
                self.store.update(LEASES, {"_id": CHAIN_ID}, {"$set": {"seq": seq, "hash": prev}}, upsert=True)
            )
            await self.store.apply(writes, session)
            return out, seq, prev

        out, seq, prev = await self.store.in_transaction(work)
        if self.holding:
            self._chain = (seq, prev)
        return out


class _ChainMoved(Exception):
    """A conditional seal found the chain or an event not as this relay left it."""


def unpublishable(doc: dict[str, Any]) -> str | None:
    """Why this outbox document cannot be published (None: it can). Pure: it reads only the
    document, so the same document gets the same answer on every instance."""
    value, headers = doc.get("value"), doc.get("headers")
    if not (
        isinstance(doc.get("topic"), str)
        and doc["topic"]
        and isinstance(doc.get("key"), str)
        and isinstance(value, bytes)
        and isinstance(headers, dict)
        and isinstance(doc.get("is_audit"), bool)
    ):
        return "malformed_outbox_document"
    if doc["is_audit"] and not doc.get("sealed"):
        try:
            event = json.loads(value)
        except (ValueError, RecursionError):
            return "audit_event_unreadable"
        if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
            return "audit_event_unreadable"
    return None
