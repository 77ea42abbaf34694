"""Sealed portal input (shared/portal_input.py): HPKE sealing bound to topic, field and record;
key rotation; the two modes; and, through the real consumer pipeline with tokens' handlers over
an in-memory store, what a refused reset leaves behind: a dead letter with its reason and the
outcome the portal waits for, and no secret in the clear anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from services.tokens.handlers import TokenHandlers
from services.tokens.settings import TokensSettings
from shared.consumer import EventPipeline, Route
from shared.crypto import Purpose, new_key_context
from shared.envelope import BadInput, DeadLetterReason, new_event
from shared.metrics import ServiceMetrics
from shared.portal_input import (
    InputReason,
    InputRefused,
    PortalInput,
    load_public_key,
    make_key_pair,
    private_pem,
    seal,
    seal_answers,
    seal_text,
    sealing_key_problems,
)
from shared.schemas import RecoveryRequested, ResetSubmitted
from shared.topics import RECOVERY_OUTCOMES, RECOVERY_REQUESTS, RECOVERY_RESETS, EventType, dlq
from tests.unit.test_tokens_handlers import MemoryStore, issue

KEY = "Clave2026nueva"


def key_file(tmp_path: Path, name: str = "sealing.pem") -> tuple[str, X25519PrivateKey]:
    key = X25519PrivateKey.generate()
    path = tmp_path / name
    path.write_bytes(private_pem(key))
    return str(path), key


def test_a_sealed_field_opens_only_in_its_own_topic_field_and_record(tmp_path: Path) -> None:
    path, key = key_file(tmp_path)
    reader = PortalInput("sealed", path)
    sealed = seal_text(key.public_key(), KEY, topic=RECOVERY_RESETS, field="new_password", ref="req-1")
    assert KEY not in sealed
    assert reader.secret(None, sealed, topic=RECOVERY_RESETS, field="new_password", ref="req-1") == KEY
    for topic, field, ref in [
        (RECOVERY_RESETS, "new_password", "req-2"),  # another record
        (RECOVERY_RESETS, "key", "req-1"),  # another field
        ("login.checks", "new_password", "req-1"),  # another topic
    ]:
        with pytest.raises(InputRefused) as refused:
            reader.secret(None, sealed, topic=topic, field=field, ref=ref)
        assert refused.value.reason == DeadLetterReason.UNDECRYPTABLE
        assert refused.value.portal_reason == InputReason.SEALED_INVALID


def test_sealing_is_randomised_and_damage_is_refused(tmp_path: Path) -> None:
    path, key = key_file(tmp_path)
    reader = PortalInput("any", path)
    one = seal(key.public_key(), b"x", topic=RECOVERY_RESETS, field="new_password", ref="r")
    two = seal(key.public_key(), b"x", topic=RECOVERY_RESETS, field="new_password", ref="r")
    assert one != two  # a fresh ephemeral key each time: equal keys do not show as equal
    damaged = one[:-3] + ("A" if one[-3] != "A" else "B") + one[-2:]
    for bad in (damaged, "!!not base64!!", one[:20]):
        with pytest.raises(InputRefused, match="sealed_new_password"):
            reader.secret(None, bad, topic=RECOVERY_RESETS, field="new_password", ref="r")


def test_another_public_key_does_not_open_and_a_rotation_opens_both(tmp_path: Path) -> None:
    old_path, old = key_file(tmp_path, "old.pem")
    new_path, new = key_file(tmp_path, "new.pem")
    sealed_old = seal_text(old.public_key(), KEY, topic=RECOVERY_RESETS, field="new_password", ref="r")
    sealed_new = seal_text(new.public_key(), KEY, topic=RECOVERY_RESETS, field="new_password", ref="r")
    with pytest.raises(InputRefused):
        PortalInput("sealed", new_path).secret(None, sealed_old, topic=RECOVERY_RESETS, field="new_password", ref="r")
    both = PortalInput("sealed", f"{new_path},{old_path}")
    for sealed in (sealed_old, sealed_new):
        assert both.secret(None, sealed, topic=RECOVERY_RESETS, field="new_password", ref="r") == KEY


def test_sealed_mode_refuses_plaintext_and_any_mode_takes_both(tmp_path: Path) -> None:
    path, key = key_file(tmp_path)
    with pytest.raises(InputRefused) as refused:
        PortalInput("sealed", path).secret(KEY, None, topic=RECOVERY_RESETS, field="new_password", ref="r")
    assert refused.value.reason == DeadLetterReason.PLAINTEXT_REFUSED == "plaintext_refused"
    assert refused.value.portal_reason == InputReason.PLAINTEXT_REFUSED
    assert KEY not in str(refused.value)  # the detail names the field, never the value
    with pytest.raises(InputRefused):
        PortalInput("sealed", path).answers({"q": "a"}, None, topic=RECOVERY_REQUESTS, ref="r")
    open_mode = PortalInput("any", path)
    assert open_mode.secret(KEY, None, topic=RECOVERY_RESETS, field="new_password", ref="r") == KEY
    assert open_mode.answers({"q": "a"}, None, topic=RECOVERY_REQUESTS, ref="r") == {"q": "a"}


def test_sealed_answers_open_to_the_object_and_anything_else_is_refused(tmp_path: Path) -> None:
    path, key = key_file(tmp_path)
    reader = PortalInput("sealed", path)
    answers = {"birth_date": "1984-03-09", "mother_surname": "Ándrade"}
    sealed = seal_answers(key.public_key(), answers, topic=RECOVERY_REQUESTS, ref="req-9")
    assert reader.answers(None, sealed, topic=RECOVERY_REQUESTS, ref="req-9") == answers
    for wrong in (b"[1, 2]", b'{"q": 3}', b"not json", b"\xff\xfe"):
        bad = seal(key.public_key(), wrong, topic=RECOVERY_REQUESTS, field="answers", ref="req-9")
        with pytest.raises(InputRefused):
            reader.answers(None, bad, topic=RECOVERY_REQUESTS, ref="req-9")


def test_the_schemas_take_exactly_one_form_of_each_secret() -> None:
    base = {"request_id": "r", "token": "t"}
    ResetSubmitted.model_validate({**base, "sealed_new_password": "QUJD"})
    for wrong in ({}, {"new_password": "a", "sealed_new_password": "QUJD"}, {"sealed_new_password": "not b64!"}):
        with pytest.raises(ValueError):
            ResetSubmitted.model_validate({**base, **wrong})
    request = {
        "request_id": "r",
        "profile": "affiliate",
        "national_id": "1710034065",
        "email": "a@example.org",
        "captcha_passed": True,
        "client_ip": "10.0.0.1",
    }
    RecoveryRequested.model_validate({**request, "sealed_answers": "QUJD"})
    for wrong in ({}, {"answers": {"q": "a"}, "sealed_answers": "QUJD"}):
        with pytest.raises(ValueError):
            RecoveryRequested.model_validate({**request, **wrong})


def test_key_pair_is_made_once_and_the_gate_names_a_bad_key(tmp_path: Path) -> None:
    private, public = tmp_path / "secrets" / "sealing.pem", tmp_path / "portal" / "public.pem"
    assert make_key_pair(private, public) == [private, public]
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    first = private.read_bytes()
    public.unlink()
    assert make_key_pair(private, public) == [public]  # the kept key's public file, made again
    assert private.read_bytes() == first
    sealed = seal_text(load_public_key(str(public)), KEY, topic=RECOVERY_RESETS, field="new_password", ref="r")
    assert PortalInput("sealed", str(private)).secret(
        None, sealed, topic=RECOVERY_RESETS, field="new_password", ref="r"
    )
    assert sealing_key_problems(str(private)) == []
    assert sealing_key_problems("") == ["not set: sealed portal input cannot be opened"]
    assert sealing_key_problems(str(public)) == ["not an unencrypted PEM private key"]


# ------------------------------------------------------------------ through the pipeline


class Pipeline:
    """Tokens' reset handler behind the real consumer pipeline, over the in-memory store."""

    def __init__(self, tmp_path: Path, mode: str) -> None:
        path, self.key = key_file(tmp_path)
        settings = TokensSettings(portal_input=mode, portal_sealing_key=path)  # type: ignore[arg-type]
        self.store = MemoryStore()
        self.handlers = TokenHandlers(self.store, settings, ServiceMetrics("tokens"))  # type: ignore[arg-type]
        self.pipeline = EventPipeline(
            service="tokens",
            topic=RECOVERY_RESETS,
            routes={EventType.RESET_SUBMITTED: Route(ResetSubmitted, self.handlers.reset_submitted)},
            store=self.store,  # type: ignore[arg-type]
            settings=settings,
            metrics=ServiceMetrics("tokens"),
            on_committed=lambda: None,
        )
        self.offset = 0

    async def deliver(self, data: dict[str, Any]) -> list[Any]:
        """One reset record through the pipeline: what it committed."""
        raw = new_event(
            type=EventType.RESET_SUBMITTED, source="/portal", data=data, correlationid=data["request_id"]
        ).to_bytes()
        self.offset += 1
        record: ConsumerRecord[Any, Any] = ConsumerRecord(
            topic=RECOVERY_RESETS,
            partition=0,
            offset=self.offset,
            timestamp=0,
            timestamp_type=0,
            key=data["request_id"].encode(),
            value=raw,
            checksum=None,
            serialized_key_size=0,
            serialized_value_size=len(raw),
            headers=(),
        )
        before = len(self.store.commits)
        await self.pipeline.process(record, raw)
        return [o for commit in self.store.commits[before:] for o in commit]


