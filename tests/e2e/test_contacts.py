"""Sealed portal input and contact data through the real stack (issue 11), played with the
portal's client library and the portal principal:

- answers, a new key and a login key sealed to Clave's public key (HPKE) are opened by the
  services that read them, and the portal topics hold only ciphertext of them;
- a recovery typed with the backup address goes there, and the registered address is told;
- a contact update with the right key changes the data, tells every old address and revokes
  live links; with a wrong key it is rejected and nothing changes.

Plaintext refused under PORTAL_INPUT=sealed is tested in tests/unit/test_portal_input.py
through the real consumer pipeline: the local stack runs `any` (development)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from clave_portal import HpkeSealer, PortalClient, PortalSettings

from services.notifier.rendering import mask_email
from shared.acl import PORTAL
from shared.topics import CONTACT_UPDATES, LOGIN_CHECKS, RECOVERY_REQUESTS, RECOVERY_RESETS
from tests.e2e.conftest import World, citizen_ip, clave_cli
from tools.mail import body_text, extract_link
from tools.testdata import Citizen, new_citizen, new_key
from tools.watch import TopicWatcher
from tools.workbench import WorkbenchSettings, principal_properties

pytestmark = pytest.mark.e2e

WRONG = "Incorrecta24"


@dataclass
class ContactCitizen(Citizen):
    """A citizen whose registry line also carries a backup e-mail and a phone."""

    backup_email: str = ""
    phone: str = "+593 99 123 4567"

    def record(self) -> dict[str, Any]:
        return {**super().record(), "backup_email": self.backup_email, "phone": self.phone}


def contact_citizen() -> ContactCitizen:
    c = new_citizen()
    tag = c.email.split("@")[0].split(".")[-1]
    fields = {k: getattr(c, k) for k in ("national_id", "email", "name", "answers", "password", "locale")}
    return ContactCitizen(**fields, backup_email=f"respaldo.{tag}@example.net")


@pytest.fixture(scope="module")
async def sealed_client(stack: WorkbenchSettings) -> AsyncIterator[PortalClient]:
    """The client as production's portal runs it: every secret sealed to Clave's public key
    (the local stack publishes it at PORTAL_SEALING_PUBLIC_KEY)."""
    default = Path(os.environ.get("VAR_DIR", "var")) / "portal" / "sealing-public.pem"
    public = os.environ.get("PORTAL_SEALING_PUBLIC_KEY") or str(default)
    async with PortalClient(
        PortalSettings.from_properties(principal_properties(PORTAL)),
        source="/portal/tests",
        sealer=HpkeSealer.from_file(public),
        timeout=60,
    ) as c:
        yield c


@pytest.fixture(scope="module")
async def portal_input(stack: WorkbenchSettings) -> AsyncIterator[TopicWatcher]:
    w = TopicWatcher(stack, [RECOVERY_REQUESTS, RECOVERY_RESETS, LOGIN_CHECKS, CONTACT_UPDATES])
    await w.start()
    yield w
    await w.stop()


async def request(client: PortalClient, c: Citizen, email: str) -> str:
    rid = await client.request_recovery(
        national_id=c.national_id,
        email=email,
        answers=dict(c.answers),
        client_ip=citizen_ip(),
        captcha_passed=True,
        locale=c.locale,
    )
    assert (await client.request_outcome(rid)).status == "accepted"
    return rid


async def mail_to(world: World, address: str, marker: str, timeout: float = 60) -> EmailMessage:
    """The one mail to `address` whose text holds `marker`."""
    found = await world.mailbox.wait_for(
        lambda m: address.lower() in str(m["To"]).lower() and marker in body_text(m), timeout=timeout
    )
    assert len(found) == 1, f"expected one mail to {address} with {marker!r}, got {len(found)}"
    return found[0]


# ---- sealed input ------------------------------------------------------------------------------


async def test_sealed_answers_new_key_and_login_key_are_opened_by_their_readers(
    world: World, sealed_client: PortalClient, portal_input: TopicWatcher
) -> None:
    c = await world.citizen()
    rid = await request(sealed_client, c, c.email)
    _, token = await world.recovery_mail(rid)  # the answers opened and verified
    key = new_key()
    outcome = await sealed_client.submit_reset(rid, token=token, new_password=key)
    assert outcome.completed, outcome  # the new key opened, checked and stored
    assert await sealed_client.check_credentials(c.national_id, key, client_ip=citizen_ip())
    assert not await sealed_client.check_credentials(c.national_id, WRONG, client_ip=citizen_ip())
    # What crossed the portal topics: the sealed forms only.
    mine = portal_input.matching(lambda _t, _h, d: c.national_id in json.dumps(d) or rid in json.dumps(d))
    data = [d["data"] for d in mine]
    assert any("sealed_answers" in d for d in data) and any("sealed_new_password" in d for d in data)
    assert any("sealed_key" in d for d in data)
    text = json.dumps(data, ensure_ascii=False)
    assert key not in text and WRONG not in text
    assert not any(a in text for a in c.answers.values())
    assert not any({"answers", "new_password", "key"} & set(d) for d in data)


# ---- recovery to the backup address ------------------------------------------------------------


async def test_a_recovery_typed_with_the_backup_address_goes_there_and_the_primary_is_told(
    world: World, client: PortalClient
) -> None:
    c = contact_citizen()
    await world.register(c)
    rid = await request(client, c, c.backup_email.upper())
    recovery = await mail_to(world, c.backup_email, rid)
    _, link_rid, token = extract_link(recovery)
    assert link_rid == rid
    notice = await mail_to(world, c.email, mask_email(c.backup_email))  # the backup address, masked
    assert "recuperar?" not in body_text(notice) and token not in body_text(notice)
    assert "respaldo" not in body_text(notice)  # masked: the backup's local part is not shown
    # The registered address got the notice and nothing else: no link went there.
    assert [m for m in world.mails_to(c.email) if "recuperar?" in body_text(m)] == []
    outcome = await client.submit_reset(rid, token=token, new_password=new_key())
    assert outcome.completed, outcome


# ---- contact updates ---------------------------------------------------------------------------


async def test_a_contact_update_with_the_right_key_tells_every_old_address_and_revokes_links(
    world: World, client: PortalClient, sealed_client: PortalClient
) -> None:
    c = contact_citizen()
    await world.register(c)
    rid = await request(client, c, c.email)
    _, token = await world.recovery_mail(rid)  # a live link, before the change
    new_email = f"nuevo.{c.national_id}@example.org"
    result = await sealed_client.update_contact(  # the key sealed (sealed_key), opened by password
        c.national_id, c.password, client_ip=citizen_ip(), email=new_email, backup_email="", phone="0987654321"
    )
    assert result.updated, result
    for old in (c.email, c.backup_email):
        notice = await mail_to(world, old, "n***@example.org")
        assert "eliminado" in body_text(notice) and "+593***21" in body_text(notice)
    # The link sent before the change is dead.
    outcome = await client.submit_reset(rid, token=token, new_password=new_key())
    assert outcome.status == "rejected" and outcome.reasons == ("token_invalid",), outcome
    # Recoveries now go to the new address only (the old ones are no longer on file).
    rid2 = await request(client, c, new_email)
    await mail_to(world, new_email, rid2)
    rid3 = await request(client, c, c.backup_email)
    await world.mail_barrier()  # a later recovery was mailed: one for rid3 would have been too
    assert not [m for m in world.mailbox.to(c.backup_email) if rid3 in body_text(m)]


async def test_a_contact_update_with_a_wrong_key_is_rejected_and_changes_nothing(
    world: World, client: PortalClient
) -> None:
    c = contact_citizen()
    await world.register(c)
    rid = await request(client, c, c.email)
    _, token = await world.recovery_mail(rid)
    result = await client.update_contact(
        c.national_id, WRONG, client_ip=citizen_ip(), email=f"intruso.{c.national_id}@example.org"
    )
    assert not result.updated and result.reasons == ("key_invalid",), result
    # An unknown ID answers the same (no enumeration).
    ghost = await client.update_contact("0926687856", WRONG, client_ip=citizen_ip(), phone="0991234567")
    assert not ghost.updated and ghost.reasons == ("key_invalid",)
    # Nothing changed: the link is live, the registered address still receives recoveries, and
    # once a later mail has arrived, no change notice went to either address.
    outcome = await client.submit_reset(rid, token=token, new_password=new_key())
    assert outcome.completed, outcome
    rid2 = await request(client, c, c.email)
    await mail_to(world, c.email, rid2)
    await world.mail_barrier()
    for address in (c.email, c.backup_email):
        assert not [m for m in world.mailbox.to(address) if "datos de contacto" in body_text(m)]


# ---- the operator's contact update (a signed command, through the `clave` command) -------------


async def test_an_operator_changes_backup_and_phone_and_every_old_address_is_told(
    world: World, client: PortalClient
) -> None:
    c = contact_citizen()
    await world.register(c)
    rid = await request(client, c, c.email)
    _, token = await world.recovery_mail(rid)
    new_backup = f"otro.{c.national_id}@example.net"
    out = await asyncio.to_thread(
        clave_cli, "accounts", "update-contact", c.national_id, "--backup-email", new_backup, "--phone", "",
        "-o", "op-1", "-r", "form 12, cédula checked",
    )  # fmt: skip
    assert "succeeded" in out.stdout, out.stdout
    for old in (c.email, c.backup_email):
        notice = await mail_to(world, old, "o***@example.net")
        assert "eliminado" in body_text(notice)
    outcome = await client.submit_reset(rid, token=token, new_password=new_key())
    assert outcome.reasons == ("token_invalid",), outcome  # the link sent before is dead
    # The registered e-mail is not this command's (two operators: update-email).
    refused = await asyncio.to_thread(
        clave_cli, "accounts", "update-contact", c.national_id, "-o", "op-1", "-r", "typo", check=False
    )
    assert refused.returncode == 2 and "nothing to change" in refused.stderr + refused.stdout
    # A recovery typed with the new backup goes there.
    rid2 = await request(client, c, new_backup)
    await mail_to(world, new_backup, rid2)
