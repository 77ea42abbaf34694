"""Every recovery request gets an answer, through the real broker and identity: a request that
fails validation is answered `rejected` / `request_invalid` on recovery.outcomes, keyed by its
request_id, besides its sealed dead letter on recovery.requests.dlq; the answer is the same for
a registered and an unknown ID, and nothing else happens (no e-mail)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from shared.crypto import SecretBox
from shared.envelope import new_event
from shared.kafkaio import publish_raw
from shared.topics import RECOVERY_REQUESTS, EventType, dlq
from tests.e2e.conftest import World
from tools.mail import body_text
from tools.testdata import random_cedula

pytestmark = pytest.mark.e2e


def request_event(national_id: str, marker: str, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "profile": "affiliate",
        "national_id": national_id,
        "email": "citizen@example.org",
        "answers": {"mother_surname": marker},
        "captcha_passed": True,
        "locale": "es",
        "client_ip": "10.20.30.40",
    }
    data.update(overrides)
    data = {k: v for k, v in data.items() if v is not None}
    event = new_event(type=EventType.RECOVERY_REQUESTED, source="/portal/tests", data=data, correlationid="c")
    return json.loads(event.to_bytes())  # type: ignore[no-any-return]


# Classes of malformed requests, each with a readable request_id; the dead letter's reason.
Make = Callable[[str, str], dict[str, Any]]
CASES: dict[str, tuple[str, Make]] = {
    "email_missing": ("schema_invalid", lambda nid, m: request_event(nid, m, email=None)),
    "bad_client_ip": ("schema_invalid", lambda nid, m: request_event(nid, m, client_ip="999.1.1.1")),
    # A sealed field that is not even base64url (the marker goes in the e-mail: a record with a
    # sealed field must hold no secret in the clear, tests/e2e/test_zz_secrets_scan.py).
    "sealed_answers_malformed": (
        "schema_invalid",
        lambda nid, m: request_event(nid, m, answers=None, sealed_answers="not base64!", email=f"{m}@example.org"),
    ),
    "unknown_field": ("schema_invalid", lambda nid, m: request_event(nid, m, favourite_colour="blue")),
    "wrong_specversion": ("wrong_specversion", lambda nid, m: {**request_event(nid, m), "specversion": "0.3"}),
    "unknown_type": ("unknown_type", lambda nid, m: {**request_event(nid, m), "type": "ec.clave.nope.v1"}),
}


async def send(world: World, national_id: str, case: str, marker: str) -> str:
    event = CASES[case][1](national_id, marker)
    await publish_raw(world.portal.settings, RECOVERY_REQUESTS, national_id.encode(), json.dumps(event).encode())
    return str(event["data"]["request_id"])


async def dead_letter(world: World, reason: str, marker: str) -> dict[str, Any]:
    box = SecretBox(world.settings.dlq_keys)
    found = await world.dead_letters.wait(
        lambda topic, headers, d: (
            topic == dlq(RECOVERY_REQUESTS)
            and headers.get("clave-dlq-reason") == reason
            and marker.encode() in box.open_bytes(d["data"]["sealed_payload"])
        ),
        timeout=60,
    )
    return found[-1]  # type: ignore[no-any-return]


@pytest.mark.parametrize("case", sorted(CASES))
async def test_a_request_that_fails_validation_is_answered_request_invalid(world: World, case: str) -> None:
    marker = f"SECRET{uuid.uuid4().hex}"
    known = await world.citizen()
    unknown = random_cedula()
    rid_known = await send(world, known.national_id, case, marker)
    rid_unknown = await send(world, unknown, case, marker)
    answers = [await world.portal.wait_outcome(rid, "request") for rid in (rid_known, rid_unknown)]
    # The same answer whatever the ID names: no enumeration.
    rejected = {"stage": "request", "status": "rejected", "reasons": ["request_invalid"]}
    assert answers[0] == {"request_id": rid_known, **rejected}
    assert answers[1] == {**answers[0], "request_id": rid_unknown}
    for rid in (rid_known, rid_unknown):
        [outcome] = world.portal.outcomes(rid)  # one answer, no `accepted` besides it
        assert marker not in json.dumps(outcome) and known.national_id not in json.dumps(outcome)
    letter = await dead_letter(world, CASES[case][0], marker)
    assert letter["data"]["origin_topic"] == RECOVERY_REQUESTS
    assert marker not in json.dumps(letter)  # the payload is sealed, the detail names fields only


async def test_an_invalid_request_sends_no_mail_and_the_next_one_works(world: World) -> None:
    marker = f"SECRET{uuid.uuid4().hex}"
    c = await world.citizen()
    rid = await send(world, c.national_id, "email_missing", marker)
    assert (await world.portal.wait_outcome(rid, "request"))["reasons"] == ["request_invalid"]
    # The citizen's next, valid request is served on the same partition; its mail comes alone.
    good = await world.request(c)
    assert (await world.portal.wait_outcome(good, "request"))["status"] == "accepted"
    await world.recovery_mail(good)
    mails = world.mails_to(c.email)
    assert [m for m in mails if rid in body_text(m)] == []
    assert len([m for m in mails if good in body_text(m)]) == 1
    assert len(mails) == 1  # the valid request's recovery mail, nothing for the invalid one


async def test_a_request_with_no_readable_request_id_is_dead_lettered_and_never_answered_by_its_key(
    world: World,
) -> None:
    """Its record key is the national ID: never echoed as a request_id. A later request from the
    same partition shows the consumer went on (and that the no-answer check is not premature)."""
    marker = f"SECRET{uuid.uuid4().hex}"
    c = await world.citizen()
    raw = b'{"specversion": "1.0", "data": {"answers": {"q": "' + marker.encode() + b'"'
    await publish_raw(world.portal.settings, RECOVERY_REQUESTS, c.national_id.encode(), raw)
    await dead_letter(world, "malformed_json", marker)
    good = await world.request(c)
    assert (await world.portal.wait_outcome(good, "request"))["status"] == "accepted"
    assert world.portal.outcomes(c.national_id) == []
