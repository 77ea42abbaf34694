"""Bad input never stops a consumer: each class lands in the topic's DLQ with its reason and
origin, sealed (no secret readable), audited, and the next good message is processed."""

from __future__ import annotations

import json
import secrets
import uuid
from datetime import UTC, datetime

import pytest

from shared.crypto import Purpose, SecretBox, new_key_context
from shared.envelope import new_event
from shared.kafkaio import publish_raw
from shared.topics import RECOVERY_RESETS, TOKENS_REDEEMED, EventType, dlq
from tests.e2e.conftest import World
from tools.testdata import new_key

pytestmark = pytest.mark.e2e


def reset_event(**data_overrides: object) -> dict:
    data = {
        "request_id": f"req-{uuid.uuid4().hex}",
        "token": secrets.token_urlsafe(32),
        "new_password": "Secreto123",
        **data_overrides,
    }
    return json.loads(
        new_event(
            type=EventType.RESET_SUBMITTED, source="/portal/tests", data=data, correlationid=str(data["request_id"])
        ).to_bytes()
    )


CASES = {
    "malformed_json": lambda marker: b'{"specversion": "1.0", "new_password": "' + marker.encode() + b'"',
    "not_cloudevent": lambda marker: json.dumps({"hello": marker}).encode(),
    "wrong_specversion": lambda marker: json.dumps({**reset_event(new_password=marker), "specversion": "0.3"}).encode(),
    "unknown_type": lambda marker: json.dumps(
        {**reset_event(new_password=marker), "type": "ec.clave.nope.v1"}
    ).encode(),
    "schema_invalid": lambda marker: json.dumps(reset_event(new_password=marker, code="12ab")).encode(),
    "too_large": lambda marker: json.dumps(reset_event(new_password=marker + "x" * 70_000)).encode(),
}


@pytest.mark.parametrize("reason", sorted(CASES))
async def test_bad_input_is_dead_lettered_with_reason_and_origin(world: World, reason: str) -> None:
    marker = f"SECRET{uuid.uuid4().hex}"
    key = uuid.uuid4().hex
    value = CASES[reason](marker)
    await publish_raw(world.portal.settings, RECOVERY_RESETS, key.encode(), value)
    box = SecretBox(world.settings.dlq_keys)
    found = await world.dead_letters.wait(
        lambda topic, headers, d: (
            topic == dlq(RECOVERY_RESETS)
            and headers.get("clave-dlq-reason") == reason
            and marker.encode() in box.open_bytes(d["data"]["sealed_payload"])
        ),
        timeout=60,
    )
    letter = found[-1]
    assert letter["type"] == "ec.clave.dead_letter.v1"
    assert letter["data"]["origin_topic"] == RECOVERY_RESETS
    assert isinstance(letter["data"]["origin_offset"], int)
    assert marker not in json.dumps(letter)  # the payload is sealed, the detail names fields only
    # Every reset gets an answer: keyed by the request_id read from the record, else its key.
    try:
        answer_id = json.loads(value)["data"]["request_id"]
    except (ValueError, KeyError, TypeError):
        answer_id = key
    if reason == "too_large":
        answer_id = key  # not parsed at all: only its key is known
    outcome = await world.portal.wait_outcome(answer_id, "reset")
    assert (outcome["status"], outcome["reasons"]) == ("rejected", ["reset_invalid"])
    await world.audit_log.wait(
        lambda _t, _h, d: (
            d["data"].get("action") == "message_dead_lettered"
            and d["data"]["details"].get("offset") == letter["data"]["origin_offset"]
            and reason in d["data"].get("reasons", [])
        )
    )


async def test_redelivered_event_id_changes_nothing(world: World) -> None:
    c = await world.citizen()
    rid = await world.request(c)
    _, token = await world.recovery_mail(rid)
    event = new_event(
        type=EventType.RESET_SUBMITTED,
        source="/portal/tests",
        correlationid=rid,
        data={"request_id": rid, "token": token, "new_password": new_key()},
    )
    await publish_raw(world.portal.settings, RECOVERY_RESETS, rid.encode(), event.to_bytes())
    await publish_raw(world.portal.settings, RECOVERY_RESETS, rid.encode(), event.to_bytes())
    assert (await world.portal.wait_outcome(rid, "reset"))["status"] == "completed"
    await world.dead_letters.wait(
        lambda topic, headers, d: headers.get("clave-dlq-reason") == "duplicate_event" and d.get("correlationid") == rid
    )
    assert len([o for o in world.portal.outcomes(rid) if o["stage"] == "reset"]) == 1


async def test_internal_topic_with_foreign_ciphertext_is_dead_lettered(world: World) -> None:
    from cryptography.fernet import Fernet

    rid = f"req-{uuid.uuid4().hex}"
    account_id, token_id = uuid.uuid4().hex, uuid.uuid4().hex
    foreign = SecretBox(Fernet.generate_key().decode()).seal(
        {"new_password": "Robada123"},
        purpose=Purpose.NEW_KEY,
        context=new_key_context(token_id=token_id, account_id=account_id, request_id=rid),
    )
    event = new_event(
        type=EventType.TOKENS_REDEEMED,
        source="/clave/tokens",  # as its producer names itself: only the ciphertext is foreign
        correlationid=rid,
        data={
            "request_id": rid,
            "account_id": account_id,
            "token_id": token_id,
            "recipient": {"email": "x@example.org", "name": "X", "locale": "es"},
            "sealed_new_key": foreign,
        },
    )
    await publish_raw(world.settings, TOKENS_REDEEMED, b"k", event.to_bytes())
    found = await world.dead_letters.wait(
        lambda topic, headers, d: topic == dlq(TOKENS_REDEEMED) and d.get("correlationid") == rid
    )
    assert found[0]["data"]["reason"] == "undecryptable"
    assert datetime.fromisoformat(found[0]["time"]) <= datetime.now(UTC)
