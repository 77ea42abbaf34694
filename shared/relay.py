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
  other process (a second instance of the service, `clave accounts import`), by a
  change stream on the outbox: one getMore that waits up to WATCH_AWAIT_S in the store;
- it holds the lease only while it has work: it takes it when woken, renews it at most
  every RENEW_S while busy (not on every cycle), and gives it back after LINGER_S
  without work, so an idle relay writes nothing, and whichever instance is woken next
  can take it at once. A busy holder's outbox reads cover every instance's events,
  and the change stream wakes it for those committed after its last read;
- a slow safety poll (SAFETY_POLL_S; FALLBACK_POLL_S when the store has no change
  streams) catches whatever a wake missed.
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
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from bson import ObjectId
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError, OperationFailure, PyMongoError

from shared import audit
from shared.auditkeys import load_signing_key
from shared.envelope import CONTENT_TYPE
from shared.kafka import client_kwargs
from shared.metrics import ServiceMetrics
from shared.settings import PlatformSettings
from shared.store import LEASES, OUTBOX, Outgoing, ServiceStore

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
CHAIN_ID = "audit-chain"
# The store cannot run change streams (a standalone server): no use retrying them.
NO_CHANGE_STREAMS = frozenset({40573, 40324, 115})


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
        self._producer: Any = None  # AIOKafkaProducer, or what a test hands to start()
        self._stopping = False
        self._held_until = 0.0  # loop time until which our lease is valid (0: not ours)
        self._other_until = 0.0  # loop time until which another relay's lease was seen valid
        self._watching = False  # the change stream is open: the safety poll can be slow
        self._released = asyncio.Event()  # set when this relay gives its lease back
        self._seen: OrderedDict[ObjectId, None] = OrderedDict()

    def wake(self) -> None:
        self._wake.set()

    @property
    def holding(self) -> bool:
        return self._held_until > self._now()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def start(self, producer: Any = None) -> None:
        """Start publishing (and watching the outbox). `producer`: tests pass a stand-in."""
        if producer is None:
            producer = AIOKafkaProducer(
                **client_kwargs(self.settings),
                client_id=f"clave-{self.service}-relay",
                enable_idempotence=True,  # forces acks=all
                linger_ms=2,
            )
            await producer.start()
        self._producer = producer
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-relay")
        self._watcher = asyncio.create_task(self._watch(), name=f"{self.service}-relay-watch")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        for task in (self._watcher, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
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
                if await self.publish_pending() > 0:
                    backoff = 0.1
                    continue
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
        self._released.set()

    # ---- publishing ----------------------------------------------------------------------------

    async def send_now(self, outgoing: list[Outgoing]) -> None:
        """Send committed events at once, outside the outbox order (replies someone waits for:
        HandlerContext.reply). Their outbox copies are published as usual later, with the same
        ids, so a failure here loses nothing. Not for audit events (they are sealed in order)."""
        if self._producer is None:
            return
        futures = [
            await self._producer.send(
                o.topic,
                value=o.event.to_bytes(),
                key=o.key.encode(),
                headers=[("content-type", CONTENT_TYPE.encode()), *((k, v.encode()) for k, v in o.headers.items())],
            )
            for o in outgoing
            if not o.event.type.startswith("ec.clave.audit.")
        ]
        await asyncio.gather(*futures)

    async def publish_pending(self) -> int:
        """Publish one batch of the outbox; the number published. Without the lease, look
        first: a wake or a timer with nothing to publish then costs one read, no write (and
        no lease write that would wake every change stream of a store like secantusd-py)."""
        if not self.holding:
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
        if any(d["is_audit"] and not d.get("sealed") for d in docs):
            docs = await self._seal_audit(docs)
        assert self._producer is not None
        futures = []
        for doc in docs:
            headers = [(k, str(v).encode()) for k, v in doc["headers"].items()]
            futures.append(
                await self._producer.send(
                    doc["topic"], value=bytes(doc["value"]), key=doc["key"].encode(), headers=headers
                )
            )
        await asyncio.gather(*futures)
        await self.store.db[OUTBOX].update_many(
            {"_id": {"$in": [d["_id"] for d in docs]}},
            {"$set": {"sent": True, "sent_at": datetime.now(UTC)}},
        )
        self.metrics.outbox_published.inc(len(docs))
        self.metrics.outbox_pending.set(
            await self.store.db[OUTBOX].count_documents({"sent": False}) if len(docs) == BATCH else 0
        )
        return len(docs)

    def _remember(self, ids: Any) -> None:
        for i in ids:
            self._seen[i] = None
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)

    async def _seal_audit(self, docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Give each unsealed audit event its place in the chain, durably, before publishing.

        The documents are read again inside the transaction: if a previous attempt's commit
        landed although its reply was lost (store restart), they are sealed already and must
        not be sealed a second time (that would skip sequence numbers in the chain)."""
        ids = [d["_id"] for d in docs]

        async def work(session: AsyncClientSession) -> list[dict[str, Any]]:
            head = await self.store.db[LEASES].find_one({"_id": CHAIN_ID}, session=session) or {
                "seq": 0,
                "hash": audit.GENESIS,
            }
            seq, prev = int(head["seq"]), str(head["hash"])
            current = {
                d["_id"]: d for d in await self.store.db[OUTBOX].find({"_id": {"$in": ids}}, session=session).to_list()
            }
            out = []
            for doc in (current[i] for i in ids if i in current):
                if doc["is_audit"] and not doc.get("sealed"):
                    seq += 1
                    value, prev = audit.seal(
                        json.loads(bytes(doc["value"])),
                        producer=self.service,
                        seq=seq,
                        prev=prev,
                        signer=self.signer,
                    )
                    await self.store.db[OUTBOX].update_one(
                        {"_id": doc["_id"]}, {"$set": {"value": value, "sealed": True}}, session=session
                    )
                    doc = {**doc, "value": value, "sealed": True}
                out.append(doc)
            await self.store.db[LEASES].update_one(
                {"_id": CHAIN_ID}, {"$set": {"seq": seq, "hash": prev}}, upsert=True, session=session
            )
            return out

        return await self.store.in_transaction(work)
