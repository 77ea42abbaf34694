"""A stand-in for the upstream portal, speaking only the public topic contract.

Used by `make demo`, the bench and the end-to-end tests: it publishes recovery requests and
reset submissions exactly as the real portal must, and reads `recovery.outcomes` (with the
workbench's topic watcher, tools/watch.py). The captured e-mails are tools/mail.py's.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

from shared.envelope import CONTENT_TYPE, new_event
from shared.producer import ATTEMPTS, Producer, kafka_producer
from shared.schemas import RecoveryRequested, ResetSubmitted
from shared.settings import PlatformSettings
from shared.topics import RECOVERY_OUTCOMES, RECOVERY_REQUESTS, RECOVERY_RESETS, EventType
from tools.watch import TopicWatcher

SOURCE = "/portal/tests"


class Portal:
    producer_attempts = ATTEMPTS  # tries per send (shared.producer)

    def __init__(self, settings: PlatformSettings) -> None:
        self.settings = settings
        self.watcher = TopicWatcher(settings, [RECOVERY_OUTCOMES])
        self._producer: Producer | None = None

    async def start(self) -> None:
        self._producer = kafka_producer(self.settings, name="portal", attempts=self.producer_attempts)
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
        found: list[dict[str, Any]] = []

        def enough() -> bool:
            nonlocal found
            found = [o for o in self.outcomes(request_id) if o.get("stage") == stage]
            return len(found) >= count

        try:
            await self.watcher.wait_until(enough, timeout=timeout, what=f"outcome {count} of {request_id}/{stage}")
        except TimeoutError:
            raise TimeoutError(f"{len(found)}/{count} {stage} outcomes of {request_id}") from None
        return found[count - 1]

    def outcomes(self, request_id: str) -> list[dict[str, Any]]:
        """The request's outcomes in arrival order, each event once: an answer sent as a reply
        has its outbox copy (the same event id) published too when the relay could not know
        the reply had gone (another instance's relay, a failed reply)."""
        docs = self.watcher.matching(lambda _t, _h, doc: doc.get("data", {}).get("request_id") == request_id)
        seen: set[Any] = set()
        unique = []
        for doc in docs:
            if doc.get("id") not in seen:
                seen.add(doc.get("id"))
                unique.append(doc["data"])
        return unique
