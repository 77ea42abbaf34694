"""End-to-end fixtures: the real services, the real Kafka broker, the real store, the real
SMTP capture server. `make test` starts them; these fixtures only check they answer and
never stand anything in for them."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner
from clave_portal import PortalClient, PortalSettings

from shared.acl import AUDITOR, OPERATOR, PORTAL
from shared.contract import expected_sources
from shared.crypto import keyed_hash
from shared.envelope import CONTENT_TYPE, new_event
from shared.kafka import client_kwargs
from shared.schemas import IdentityDeclined, ResetSubmitted
from shared.topics import (
    AUDIT_EVENTS,
    CONSUMED,
    IDENTITY_DECLINED,
    PASSWORD_REJECTED,
    PASSWORD_UPDATED,
    RECOVERY_RESETS,
    TOKENS_CODE_REJECTED,
    TOKENS_REDEEMED,
    EventType,
    dlq,
)
from tools.mail import Mailbox, body_text, extract_link
from tools.portal import Portal
from tools.testdata import Citizen, new_citizen, write_jsonl
from tools.watch import TopicWatcher
from tools.workbench import (
    SERVICES,
    WorkbenchSettings,
    as_principal,
    metrics_url,
    principal_properties,
    workbench_settings,
)

pytestmark = pytest.mark.e2e


def fetch(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="session")
def settings() -> WorkbenchSettings:
    return workbench_settings()


@pytest.fixture(scope="session")
def stack(settings: WorkbenchSettings) -> WorkbenchSettings:
    """Wait (with a deadline) until all four services are ready; fail clearly otherwise."""
    deadline = time.monotonic() + 90
    missing: list[str] = list(SERVICES)
    while missing and time.monotonic() < deadline:
        missing = [s for s in SERVICES if not fetch_ok(metrics_url(settings, s, "/readyz"))]
        if missing:
            time.sleep(0.5)
    if missing:
        pytest.fail(f"services not ready: {missing}. Run the suite with `make test` (it starts the stack).")
    return settings


def fetch_ok(url: str) -> bool:
    try:
        return fetch(url, timeout=2)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
async def portal(stack: WorkbenchSettings) -> AsyncIterator[Portal]:
    p = Portal(as_principal(stack, PORTAL))  # plays the portal with the portal's principal
    await p.start()
    yield p
    await p.stop()


@pytest.fixture(scope="session")
async def client(stack: WorkbenchSettings) -> AsyncIterator[PortalClient]:
    """The portal's client library (clients/python), with the portal principal's own settings."""
    async with PortalClient(
        PortalSettings.from_properties(principal_properties(PORTAL)), source="/portal/tests", timeout=60
    ) as c:
        yield c


def citizen_ip() -> str:
    """A citizen's address: many of them, so the per-address limits stay out of the way."""
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(254) + 1}"


@pytest.fixture(scope="session")
async def audit_log(stack: WorkbenchSettings) -> AsyncIterator[TopicWatcher]:
    """Every audit event published during the session."""
    w = TopicWatcher(stack, [AUDIT_EVENTS])
    await w.start()
    yield w
    await w.stop()


@pytest.fixture(scope="session")
async def dead_letters(stack: WorkbenchSettings) -> AsyncIterator[TopicWatcher]:
    w = TopicWatcher(stack, [dlq(t) for t in CONSUMED])
    await w.start()
    yield w
    await w.stop()


@pytest.fixture(scope="session")
def mailbox(stack: WorkbenchSettings) -> Mailbox:
    # This session's mail only: var/mail keeps every earlier run's (test, test-faults, demo...).
    return Mailbox(stack.mail_dir, ignore_existing=True)


# Who runs each `clave` command group: operators the accounts, auditors the audit log.
CLI_PRINCIPALS = {"accounts": OPERATOR, "audit": AUDITOR}


def cli_env(principal: str) -> dict[str, str]:
    """The environment with Kafka access as `principal` (its properties file)."""
    return {**os.environ, "KAFKA_CLIENT_PROPERTIES": str(principal_properties(principal).resolve())}


