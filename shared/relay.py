"""The outbox relay: publishes a service's outbox to Kafka, in order.

One relay per service is active at a time (a lease in the service's store), so
two instances of a service share consumption but never interleave the audit
chain. A lease whose holder crashed is waited out (LEASE_S), except when that
holder was a process of this host that is gone (a service killed and
restarted): then the new relay takes over at once. A crash after publishing
but before marking `sent` republishes the same events with the same ids;
consumers drop them as duplicates, and audit readers count an identical
redelivery once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from pymongo.asynchronous.client_session import AsyncClientSession
from pymongo.errors import DuplicateKeyError, PyMongoError

from shared import audit
from shared.kafka import client_kwargs
from shared.metrics import ServiceMetrics
from shared.settings import PlatformSettings
from shared.store import LEASES, OUTBOX, ServiceStore

log = logging.getLogger(__name__)

LEASE_S = 10
BATCH = 500
CHAIN_ID = "audit-chain"


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
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None
        self._stopping = False

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            **client_kwargs(self.settings),
            client_id=f"clave-{self.service}-relay",
            enable_idempotence=True,  # forces acks=all
            linger_ms=2,
        )
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name=f"{self.service}-relay")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._producer is not None:
            await self._producer.stop()
        with contextlib.suppress(PyMongoError):
            await self.store.db[LEASES].delete_one({"_id": "relay", "owner": self.owner})

    async def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                published = await self.publish_pending()
                backoff = 0.1
                if published == 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout=0.5)
            except asyncio.CancelledError:
                raise
            except (PyMongoError, KafkaError, OSError) as exc:
                self.metrics.relay_errors.inc()
                log.warning("relay: %s; retrying in %.1fs", exc.__class__.__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    async def _acquire_lease(self) -> bool:
        now = datetime.now(UTC)
        lease = {"$set": {"owner": self.owner, "expires_at": now + timedelta(seconds=LEASE_S)}}
        try:
            await self.store.db[LEASES].update_one(
                {"_id": "relay", "$or": [{"owner": self.owner}, {"expires_at": {"$lt": now}}]}, lease, upsert=True
            )
            return True
        except DuplicateKeyError:
            pass
        # Held by another owner. If that owner was a process of this host that no longer
        # exists (the service was killed and restarted), its lease need not be waited out.
        held = await self.store.db[LEASES].find_one({"_id": "relay"}, {"owner": 1})
        if held is None or not owner_is_dead(str(held.get("owner", ""))):
            return False
        result = await self.store.db[LEASES].update_one({"_id": "relay", "owner": held["owner"]}, lease)
        if result.modified_count == 1:
            log.warning("relay: took over the lease of %s (that process is gone)", held["owner"])
            return True
        return False

    async def publish_pending(self) -> int:
        if not await self._acquire_lease():
            return 0
        docs = await self.store.db[OUTBOX].find({"sent": False}).sort("_id", 1).limit(BATCH).to_list()
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
                        key=self.settings.audit_hmac_key,
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
