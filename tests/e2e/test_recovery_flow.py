"""The whole recovery through the real stack, as the portal and the citizen live it."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import World, fetch, metric_value, metrics_url
from tools.mail import body_text, extract_code
from tools.testdata import new_key
from tools.workbench import RECOVERY_SERVICES

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("profile", "locale", "subject_word"),
    [
        ("affiliate", "es", "recuperación"),
        ("employer", "en", "reset your"),
    ],
)
async def test_recovery_by_link_completes_for_both_profiles_and_languages(
    world: World, profile: str, locale: str, subject_word: str
) -> None:
    citizen = await world.citizen(profile=profile, locale=locale)
    # Typed differently from the registry: case, spacing, dashes in the ID.
    typed_id = citizen.national_id[:4] + "-" + citizen.national_id[4:]
    rid = await world.request(
        citizen,
        national_id=typed_id,
        email_address=citizen.email.upper(),
        answers={k: f"  {v.upper()} " for k, v in citizen.answers.items()},
    )
    assert (await world.portal.wait_outcome(rid, "request"))["status"] == "accepted"
    mail, token = await world.recovery_mail(rid)
    assert subject_word in mail["Subject"].lower()
    assert mail["To"] == citizen.email
    assert mail["Auto-Submitted"] == "auto-generated"
    assert mail.is_multipart() and {p.get_content_type() for p in mail.iter_parts()} == {"text/plain", "text/html"}
    assert world.settings.portal_base_url in body_text(mail)

    before = len(world.mails_to(citizen.email))
    await world.portal.submit_reset(rid, new_key(), token=token)
    outcome = await world.portal.wait_outcome(rid, "reset")
    assert outcome == {"request_id": rid, "stage": "reset", "status": "completed", "reasons": []}
    changed = await world.mailbox.wait_for(
        lambda m: citizen.email in str(m["To"]) and "recuperar?" not in body_text(m), count=1
    )
    await world.mail_barrier()  # a later mail has arrived: a second one to the citizen would have too
    assert len(world.mails_to(citizen.email)) == before + 1
    assert changed[0]["Message-ID"] != mail["Message-ID"]


async def test_recovery_by_code_with_request_id(world: World) -> None:
    citizen = await world.citizen()
    rid = await world.request(citizen)
    mail, _ = await world.recovery_mail(rid)
    code = extract_code(mail)
    await world.portal.submit_reset(rid, new_key(), code=code)
    assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
    audit = await world.audited(rid, "token_reserved")
    assert audit["details"]["by"] == "code"


async def test_a_new_request_revokes_the_earlier_link(world: World) -> None:
    citizen = await world.citizen()
    first = await world.request(citizen)
    _, old_token = await world.recovery_mail(first)
    second = await world.request(citizen)
    _, new_token = await world.recovery_mail(second)
    await world.portal.submit_reset(first, new_key(), token=old_token)
    assert (await world.portal.wait_outcome(first, "reset"))["reasons"] == ["token_invalid"]
    await world.portal.submit_reset(second, new_key(), token=new_token)
    assert (await world.portal.wait_outcome(second, "reset"))["status"] == "completed"


async def test_counters_move_through_the_flow(world: World) -> None:
    before = {s: fetch(metrics_url(world.settings, s))[1] for s in RECOVERY_SERVICES}
    citizen = await world.citizen()
    rid = await world.request(citizen)
    _, token = await world.recovery_mail(rid)
    await world.portal.submit_reset(rid, new_key(), token=token)
    await world.portal.wait_outcome(rid, "reset")
    await world.mailbox.wait_for(lambda m: citizen.email in str(m["To"]) and "recuperar?" not in body_text(m))
    await world.audited(rid, "mail_sent")
    after = {s: fetch(metrics_url(world.settings, s))[1] for s in before}

    def moved(service: str, name: str, **labels: str) -> float:
        return metric_value(after[service], name, **labels) - metric_value(before[service], name, **labels)

    # Other tests may run concurrently in the same services, hence >=.
    assert moved("identity", "clave_identity_requests_total", result="verified") >= 1
    assert moved("tokens", "clave_tokens_issued_total") >= 1
    assert moved("tokens", "clave_tokens_redeemed_total") >= 1
    assert moved("password", "clave_password_changed_total") >= 1
    assert moved("notifier", "clave_mails_sent_total", kind="recovery_link") >= 1
    for service in before:
        assert "national_id" not in after[service] and citizen.email not in after[service]
    # Lag is measured for every consumed topic (a gauge, present from start-up).
    assert 'clave_consumer_lag_messages{topic="recovery.requests"}' in after["identity"]
    assert 'clave_consumer_lag_messages{topic="recovery.resets"}' in after["tokens"]
