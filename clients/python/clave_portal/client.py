"""PortalClient: the portal's whole conversation with Clave over Kafka.

It publishes what the portal sends (`recovery.requests`, `recovery.resets`, `login.checks`,
`account.contact_updates`) as
valid CloudEvents with the portal principal's credentials, and reads the answers
(`recovery.outcomes`, `login.results`, `account.contact_results`) with one background consumer that every instance runs
over every partition (by assignment, from the end at start: each instance sees the answers to
what it sent, and no consumer group has to be shared). Answers are correlated by
`request_id` / `check_id` within a deadline; redelivered answers (the same event id) count once.
`key_changes()` streams `account.key_changed` so the portal can end other sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import OrderedDict
from collections.abc import Callable
from types import TracebackType
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from clave_portal import events as ev
from clave_portal.errors import ClaveError, ClaveTimeout
from clave_portal.models import ContactResult, KeyChange, Locale, LoginResult, Outcome, Profile
from clave_portal.producer import Producer
from clave_portal.sealing import InputSealer, PlainInput
from clave_portal.settings import PortalSettings

DEFAULT_TIMEOUT_S = 30.0
ANSWER_CACHE = 50_000  # answer ids remembered (a late waiter still finds its answer)
Event = dict[str, Any]
Predicate = Callable[[Event], bool]


class _Answers:
    """The answer topics, read into a bounded cache of events by answer id."""

    def __init__(self, settings: PortalSettings, topics: dict[str, str]) -> None:
        self._settings = settings
        self._topics = topics  # topic -> the data field its answers are keyed by
        self._by_id: OrderedDict[str, list[Event]] = OrderedDict()
        self._seen: OrderedDict[str, None] = OrderedDict()  # event ids (at-least-once: dedupe)
        self._signals: dict[str, set[asyncio.Event]] = {}  # answer id -> one event per waiter
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = AIOKafkaConsumer(**self._settings.kafka_kwargs(), enable_auto_commit=False)
        await consumer.start()
        self._consumer = consumer
        partitions: list[TopicPartition] = []
        for topic in self._topics:
            found = consumer.partitions_for_topic(topic)
            if not found:
                await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call
                found = consumer.partitions_for_topic(topic) or set()
            if not found:
                raise ClaveError(f"topic {topic} not found (or not readable with these credentials)")
            partitions += [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the end now: nothing published after start() is missed
            await consumer.position(tp)
        self._task = asyncio.create_task(self._collect(), name="clave-portal-answers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            with contextlib.suppress(asyncio.CancelledError, KafkaError):
                await self._consumer.stop()

    async def _collect(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500)
            except KafkaError:
                await asyncio.sleep(0.5)  # a broker restart: keep reading
                continue
            for records in batch.values():
                for record in records:
                    self._take(record.topic, record.value)

    def _take(self, topic: str, value: bytes | None) -> None:
        try:
            event = json.loads(value or b"")
            answer_id = event["data"][self._topics[topic]]
            event_id = event["id"]
        except (ValueError, TypeError, KeyError, RecursionError):
            return  # not an answer we can read: nobody waits for it
        if not isinstance(answer_id, str) or event_id in self._seen:
            return
        self._seen[event_id] = None
        if len(self._seen) > 4 * ANSWER_CACHE:
            self._seen.popitem(last=False)
        self._by_id.setdefault(answer_id, []).append(event)
        self._by_id.move_to_end(answer_id)
        if len(self._by_id) > ANSWER_CACHE:
            self._by_id.popitem(last=False)
        for signal in self._signals.get(answer_id, ()):
            signal.set()

    def mark(self, answer_id: str) -> int:
        """How many answers for this id are here now (wait for one after them)."""
        return len(self._by_id.get(answer_id, ()))

    async def wait(self, answer_id: str, predicate: Predicate, *, after: int, timeout: float) -> Event:
        """The first answer for `answer_id` after the first `after` ones that `predicate` accepts."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        signal = asyncio.Event()
        self._signals.setdefault(answer_id, set()).add(signal)
        try:
            while True:
                for event in self._by_id.get(answer_id, [])[after:]:
                    if predicate(event):
                        return event
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise ClaveTimeout(f"no answer for {answer_id} within {timeout:g} s")
                signal.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(signal.wait(), remaining)
        finally:
            waiting = self._signals.get(answer_id, set())
            waiting.discard(signal)
            if not waiting:
                self._signals.pop(answer_id, None)


