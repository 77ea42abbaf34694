"""A stand-in for the upstream portal, speaking only the public topic contract.

Used by `make demo` and the end-to-end tests: it publishes recovery requests and
reset submissions exactly as the real portal must, reads `recovery.outcomes`,
and reads the captured e-mails from the mail catcher's folder (`MAIL_DIR`).
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import re
import secrets
import time
import uuid
import weakref
from collections.abc import Callable
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from shared.envelope import CONTENT_TYPE, new_event
from shared.kafka import client_kwargs
from shared.schemas import RecoveryRequested, ResetSubmitted
from shared.settings import PlatformSettings
from shared.topics import RECOVERY_OUTCOMES, RECOVERY_REQUESTS, RECOVERY_RESETS, EventType

SOURCE = "/portal/tests"


async def stop_background_consumer(task: asyncio.Task[None] | None, consumer: AIOKafkaConsumer | None) -> None:
    """Stop a task that polls `consumer`, then the consumer. aiokafka's fetcher can surface its
    own cancelled retry sleep (or a broker error) on close: neither matters once we stop."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if consumer is not None:
        with contextlib.suppress(asyncio.CancelledError, KafkaError):
            await consumer.stop()


class TopicWatcher:
    """Collects every record published to some topics from the moment it starts."""

    def __init__(self, settings: PlatformSettings, topics: list[str]) -> None:
        self.settings = settings
        self.topics = topics
        self.records: list[tuple[str, dict[str, str], dict[str, Any]]] = []  # topic, headers, event
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.errors: list[str] = []

    async def start(self) -> None:
        self._consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        await self._consumer.start()
        await self._consumer._client.force_metadata_update()  # noqa: SLF001 - no public call
        tps = [
            TopicPartition(topic, p)
            for topic in self.topics
            for p in sorted(self._consumer.partitions_for_topic(topic) or set())
        ]
        self._consumer.assign(tps)
        await self._consumer.seek_to_end(*tps)
        for tp in tps:  # resolve the end position now, so nothing published later is missed
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        await stop_background_consumer(self._task, self._consumer)

    async def _collect(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batch = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as exc:  # e.g. while the broker restarts: keep watching
                self.errors.append(exc.__class__.__name__)
                await asyncio.sleep(0.5)
                continue
            for messages in batch.values():
                for msg in messages:
                    try:
                        doc = json.loads(msg.value)
                    except (ValueError, TypeError, RecursionError):
                        doc = {"unparseable": True}
                    headers = {k: v.decode("utf-8", "replace") for k, v in (msg.headers or [])}
                    self.records.append((msg.topic, headers, doc))
            if batch:
                self._changed.set()

    def matching(self, predicate: Callable[[str, dict[str, str], dict[str, Any]], bool]) -> list[dict[str, Any]]:
        return [doc for topic, headers, doc in list(self.records) if predicate(topic, headers, doc)]

    async def wait(
        self,
        predicate: Callable[[str, dict[str, str], dict[str, Any]], bool],
        timeout: float = 60.0,
        count: int = 1,
    ) -> list[dict[str, Any]]:
        """At least `count` records matching `predicate`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(predicate)
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{len(found)}/{count} matching records on {self.topics} in {timeout}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))


class Portal:
    def __init__(self, settings: PlatformSettings) -> None:
        self.settings = settings
        self.watcher = TopicWatcher(settings, [RECOVERY_OUTCOMES])
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**client_kwargs(self.settings), enable_idempotence=True)
        await self._producer.start()
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()
        if self._producer:
            await self._producer.stop()

    async def _send(self, topic: str, key: str, event_type: str, data: dict[str, Any], request_id: str) -> str:
        assert self._producer is not None
        event = new_event(type=event_type, source=SOURCE, data=data, correlationid=request_id)
        await self._producer.send_and_wait(
            topic, event.to_bytes(), key=key.encode(), headers=[("content-type", CONTENT_TYPE.encode())]
        )
        return event.id

    async def request_recovery(
        self,
        *,
        national_id: str,
        email_address: str,
        answers: dict[str, str],
        profile: str = "affiliate",
        representative_id: str | None = None,
        captcha_passed: bool = True,
        locale: str = "es",
        client_ip: str | None = None,
        request_id: str | None = None,
    ) -> str:
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        # Citizens come from many addresses; a fixed one would trip the per-IP limit in tests.
        client_ip = client_ip or f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"
        data = RecoveryRequested.model_validate(
            {
                "request_id": request_id,
                "profile": profile,
                "national_id": national_id,
                "representative_id": representative_id,
                "email": email_address,
                "answers": answers,
                "captcha_passed": captcha_passed,
                "locale": locale,
                "client_ip": client_ip,
            }
        ).model_dump(mode="json")
        # Keyed by national ID (contract): one citizen's requests stay in order.
        await self._send(RECOVERY_REQUESTS, national_id, EventType.RECOVERY_REQUESTED, data, request_id)
        return request_id

    async def submit_reset(
        self, request_id: str, new_password: str, *, token: str | None = None, code: str | None = None
    ) -> None:
        data = ResetSubmitted(request_id=request_id, token=token, code=code, new_password=new_password).model_dump(
            mode="json", exclude_none=True
        )
        await self._send(RECOVERY_RESETS, request_id, EventType.RESET_SUBMITTED, data, request_id)

    async def wait_outcome(self, request_id: str, stage: str, timeout: float = 60.0, count: int = 1) -> dict[str, Any]:
        """The `count`-th outcome of `stage` for the request, waiting up to `timeout` seconds."""
        found = await self.watcher.wait(
            lambda _t, _h, doc: (
                doc.get("data", {}).get("request_id") == request_id and doc["data"].get("stage") == stage
            ),
            timeout=timeout,
            count=count,
        )
        return found[count - 1]["data"]  # type: ignore[no-any-return]

    def outcomes(self, request_id: str) -> list[dict[str, Any]]:
        return [
            d["data"]
            for d in self.watcher.matching(lambda _t, _h, doc: doc.get("data", {}).get("request_id") == request_id)
        ]


class _ParsedOnce(HeaderRegistry):
    """email.policy.default parses a header again on every access (`msg["To"]`), and tests
    poll the whole folder many times a second: each distinct header is parsed once. Header
    values never change (a message file is written whole and never edited)."""

    def __init__(self) -> None:
        super().__init__()
        self._parsed: dict[tuple[str, str], BaseHeader] = {}

    def __call__(self, name: str, value: str) -> BaseHeader:
        key = (name.lower(), value)
        header = self._parsed.get(key)
        if header is None:
            header = self._parsed[key] = super().__call__(name, value)
        return header


MAIL_POLICY = email.policy.default.clone(header_factory=_ParsedOnce())


class Mailbox:
    """The mail catcher's folder: one .eml file per accepted message.

    `new_only`: only the messages that arrive after this object is made. The folder keeps
    every earlier run's mail (make test, test-faults, test-scale, demo...); a test session
    looks only at its own (its citizens are new), and each poll stays as cheap as its own
    mail count allows, however long the folder has grown."""

    def __init__(self, mail_dir: str | Path, *, new_only: bool = False) -> None:
        self.dir = Path(mail_dir)
        self._cache: dict[Path, EmailMessage] = {}
        self._earlier = self.snapshot() if new_only else set()

    def messages(self) -> list[tuple[Path, EmailMessage]]:
        out = []
        for path in sorted(self.dir.glob("*.eml")):
            if path in self._earlier:
                continue
            msg = self._cache.get(path)
            if msg is None:  # files appear whole (written, then renamed) and never change
                with path.open("rb") as fh:
                    msg = email.message_from_binary_file(fh, policy=MAIL_POLICY)  # type: ignore[assignment]
                self._cache[path] = msg  # type: ignore[assignment]
            out.append((path, msg))
        return out  # type: ignore[return-value]

    def to(self, address: str) -> list[EmailMessage]:
        return [m for _, m in self.messages() if address.lower() in str(m["To"]).lower()]

    def snapshot(self) -> set[Path]:
        """The messages already here, to ignore in a later `wait_for(..., after=...)`."""
        return set(self.dir.glob("*.eml"))

    async def wait_for(
        self,
        predicate: Callable[[EmailMessage], bool],
        timeout: float = 60.0,
        count: int = 1,
        after: set[Path] | None = None,
    ) -> list[EmailMessage]:
        deadline = time.monotonic() + timeout
        while True:
            found = [m for p, m in self.messages() if (after is None or p not in after) and predicate(m)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(found)}/{count} matching e-mails within {timeout}s")
            await asyncio.sleep(0.1)  # polling a folder: the condition is re-checked until the deadline


_BODIES: weakref.WeakKeyDictionary[EmailMessage, str] = weakref.WeakKeyDictionary()


def body_text(msg: EmailMessage) -> str:
    """The plain-text part (decoded once per message: predicates read it on every poll)."""
    text = _BODIES.get(msg)
    if text is None:
        part = msg.get_body(preferencelist=("plain",))
        text = _BODIES[msg] = part.get_content() if part is not None else ""
    return text


def extract_link(msg: EmailMessage) -> tuple[str, str, str]:
    """(link, request_id, token) from a recovery e-mail."""
    match = re.search(r"https?://\S+recuperar\?\S+", body_text(msg))
    if match is None:
        raise ValueError("no recovery link in the e-mail")
    link = match.group(0).rstrip(".)>")
    query = parse_qs(urlsplit(link).query)
    return link, query["request_id"][0], query["token"][0]


def extract_code(msg: EmailMessage) -> str:
    match = re.search(r"\b(\d{6})\b", body_text(msg))
    if match is None:
        raise ValueError("no 6-digit code in the e-mail")
    return match.group(1)
