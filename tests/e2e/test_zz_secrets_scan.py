"""After the end-to-end run (this file runs last): no secret used in the run appears in any
topic but the portal inputs (and in those, not in any record sent sealed; with
PORTAL_INPUT=sealed, in none), in any collection of any store, in any log file or in any
/metrics output. Secrets: every security answer and key the tests made, and every token,
code and key that crossed the portal topics or reached a mailbox.

It first drives traffic of its own (`drive`: accounts imported, recoveries by link and by code,
in the clear and sealed, logins with right and wrong keys), so it proves as much when it runs
alone as after the whole suite: at least MIN_OWN_SECRETS secrets of its own, every kind of
secret, every path they take."""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
from bson import json_util
from clave_portal import HpkeSealer, PortalClient, PortalSettings
from pymongo import AsyncMongoClient

from shared.acl import PORTAL
from shared.kafka import client_kwargs
from shared.kafkaio import read_topic
from shared.topics import PORTAL_INPUTS
from tests.e2e.conftest import SERVICES, World, citizen_ip, fetch, metrics_url
from tools.mail import Mailbox, body_text, extract_code
from tools.testdata import SECRETS_MADE, Citizen, new_citizen, new_key
from tools.workbench import WorkbenchSettings, principal_properties

T = TypeVar("T")

pytestmark = pytest.mark.e2e

WORD = re.compile(r"[A-Za-z0-9_\-]+")
MIN_OWN_SECRETS = 100  # driven by this test alone: a scan that proves something even when run alone
CITIZENS = 30  # each brings a fingerprint code and an initial key of its own (answers repeat)
RECOVERIES = 12  # half by link, half by code: each a mailed token and code, and a new key
SEALED = 2  # of those, sent sealed (answers, new key, login key): the sealed input is scanned too
PARALLEL = 6
# A code must stand alone: not inside base64, hex, a decimal fraction or a time of day.
CODE_EDGE = r"(?<![A-Za-z0-9_\-+/=.:]){}(?![A-Za-z0-9_\-+/=])"


async def portal_inputs(settings: WorkbenchSettings) -> tuple[set[str], set[str]]:
    """What citizens typed: answers, tokens, keys (words) and codes, from the portal's input topics."""
    words: set[str] = set()
    codes: set[str] = set()
    for topic in PORTAL_INPUTS:
        async for record in read_topic(settings, topic):
            try:
                data = json.loads(record.value).get("data") or {}
            except (ValueError, AttributeError, RecursionError):
                continue  # the poison records of the dead-letter tests: nothing a citizen typed
            if not isinstance(data, dict):
                continue
            answers = data.get("answers")
            if isinstance(answers, dict):
                words.update(str(a) for a in answers.values())
            for field in ("token", "new_password", "key"):
                if isinstance(data.get(field), str):
                    words.add(data[field])
            if isinstance(data.get("code"), str):
                codes.add(data["code"])
    return words, codes


def mailed(settings: WorkbenchSettings) -> tuple[set[str], set[str]]:
    words, codes = set(), set()
    for _, msg in Mailbox(settings.mail_dir).messages():
        text = body_text(msg)
        words.update(re.findall(r"token=([A-Za-z0-9_\-]{20,})", text))
        codes.update(re.findall(r"(?<!\d)(\d{6})(?!\d)", text) if "recuperar?" in text else [])
    return words, codes


def sent_sealed(value: bytes) -> bool:
    """A portal input record whose secrets came sealed (a `sealed_*` field in its data)."""
    try:
        data = json.loads(value).get("data")
    except (ValueError, AttributeError, RecursionError):
        return False
    return isinstance(data, dict) and any(str(k).startswith("sealed_") and v is not None for k, v in data.items())


def without_link_secrets(value: bytes) -> str:
    """A portal record without a reset's `token` or `code`: the contract does not seal those (they
    come from the citizen's own mail, are single-use and live 30 / 10 minutes)."""
    try:
        doc = json.loads(value)
        doc["data"].pop("token", None)
        doc["data"].pop("code", None)
    except (ValueError, AttributeError, KeyError, TypeError, RecursionError):
        return value.decode("utf-8", "replace")
    return json.dumps(doc, ensure_ascii=False)


async def sealed_portal_input(settings: WorkbenchSettings) -> list[tuple[str, str]]:
    """With sealing on (PORTAL_INPUT=sealed), the portal's input topics too: every record. The
    local stack runs `any`: then the records the portal sent sealed (tests/e2e/test_contacts.py),
    which must hold no secret in the clear either."""
    every = os.environ.get("PORTAL_INPUT") == "sealed"
    out = []
    for topic in PORTAL_INPUTS:
        chunks = []
        async for record in read_topic(settings, topic):
            if every or sent_sealed(record.value):
                chunks.append(without_link_secrets(record.value))
        out.append((f"topic {topic} ({'every record' if every else 'sealed records'})", "\n".join(chunks)))
    return out


async def sources(settings: WorkbenchSettings) -> list[tuple[str, str]]:
    """(name, text) for every place a secret must never be."""
    from aiokafka.admin import AIOKafkaAdminClient

    out: list[tuple[str, str]] = []
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if not t.startswith("__")]
    finally:
        await admin.close()
    for topic in sorted(set(topics) - set(PORTAL_INPUTS)):
        chunks = []
        async for record in read_topic(settings, topic):
            chunks.append(record.value.decode("utf-8", "replace"))
            chunks.extend(f"{k}={v}" for k, v in record.headers.items())
        out.append((f"topic {topic}", "\n".join(chunks)))
    out += await sealed_portal_input(settings)
    client: AsyncMongoClient = AsyncMongoClient(settings.mongodb_uri)
    try:
        for db_name in await client.list_database_names():
            if not db_name.startswith(settings.mongodb_db_prefix):
                continue
            for collection in await client[db_name].list_collection_names():
                docs = await client[db_name][collection].find().to_list()
                out.append((f"store {db_name}.{collection}", json_util.dumps(docs)))
    finally:
        await client.close()
    log_dir = Path(os.environ.get("VAR_DIR", "var")) / "log"
    for path in sorted(log_dir.glob("*.log")):
        out.append((f"log {path.name}", path.read_text(encoding="utf-8", errors="replace")))
    for service in SERVICES:
        out.append((f"metrics {service}", fetch(metrics_url(settings, service))[1]))
    return out


