"""The portal's side through the real stack, played with the portal's client library
(clave_portal) and the portal principal: credential checks (login), key-change events, and an
answer for every reset (issue 11)."""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from argon2 import PasswordHasher, extract_parameters
from clave_page.app import create_app
from clave_page.portal_backend import PortalBackend
from clave_page.settings import PageSettings
from clave_portal import KeyChange, PortalClient
from clave_portal.client import KeyChanges
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from shared.crypto import keyed_hash
from shared.topics import LOGIN_CHECKS, RECOVERY_RESETS
from tests.e2e.conftest import Publisher, World, citizen_ip, clave_cli
from tools.testdata import Citizen, new_citizen, new_key, random_cedula, write_jsonl
from tools.workbench import WorkbenchSettings

pytestmark = pytest.mark.e2e

WRONG = "Incorrecta24"


@pytest.fixture
async def credentials(stack: WorkbenchSettings) -> AsyncIterator[AsyncCollection[Any]]:
    """The password service's store, as its operator would read it (the test's own observation)."""
    mongo: AsyncMongoClient[Any] = AsyncMongoClient(stack.mongodb_uri)
    yield mongo[stack.db_name("password")]["credentials"]
    await mongo.close()


async def next_change(changes: KeyChanges, national_id: str, timeout: float = 60) -> KeyChange:
    """The next key change of this citizen (others' changes go by)."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no key change for {national_id} within {timeout} s")
        change = await asyncio.wait_for(changes.__anext__(), remaining)
        if change.national_id == national_id:
            return change


async def recover(world: World, client: PortalClient, c: Citizen, new_password: str) -> str:
    rid = await client.request_recovery(
        national_id=c.national_id,
        email=c.email,
        answers=dict(c.answers),
        client_ip=citizen_ip(),
        captcha_passed=True,
        profile=c.profile,
        representative_id=c.representative_id,
        locale=c.locale,
    )
    assert (await client.request_outcome(rid)).status == "accepted"
    _, token = await world.recovery_mail(rid)
    outcome = await client.submit_reset(rid, token=token, new_password=new_password)
    assert outcome.completed, outcome
    return rid


# ---- credential checks -------------------------------------------------------------------------


async def test_the_right_key_is_valid_and_a_wrong_one_is_not(world: World, client: PortalClient) -> None:
    c = await world.citizen()
    ip = citizen_ip()
    assert await client.check_credentials(c.national_id, c.password, client_ip=ip)
    wrong = await client.login(c.national_id, WRONG, client_ip=ip)
    assert not wrong.valid and wrong.reasons == ("key_invalid",)
    # Typed as people type it (dashes, spaces): the same citizen.
    spaced = f"{c.national_id[:3]} {c.national_id[3:6]}-{c.national_id[6:]}"
    assert await client.check_credentials(spaced, c.password, client_ip=ip)
    audit = await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "key_checked" and d["data"]["details"].get("reference") == wrong.check_id
        )
    )
    record = audit[0]["data"]
    assert record["outcome"] == "rejected" and record["reasons"] == ["key_invalid"] and record["account_id"]
    assert WRONG not in str(audit[0]) and c.password not in str(audit[0])


async def test_an_unknown_id_gets_the_same_answer_as_a_wrong_key(world: World, client: PortalClient) -> None:
    c = await world.citizen()
    ip = citizen_ip()
    wrong = await client.login(c.national_id, WRONG, client_ip=ip)
    unknown = await client.login(random_cedula(), WRONG, client_ip=ip)
    assert (wrong.valid, wrong.reasons) == (unknown.valid, unknown.reasons) == (False, ("key_invalid",))
    # The portal's own input error is its own reason (it leaks nothing the portal did not send).
    bad = await client.login("1710034066", WRONG, client_ip=ip)
    assert bad.reasons == ("id_invalid",)


async def test_wrong_keys_lock_out_the_guessing_address_not_the_owner(world: World, client: PortalClient) -> None:
    c = await world.citizen()
    attacker = citizen_ip()
    for _ in range(world.settings.login_block_max_failures):
        assert (await client.login(c.national_id, WRONG, client_ip=attacker)).reasons == ("key_invalid",)
    # Locked out: even the right key from there is refused, so the answer is no oracle for it.
    locked = await client.login(c.national_id, c.password, client_ip=attacker)
    assert not locked.valid and locked.reasons == ("throttled",)
    # The owner, from home, is not affected.
    assert await client.check_credentials(c.national_id, c.password, client_ip=citizen_ip())
    # An unknown ID is locked the same way (no telling it apart by the throttling either).
    ghost = random_cedula()
    for _ in range(world.settings.login_block_max_failures):
        assert (await client.login(ghost, WRONG, client_ip=attacker)).reasons == ("key_invalid",)
    assert (await client.login(ghost, WRONG, client_ip=attacker)).reasons == ("throttled",)
    await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("action") == "key_checks_locked" and d["data"].get("account_id") is not None
    )


async def test_an_outdated_hash_is_rehashed_on_a_valid_login(
    world: World, client: PortalClient, credentials: AsyncCollection[Any]
) -> None:
    c = new_citizen()
    [account_id] = await world.register(c)
    # A hash from before the argon2 parameters were raised.
    old = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(unicodedata.normalize("NFKC", c.password))
    await credentials.update_one({"_id": account_id}, {"$set": {"hash": old}})
    result = await client.login(c.national_id, c.password, client_ip=citizen_ip())
    assert result.valid
    doc = await credentials.find_one({"_id": account_id})
    assert doc is not None and doc["hash"] != old
    params = extract_parameters(doc["hash"])
    assert (params.memory_cost, params.time_cost) == (world.settings.argon2_memory_kib, world.settings.argon2_time_cost)
    audit = await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "key_checked" and d["data"]["details"].get("reference") == result.check_id
        )
    )
    assert audit[0]["data"]["details"].get("rehashed") is True
    # Transparent: the same key still works, a wrong one still does not.
    assert await client.check_credentials(c.national_id, c.password, client_ip=citizen_ip())
    assert not await client.check_credentials(c.national_id, WRONG, client_ip=citizen_ip())


async def test_a_check_that_cannot_be_read_is_answered(world: World, client: PortalClient) -> None:
    result = await client.login(random_cedula(), WRONG, client_ip="not-an-address")
    assert not result.valid and result.reasons == ("check_invalid",)
    await world.dead_letters.wait(
        lambda _t, h, d: h.get("clave-origin-topic") == LOGIN_CHECKS and d.get("correlationid") == result.check_id
    )


# ---- a key the import took with --legacy-keys, through the reference page ----------------------


async def import_legacy(world: World, c: Citizen) -> None:
    """Import a citizen whose key breaks the policy, with the migration option; wait until the
    password service stored it (marked must-change)."""
    path = write_jsonl([c], Path(tempfile.mkdtemp()) / "legacy.jsonl")
    await asyncio.to_thread(clave_cli, "accounts", "import", str(path), "--operator", "op-1", "--legacy-keys")
    ref = keyed_hash(world.settings.pseudonym_key, c.national_id)
    [imported] = await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("action") == "account_imported" and d["data"].get("subject_ref") == ref
    )
    account_id = imported["data"]["account_id"]
    await world.audit_log.wait(
        lambda _t, _h, d: d["data"].get("action") == "initial_key_set" and d["data"].get("account_id") == account_id
    )


async def page_login(client: PortalClient, national_id: str, key: str, lang: str = "es") -> httpx2.Response:
    """The reference page, in process on the real client (the same app `make portal` serves),
    from a citizen's own address."""
    app = create_app(PageSettings(clave_env="development", page_captcha="stand-in"), PortalBackend(client))
    transport = httpx2.ASGITransport(app=app, client=(citizen_ip(), 40000))
    async with httpx2.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as browser:
        form = await browser.get(f"/ingresar?lang={lang}")
        token = re.search(r'name="form_token" value="([^"]+)"', form.text)
        assert token, form.text
        data = {"form_token": token.group(1), "national_id": national_id, "key": key}
        return await browser.post(f"/ingresar?lang={lang}", data=data)