def clave_cli(*args: str, check: bool = True, principal: str | None = None) -> subprocess.CompletedProcess[str]:
    principal = principal or CLI_PRINCIPALS[args[0]]
    result = subprocess.run(
        [sys.executable, "-m", "clave.cli", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=cli_env(principal),
    )
    if check and result.returncode != 0:
        raise AssertionError(f"clave {' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


class World:
    """Test helpers that act like the people who use Clave: operator, portal, citizen."""

    def __init__(
        self,
        settings: WorkbenchSettings,
        portal: Portal,
        mailbox: Mailbox,
        audit_log: TopicWatcher,
        dead_letters: TopicWatcher,
    ) -> None:
        self.settings = settings
        self.portal = portal
        self.mailbox = mailbox
        self.audit_log = audit_log
        self.dead_letters = dead_letters

    async def register(self, *citizens: Citizen) -> list[str]:
        """Import citizens with the operator's CLI; wait until their initial keys are stored.
        Returns their internal account ids."""
        path = write_jsonl(list(citizens), Path(tempfile.mkdtemp()) / "accounts.jsonl")
        await asyncio.to_thread(clave_cli, "accounts", "import", str(path), "--operator", "op-1")
        refs = {keyed_hash(self.settings.pseudonym_key, c.national_id) for c in citizens}
        imported = await self.audit_log.wait(
            lambda _t, _h, d: d["data"].get("action") == "account_imported" and d["data"].get("subject_ref") in refs,
            count=len(citizens),
            timeout=60,
        )
        by_ref = {d["data"]["subject_ref"]: d["data"]["account_id"] for d in imported}
        ids = [by_ref[keyed_hash(self.settings.pseudonym_key, c.national_id)] for c in citizens]
        # Set or refused (a key that breaks the password service's policy): a refusal fails
        # here with its reasons rather than as a time-out.
        settled = await self.audit_log.wait(
            lambda _t, _h, d: (
                d["data"].get("action") in ("initial_key_set", "initial_key_refused")
                and d["data"].get("account_id") in ids
            ),
            count=len(ids),
            timeout=60,
        )
        refused = [d["data"]["reasons"] for d in settled if d["data"]["action"] == "initial_key_refused"]
        assert not refused, f"the password service refused initial keys: {refused}"
        return ids

    async def citizen(self, **kwargs: Any) -> Citizen:
        c = new_citizen(**kwargs)
        await self.register(c)
        return c

    async def request(self, c: Citizen, **overrides: Any) -> str:
        args: dict[str, Any] = {
            "national_id": c.national_id,
            "email_address": c.email,
            "answers": dict(c.answers),
            "profile": c.profile,
            "representative_id": c.representative_id,
            "locale": c.locale,
        }
        args.update(overrides)
        return await self.portal.request_recovery(**args)

    async def audited(self, request_id: str, action: str = "recovery_requested", timeout: float = 60) -> dict[str, Any]:
        found = await self.audit_log.wait(
            lambda _t, _h, d: d["data"].get("request_id") == request_id and d["data"].get("action") == action,
            timeout=timeout,
        )
        return found[0]["data"]  # type: ignore[no-any-return]

    async def recovery_mail(self, request_id: str, timeout: float = 60) -> tuple[Any, str]:
        mails = await self.mailbox.wait_for(lambda m: request_id in body_text(m), timeout=timeout)
        assert len(mails) == 1, f"expected exactly one recovery e-mail for {request_id}, got {len(mails)}"
        _, _, token = extract_link(mails[0])
        return mails[0], token

    def mails_to(self, address: str) -> list[Any]:
        return self.mailbox.to(address)

    async def mail_barrier(self, timeout: float = 60) -> None:
        """Before concluding "no mail was sent": a recovery for someone else, requested now, has
        been mailed. The notifier sends in queue order, so a mail wrongly queued before this one
        would have arrived by then, and the "nothing" check can see it."""
        probe = await self.citizen()
        await self.recovery_mail(await self.request(probe), timeout=timeout)


@pytest.fixture
def world(
    stack: WorkbenchSettings, portal: Portal, mailbox: Mailbox, audit_log: TopicWatcher, dead_letters: TopicWatcher
) -> World:
    return World(stack, portal, mailbox, audit_log, dead_letters)


def producer_source(topic: str) -> str:
    """The `source` the producer of `topic` gives its events (the portal names itself freely)."""
    sources = expected_sources(topic)
    return "/tests/e2e" if sources is None else sorted(sources)[0]


class Publisher:
    """Raw events, for what the portal stand-in does not say: a reset on a chosen partition or
    with a client address, and internal events published by hand (identity.declined)."""

    def __init__(self, settings: WorkbenchSettings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._partitioner = DefaultPartitioner()

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(**client_kwargs(self.settings), enable_idempotence=True)
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    def partition_of(self, key: str) -> int:
        """The partition Kafka's default partitioner gives `key` (as the portal publishes it)."""
        parts = list(range(self.settings.kafka_topic_partitions))
        return int(self._partitioner(key.encode(), parts, parts))

    async def publish(
        self,
        topic: str,
        key: str,
        event_type: str,
        data: dict[str, Any],
        correlationid: str,
        partition: int | None,
        source: str | None = None,
    ) -> str:
        """Publish as the topic's producer would name itself (`source`), unless told otherwise."""
        assert self._producer is not None
        event = new_event(
            type=event_type, source=source or producer_source(topic), data=data, correlationid=correlationid
        )
        await self._producer.send_and_wait(
            topic,
            event.to_bytes(),
            key=key.encode(),
            partition=partition,
            headers=[("content-type", CONTENT_TYPE.encode())],
        )
        return event.id

    async def reset(
        self,
        request_id: str,
        new_password: str,
        *,
        token: str | None = None,
        code: str | None = None,
        client_ip: str | None = None,
        partition: int | None = None,
    ) -> str:
        """A reset as the portal sends it (keyed by request_id), optionally on another partition."""
        data = ResetSubmitted(
            request_id=request_id, token=token, code=code, new_password=new_password, client_ip=client_ip
        ).model_dump(mode="json", exclude_none=True)
        return await self.publish(RECOVERY_RESETS, request_id, EventType.RESET_SUBMITTED, data, request_id, partition)

    async def declined(self, request_id: str, *, subject_ref: str, account_id: str | None) -> str:
        """identity.declined as identity emits it for a request it did not verify."""
        data = IdentityDeclined(request_id=request_id, account_id=account_id, subject_ref=subject_ref)
        return await self.publish(
            IDENTITY_DECLINED,
            account_id or subject_ref,
            EventType.IDENTITY_DECLINED,
            data.model_dump(mode="json", exclude_none=True),
            request_id,
            None,
        )


@pytest.fixture(scope="session")
async def publisher(stack: WorkbenchSettings) -> AsyncIterator[Publisher]:
    p = Publisher(stack)
    await p.start()
    yield p
    await p.stop()


@pytest.fixture(scope="session")
async def internal_events(stack: WorkbenchSettings) -> AsyncIterator[TopicWatcher]:
    """The internal events of the token saga published during the session."""
    w = TopicWatcher(
        stack, [IDENTITY_DECLINED, TOKENS_REDEEMED, TOKENS_CODE_REJECTED, PASSWORD_UPDATED, PASSWORD_REJECTED]
    )
    await w.start()
    yield w
    await w.stop()
