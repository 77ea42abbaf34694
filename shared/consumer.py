"""The idempotent consumer: raw Kafka record -> validated event -> handler -> one transaction.

Every subscription of every service goes through `EventPipeline.process`:

1. parse the CloudEvent strictly, once, check that its `source` is a service
   that produces the topic (shared/contract.py; a client's topic is proven by
   the broker's ACLs instead), and validate `data` against its schema; any
   failure is a `BadInput`: the record goes to `<topic>.dlq` (through the
   outbox, with reason and origin), is counted and audited, and the consumer
   moves on;
2. run the handler, which loads state, decides, and calls `ctx.commit(...)`:
   the processed-event record, the state writes and the outgoing events are
   stored atomically; a redelivered event id is refused there (`DuplicateEvent`)
   and dead-lettered as `duplicate_event`, so it changes nothing;
3. any other exception (store or broker down) propagates after a backoff, so
   the offset is not committed and Kafka redelivers: at-least-once.

No record can stall its partition. Dead-lettering is total: the letter is built
only from what the single parse carried (never by parsing the bytes again), and
every text in it is made safe for a header, BSON and a log line. A handler that
fails the same way HANDLER_ATTEMPTS times is parked as `handler_error`; so is one
that keeps failing with an "outage" error while the store answers (an outage
that is not one). Only a store that cannot take even a minimal letter, built
from no text the record holds, keeps a record waiting (backing off).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from shared.audit import audit_event
from shared.contract import expected_sources
from shared.crypto import Purpose, SealError, SealExpired, SealMismatch, SecretBox
from shared.envelope import BadInput, CloudEvent, DeadLetterReason, describe_errors, new_event, parse_event
from shared.metrics import ServiceMetrics
from shared.schemas import AuditRecord, Payload
from shared.settings import PlatformSettings
from shared.store import DuplicateEvent, Outgoing, ServiceStore, Write, is_transient
from shared.topics import EventType, dlq

log = logging.getLogger(__name__)

HANDLER_ATTEMPTS = 3
HANDLER_ERROR = DeadLetterReason.HANDLER_ERROR  # the handler failed the same way HANDLER_ATTEMPTS times
# Store-error retries of one record while the store answers its ping: with the backoff
# (0.2 s doubling to 5 s) at least 80 s, up to about 3 minutes with the store's own
# retries; longer than a transaction left by a crashed process blocks (MongoDB: 60 s).
UNEXPLAINED_OUTAGE_ATTEMPTS = 20
DLQ_KEY_BYTES = 256
REPLY_TIMEOUT_S = 5.0  # an immediate reply not sent by then is left to the relay (its outbox copy)
DLQ_DETAIL_CHARS = 500


@dataclass
class HandlerContext:
    """What a handler gets besides its event: emit, audit and commit, nothing else."""

    service: str
    consumer: str
    topic: str
    event: CloudEvent
    store: ServiceStore
    outgoing: list[Outgoing] = field(default_factory=list)
    replies: list[Outgoing] = field(default_factory=list)  # also sent at once after the commit (see reply)
    committed: bool = False
    raw: bytes = b""  # the record exactly as received (the audit read model hashes it)
    partition: int = -1  # where the record came from (-1: not from Kafka)
    offset: int = -1

    @property
    def source(self) -> str:
        return f"/clave/{self.service}"

    def emit(self, topic: str, key: str, type: str, data: Payload, subject: str | None = None) -> CloudEvent:
        event = new_event(
            type=type,
            source=self.source,
            data=data.model_dump(mode="json"),
            correlationid=self.event.correlationid,
            causationid=self.event.id,
            subject=subject,
        )
        self.outgoing.append(Outgoing(topic=topic, key=key, event=event))
        return event

    def reply(self, topic: str, key: str, type: str, data: Payload) -> CloudEvent:
        """An answer someone waits for (a login result): stored in the outbox like any event
        (durable), and also sent as soon as the commit is done, without waiting for the relay.
        The relay then publishes the same event (same id) again: readers drop the copy."""
        event = self.emit(topic, key, type, data)
        self.replies.append(self.outgoing[-1])
        return event

    def audit(
        self,
        action: str,
        outcome: str,
        *,
        account_id: str | None = None,
        subject_ref: str | None = None,
        request_id: str | None = None,
        reasons: list[str] | None = None,
        actor: str = "system",
        details: dict[str, Any] | None = None,
    ) -> None:
        record = AuditRecord(
            service=self.service,
            action=action,
            outcome=outcome,  # type: ignore[arg-type]
            actor=actor,
            account_id=account_id,
            subject_ref=subject_ref,
            request_id=request_id,
            reasons=reasons or [],
            details=details or {},
        )
        self.outgoing.append(
            audit_event(record, correlationid=self.event.correlationid, causationid=self.event.id, source=self.source)
        )

    async def commit(self, *writes: Write) -> None:
        """Store everything at once: the processed-event record, the staged events and the
        store's intent writes (`shared.store.Write`), in one transaction, as one bulk write."""
        await self.store.commit(
            consumer=self.consumer, event_id=self.event.id, writes=list(writes), outgoing=self.outgoing
        )
        self.committed = True

    def unstage(self) -> None:
        """Drop what was staged for a decision that was not stored (a lost race: the handler
        decides again on fresh state), so its events and answer are never sent."""
        self.outgoing.clear()
        self.replies.clear()

    def refuse(self, bad: BadInput) -> BadInput:
        """`bad`, carrying what the handler staged (the answer someone waits for): the dead
        letter commits it atomically, and nothing stays staged here. Returns `bad`, to raise."""
        bad.also = list(self.outgoing)
        self.unstage()
        return bad

    def settled(self) -> None:
        """The handler stored its effect itself, in one idempotent write keyed by the event
        (the audit read model): no transaction, no processed-event record, nothing to relay."""
        assert not self.outgoing, "a handler that emits commits through the outbox"
        self.committed = True