async def test_a_plaintext_reset_under_sealed_mode_is_dead_lettered_and_answered(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, "sealed")
    _, token, _ = await issue(p.handlers, p.store, rid="req-plain")
    committed = await p.deliver({"request_id": "req-plain", "token": token, "new_password": KEY})
    letters = [o for o in committed if o.topic == dlq(RECOVERY_RESETS)]
    (letter,) = letters
    assert letter.headers["clave-dlq-reason"] == "plaintext_refused"
    assert "new_password" in letter.headers["clave-dlq-detail"]
    (answer,) = [o.event.data for o in committed if o.topic == RECOVERY_OUTCOMES]
    assert answer == {
        "request_id": "req-plain",
        "stage": "reset",
        "status": "rejected",
        "reasons": ["plaintext_refused"],
    }
    # Nothing reserved: the same link still works, sealed.
    assert not [o for o in committed if o.topic == "tokens.redeemed"]
    text = json.dumps([o.to_document() for o in committed], default=str)
    assert KEY not in text and token not in text
    sealed = seal_text(p.key.public_key(), KEY, topic=RECOVERY_RESETS, field="new_password", ref="req-plain")
    committed = await p.deliver({"request_id": "req-plain", "token": token, "sealed_new_password": sealed})
    (redeemed,) = [o.event.data for o in committed if o.topic == "tokens.redeemed"]
    context = new_key_context(token_id=redeemed["token_id"], account_id=redeemed["account_id"], request_id="req-plain")
    opened = p.handlers.password_box.open(
        redeemed["sealed_new_key"], purpose=Purpose.NEW_KEY, context=context, ttl_s=60
    )
    assert opened == {"new_password": KEY}
    assert not [o for o in committed if o.topic == dlq(RECOVERY_RESETS)]


async def test_a_sealed_reset_for_another_record_is_dead_lettered_as_undecryptable(tmp_path: Path) -> None:
    p = Pipeline(tmp_path, "any")
    _, token, _ = await issue(p.handlers, p.store, rid="req-a")
    elsewhere = seal_text(p.key.public_key(), KEY, topic=RECOVERY_RESETS, field="new_password", ref="req-b")
    committed = await p.deliver({"request_id": "req-a", "token": token, "sealed_new_password": elsewhere})
    (letter,) = [o for o in committed if o.topic == dlq(RECOVERY_RESETS)]
    assert letter.headers["clave-dlq-reason"] == DeadLetterReason.UNDECRYPTABLE
    (answer,) = [o.event.data for o in committed if o.topic == RECOVERY_OUTCOMES]
    assert answer["status"] == "rejected" and answer["reasons"] == ["sealed_invalid"]
    # In `any` mode the clear form still works.
    committed = await p.deliver({"request_id": "req-a", "token": token, "new_password": KEY})
    assert [o for o in committed if o.topic == "tokens.redeemed"]


def test_bad_input_carries_no_answer_by_default() -> None:
    assert BadInput(DeadLetterReason.SCHEMA_INVALID, "x").also == []
