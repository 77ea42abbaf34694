"""The topic contract document (docs/asyncapi.yaml): it is what the code says, and the code
says what it does.

- drift: the committed file equals what clave/asyncapi.py builds from the code now, and
  reads back (as YAML) as exactly that document;
- the table of shared/contract.py against the code: each service's subscriptions and the
  event types and models it routes, the topics its modules name; every topic and type;
- the schemas against the code: real dead letters (from the consumer pipeline) and real
  envelopes validate against the document; the portal's payload schemas accept and refuse
  what the pydantic models accept and refuse.

CI also validates the file with the AsyncAPI project's parser (`make contract-check`).
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012
from ruamel.yaml import YAML

from clave import asyncapi
from shared import contract
from shared import topics as t
from shared.consumer import EventPipeline, Route
from shared.contract import ADMIN_ONLY, CLIENTS, SERVICES, TOPICS, carried_by
from shared.envelope import CONTENT_TYPE, new_event
from shared.metrics import ServiceMetrics
from shared.runtime import Service
from shared.schemas import SCHEMAS, RecoveryOutcome, RecoveryRequested, ResetSubmitted
from shared.settings import PlatformSettings
from shared.topics import EventType

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
BASE = "urn:clave:asyncapi"


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return json.loads(json.dumps(asyncapi.build()))


def validator(document: dict[str, Any], pointer: str) -> Draft202012Validator:
    """A validator for the schema at `pointer` in the document, its `$ref`s resolved in it."""
    registry: Registry[Any] = Registry().with_resource(
        BASE, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"{BASE}#{pointer}"}, registry=registry)


def errors(check: Draft202012Validator, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in check.iter_errors(instance)]


# ---- drift -------------------------------------------------------------------------------------


def test_committed_document_is_what_the_code_builds() -> None:
    committed = DOCUMENT.read_text(encoding="utf-8") if DOCUMENT.exists() else ""
    assert committed == asyncapi.render(asyncapi.build()), (
        f"docs/asyncapi.yaml differs from the code's topics or schemas: run `{asyncapi.REGENERATE}` "
        "and commit docs/asyncapi.yaml"
    )


def test_written_yaml_reads_back_as_the_document(document: dict[str, Any]) -> None:
    assert YAML(typ="safe").load(asyncapi.render(document)) == document


def test_check_mode_names_the_command_to_regenerate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "asyncapi.yaml"
    stale.write_text(DOCUMENT.read_text(encoding="utf-8").replace("recovery.outcomes", "recovery.answers"))
    assert asyncapi.main(stale, check=True) == 1
    assert asyncapi.REGENERATE in capsys.readouterr().out
    assert asyncapi.main(stale) == 0
    assert asyncapi.main(stale, check=True) == 0


# ---- the table against the code ----------------------------------------------------------------


def test_every_topic_has_its_contract_and_a_channel(document: dict[str, Any]) -> None:
    topics = {spec.name for spec in t.all_topics(6, 1, 1)}
    assert set(TOPICS) == {n for n in topics if not n.endswith(t.DLQ_SUFFIX)}, "a topic without a contract entry"
    assert topics <= set(document["channels"])
    for service, spec in SERVICES.items():
        for topic in spec.consumes:
            assert t.dlq(topic) in document["channels"], f"{service} dead-letters {topic} nowhere"
    for party in (*SERVICES, *CLIENTS):
        assert party in document["components"]["tags"]


def test_every_event_type_is_carried_by_exactly_one_topic() -> None:
    declared = {v for k, v in vars(EventType).items() if k.isupper()}
    carried = [e for topic in TOPICS for e in carried_by(topic)]
    assert sorted(carried) == sorted(set(carried)), "an event type on two topics"
    assert set(carried) | {EventType.DEAD_LETTER} == declared
    assert set(SCHEMAS) == set(carried), "a type on a topic without a payload model (or the reverse)"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_table_matches_the_service_subscriptions(service: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `build()` subscribes, with which types and models: exactly the table."""
    routed: dict[str, dict[str, Route]] = {}
    original = Service.consume

    def record(self: Service, topic: str, routes: dict[str, Route], **options: Any) -> None:
        routed[topic] = routes
        original(self, topic, routes, **options)

    monkeypatch.setattr(Service, "consume", record)
    built = importlib.import_module(f"services.{service}.app").build()
    assert sorted(routed) == sorted(SERVICES[service].consumes)
    assert built.group_id == contract.group_id(service)
    for topic, routes in routed.items():
        assert set(routes) <= set(carried_by(topic)), f"{service} routes types {topic} does not carry"
        for event_type, route in routes.items():
            assert route.model is SCHEMAS[event_type], f"{service} reads {event_type} with another model"