Handler = Callable[[HandlerContext, Any], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    model: type[Payload]
    handler: Handler


# An id an answer may be keyed by (the contract's request_id / check_id shape).
_ANSWER_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


@dataclass(frozen=True)
class InvalidAnswer:
    """How a consumer of portal input answers a record it dead-letters: the portal is waiting
    for an answer keyed by the record's id (`id_field` of its data, else its record key), so
    it gets one besides the dead letter (`recovery.outcomes`: `rejected` / `reset_invalid`).
    A redelivered event (`duplicate_event`) is not answered again: its first copy was.
    `from_key=False` for a topic keyed by something else (the national ID): never echoed."""

    id_field: str
    topic: str
    event_type: str
    payload: Callable[[str], Payload]  # the answer for that id
    from_key: bool = True  # the record key is that id too (recovery.resets), so it may stand in

    def readable_id(self, data: dict[str, Any] | None, key: Any) -> str | None:
        value = data.get(self.id_field) if isinstance(data, dict) else None
        if isinstance(value, str) and _ANSWER_ID.fullmatch(value):
            return value
        if self.from_key and isinstance(key, bytes | bytearray):
            text = bytes(key).decode("utf-8", "replace")
            if _ANSWER_ID.fullmatch(text):
                return text
        return None


@dataclass
class _Tries:
    """Failed runs of one record, by kind."""

    bugs: int = 0  # handler errors that are not outages
    unexplained: int = 0  # outage errors while the store answered its ping


Parsed: TypeAlias = tuple[CloudEvent, Route, Payload]


class EventPipeline:
    def __init__(
        self,
        *,
        service: str,
        topic: str,
        routes: dict[str, Route],
        store: ServiceStore,
        settings: PlatformSettings,
        metrics: ServiceMetrics,
        on_committed: Callable[[], None],
        answer: InvalidAnswer | None = None,
        send_now: Callable[[list[Outgoing]], Awaitable[None]] | None = None,
    ) -> None:
        self.answer = answer
        self.send_now = send_now
        self.service = service
        self.topic = topic
        self.consumer = f"{service}:{topic}"
        self.routes = routes
        self.known_types = frozenset(routes)
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.on_committed = on_committed
        self.dlq_box = SecretBox(settings.dlq_keys)
        # Who may have produced what this topic carries (None: a client's topic, proven by ACLs).
        self.sources = expected_sources(topic)
        self._failure_streak = 0
        self._attempts: dict[tuple[int, int], _Tries] = {}

    async def process(self, record: ConsumerRecord[Any, Any], raw: bytes) -> None:
        """Handle or park one record. Raises (after a backoff) only to have it redelivered."""
        started = time.perf_counter()
        position = (record.partition, record.offset)
        settled = False  # handled or parked: nothing about this record is kept
        relay = True  # something went to the outbox: the relay has work
        try:
            try:
                parsed = self._parse(raw)
                if isinstance(parsed, BadInput):
                    await self._park(record, raw, parsed)
                else:
                    relay = await self._handle(record, raw, parsed)
            except asyncio.CancelledError as cancelled:
                raise not_a_stop(cancelled) from cancelled
            settled = True
        except Exception as exc:
            # Store or broker trouble (or a handler failure not yet counted out): back off,
            # then let Kafka redeliver (at-least-once).
            self._failure_streak += 1
            self.metrics.failures.labels(self.topic, exc.__class__.__name__).inc()
            delay = backoff(self._failure_streak)
            log.warning("%s: %s (redelivery in %.1fs)", self.consumer, exc.__class__.__name__, delay)
            await asyncio.sleep(delay)
            raise
        finally:
            if settled:
                self._attempts.pop(position, None)
            self.metrics.duration.labels(self.topic).observe(time.perf_counter() - started)
        self._failure_streak = 0
        if relay:
            self.on_committed()  # not for nothing: a wake with nothing to publish costs a read

    def _parse(self, raw: bytes) -> Parsed | BadInput:
        """The only parse of the record: the event, its route and its data, or why not."""
        try:
            event = parse_event(raw, max_bytes=self.settings.max_event_bytes, known_types=self.known_types)
        except BadInput as bad:
            return bad
        except Exception as exc:  # pure code on these bytes: it would fail again
            return BadInput(HANDLER_ERROR, f"parsing raised {exc.__class__.__name__}")
        if self.sources is not None and event.source not in self.sources:
            # Never echo the source given (an input value); name the expected ones.
            expected = ", ".join(sorted(self.sources)) or "none"
            return BadInput(
                DeadLetterReason.WRONG_SOURCE,
                f"source is not a producer of this topic (expected {expected})",
                correlationid=event.correlationid,
            )
        route = self.routes[event.type]
        try:
            return event, route, route.model.model_validate(event.data)
        except ValidationError as exc:
            detail = describe_errors(exc)
            return BadInput(DeadLetterReason.SCHEMA_INVALID, detail, correlationid=event.correlationid, data=event.data)
        except Exception as exc:  # a validator that crashed: the same every time
            return BadInput(
                HANDLER_ERROR, f"validation raised {exc.__class__.__name__}", correlationid=event.correlationid
            )

    async def _handle(self, record: ConsumerRecord[Any, Any], raw: bytes, parsed: Parsed) -> bool:
        """Run the handler (or park the record); whether anything went to the outbox."""
        event, route, data = parsed
        ctx = HandlerContext(
            self.service,
            self.consumer,
            self.topic,
            event,
            self.store,
            raw=raw,
            partition=record.partition,
            offset=record.offset,
        )
        try:
            await route.handler(ctx, data)
            if not ctx.committed:
                await ctx.commit()
        except DuplicateEvent:
            bad = BadInput(DeadLetterReason.DUPLICATE_EVENT, f"event {event.id} already processed")
        except BadInput as raised:
            bad = raised
        except (Exception, asyncio.CancelledError) as caught:
            exc = not_a_stop(caught)
            if not await self._counted_out(record, exc):
                if exc is caught:
                    raise
                raise exc from caught
            # Deterministic failure (a bug, not an outage): retrying forever would block the
            # partition. Park the record, with the error class, and go on.
            self.metrics.failures.labels(self.topic, exc.__class__.__name__).inc()
            log.error(
                "%s: %s on %s/%s, dead-lettering", self.consumer, exc.__class__.__name__, *record_position(record)
            )
            bad = BadInput(HANDLER_ERROR, f"handler raised {exc.__class__.__name__}")
        else:
            self.metrics.consumed.labels(self.topic, event.type).inc()
            if ctx.committed and ctx.replies:
                await self._reply_now(ctx.replies)
            return bool(ctx.outgoing)
        bad.correlationid = event.correlationid
        bad.data = event.data
        await self._park(record, raw, bad)
        return True

    async def _reply_now(self, replies: list[Outgoing]) -> None:
        """Send committed replies at once; on any failure the outbox copy still goes."""
        if self.send_now is None:
            return
        try:
            # Bounded: a producer whose sender died can leave its delivery futures pending for
            # ever, and this consumer's partitions would wait with them.
            async with asyncio.timeout(REPLY_TIMEOUT_S):
                await self.send_now(replies)
        except (Exception, asyncio.CancelledError) as exc:
            not_a_stop(exc)
            log.warning("%s: immediate reply failed (%s); the relay sends it", self.consumer, exc.__class__.__name__)

    async def _counted_out(self, record: ConsumerRecord[Any, Any], exc: Exception) -> bool:
        """Count a handler failure against its record: has it failed too often to retry?"""
        tries = self._attempts.setdefault(record_position(record), _Tries())
        if not _is_outage(exc):
            tries.bugs += 1
            return tries.bugs >= HANDLER_ATTEMPTS
        if not await self.store.ping():
            tries.unexplained = 0  # a real outage, which explains the earlier failures too
            return False
        # The store answers, yet the handler reports it away: maybe this record, not the store.
        tries.unexplained += 1
        return tries.unexplained >= UNEXPLAINED_OUTAGE_ATTEMPTS

    async def _park(self, record: ConsumerRecord[Any, Any], raw: bytes, bad: BadInput) -> None:
        """Park the record in `<topic>.dlq`, sealed (it may hold what a citizen typed), and audit it.

        Total: nothing the record holds can make it raise. It raises only when the store
        takes no letter at all (an outage), and the record is then redelivered."""
        origin = record_origin(record)
        try:
            parked = await self._commit_letter(origin, self._letter(record, raw, bad))
        except Exception as exc:
            if _is_outage(exc):
                raise
            # A bug in the letter itself: park one whose texts owe nothing to the record.
            log.error(
                "%s: dead letter for %s failed (%s), parking a minimal one",
                self.consumer,
                origin,
                exc.__class__.__name__,
            )
            letter = self._minimal_letter(record, raw, bad.reason, exc)
            parked = await self._commit_letter(origin, letter + [o for o in bad.also if isinstance(o, Outgoing)])
        if parked:
            self.metrics.dead_letters.labels(record.topic, bad.reason).inc()
            log.info("%s: dead-lettered %s (%s)", self.consumer, origin, bad.reason)

    async def _commit_letter(self, origin: str, outgoing: list[Outgoing]) -> bool:
        try:
            # Keyed by position, so a redelivered bad record is parked once.
            await self.store.commit(consumer=f"{self.consumer}:dlq", event_id=origin, writes=None, outgoing=outgoing)
        except DuplicateEvent:
            return False
        return True

    def _letter(self, record: ConsumerRecord[Any, Any], raw: bytes, bad: BadInput) -> list[Outgoing]:
        letter = self._outgoing(
            record,
            reason=bad.reason,
            detail=safe_text(bad.detail, DLQ_DETAIL_CHARS),
            correlation=bad.correlationid or record_origin(record),
            key=dlq_key(record),
            payload=self._sealed(raw),
        )
        also = [o for o in bad.also if isinstance(o, Outgoing)]
        return letter + also + self._answer(record, bad)

    def _answer(self, record: ConsumerRecord[Any, Any], bad: BadInput) -> list[Outgoing]:
        """The portal's answer to a record it will never get another one for (see InvalidAnswer)."""
        if self.answer is None or bad.reason == DeadLetterReason.DUPLICATE_EVENT or bad.also:
            return []  # (a handler that staged its own answer, bad.also, gave the portal a better one)
        answer_id = self.answer.readable_id(bad.data, record.key)
        if answer_id is None:
            return []
        event = new_event(
            type=self.answer.event_type,
            source=f"/clave/{self.service}",
            data=self.answer.payload(answer_id).model_dump(mode="json"),
            correlationid=answer_id,
        )
        return [Outgoing(topic=self.answer.topic, key=answer_id, event=event)]

    def _minimal_letter(
        self, record: ConsumerRecord[Any, Any], raw: bytes, reason: str, exc: Exception
    ) -> list[Outgoing]:
        origin = record_origin(record)
        return self._outgoing(
            record,
            reason=reason,
            detail=f"dead letter failed ({exc.__class__.__name__}): detail, key and correlation id left out",
            correlation=origin,
            key=origin,
            payload=self._sealed(raw),
        )

    def _sealed(self, raw: bytes) -> dict[str, Any]:
        # A too_large record is sealed up to the size limit only: the letter must stay
        # under the broker's message limit, or the relay could never publish it.
        kept = raw[: self.settings.max_event_bytes]
        return {
            "payload_sha256": hashlib.sha256(raw).hexdigest(),
            "payload_bytes": len(raw),
            "sealed_payload": self.dlq_box.seal_bytes(kept),
            "sealed_bytes": len(kept),
        }

    def _outgoing(
        self,
        record: ConsumerRecord[Any, Any],
        *,
        reason: str,
        detail: str,
        correlation: str,
        key: str,
        payload: dict[str, Any],
    ) -> list[Outgoing]:
        letter = new_event(
            type=EventType.DEAD_LETTER,
            source=f"/clave/{self.service}",
            data={
                "reason": reason,
                "detail": detail,
                "origin_topic": record.topic,
                "origin_partition": record.partition,
                "origin_offset": record.offset,
                **payload,
            },
            correlationid=correlation,
            subject=reason,
        )
        headers = {
            "clave-dlq-reason": reason,
            "clave-dlq-detail": detail,
            "clave-origin-topic": record.topic,
            "clave-origin-partition": str(record.partition),
            "clave-origin-offset": str(record.offset),
        }
        record_audit = AuditRecord(
            service=self.service,
            action="message_dead_lettered",
            outcome="rejected",
            reasons=[reason],
            details={"topic": record.topic, "partition": record.partition, "offset": record.offset},
        )
        return [
            Outgoing(topic=dlq(record.topic), key=key, event=letter, headers=headers),
            audit_event(record_audit, correlationid=correlation, causationid=None, source=f"/clave/{self.service}"),
        ]


def open_sealed(
    box: SecretBox,
    sealed: str,
    *,
    purpose: Purpose,
    context: dict[str, str],
    ttl_s: int | None,
    what: str,
) -> dict[str, Any]:
    """A sealed field of the event being handled, opened for `purpose` and `context` (the
    event's own identifiers); else the BadInput that dead-letters the event with its reason,
    before the handler has done anything."""
    try:
        return box.open(sealed, purpose=purpose, context=context, ttl_s=ttl_s)
    except SealMismatch as exc:
        raise BadInput(DeadLetterReason.SEALED_CONTEXT_MISMATCH, f"{what}: {exc}") from None
    except SealExpired as exc:
        raise BadInput(DeadLetterReason.SEALED_EXPIRED, f"{what}: {exc}") from None
    except SealError:
        raise BadInput(DeadLetterReason.UNDECRYPTABLE, f"{what} does not open with our keys") from None


class StrayCancellation(Exception):
    """A future the handler awaited was cancelled by someone else (a producer or connection
    closed under it) while this consumer is not being stopped."""


def not_a_stop(exc: BaseException) -> Exception:
    """`exc` as a failure to retry (or count out). A CancelledError that is not this task's own
    cancellation becomes a StrayCancellation: propagated as it is, it would end FastStream's
    consume loop for good (a task that ends cancelled is not restarted) while the consumer
    stays in its group and heartbeats, and its partitions would wait for ever, silently.
    This task's own cancellation (the service stopping) is re-raised."""
    if not isinstance(exc, asyncio.CancelledError):
        assert isinstance(exc, Exception)
        return exc
    task = asyncio.current_task()
    if task is None or task.cancelling():
        raise exc
    return StrayCancellation("an awaited operation was cancelled")


def backoff(streak: int) -> float:
    """Seconds to wait before a redelivery, after `streak` failures in a row."""
    return min(0.1 * 2 ** min(streak, 6), 5.0)


def record_position(record: ConsumerRecord[Any, Any]) -> tuple[int, int]:
    return record.partition, record.offset


def record_origin(record: ConsumerRecord[Any, Any]) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"


def dlq_key(record: ConsumerRecord[Any, Any]) -> str:
    """The letter's key: the record's own (bounded, decoded leniently), else its position."""
    key = record.key
    if not isinstance(key, bytes | bytearray) or not key:
        return record_origin(record)
    return bytes(key[:DLQ_KEY_BYTES]).decode("utf-8", "replace")


def safe_text(value: str, limit: int) -> str:
    """Printable ASCII only, at most `limit` characters: fit for a header, BSON and a log line."""
    return "".join(c if " " <= c <= "~" else "?" for c in value[:limit])


def _is_outage(exc: BaseException) -> bool:
    """Errors of the store, the broker or the network: retried for as long as they last."""
    return is_transient(exc) or isinstance(exc, KafkaError | OSError | TimeoutError)