class KeyChanges:
    """`account.key_changed` as an async iterator of `KeyChange`.

    With a `group_id` (it must start with `portal`, the portal principal's group prefix) the
    instances of a portal share the changes and each is handled once: a change is committed when
    the next one is asked for (at least once). Without one, this iterator reads every partition
    from the moment it starts. Call `start()` (or `async with`) to be sure nothing published
    after that moment is missed; iterating starts it otherwise."""

    def __init__(self, settings: PortalSettings, group_id: str | None) -> None:
        if group_id is not None and not group_id.startswith("portal"):
            raise ClaveError("a key-change group id must start with 'portal' (the portal principal's groups)")
        self._settings = settings
        self._group_id = group_id
        self._consumer: AIOKafkaConsumer | None = None
        self._pending_commit = False
        self._seen: OrderedDict[str, None] = OrderedDict()

    async def start(self) -> KeyChanges:
        if self._consumer is not None:
            return self
        kwargs = self._settings.kafka_kwargs()
        if self._group_id is None:
            consumer = AIOKafkaConsumer(**kwargs, enable_auto_commit=False)
            await consumer.start()
            await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call
            tps = [
                TopicPartition(ev.ACCOUNT_KEY_CHANGED, p)
                for p in sorted(consumer.partitions_for_topic(ev.ACCOUNT_KEY_CHANGED) or ())
            ]
            consumer.assign(tps)
            await consumer.seek_to_end(*tps)
            for tp in tps:
                await consumer.position(tp)
        else:
            consumer = AIOKafkaConsumer(
                ev.ACCOUNT_KEY_CHANGED,
                **kwargs,
                group_id=self._group_id,
                enable_auto_commit=False,
                auto_offset_reset="latest",
            )
            await consumer.start()
        self._consumer = consumer
        return self

    async def aclose(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(asyncio.CancelledError, KafkaError):
                await self._consumer.stop()
            self._consumer = None

    async def __aenter__(self) -> KeyChanges:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> KeyChanges:
        return self

    async def __anext__(self) -> KeyChange:
        consumer = (await self.start())._consumer
        assert consumer is not None
        if self._pending_commit and self._group_id is not None:
            await consumer.commit()  # the previous change was handled
        self._pending_commit = False
        while True:
            record = await consumer.getone()
            try:
                change = KeyChange.from_event(json.loads(record.value or b""))
            except (ValueError, TypeError, KeyError, RecursionError):
                continue
            if change.event_id in self._seen:
                continue  # a redelivery
            self._seen[change.event_id] = None
            if len(self._seen) > ANSWER_CACHE:
                self._seen.popitem(last=False)
            self._pending_commit = True
            return change


class PortalClient:
    """The portal's client. Use as `async with PortalClient(settings) as clave: ...`.

    `settings`: the portal principal's Kafka connection (`PortalSettings.from_properties`).
    `source`: the CloudEvents `source` the portal names itself with.
    `sealer`: what seals secret input before it is sent (`PlainInput`: development only).
    `timeout`: the default deadline, in seconds, for an answer.
    `on_producer_event(event, error)`: told when the producer is replaced ("replaced": aiokafka's
    idempotence broke it) or a send is retried ("retried"), e.g. to count them."""

    def __init__(
        self,
        settings: PortalSettings,
        *,
        source: str = "/portal",
        sealer: InputSealer | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        on_producer_event: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.sealer: InputSealer = sealer or PlainInput()
        self.timeout = timeout
        self.on_producer_event = on_producer_event
        self._producer: Producer | None = None
        self._answers = _Answers(
            settings,
            {ev.RECOVERY_OUTCOMES: "request_id", ev.LOGIN_RESULTS: "check_id", ev.CONTACT_RESULTS: "update_id"},
        )

    async def start(self) -> None:
        producer = Producer(self._new_producer, on_event=self.on_producer_event)
        await producer.start()
        self._producer = producer
        await self._answers.start()

    async def _new_producer(self) -> AIOKafkaProducer:
        producer = AIOKafkaProducer(**self.settings.kafka_kwargs(), enable_idempotence=True, acks="all")
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()  # no "Unclosed AIOKafkaProducer" besides the error
            raise
        return producer

    async def stop(self) -> None:
        await self._answers.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    async def __aenter__(self) -> PortalClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def _send(self, topic: str, key: str, event_type: str, data: dict[str, Any], correlationid: str) -> None:
        if self._producer is None:
            raise ClaveError("the client is not started (use `async with PortalClient(...)` or `await start()`)")
        event = ev.cloud_event(
            event_type, self.sealer.seal(event_type, data), source=self.source, correlationid=correlationid
        )
        await self._producer.send_and_wait(
            topic, ev.encode(event), key=key.encode(), headers=[("content-type", ev.CONTENT_TYPE.encode())]
        )

    # ---- recovery --------------------------------------------------------------------------------

    async def request_recovery(
        self,
        *,
        national_id: str,
        email: str,
        answers: dict[str, str],
        client_ip: str,
        captcha_passed: bool,
        profile: Profile = "affiliate",
        representative_id: str | None = None,
        locale: Locale = "es",
        request_id: str | None = None,
    ) -> str:
        """Ask for a recovery e-mail; returns the request_id (the link carries it back). Its
        answer (`request_outcome`) is `accepted` whatever the account; `rejected` only for a
        repeated request_id (`duplicate_request`) or a request Clave could not process
        (`request_invalid`, `plaintext_refused`, `sealed_invalid`)."""
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        data: dict[str, Any] = {
            "request_id": request_id,
            "profile": profile,
            "national_id": national_id,
            "email": email,
            "answers": dict(answers),
            "captcha_passed": captcha_passed,
            "locale": locale,
            "client_ip": client_ip,
        }
        if representative_id is not None:
            data["representative_id"] = representative_id
        # Keyed by national ID (contract): one citizen's requests stay in order.
        await self._send(ev.RECOVERY_REQUESTS, national_id, ev.RECOVERY_REQUESTED, data, request_id)
        return request_id

    async def request_outcome(self, request_id: str, *, timeout: float | None = None) -> Outcome:
        """The answer to a recovery request: `accepted`, or `rejected` with one reason
        (`duplicate_request`, `request_invalid`, `plaintext_refused`, `sealed_invalid`: see
        `Outcome.invalid`). Raises ClaveTimeout when none came within the deadline."""
        event = await self._answers.wait(
            request_id, lambda e: e["data"].get("stage") == "request", after=0, timeout=timeout or self.timeout
        )
        return Outcome.from_event(event)

    async def submit_reset(
        self,
        request_id: str,
        *,
        new_password: str,
        token: str | None = None,
        code: str | None = None,
        client_ip: str | None = None,
        timeout: float | None = None,
    ) -> Outcome:
        """Submit the link's token (or the e-mailed code) and the new key; returns Clave's answer
        to this reset (`completed`, or `rejected` with its reasons). Raises ClaveTimeout when no
        answer came within the deadline."""
        if (token is None) == (code is None):
            raise ClaveError("give exactly one of token or code")
        data: dict[str, Any] = {"request_id": request_id, "new_password": new_password}
        data.update({"token": token} if token is not None else {"code": code})
        if client_ip is not None:
            data["client_ip"] = client_ip
        after = self._answers.mark(request_id)
        await self._send(ev.RECOVERY_RESETS, request_id, ev.RESET_SUBMITTED, data, request_id)
        event = await self._answers.wait(
            request_id, lambda e: e["data"].get("stage") == "reset", after=after, timeout=timeout or self.timeout
        )
        return Outcome.from_event(event)

    # ---- login -----------------------------------------------------------------------------------

    async def login(
        self, national_id: str, key: str, *, client_ip: str, check_id: str | None = None, timeout: float | None = None
    ) -> LoginResult:
        """Check a citizen's key; the answer with its reason (`throttled`: ask the citizen to
        wait). `client_ip` is the citizen's address: wrong keys are throttled per address block."""
        check_id = check_id or f"chk-{uuid.uuid4().hex}"
        data = {"check_id": check_id, "national_id": national_id, "key": key, "client_ip": client_ip}
        after = self._answers.mark(check_id)
        await self._send(ev.LOGIN_CHECKS, national_id, ev.LOGIN_CHECK_REQUESTED, data, check_id)
        event = await self._answers.wait(check_id, lambda _e: True, after=after, timeout=timeout or self.timeout)
        return LoginResult.from_event(event)

    async def check_credentials(
        self, national_id: str, key: str, *, client_ip: str, timeout: float | None = None
    ) -> bool:
        """Is `key` the citizen's current key? False alike for a wrong key, an unknown ID and a
        throttled check (use `login` for the reason)."""
        return (await self.login(national_id, key, client_ip=client_ip, timeout=timeout)).valid

    # ---- contact data ----------------------------------------------------------------------------

    async def update_contact(
        self,
        national_id: str,
        key: str,
        *,
        client_ip: str,
        email: str | None = None,
        backup_email: str | None = None,
        phone: str | None = None,
        update_id: str | None = None,
        timeout: float | None = None,
    ) -> ContactResult:
        """Change a logged-in citizen's contact data; `key` is their current key, checked as a
        login's (same throttling). Give any of `email`, `backup_email`, `phone` (E.164 or
        Ecuadorian national format); `""` removes the backup e-mail or the phone. Every address
        on file before is told and live recovery links are revoked."""
        if email is None and backup_email is None and phone is None:
            raise ClaveError("give at least one of email, backup_email, phone")
        update_id = update_id or f"upd-{uuid.uuid4().hex}"
        data: dict[str, Any] = {"update_id": update_id, "national_id": national_id, "key": key, "client_ip": client_ip}
        for name, value in (("email", email), ("backup_email", backup_email), ("phone", phone)):
            if value is not None:
                data[name] = value
        after = self._answers.mark(update_id)
        await self._send(ev.CONTACT_UPDATES, national_id, ev.CONTACT_UPDATE_REQUESTED, data, update_id)
        event = await self._answers.wait(update_id, lambda _e: True, after=after, timeout=timeout or self.timeout)
        return ContactResult.from_event(event)

    # ---- key changes -----------------------------------------------------------------------------

    def key_changes(self, *, group_id: str | None = None) -> KeyChanges:
        """`async for change in client.key_changes(): ...` (see KeyChanges)."""
        return KeyChanges(self.settings, group_id)