def login_message(response: httpx2.Response) -> str:
    found = re.search(r'id="login-result">(.*?)</p>', response.text, re.S)
    assert found, response.text
    return found.group(1)


async def test_a_legacy_key_is_right_but_must_be_replaced_and_a_wrong_one_reads_as_an_unknown_id(
    world: World, client: PortalClient
) -> None:
    c = new_citizen()
    c.password = "abc"  # breaks the key policy: only --legacy-keys takes it
    await import_legacy(world, c)
    right = await page_login(client, c.national_id, "abc")
    assert right.status_code == 200, right.text
    assert "debe reemplazarla por una nueva" in login_message(right)
    assert '<a href="/solicitar" id="login-forgot">' in login_message(right)
    english = await page_login(client, c.national_id, "abc", lang="en")
    assert "you must replace it with a new one" in login_message(english)
    # No enumeration: a wrong key for this account reads exactly as one for an unknown ID.
    wrong = await page_login(client, c.national_id, "abd")
    unknown = await page_login(client, random_cedula(), "abd")
    assert wrong.status_code == unknown.status_code == 401
    assert login_message(wrong) == login_message(unknown) == "La cédula o la clave no son correctas."
    # The public bool is unchanged: the right key is right.
    assert await client.check_credentials(c.national_id, "abc", client_ip=citizen_ip())
    # Once replaced through the recovery, the new key is plainly right.
    new = new_key()
    await recover(world, client, c, new)
    replaced = await page_login(client, c.national_id, new)
    assert replaced.status_code == 200 and login_message(replaced).startswith("Su clave es correcta. Ya puede ingresar")


