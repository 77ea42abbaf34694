"""The CloudEvents envelope parser (every DLQ reason, fuzzing) and the payload schemas."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.envelope import (
    SPECVERSION,
    BadInput,
    CloudEvent,
    DeadLetterReason,
    describe_errors,
    new_event,
    parse_event,
)
from shared.schemas import ContactUpdateRequested, LoginCheckRequested, RecoveryRequested, ResetSubmitted
from shared.topics import EventType

KNOWN = frozenset({EventType.RECOVERY_REQUESTED, EventType.RESET_SUBMITTED})
LIMIT = 64 * 1024
SECRET = "S3cr3t-Hunter2-XyZzY"  # noqa: S105 - a value that must never leak into DLQ details


def valid_doc(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "0b6f0a38-6f3f-4a33-9d49-3c4c4b8f2a11",
        "source": "/portal",
        "type": EventType.RESET_SUBMITTED,
        "time": "2025-03-09T12:00:00Z",
        "datacontenttype": "application/json",
        "correlationid": "req-1",
        "data": {"request_id": "req-1", "token": "t", "new_password": "Abc123"},
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not _DROP}


_DROP = object()


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def reason_of(data: bytes, *, max_bytes: int = LIMIT, known: frozenset[str] = KNOWN) -> str:
    with pytest.raises(BadInput) as info:
        parse_event(data, max_bytes=max_bytes, known_types=known)
    return info.value.reason


# ------------------------------------------------------------------ happy path


def test_valid_event_parses() -> None:
    event = parse_event(raw(valid_doc()), max_bytes=LIMIT, known_types=KNOWN)
    assert event.type == EventType.RESET_SUBMITTED
    assert event.time == datetime(2025, 3, 9, 12, 0, tzinfo=UTC)
    assert event.correlationid == "req-1"
    assert event.data["request_id"] == "req-1"


def test_new_event_round_trips_through_bytes() -> None:
    event = new_event(
        type=EventType.RECOVERY_REQUESTED,
        source="/clave/test",
        subject="s",
        data={"a": 1, "nombre": "Peña", "nested": {"x": [1, 2]}},
        correlationid="req-9",
        causationid="evt-0",
    )
    assert event.specversion == SPECVERSION
    again = parse_event(event.to_bytes(), max_bytes=LIMIT, known_types=KNOWN)
    assert again == event
    assert again.to_bytes() == event.to_bytes()
    assert "Peña" in event.to_bytes().decode()  # UTF-8, not \u escapes


def test_to_bytes_omits_absent_optional_attributes() -> None:
    event = new_event(type=EventType.RECOVERY_REQUESTED, source="/s", data={}, correlationid="c")
    doc = json.loads(event.to_bytes())
    assert "subject" not in doc and "causationid" not in doc
    assert set(doc) >= {"specversion", "id", "source", "type", "time", "correlationid", "data"}


def test_valid_extension_attribute_kept() -> None:
    event = parse_event(raw(valid_doc(traceparent="00-abc-01", retries=2)), max_bytes=LIMIT, known_types=KNOWN)
    assert json.loads(event.to_bytes())["traceparent"] == "00-abc-01"


def test_exactly_at_size_limit_is_accepted() -> None:
    data = raw(valid_doc())
    assert parse_event(data, max_bytes=len(data), known_types=KNOWN).id


# ------------------------------------------------------------------ each DLQ reason


def test_too_large() -> None:
    data = raw(valid_doc())
    assert reason_of(data, max_bytes=len(data) - 1) == DeadLetterReason.TOO_LARGE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"{'a': 1}",
        b"not json",
        b'{"a":1}{"b":2}',
        b"\xff\xfe\xfd",
        b'{"specversion":"1.0","id":"\xff"}',
        b"\xc3\x28",
    ],
)
def test_malformed_json(data: bytes) -> None:
    assert reason_of(data) == DeadLetterReason.MALFORMED_JSON


@pytest.mark.parametrize("doc", [[], [valid_doc()], 42, 1.5, "text", None, True])
def test_not_cloudevent_when_not_an_object(doc: Any) -> None:
    assert reason_of(raw(doc)) == DeadLetterReason.NOT_CLOUDEVENT


@pytest.mark.parametrize("missing", ["specversion", "id", "source", "type", "time", "correlationid", "data"])
def test_not_cloudevent_when_attribute_missing(missing: str) -> None:
    assert reason_of(raw(valid_doc(**{missing: _DROP}))) == DeadLetterReason.NOT_CLOUDEVENT


@pytest.mark.parametrize(
    "overrides",
    [
        {"time": "2025-03-09T12:00:00"},  # naive: no offset
        {"time": "yesterday"},
        {"id": ""},
        {"id": "x" * 129},
        {"correlationid": ""},
        {"source": ""},
        {"data": [1, 2]},
        {"data": "string"},
        {"data": None},
        {"subject": "s" * 257},
        {"BadName": "x"},  # extension names are lowercase alphanumerics
        {"ext_1": "x"},
        {"ext": {"nested": 1}},  # extension values are scalars
        {"ext": [1]},
    ],
)
def test_not_cloudevent_when_attribute_invalid(overrides: dict[str, Any]) -> None:
    assert reason_of(raw(valid_doc(**overrides))) == DeadLetterReason.NOT_CLOUDEVENT


@pytest.mark.parametrize("version", ["0.3", "1", "1.0 ", 1.0, None, ["1.0"]])
def test_wrong_specversion(version: Any) -> None:
    assert reason_of(raw(valid_doc(specversion=version))) == DeadLetterReason.WRONG_SPECVERSION


def test_unknown_type() -> None:
    doc = valid_doc(type="ec.clave.something.else.v1")
    assert reason_of(raw(doc)) == DeadLetterReason.UNKNOWN_TYPE
    # The same event is fine where that type is consumed.
    assert parse_event(raw(doc), max_bytes=LIMIT, known_types={"ec.clave.something.else.v1"})


def test_timezone_offsets_accepted() -> None:
    event = parse_event(raw(valid_doc(time="2025-03-09T07:00:00-05:00")), max_bytes=LIMIT, known_types=KNOWN)
    assert event.time == datetime(2025, 3, 9, 12, 0, tzinfo=UTC)


# ------------------------------------------------------------------ known crashes


@pytest.mark.parametrize("bad_type", [[], {}, ["ec.clave.reset.submitted.v1"]])
def test_non_string_type_is_bad_input(bad_type: Any) -> None:
    assert reason_of(raw(valid_doc(type=bad_type))) in (DeadLetterReason.NOT_CLOUDEVENT, DeadLetterReason.UNKNOWN_TYPE)


def test_huge_integer_is_bad_input() -> None:
    data = b'{"specversion":"1.0","n":' + b"1" * 5000 + b"}"
    assert len(data) < LIMIT
    assert reason_of(data) == DeadLetterReason.MALFORMED_JSON


def test_deeply_nested_json_is_bad_input() -> None:
    depth = 5000
    data = b'{"specversion":"1.0","data":' + b"[" * depth + b"]" * depth + b"}"
    assert len(data) < LIMIT
    assert reason_of(data) in (DeadLetterReason.MALFORMED_JSON, DeadLetterReason.NOT_CLOUDEVENT)


# ------------------------------------------------------------------ no secrets in details


@pytest.mark.parametrize(
    "overrides",
    [
        {"id": SECRET * 10},
        {"time": SECRET},
        {"data": SECRET},
        {"data": [SECRET]},
        {"subject": SECRET * 20},
        {"correlationid": SECRET * 10},
        {"causationid": SECRET * 10},
        {"ext": {"password": SECRET}},
        {"ext": [SECRET]},
        {"source": 12345, "time": SECRET, "data": SECRET},
        {SECRET: "x"},  # an extension *name* is input too
    ],
)
def test_not_cloudevent_detail_never_contains_the_input(overrides: dict[str, Any]) -> None:
    with pytest.raises(BadInput) as info:
        parse_event(raw(valid_doc(**overrides)), max_bytes=LIMIT, known_types=KNOWN)
    assert info.value.reason == DeadLetterReason.NOT_CLOUDEVENT
    assert info.value.detail  # says which field
    assert SECRET not in info.value.detail
    assert SECRET not in str(info.value)


def test_describe_errors_names_fields_but_not_values() -> None:
    with pytest.raises(ValidationError) as info:
        ResetSubmitted.model_validate(
            {"request_id": "r 1", "code": SECRET[:6], "new_password": SECRET * 20, "extra": SECRET}
        )
    text = describe_errors(info.value)
    assert SECRET not in text and SECRET[:6] not in text
    assert "new_password" in text and "code" in text
    # The raw pydantic message, by contrast, would show the inputs.
    assert SECRET in str(info.value)


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (ResetSubmitted, {"request_id": "r-1", "code": "123456", "new_password": "x"}),
        (RecoveryRequested, {}),  # many errors: the address's must still not show the input
        (LoginCheckRequested, {"check_id": "c-1", "national_id": "1710034065", "key": "x"}),
        (ContactUpdateRequested, {"update_id": "u-1", "national_id": "1710034065", "key": "x", "phone": "1"}),
    ],
)
def test_a_bad_client_ip_is_named_but_never_quoted(model: type[Any], fields: dict[str, Any]) -> None:
    # ipaddress's own error quotes the value ("'...' does not appear to be an IPv4 or IPv6
    # address"): a portal that misfiles a secret into client_ip would see it in the DLQ header.
    with pytest.raises(ValidationError) as info:
        model.model_validate({**fields, "client_ip": SECRET})
    errors = info.value.errors(include_input=False, include_url=False)
    assert any(err["loc"] == ("client_ip",) for err in errors)
    assert all(SECRET not in str(err["msg"]) for err in errors)
    assert SECRET not in describe_errors(info.value)


def test_describe_errors_limits_to_five_errors() -> None:
    with pytest.raises(ValidationError) as info:
        CloudEvent.model_validate({})
    assert len(info.value.errors()) > 5
    assert describe_errors(info.value).count(";") == 4


def test_malformed_json_detail_has_no_payload() -> None:
    with pytest.raises(BadInput) as info:
        parse_event(b'{"new_password": "' + SECRET.encode() + b'"', max_bytes=LIMIT, known_types=KNOWN)
    assert info.value.reason == DeadLetterReason.MALFORMED_JSON
    assert SECRET not in str(info.value)


# ------------------------------------------------------------------ fuzz


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        event = parse_event(data, max_bytes=256, known_types=KNOWN)
    except BadInput as bad:
        assert bad.reason in {
            DeadLetterReason.TOO_LARGE,
            DeadLetterReason.MALFORMED_JSON,
            DeadLetterReason.NOT_CLOUDEVENT,
            DeadLetterReason.WRONG_SPECVERSION,
            DeadLetterReason.UNKNOWN_TYPE,
        }
        if len(data) > 256:
            assert bad.reason == DeadLetterReason.TOO_LARGE
    else:
        assert isinstance(event, CloudEvent)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
hashable_json = json_scalars | st.sampled_from(sorted(KNOWN))


@settings(max_examples=300)
@given(
    st.fixed_dictionaries(
        {
            "specversion": st.sampled_from(["1.0", "1.0", "0.3"]) | json_values,
            "id": json_values,
            "source": json_values,
            "type": hashable_json,
        },
        optional={
            "time": st.sampled_from(["2025-03-09T12:00:00Z", "2025-03-09T12:00:00"]) | json_values,
            "correlationid": json_values,
            "data": json_values,
            "subject": json_values,
            "ext": json_values,
        },
    )
)
def test_fuzz_cloudevent_shaped_documents(doc: dict[str, Any]) -> None:
    """Near-miss envelopes: right keys, arbitrary values. (A non-hashable `type` is the known
    crash above, so `type` stays a scalar here.)"""
    try:
        event = parse_event(raw(doc), max_bytes=LIMIT, known_types=KNOWN)
    except BadInput as bad:
        assert bad.reason != DeadLetterReason.MALFORMED_JSON
    else:
        assert event.type in KNOWN and event.time.tzinfo is not None


# ------------------------------------------------------------------ schemas: ResetSubmitted


def test_reset_with_token_or_code() -> None:
    by_token = ResetSubmitted(request_id="req-1", token="tok", new_password="Abc123")
    by_code = ResetSubmitted(request_id="req-1", code="012345", new_password="Abc123")
    assert by_token.code is None and by_code.token is None
    assert by_code.code == "012345"


@pytest.mark.parametrize(
    "secrets_given",
    [{}, {"token": "tok", "code": "123456"}, {"token": None, "code": None}],
)
def test_reset_requires_exactly_one_secret(secrets_given: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResetSubmitted(request_id="req-1", new_password="Abc123", **secrets_given)


@pytest.mark.parametrize(
    "code",
    ["12345", "1234567", "12345a", "", " 123456", "123456 ", "123456\n", "１２３４５６", "١٢٣٤٥٦", "12 456"],
)
def test_reset_code_must_be_six_ascii_digits(code: str) -> None:
    with pytest.raises(ValidationError):
        ResetSubmitted(request_id="req-1", code=code, new_password="Abc123")


@given(st.text(alphabet="0123456789", min_size=6, max_size=6))
def test_reset_any_six_digit_code_accepted(code: str) -> None:
    assert ResetSubmitted(request_id="r", code=code, new_password="x").code == code


@pytest.mark.parametrize(
    "fields",
    [
        {"token": ""},
        {"token": "t" * 129},
        {"token": "t", "new_password": ""},
        {"token": "t", "new_password": "x" * 257},
        {"token": "t", "request_id": "req 1"},
        {"token": "t", "request_id": ""},
        {"token": "t", "request_id": "r" * 65},
        {"token": "t", "unexpected": 1},
    ],
)
def test_reset_shape_rules(fields: dict[str, Any]) -> None:
    base = {"request_id": "req-1", "new_password": "Abc123"}
    with pytest.raises(ValidationError):
        ResetSubmitted.model_validate({**base, **fields})


# ------------------------------------------------------------------ schemas: RecoveryRequested


def request(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "request_id": "req-1",
        "profile": "affiliate",
        "national_id": "1710034065",
        "email": "maria.perez@example.org",
        "answers": {"birth_date": "1984-03-09", "mother_surname": "Andrade"},
        "captcha_passed": True,
        "locale": "es",
        "client_ip": "190.152.1.10",
    }
    doc.update(kw)
    return doc


def test_recovery_requested_valid() -> None:
    req = RecoveryRequested.model_validate(request())
    assert req.representative_id is None and req.locale == "es"


def test_recovery_requested_ipv6_normalised() -> None:
    req = RecoveryRequested.model_validate(request(client_ip="2001:0DB8:0000:0000::0001"))
    assert req.client_ip == "2001:db8::1"


@pytest.mark.parametrize("field", ["password", "nationalId", "token"])
def test_recovery_requested_rejects_unknown_fields(field: str) -> None:
    with pytest.raises(ValidationError):
        RecoveryRequested.model_validate(request(**{field: "x"}))


@pytest.mark.parametrize(
    "ip", ["", "999.1.1.1", "1.2.3", "localhost", "190.152.1.10 ", "190.152.1.10/24", "::g", "1.2.3.4.5"]
)
def test_recovery_requested_rejects_bad_client_ip(ip: str) -> None:
    with pytest.raises(ValidationError):
        RecoveryRequested.model_validate(request(client_ip=ip))


@pytest.mark.parametrize(
    "answers",
    [{"birth_date": "x" * 257}, {"": "a"}, {"k" * 65: "a"}, {f"q{i}": "a" for i in range(17)}],
)
def test_recovery_requested_rejects_oversize_answers(answers: dict[str, str]) -> None:
    with pytest.raises(ValidationError) as info:
        RecoveryRequested.model_validate(request(answers=answers))
    assert "x" * 257 not in describe_errors(info.value)


def test_recovery_requested_answer_size_limits_inclusive() -> None:
    answers = {"k" * 64: "x" * 256, **{f"q{i}": "" for i in range(15)}}
    assert len(RecoveryRequested.model_validate(request(answers=answers)).answers) == 16


@pytest.mark.parametrize(
    "fields",
    [
        {"profile": "admin"},
        {"locale": "fr"},
        {"email": "ab"},
        {"email": "a" * 255},
        {"national_id": ""},
        {"request_id": "a/b"},
        {"captcha_passed": None},
        {"representative_id": "1" * 33},
    ],
)
def test_recovery_requested_shape_rules(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RecoveryRequested.model_validate(request(**fields))


# ------------------------------------------------------------------ what a dead letter needs, from the one parse


def test_bad_input_carries_a_readable_correlation_id() -> None:
    with pytest.raises(BadInput) as info:
        parse_event(raw(valid_doc(type="ec.clave.other.v1")), max_bytes=LIMIT, known_types=KNOWN)
    assert info.value.correlationid == "req-1"


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"a":' * 3000 + b"1" + b"}" * 3000,
        b'{"correlationid":"req-1","n":' + b"1" * 5000 + b"}",
        raw(valid_doc(correlationid="x" * 129, type="ec.clave.other.v1")),
        raw(valid_doc(correlationid="req\n1", type="ec.clave.other.v1")),
        raw(valid_doc(correlationid=["req-1"])),
        raw([valid_doc()]),
    ],
)
def test_bad_input_without_a_usable_correlation_id(data: bytes) -> None:
    with pytest.raises(BadInput) as info:
        parse_event(data, max_bytes=LIMIT, known_types=KNOWN)
    assert info.value.correlationid is None


@pytest.mark.parametrize(
    "doc",
    [
        valid_doc(correlationid="req-\ud800"),
        valid_doc(data={"request_id": "req-1", "token": "\udc00", "new_password": "Abc123"}),
        valid_doc(data={"\ud83d": 1}),
        valid_doc(ext="\udfff"),
    ],
)
def test_lone_surrogate_is_malformed_json(doc: dict[str, Any]) -> None:
    """JSON escapes can spell a string that is not Unicode; nothing downstream could encode it."""
    assert reason_of(raw(doc)) == DeadLetterReason.MALFORMED_JSON


def test_surrogate_pair_and_escaped_backslash_are_fine() -> None:
    doc = valid_doc(data={"request_id": "req-1", "token": "\U0001f600 \\ud800", "new_password": "Abc123"})
    data = raw(doc)
    assert b"\\ud83d\\ude00" in data and b"\\\\ud800" in data
    assert parse_event(data, max_bytes=LIMIT, known_types=KNOWN).data["token"] == "\U0001f600 \\ud800"