@pytest.fixture
async def sealed_client(stack: WorkbenchSettings) -> AsyncIterator[PortalClient]:
    """The portal as production runs it: every secret sealed to Clave's public key."""
    default = Path(os.environ.get("VAR_DIR", "var")) / "portal" / "sealing-public.pem"
    public = os.environ.get("PORTAL_SEALING_PUBLIC_KEY") or str(default)
    async with PortalClient(
        PortalSettings.from_properties(principal_properties(PORTAL)),
        source="/portal/tests",
        sealer=HpkeSealer.from_file(public),
        timeout=60,
    ) as c:
        yield c


async def bounded(jobs: list[Awaitable[T]]) -> list[T]:
    gate = asyncio.Semaphore(PARALLEL)

    async def one(job: Awaitable[T]) -> T:
        async with gate:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs))


async def recover(world: World, portal: PortalClient, c: Citizen, *, by_code: bool) -> set[str]:
    """A whole recovery through the portal client: request, mail, reset with a new key, a login
    with it and one with a wrong key. The secrets it used (the mailed code aside)."""
    rid = await portal.request_recovery(
        national_id=c.national_id,
        email=c.email,
        answers=dict(c.answers),
        client_ip=citizen_ip(),
        captcha_passed=True,
        locale=c.locale,  # type: ignore[arg-type]
    )
    assert (await portal.request_outcome(rid)).accepted
    mail, token = await world.recovery_mail(rid)
    key = new_key()
    if by_code:
        outcome = await portal.submit_reset(rid, code=extract_code(mail), new_password=key)
    else:
        outcome = await portal.submit_reset(rid, token=token, new_password=key)
    assert outcome.completed, outcome
    wrong = new_key()
    assert await portal.check_credentials(c.national_id, key, client_ip=citizen_ip())
    assert not await portal.check_credentials(c.national_id, wrong, client_ip=citizen_ip())
    return {token, key, wrong}


async def log_in(portal: PortalClient, c: Citizen) -> set[str]:
    """A login with the initial key and one with a wrong key."""
    wrong = new_key()
    assert await portal.check_credentials(c.national_id, c.password, client_ip=citizen_ip())
    assert not await portal.check_credentials(c.national_id, wrong, client_ip=citizen_ip())
    return {wrong}


async def drive(world: World, client: PortalClient, sealed_client: PortalClient) -> set[str]:
    """This test's own traffic; the secrets it used."""
    citizens = [new_citizen() for _ in range(CITIZENS)]
    await world.register(*citizens)
    used = {s for c in citizens for s in (c.password, *c.answers.values())}
    jobs: list[Awaitable[set[str]]] = []
    for n, c in enumerate(citizens):
        portal = sealed_client if n < SEALED else client
        if n < RECOVERIES:
            jobs.append(recover(world, portal, c, by_code=n % 2 == 1))
        else:
            jobs.append(log_in(portal, c))
    for found in await bounded(jobs):
        used |= found
    return used


async def test_no_secret_appears_outside_the_portal_inputs_and_the_mailbox(
    world: World, client: PortalClient, sealed_client: PortalClient
) -> None:
    own = await drive(world, client, sealed_client)
    typed_words, typed_codes = await portal_inputs(world.settings)
    mailed_words, mailed_codes = mailed(world.settings)
    word_secrets = {s for s in SECRETS_MADE | typed_words | mailed_words if WORD.fullmatch(s) and len(s) >= 4}
    other_secrets = {s for s in SECRETS_MADE | typed_words if not WORD.fullmatch(s) and len(s) >= 4}
    codes = typed_codes | mailed_codes
    assert len(word_secrets) > 100 and codes, "the run should have used many secrets"
    own_words = {s for s in own if WORD.fullmatch(s) and len(s) >= 4}
    assert own_words <= word_secrets  # every secret this test used is looked for
    assert len(own_words) >= MIN_OWN_SECRETS, f"this test drove only {len(own_words)} secrets of its own"
    code_pattern = re.compile("|".join(CODE_EDGE.format(re.escape(c)) for c in sorted(codes)))

    places = await sources(world.settings)
    assert any(name.startswith("topic audit.events") for name, _ in places)
    # Sealed portal input was sent in this run (by `drive`, and test_contacts.py) and is scanned like the rest.
    assert any(name.startswith("topic recovery.requests (") and text for name, text in places)
    assert any(name.startswith("store ") for name, _ in places)
    assert any(name.startswith("log ") for name, _ in places), "no log files found: is VAR_DIR set?"
    leaks = []
    for name, text in places:
        found = set(WORD.findall(text)) & word_secrets
        found |= {s for s in other_secrets if s in text}
        found |= set(code_pattern.findall(text)) if codes else set()
        if found:
            leaks.append(f"{name}: {len(found)} secret(s), e.g. {sorted(found)[0][:3]}…")
    print(
        f"\nscanned {len(places)} places for {len(word_secrets) + len(other_secrets)} secrets "
        f"({len(own_words)} used by this test itself) and {len(codes)} codes"
    )
    assert not leaks, "\n".join(leaks)