# ---- key changes -------------------------------------------------------------------------------


async def test_a_recovery_through_the_client_changes_the_key_and_tells_the_portal(
    world: World, client: PortalClient
) -> None:
    c = await world.citizen()
    new = new_key()
    async with client.key_changes() as changes:
        rid = await recover(world, client, c, new)
        change = await next_change(changes, c.national_id)
    assert (change.cause, change.request_id) == ("recovery", rid)
    assert await client.check_credentials(c.national_id, new, client_ip=citizen_ip())
    assert not await client.check_credentials(c.national_id, c.password, client_ip=citizen_ip())


async def test_an_initial_key_is_announced_too(world: World, client: PortalClient) -> None:
    c = new_citizen()
    async with client.key_changes() as changes:
        await world.register(c)
        change = await next_change(changes, c.national_id)
    assert change.cause == "initial" and change.request_id is None


# ---- every reset gets an answer ----------------------------------------------------------------


async def test_a_reset_that_fails_validation_is_rejected_reset_invalid(client: PortalClient) -> None:
    outcome = await client.submit_reset(f"req-{uuid.uuid4().hex}", code="12ab", new_password="Nueva2024x")
    assert outcome.status == "rejected" and outcome.reasons == ("reset_invalid",)


async def test_an_unreadable_reset_is_answered_by_its_record_key(world: World, publisher: Publisher) -> None:
    rid = f"req-{uuid.uuid4().hex}"
    raw = b'{"specversion":"1.0", not json'
    assert publisher._producer is not None
    await publisher._producer.send_and_wait(RECOVERY_RESETS, raw, key=rid.encode())
    outcome = await world.portal.wait_outcome(rid, "reset")
    assert outcome["status"] == "rejected" and outcome["reasons"] == ["reset_invalid"]
    digest = hashlib.sha256(raw).hexdigest()
    await world.dead_letters.wait(lambda _t, h, d: d.get("data", {}).get("payload_sha256") == digest)


async def test_a_repeated_request_id_gets_an_answer_of_its_own(world: World, client: PortalClient) -> None:
    c = await world.citizen()
    args: dict[str, Any] = {
        "national_id": c.national_id,
        "email": c.email,
        "answers": dict(c.answers),
        "client_ip": citizen_ip(),
        "captcha_passed": True,
    }
    rid = await client.request_recovery(**args)
    assert (await client.request_outcome(rid)).status == "accepted"
    await client.request_recovery(**args, request_id=rid)
    second = await world.portal.wait_outcome(rid, "request", count=2)
    assert second == {"request_id": rid, "stage": "request", "status": "rejected", "reasons": ["duplicate_request"]}
    await world.recovery_mail(rid)  # still the one e-mail