TOPIC_CONSTANTS = {k: v for k, v in vars(t).items() if k.isupper() and isinstance(v, str) and v in TOPICS}


def topics_named_in(paths: list[Path]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "shared.topics":
                found |= {TOPIC_CONSTANTS[a.name] for a in node.names if a.name in TOPIC_CONSTANTS}
    return found


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_table_matches_the_topics_the_service_code_names(service: str) -> None:
    spec = SERVICES[service]
    named = topics_named_in(list((ROOT / "services" / service).glob("*.py")))
    assert named <= {*spec.consumes, *spec.produces}, f"{service} names topics the table does not list"
    assert set(spec.produces) <= named, f"the table says {service} produces topics its code never names"


def test_portal_stand_in_and_cli_use_the_clients_topics() -> None:
    portal = CLIENTS["portal"]
    # The recovery stand-in plays part of the portal (the client library, clients/python, all of it).
    assert topics_named_in([ROOT / "tools" / "portal.py"]) <= {*portal.produces, *portal.consumes}
    # The operator's commands and their results; admin's registry of operator keys.
    operator = CLIENTS["operator"]
    named = topics_named_in([ROOT / "clave" / "cli.py", ROOT / "clave" / "operators.py"])
    assert named == {*operator.produces, *operator.consumes, *ADMIN_ONLY}


def test_operations_name_real_channels_and_messages(document: dict[str, Any]) -> None:
    for name, op in document["operations"].items():
        channel = op["channel"]["$ref"].removeprefix("#/channels/")
        assert channel in document["channels"], name
        for ref in op["messages"]:
            assert ref["$ref"].startswith(f"#/channels/{channel}/messages/"), name
            assert ref["$ref"].rsplit("/", 1)[1] in document["channels"][channel]["messages"], name
    senders = {op["channel"]["$ref"] for op in document["operations"].values() if op["action"] == "send"}
    unsent = {c for c in document["channels"] if f"#/channels/{c}" not in senders}
    # Declared in shared/topics.py before any service uses them (other branches): no operation yet.
    early = {t.IDENTITY_DECLINED, t.TOKENS_CODE_REJECTED}
    assert unsent <= early | {t.dlq(name) for name in early}, unsent


# ---- the schemas against what the code writes and reads ----------------------------------------


class FakeStore:
    """Takes the pipeline's commits: the dead letter it would put in the outbox."""

    def __init__(self) -> None:
        self.outgoing: list[Any] = []

    async def commit(self, *, consumer: str, event_id: str, writes: Any, outgoing: list[Any]) -> None:
        self.outgoing.extend(outgoing)


class FakeRecord:
    topic = t.RECOVERY_REQUESTS
    partition = 2
    offset = 41
    key = b"1710034065"


@pytest.mark.parametrize("raw", [b"{not json", b'{"specversion": "0.3", "id": "x", "source": "/p", "type": "t"}'])
async def test_real_dead_letters_match_the_document(document: dict[str, Any], raw: bytes) -> None:
    store = FakeStore()
    pipeline = EventPipeline(
        service="identity",
        topic=t.RECOVERY_REQUESTS,
        routes={},
        store=store,  # type: ignore[arg-type]
        settings=PlatformSettings(),
        metrics=ServiceMetrics("identity"),
        on_committed=lambda: None,
    )
    await pipeline.process(FakeRecord(), raw)  # type: ignore[arg-type]
    letters = [o for o in store.outgoing if o.topic == t.dlq(t.RECOVERY_REQUESTS)]
    assert len(letters) == 1
    letter = letters[0]
    message = "/components/messages/dead_letter.v1"
    assert errors(validator(document, f"{message}/payload"), json.loads(letter.event.to_bytes())) == []
    headers = letter.to_document()["headers"]
    assert errors(validator(document, f"{message}/headers"), headers) == []
    assert headers["content-type"] == CONTENT_TYPE
    assert letter.key == "1710034065"
    audit = [o for o in store.outgoing if o.topic == t.AUDIT_EVENTS]
    assert (
        errors(validator(document, "/components/messages/audit.v1/payload"), json.loads(audit[0].event.to_bytes()))
        == []
    )


def test_document_refuses_a_dead_letter_with_a_field_the_code_does_not_write(document: dict[str, Any]) -> None:
    data = {
        "reason": "malformed_json",
        "detail": "not JSON",
        "origin_topic": t.RECOVERY_REQUESTS,
        "origin_partition": 0,
        "origin_offset": 1,
        "payload_sha256": "0" * 64,
        "payload_bytes": 3,
        "sealed_payload": "gAAAA",
        "sealed_bytes": 3,
    }
    event = json.loads(
        new_event(type=EventType.DEAD_LETTER, source="/clave/identity", data=data, correlationid="c").to_bytes()
    )
    check = validator(document, "/components/messages/dead_letter.v1/payload")
    assert errors(check, event) == []
    event["data"]["payload"] = "the citizen's answers"
    assert errors(check, event), "a new dead-letter field must be documented"
    event["data"].pop("payload")
    event["data"]["reason"] = "no_such_reason"
    assert errors(check, event)


def outcome_event(data: dict[str, Any]) -> dict[str, Any]:
    return json.loads(
        new_event(type=EventType.RECOVERY_OUTCOME, source="/clave/tokens", data=data, correlationid="r-1").to_bytes()
    )


def test_outcomes_the_services_write_match_the_document(document: dict[str, Any]) -> None:
    check = validator(document, "/components/messages/recovery.outcome.v1/payload")
    reasons = document["components"]["schemas"]["ResetReason"]["enum"]
    for outcome in (
        RecoveryOutcome(request_id="r-1", stage="request", status="accepted"),
        RecoveryOutcome(request_id="r-1", stage="reset", status="completed"),
        RecoveryOutcome(request_id="r-1", stage="reset", status="rejected", reasons=reasons),
    ):
        assert errors(check, outcome_event(outcome.model_dump(mode="json"))) == []
    wrong = outcome_event({"request_id": "r-1", "stage": "reset", "status": "rejected", "reasons": ["nope"]})
    assert errors(check, wrong)


RESET = {"request_id": "req-1", "new_password": "Nuevo2025"}
REQUEST = {
    "request_id": "req-1",
    "profile": "affiliate",
    "national_id": "1710034065",
    "email": "maria@example.org",
    "answers": {"birth_date": "1984-03-09"},
    "captcha_passed": True,
    "client_ip": "10.1.2.3",
}


# (model, data, lax): `lax` marks input the document refuses but pydantic's lax mode coerces
# (the string "yes" for a boolean): the document may be stricter than the code, never looser.
@pytest.mark.parametrize(
    ("model", "data", "lax"),
    [
        (ResetSubmitted, {**RESET, "token": "abc"}, False),
        (ResetSubmitted, {**RESET, "code": "123456"}, False),
        (ResetSubmitted, {**RESET, "token": "abc", "code": None}, False),
        (ResetSubmitted, {**RESET, "token": None, "code": "123456", "client_ip": "10.0.0.1"}, False),
        (ResetSubmitted, {**RESET, "token": "abc", "code": "123456"}, False),  # both
        (ResetSubmitted, RESET, False),  # neither
        (ResetSubmitted, {**RESET, "token": None, "code": None}, False),
        (ResetSubmitted, {**RESET, "code": "12345"}, False),
        (ResetSubmitted, {**RESET, "token": ""}, False),
        (ResetSubmitted, {"request_id": "req-1", "token": "abc"}, False),  # no new key
        (ResetSubmitted, {**RESET, "token": "abc", "extra": 1}, False),  # unknown field
        (ResetSubmitted, {**RESET, "request_id": "req 1", "token": "abc"}, False),
        (RecoveryRequested, REQUEST, False),
        (
            RecoveryRequested,
            {**REQUEST, "profile": "employer", "representative_id": "1710034065", "locale": "en"},
            False,
        ),
        (RecoveryRequested, {**REQUEST, "profile": "company"}, False),
        (RecoveryRequested, {**REQUEST, "locale": "fr"}, False),
        (RecoveryRequested, {**REQUEST, "captcha_passed": "maybe"}, False),
        (RecoveryRequested, {**REQUEST, "captcha_passed": "yes"}, True),
        (RecoveryRequested, {**REQUEST, "answers": {f"q{i}": "a" for i in range(17)}}, False),
        (RecoveryRequested, {k: v for k, v in REQUEST.items() if k != "email"}, False),
        (RecoveryRequested, {**REQUEST, "token": "x"}, False),
    ],
)
def test_portal_schemas_accept_what_the_models_accept(
    document: dict[str, Any], model: type[BaseModel], data: dict[str, Any], lax: bool
) -> None:
    try:
        model.model_validate(data)
        accepted = True
    except ValidationError:
        accepted = False
    schema_errors = errors(validator(document, f"/components/schemas/{model.__name__}"), data)
    if lax:
        assert accepted and schema_errors
    else:
        assert (not schema_errors) == accepted, (accepted, schema_errors)


def test_portal_fields_and_the_envelope_are_described(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for name in ("CloudEvent", "RecoveryRequested", "ResetSubmitted", "RecoveryOutcome"):
        undescribed = [p for p, s in schemas[name]["properties"].items() if not s.get("description")]
        assert not undescribed, f"{name}: describe {undescribed} in clave/asyncapi.py"


def test_reason_enumerations_are_the_codes_of_the_code(document: dict[str, Any]) -> None:
    from services.identity.domain import Reason as RequestReason
    from services.password.policy import Reason as PasswordReason
    from services.tokens.domain import Reason as TokenReason
    from shared.envelope import DeadLetterReason
    from shared.portal_input import InputReason

    schemas = document["components"]["schemas"]
    reset = set(asyncapi.codes(TokenReason)) | set(PasswordReason.ALL) | set(asyncapi.codes(InputReason))
    assert set(schemas["ResetReason"]["enum"]) == reset
    assert {"plaintext_refused", "sealed_invalid"} <= reset
    assert schemas["PasswordReason"]["enum"] == list(PasswordReason.ALL)
    assert set(schemas["RequestReason"]["enum"]) == {
        "id_invalid",
        "account_unknown",
        "answers_wrong",
        "email_mismatch",
        "representative_mismatch",
        "captcha_missing",
        "locked",
        "rate_limited",
        "duplicate_request",
    } | set(asyncapi.codes(RequestReason))
    assert schemas["DeadLetterReason"]["enum"] == asyncapi.codes(DeadLetterReason)
    # What a request may be `rejected` with (added to, never renamed): a repeat, or unreadable.
    assert schemas["RequestOutcomeReason"]["enum"] == ["duplicate_request", "request_invalid"]
    outcome_reasons = schemas["RecoveryOutcome"]["properties"]["reasons"]["items"]["anyOf"]
    assert {"$ref": "#/components/schemas/RequestOutcomeReason"} in outcome_reasons
    for name in ("ResetReason", "PasswordReason", "RequestReason", "RequestOutcomeReason", "DeadLetterReason"):
        for code in schemas[name]["enum"]:
            assert f"| `{code}` |" in schemas[name]["description"]


def test_every_message_states_its_record_key_and_headers(document: dict[str, Any]) -> None:
    for name, message in document["components"]["messages"].items():
        assert message["bindings"]["kafka"]["key"]["description"], name
        assert message["headers"]["$ref"].endswith("Headers"), name
        assert message["contentType"] == CONTENT_TYPE
    for topic, channel in document["channels"].items():
        assert "**Record key:**" in channel["description"], topic
