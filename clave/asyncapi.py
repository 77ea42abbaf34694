"""The topic contract as an AsyncAPI 3.0 document, made from the code.

    .venv/bin/clave contract            # (re)write docs/asyncapi.yaml
    .venv/bin/clave contract --check    # exit 1 when docs/asyncapi.yaml is not what the code says

Channels are the topics of shared/topics.py and their `.dlq` twins; a message is a
CloudEvents `type`, its payload the envelope (shared/envelope.py `CloudEvent`) with `data`
the pydantic model of shared/schemas.py (`model_json_schema`, validation mode: what a
consumer accepts); operations say who sends and who receives each topic
(shared/contract.py). Reason codes come from the services' domains.

Why not FastStream's own generator: Clave's handlers take raw bytes (the pipeline parses
and dead-letters), outgoing events go through the outbox relay rather than the broker, and
FastStream 0.7.8's AsyncAPI 3 builder makes one channel per subscriber (`identity:topic`),
one message per channel, no headers and no record key, so its document would need
rewriting here anyway.
"""

from __future__ import annotations

import difflib
import inspect
import json
import re
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from services.identity.domain import ContactReason, OutcomeReason
from services.identity.domain import Reason as RequestReason
from services.password.domain import LoginReason
from services.password.policy import Reason as PasswordReason
from services.tokens.domain import Reason as TokenReason
from shared import topics as t
from shared.contract import (
    ADMIN_ONLY,
    CLIENTS,
    DLQ_HEADERS,
    PORTAL_FACING,
    SERVICES,
    TOPICS,
    DeadLetter,
    carried_by,
    record_key,
    writes,
)
from shared.envelope import CONTENT_TYPE, SPECVERSION, CloudEvent, DeadLetterReason
from shared.portal_input import InputReason
from shared.schemas import SCHEMAS
from shared.settings import PlatformSettings
from shared.topics import EventType

ASYNCAPI = "3.0.0"
KAFKA_BINDING = "0.5.0"
DOCUMENT = Path("docs/asyncapi.yaml")
REGENERATE = ".venv/bin/clave contract"
SCHEMA_REF = "#/components/schemas/"

# ---- descriptions the models do not carry ------------------------------------------------------

ENVELOPE_FIELDS: dict[str, str] = {
    "specversion": "CloudEvents version: always `1.0` (anything else is dead-lettered as `wrong_specversion`).",
    "id": "Unique id of this event (a UUID from Clave). Consumers drop an id they already processed.",
    "source": "Who produced it: `/clave/<service>` for Clave's services, `/clave/cli` for operator commands; "
    "the portal names itself.",
    "type": "The event type, `ec.clave.<what>.v<N>`: it decides the schema of `data`. A type not carried by the "
    "topic is dead-lettered as `unknown_type`.",
    "time": "When the event was produced, RFC 3339 with a timezone.",
    "subject": "Audit events: the action; dead letters: the reason; operator commands: the operator id.",
    "datacontenttype": "Always `application/json`.",
    "correlationid": "Extension: the recovery's `request_id` (for an operator command, its command id; for a "
    "credential check, its `check_id`). Every event a recovery causes carries it.",
    "causationid": "Extension: the `id` of the event that caused this one (absent for portal input).",
    "data": "The payload of this `type` (each message below gives its schema).",
}

# The portal-facing payloads: every field is described (tests/unit/test_contract.py checks it).
PORTAL_FIELDS: dict[str, dict[str, str]] = {
    "RecoveryRequested": {
        "request_id": "The portal's id for this recovery: it comes back on `recovery.outcomes`, in the link "
        "(`PORTAL_BASE_URL/recuperar?request_id=…&token=…`) and as `correlationid`. Unique per request "
        "(a repeated one is refused as `duplicate_request`).",
        "profile": "`affiliate` (a citizen, by cédula) or `employer` (by RUC, with the legal representative).",
        "national_id": "Cédula (10 digits) or, for an employer, RUC (13 digits); spaces and dashes allowed.",
        "representative_id": "Employers: the legal representative's cédula.",
        "email": "The e-mail address the citizen typed. Mail only ever goes to the registered address.",
        "answers": "Security question id → the citizen's answer, for every configured question "
        "(`SECURITY_QUESTIONS`); compared ignoring case, accents and spacing. Exactly one of `answers` and "
        "`sealed_answers`; refused (`plaintext_refused`) when Clave runs with `PORTAL_INPUT=sealed`.",
        "sealed_answers": "The same object as JSON, sealed to Clave's public key: base64url of HPKE (RFC 9180) "
        "`enc || ciphertext`, suite DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / ChaCha20-Poly1305, `info` "
        "`clave-portal-input/v1|recovery.requests|answers|<request_id>`.",
        "captcha_passed": "Whether the citizen solved the portal's captcha.",
        "locale": "Language of the e-mails: `es` or `en`.",
        "client_ip": "The citizen's IP address (IPv4 or IPv6), for the per-address limits.",
    },
    "ResetSubmitted": {
        "request_id": "The `request_id` from the link, or the one the code was sent for.",
        "token": "The token from the link. Exactly one of `token` and `code`.",
        "code": "The 6-digit code from the e-mail. Exactly one of `token` and `code`.",
        "new_password": "The new key, checked against the key policy and the last keys. Exactly one of "
        "`new_password` and `sealed_new_password`; refused (`plaintext_refused`) under `PORTAL_INPUT=sealed`.",
        "sealed_new_password": "The new key (UTF-8) sealed to Clave's public key: base64url of HPKE `enc || "
        "ciphertext` (suite as `sealed_answers`), `info` `clave-portal-input/v1|recovery.resets|new_password|"
        "<request_id>`.",
        "client_ip": "Optional: the citizen's IP address, so wrong codes also count per address block.",
    },
    "RecoveryOutcome": {
        "request_id": "The request this answers.",
        "stage": "`request`: the answer to `recovery.requests`; `reset`: the answer to `recovery.resets`.",
        "status": "`accepted` (every request, whatever the account: no enumeration), `completed` (the key was "
        "changed) or `rejected` (the reset was refused; the same link works again unless a reason says "
        "otherwise. A request only when its `request_id` repeats or it cannot be processed).",
        "reasons": "`rejected` only: every reason that applies (`ResetReason`s; a repeated request: "
        "`duplicate_request`; a request that cannot be processed: `request_invalid`; at either stage, input refused "
        "for how its secrets came: `plaintext_refused`, "
        "`sealed_invalid`, never anything about the account).",
    },
    "LoginCheckRequested": {
        "check_id": "The portal's id for this check: the answer on `login.results` is keyed by it and carries it "
        "(also as `correlationid`).",
        "national_id": "Cédula (10 digits) or RUC (13 digits), as the citizen typed it; spaces and dashes allowed.",
        "key": "The key the citizen typed. Never stored, logged or audited; compared with the stored argon2id "
        "hash (a decoy hash when the ID has no key, so the answer and its timing are the same). Exactly one of "
        "`key` and `sealed_key`; refused (`plaintext_refused`) under `PORTAL_INPUT=sealed`.",
        "client_ip": "The citizen's IP address (IPv4 or IPv6): wrong keys are throttled per address block "
        "(IPv4 address, IPv6 /64).",
        "sealed_key": "The key (UTF-8) sealed to Clave's public key (suite as `sealed_answers`), `info` "
        "`clave-portal-input/v1|login.checks|key|<check_id>`.",
    },
    "ContactUpdateRequested": {
        "update_id": "The portal's id for this update: the answer on `account.contact_results` is keyed by it.",
        "national_id": "Cédula (10 digits) or RUC (13 digits), as the citizen typed it.",
        "key": "The citizen's current key, checked exactly as a login's (same throttling, decoy hash, audit "
        "without the key). Exactly one of `key` and `sealed_key`.",
        "sealed_key": "The key sealed to Clave's public key (suite as `sealed_answers`), `info` "
        "`clave-portal-input/v1|account.contact_updates|key|<update_id>`.",
        "email": "Optional: the new registered e-mail (recoveries go there).",
        "backup_email": "Optional: the new backup e-mail (a recovery goes there when the citizen types it; the "
        'registered address is then told); `""` removes it.',
        "phone": "Optional: the new phone number, E.164 (`+593991234567`) or Ecuadorian national format; stored "
        'as E.164; `""` removes it. At least one of `email`, `backup_email`, `phone`.',
        "client_ip": "The citizen's IP address: wrong keys are throttled per address block, as logins.",
    },
    "ContactResult": {
        "update_id": "The update this answers.",
        "status": "`updated` (every address on file before was told, live recovery links were revoked) or "
        "`rejected` (nothing changed).",
        "reasons": "`rejected` only (`ContactResultReason`): a wrong key (`key_invalid`, alike for an unknown ID), "
        "`throttled`, or contact data that is not valid.",
    },
    "LoginResult": {
        "check_id": "The check this answers.",
        "status": "`valid`: the key is the account's current key; `invalid`: anything else, alike for an "
        "unknown ID and a wrong key.",
        "reasons": "`invalid` only (`LoginReason`): `key_invalid`, `id_invalid`, `throttled` or `check_invalid`.",
    },
    "AccountKeyChanged": {
        "national_id": "The citizen's national ID, normalised (digits only): also the record key.",
        "changed_at": "When the new key was stored.",
        "cause": "`recovery` (a reset through a link or code) or `initial` (the registry's initial key).",
        "request_id": "The recovery that changed it (`cause` `recovery`).",
    },
}


# Rules a model enforces in a validator, stated in JSON Schema.
def _one_of(*fields: str) -> dict[str, Any]:
    return {"oneOf": [{"required": [f], "properties": {f: {"type": "string"}}} for f in fields]}


MODEL_RULES: dict[str, dict[str, Any]] = {
    "RecoveryRequested": {
        "oneOf": [
            {"required": ["answers"], "properties": {"answers": {"type": "object"}}},
            {"required": ["sealed_answers"], "properties": {"sealed_answers": {"type": "string"}}},
        ]
    },
    "ResetSubmitted": {"allOf": [_one_of("token", "code"), _one_of("new_password", "sealed_new_password")]},
    "LoginCheckRequested": _one_of("key", "sealed_key"),
    "ContactUpdateRequested": {
        "allOf": [
            _one_of("key", "sealed_key"),
            {"anyOf": [{"required": ["email"]}, {"required": ["backup_email"]}, {"required": ["phone"]}]},
        ]
    },
}

# Where a topic carries several types, what each one is.
TYPE_SUMMARIES: dict[str, str] = {
    EventType.OPERATOR_EMAIL_UPDATE: "An operator changes an account's e-mail to `new_email` (live tokens are "
    "revoked; the old and the new address are told).",
    EventType.OPERATOR_UNLOCK: "An operator unlocks an account.",
    EventType.OPERATOR_SEND_RECOVERY: "An operator sends the recovery e-mail to the registered address.",
    EventType.OPERATOR_CONTACT_UPDATE: "An operator changes an account's backup e-mail and phone "
    '(`new_backup_email`, `new_phone`; `""` removes one; the registered e-mail is update-email\'s, with a second '
    "operator): live tokens are revoked, every address on file before is told.",
    EventType.OPERATOR_APPROVE: "A second, different operator approves a pending command (an e-mail change) by "
    "its id (`approves`).",
    EventType.OPERATOR_CANCEL: "Any registered operator (the requester too) cancels a pending e-mail change, "
    "approved or not, by its id (`cancels`): it never takes effect and both addresses are told. An unknown, applied "
    "or already cancelled change is refused (`change_unknown`, `change_already_applied`, `change_already_cancelled`).",
    EventType.IDENTITY_EMAIL_CHANGE_REQUESTED: "An e-mail change was requested: the old address (the new one masked) "
    "and the new address are told.",
    EventType.IDENTITY_EMAIL_CHANGE_CANCELLED: "An operator cancelled a pending e-mail change: both addresses are told "
    "it will not take effect.",
    EventType.OPERATOR_ACCOUNT_IMPORT: "One line of the registry import: the account's fields, its answers and "
    "initial key sealed for identity. A changed e-mail needs an approval; an unchanged record is a no-op.",
    EventType.OPERATOR_KEY_REGISTERED: "`admin` registers an operator's Ed25519 public key.",
    EventType.OPERATOR_KEY_REVOKED: "`admin` revokes an operator's key: its commands are refused from then on.",
}

RESET_REASONS: dict[str, str] = {
    TokenReason.TOKEN_INVALID: "Unknown or revoked token, or a wrong code (attempts left).",
    TokenReason.TOKEN_EXPIRED: "The link (`LINK_TTL_S`, 30 min) or the code (`CODE_TTL_S`, 10 min) has expired.",
    TokenReason.TOKEN_USED: "Already used, or a key change with it is in progress.",
    TokenReason.RESET_INVALID: "The reset could not be processed at all (not JSON, not a valid event, a field "
    "missing or malformed): besides its dead letter on `recovery.resets.dlq`, keyed by the `request_id` read from "
    "it (else its record key). Nothing changed: the link works as before.",
    TokenReason.CODE_ATTEMPTS_EXCEEDED: "Too many wrong codes (`CODE_MAX_ATTEMPTS`, 5): the token is dead, "
    "link included.",
}
PASSWORD_REASONS: dict[str, str] = {
    PasswordReason.TOO_SHORT: "Shorter than the policy allows (seed: 6, nist: 15).",
    PasswordReason.TOO_LONG: "Longer than the policy allows (seed: 15, nist: 64).",
    PasswordReason.NOT_ALPHANUMERIC: "Seed policy: only ASCII letters and digits.",
    PasswordReason.NEEDS_LETTER_AND_DIGIT: "Seed policy: at least one letter and one digit.",
    PasswordReason.BLOCKLISTED: "A common key from the shipped blocklist.",
    PasswordReason.NOT_PRINTABLE: "NIST policy: a control, separator, surrogate or unassigned character.",
    PasswordReason.REUSED: "Equal to one of the last keys (`PASSWORD_HISTORY`, 5).",
}
INPUT_REASONS: dict[str, str] = {
    InputReason.PLAINTEXT_REFUSED: "A secret came in the clear while Clave runs with `PORTAL_INPUT=sealed`: "
    "send it sealed (nothing was checked, no token touched).",
    InputReason.SEALED_INVALID: "A sealed secret does not open with Clave's key for this record (another "
    "public key, another record's or field's context, or damaged bytes).",
}
CONTACT_REASONS: dict[str, str] = {
    ContactReason.EMAIL_INVALID: "The new e-mail is not a valid address.",
    ContactReason.BACKUP_EMAIL_INVALID: "The new backup e-mail is not a valid address.",
    ContactReason.PHONE_INVALID: "The new phone is not a valid number (E.164, or Ecuadorian national format).",
    ContactReason.BACKUP_SAME_AS_EMAIL: "The backup e-mail is the registered address.",
    ContactReason.NOTHING_TO_CHANGE: "The data given is what is on file already.",
    ContactReason.ACCOUNT_UNKNOWN: "The account is gone (an operator command about an unknown ID).",
}
LOGIN_REASONS: dict[str, str] = {
    LoginReason.KEY_INVALID: "Not the account's key, or no account (or no key yet) for this ID: alike.",
    LoginReason.ID_INVALID: "The national ID fails its check digits.",
    LoginReason.THROTTLED: "Too many wrong keys (from this address block for this account, for this account "
    "from many addresses, or from this address block overall): the key was not considered. Try later.",
    LoginReason.CHECK_INVALID: "The check could not be processed (its dead letter on `login.checks.dlq` says why).",
}

REQUEST_REASONS: dict[str, str] = {
    RequestReason.ID_INVALID: "The cédula or RUC fails its check digits.",
    RequestReason.ACCOUNT_UNKNOWN: "No account has this national ID.",
    RequestReason.ANSWERS_WRONG: "A security answer does not match.",
    RequestReason.EMAIL_MISMATCH: "The typed e-mail is not the registered one.",
    RequestReason.REPRESENTATIVE_MISMATCH: "An employer's legal representative differs.",
    RequestReason.CAPTCHA_MISSING: "The captcha was not passed.",
    RequestReason.LOCKED: "The account is locked.",
    RequestReason.RATE_LIMITED: "Too many failed requests from the client address, or too many recovery "
    "e-mails for the account.",
    RequestReason.DUPLICATE_REQUEST: "The same `request_id` again.",
}
REQUEST_OUTCOME_REASONS: dict[str, str] = {
    OutcomeReason.DUPLICATE_REQUEST: "The same `request_id` again: the first request's answer stands; "
    "nothing else happened.",
    OutcomeReason.REQUEST_INVALID: "The request could not be processed at all (not a valid event, a field "
    "missing or malformed): besides its dead letter on `recovery.requests.dlq`, keyed by the `request_id` read "
    "from its `data` (never by its record key; a record with no readable `request_id` gets no answer). Decided "
    "from the record alone, before any lookup: the same for a known and an unknown ID. Nothing happened: no "
    "e-mail, nothing counted.",
}
DLQ_REASONS: dict[str, str] = {
    DeadLetterReason.TOO_LARGE: "Larger than `MAX_EVENT_BYTES` (64 KiB).",
    DeadLetterReason.MALFORMED_JSON: "Not UTF-8 JSON.",
    DeadLetterReason.NOT_CLOUDEVENT: "Not a valid CloudEvents envelope.",
    DeadLetterReason.WRONG_SPECVERSION: "`specversion` is not `1.0`.",
    DeadLetterReason.UNKNOWN_TYPE: "A `type` this topic does not carry.",
    DeadLetterReason.SCHEMA_INVALID: "`data` does not match the schema of its type.",
    DeadLetterReason.DUPLICATE_EVENT: "An event id this consumer already processed (a redelivery: changes nothing).",
    DeadLetterReason.UNDECRYPTABLE: "A sealed field that does not open with the reader's keys (portal input: "
    "not with `PORTAL_SEALING_KEY` and the record's context).",
    DeadLetterReason.PLAINTEXT_REFUSED: "Portal input with a secret in the clear while Clave runs with "
    "`PORTAL_INPUT=sealed` (the portal also gets its outcome, reason `plaintext_refused`).",
    DeadLetterReason.HANDLER_ERROR: "The handler failed the same way 3 times (a bug, not an outage).",
    DeadLetterReason.SIGNATURE_MISSING: "An operator command without its signature, key id or signing time.",
    DeadLetterReason.SIGNATURE_INVALID: "An operator command whose signature does not verify with its operator's "
    "registered key (forged or altered).",
    DeadLetterReason.OPERATOR_UNKNOWN: "An operator command signed with a key that is not registered for that "
    "operator, or was revoked.",
    DeadLetterReason.COMMAND_EXPIRED: "An operator command signed longer ago than its lifetime "
    "(`OPERATOR_COMMAND_TTL_S`, 5 min), or in the future.",
    DeadLetterReason.COMMAND_REPLAYED: "An operator command whose `command_id` was already processed (a replay).",
    DeadLetterReason.SEALED_CONTEXT_MISMATCH: "A sealed field that opens with the reader's keys but was made for "
    "another purpose or another event (token, account, request or recipient): a copied or replayed blob. "
    "Nothing is done with it.",
    DeadLetterReason.SEALED_EXPIRED: "A sealed field older than the reader's lifetime for it (`SEALED_*_TTL_S`), "
    "or dated in the future. Nothing is done with it.",
    DeadLetterReason.WRONG_SOURCE: "An internal event whose CloudEvents `source` is not `/clave/<service>` of a "
    "service that produces its topic.",
}


def codes(reason_class: type) -> list[str]:
    """Every reason code a class of string constants defines, in definition order."""
    values = [v for k, v in vars(reason_class).items() if k.isupper() and isinstance(v, str)]
    return list(dict.fromkeys(values))


def _reason_schema(title: str, intro: str, notes: dict[str, str], values: list[str]) -> dict[str, Any]:
    missing = [v for v in values if v not in notes]
    if missing:
        raise LookupError(f"reason codes without a description in clave/asyncapi.py: {missing}")
    table = "\n".join(f"| `{v}` | {notes[v]} |" for v in values)
    return {
        "title": title,
        "type": "string",
        "enum": values,
        "description": f"{intro}\n\n| code | meaning |\n| --- | --- |\n{table}\n",
    }


def reason_schemas() -> dict[str, dict[str, Any]]:
    reset = codes(TokenReason) + [c for c in PasswordReason.ALL if c not in codes(TokenReason)]
    reset += codes(InputReason)
    return {
        "ResetReason": _reason_schema(
            "ResetReason",
            "Why a reset was rejected (`recovery.outcomes`, stage `reset`; `plaintext_refused` and "
            "`sealed_invalid` at the request stage too). Stable codes: the set is only ever added to.",
            {**RESET_REASONS, **PASSWORD_REASONS, **INPUT_REASONS},
            reset,
        ),
        "PasswordReason": _reason_schema(
            "PasswordReason", "Why the password service refused a new key.", PASSWORD_REASONS, list(PasswordReason.ALL)
        ),
        "RequestReason": _reason_schema(
            "RequestReason",
            "Why a recovery request was not verified. Never shown to the portal (it always gets `accepted`): "
            "only in the audit log (`audit.events`, `reasons`).",
            REQUEST_REASONS,
            codes(RequestReason),
        ),
        "RequestOutcomeReason": _reason_schema(
            "RequestOutcomeReason",
            "Why a request got `rejected` on `recovery.outcomes` (stage `request`) rather than `accepted`.",
            REQUEST_OUTCOME_REASONS,
            codes(OutcomeReason),
        ),
        "LoginReason": _reason_schema(
            "LoginReason",
            "Why a credential check answered `invalid` (`login.results`). An unknown ID and a wrong key give the "
            "same code.",
            {**LOGIN_REASONS, **INPUT_REASONS},
            codes(LoginReason) + codes(InputReason),
        ),
        "ContactResultReason": _reason_schema(
            "ContactResultReason",
            "Why a contact update was `rejected` (`account.contact_results`): the key's check (as a login's), "
            "the input, or the contact data.",
            {**LOGIN_REASONS, **INPUT_REASONS, **CONTACT_REASONS},
            codes(LoginReason) + codes(InputReason) + codes(ContactReason),
        ),
        "DeadLetterReason": _reason_schema(
            "DeadLetterReason",
            "Why a record went to a `.dlq` topic (`data.reason` and the header `clave-dlq-reason`).",
            DLQ_REASONS,
            codes(DeadLetterReason),
        ),
    }


# ---- schemas -----------------------------------------------------------------------------------


def _models() -> list[type[BaseModel]]:
    return list(dict.fromkeys([CloudEvent, *SCHEMAS.values(), DeadLetter]))


def _describe(schema: dict[str, Any], notes: dict[str, str]) -> None:
    for name, note in notes.items():
        schema["properties"][name]["description"] = note


def payload_schemas() -> dict[str, dict[str, Any]]:
    """Every model's JSON Schema (pydantic, validation mode), refined where the model's
    validators say more than its fields, plus the reason enumerations."""
    _, top = models_json_schema([(m, "validation") for m in _models()], ref_template=SCHEMA_REF + "{model}")
    schemas: dict[str, dict[str, Any]] = top["$defs"]
    envelope = schemas["CloudEvent"]
    envelope["description"] = (
        "The CloudEvents 1.0 envelope in structured JSON mode: the whole Kafka record value. Extension "
        "attributes other than `correlationid` and `causationid` are allowed if their names are lowercase "
        "letters and digits and their values scalars."
    )
    _describe(envelope, ENVELOPE_FIELDS)
    envelope["properties"]["specversion"]["const"] = SPECVERSION
    for model, notes in PORTAL_FIELDS.items():
        _describe(schemas[model], notes)
    for model, rules in MODEL_RULES.items():
        schemas[model].update(rules)
    schemas.update(reason_schemas())
    outcome = schemas["RecoveryOutcome"]["properties"]["reasons"]
    outcome["items"] = {"anyOf": [{"$ref": SCHEMA_REF + "ResetReason"}, {"$ref": SCHEMA_REF + "RequestOutcomeReason"}]}
    schemas["LoginResult"]["properties"]["reasons"]["items"] = {"$ref": SCHEMA_REF + "LoginReason"}
    schemas["ContactResult"]["properties"]["reasons"]["items"] = {"$ref": SCHEMA_REF + "ContactResultReason"}
    schemas["PasswordRejected"]["properties"]["reasons"]["items"] = {"$ref": SCHEMA_REF + "PasswordReason"}
    schemas["DeadLetter"]["properties"]["reason"] = {
        "$ref": SCHEMA_REF + "DeadLetterReason",
        "description": schemas["DeadLetter"]["properties"]["reason"]["description"],
    }
    schemas["AuditRecord"]["properties"]["reasons"]["description"] = (
        "Stable codes: a request's `RequestReason`s, a reset's `ResetReason`s, a dead letter's "
        "`DeadLetterReason`, `smtp_gave_up` for a mail that could not be sent, `render_failed` for one whose mail "
        "could not be rendered, `send_error` for one whose sending raised an unexpected error."
    )
    schemas["AuditRecord"]["properties"]["integrity"]["description"] = (
        "Added by the producer's outbox relay: `producer`, `seq` (1, 2, 3… per producer), `prev` (SHA-256 of the "
        "producer's previous chained event, hex), `kid` (the id of the producer's Ed25519 signing key) and `sig` "
        "(the producer's Ed25519 signature, base64, over the label `clave.audit.event.v1` and a newline followed by "
        "the event's canonical JSON with `sig` blank). Verifying needs only the producers' public keys. Events "
        "chained before signatures carry `mac` (HMAC-SHA256 with the old shared AUDIT_HMAC_KEY) instead of "
        "`kid`/`sig`; they may only begin a producer's chain."
    )
    schemas["CloudEventHeaders"] = {
        "type": "object",
        "description": "Kafka record headers of every message.",
        "properties": {"content-type": {"type": "string", "const": CONTENT_TYPE}},
        "required": ["content-type"],
    }
    schemas["DeadLetterHeaders"] = {
        "type": "object",
        "description": "Kafka record headers of a dead letter (never an input value: they are not sealed).",
        "properties": {
            "content-type": {"type": "string", "const": CONTENT_TYPE},
            **{name: {"type": "string", "description": note} for name, note in DLQ_HEADERS.items()},
        },
        "required": ["content-type", *DLQ_HEADERS],
    }
    schemas["DeadLetterHeaders"]["properties"]["clave-dlq-reason"]["enum"] = codes(DeadLetterReason)
    schemas["DeadLetterHeaders"]["properties"]["clave-dlq-detail"]["maxLength"] = 500
    for name in ("clave-origin-partition", "clave-origin-offset"):
        schemas["DeadLetterHeaders"]["properties"][name]["pattern"] = "^[0-9]+$"
    return dict(sorted(schemas.items()))


# ---- messages, channels, operations ------------------------------------------------------------


def message_id(event_type: str) -> str:
    return event_type.removeprefix("ec.clave.")


def _model_of(event_type: str) -> type[BaseModel]:
    return DeadLetter if event_type == EventType.DEAD_LETTER else SCHEMAS[event_type]


def _category(topic: str) -> str:
    if topic.endswith(t.DLQ_SUFFIX):
        return "dead-letters"
    if topic == t.AUDIT_EVENTS:
        return "audit"
    return "portal-facing" if topic in PORTAL_FACING else "internal"


def all_channels() -> dict[str, int]:
    """Every topic of shared/topics.py with its default retention (ms), and the `.dlq` twin of every
    topic some service consumes (where its consumer dead-letters, created or not)."""
    defaults = PlatformSettings.model_fields
    internal = int(defaults["internal_topic_retention_ms"].default)
    portal = int(defaults["portal_topic_retention_ms"].default)
    found = {spec.name: spec.retention_ms for spec in t.all_topics(1, portal, internal)}
    for spec in SERVICES.values():
        for topic in spec.consumes:
            found.setdefault(t.dlq(topic), internal)
    return found


def messages(channels: dict[str, int]) -> dict[str, dict[str, Any]]:
    found: dict[str, str] = {}  # event type -> the topic whose key it documents
    for topic in channels:
        for event_type in carried_by(topic):
            if event_type in found and record_key(found[event_type]) != record_key(topic):
                raise ValueError(f"{event_type} is on {found[event_type]} and {topic} with different keys")
            found.setdefault(event_type, topic)
    out: dict[str, dict[str, Any]] = {}
    for event_type, topic in found.items():
        model = _model_of(event_type)
        dead = event_type == EventType.DEAD_LETTER
        message: dict[str, Any] = {
            "name": event_type,
            "title": message_id(event_type),
            "summary": "A record that could not be processed, parked with its reason." if dead else _summary(topic),
            "contentType": CONTENT_TYPE,
            "headers": {"$ref": SCHEMA_REF + ("DeadLetterHeaders" if dead else "CloudEventHeaders")},
            "correlationId": {"$ref": "#/components/correlationIds/correlationid"},
            "payload": {
                "allOf": [
                    {"$ref": SCHEMA_REF + "CloudEvent"},
                    {
                        "type": "object",
                        "required": ["type", "data"],
                        "properties": {"type": {"const": event_type}, "data": {"$ref": SCHEMA_REF + model.__name__}},
                    },
                ]
            },
            "bindings": {
                "kafka": {"key": {"type": "string", "description": record_key(topic)}, "bindingVersion": KAFKA_BINDING}
            },
            "tags": [{"$ref": f"#/components/tags/{_category(topic)}"}],
        }
        if event_type in TYPE_SUMMARIES:
            message["summary"] = TYPE_SUMMARIES[event_type]
        if model.__doc__:
            message["description"] = " ".join(inspect.cleandoc(model.__doc__).split())
        out[message_id(event_type)] = message
    return out


def _summary(topic: str) -> str:
    return TOPICS[topic].summary


def _kept(retention_ms: int) -> str:
    if retention_ms < 0:
        return "forever"
    hours = retention_ms / 3_600_000
    return f"{hours / 24:g} days by default" if hours >= 48 else f"{hours:g} h by default"


def channels(names: dict[str, int]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for topic, retention in names.items():
        if topic.endswith(t.DLQ_SUFFIX):
            origin = topic.removesuffix(t.DLQ_SUFFIX)
            summary = f"Dead letters of `{origin}`: what its consumers could not process, sealed, with the reason."
        else:
            summary = _summary(topic)
        kept = _kept(retention)
        out[topic] = {
            "address": topic,
            "title": topic,
            "summary": summary,
            "description": f"**Record key:** {record_key(topic)}\n\n**Kept:** {kept}.\n",
            "messages": {message_id(e): {"$ref": f"#/components/messages/{message_id(e)}"} for e in carried_by(topic)},
            "bindings": {
                "kafka": {
                    "topic": topic,
                    "topicConfiguration": {"cleanup.policy": ["delete"], "retention.ms": retention},
                    "bindingVersion": KAFKA_BINDING,
                }
            },
            "tags": [{"$ref": f"#/components/tags/{_category(topic)}"}],
        }
    return out


def _operation(party: str, action: str, topic: str, description: str) -> tuple[str, dict[str, Any]]:
    verb = "sends to" if action == "send" else "receives from"
    return f"{party}.{action}.{topic}", {
        "action": action,
        "channel": {"$ref": f"#/channels/{topic}"},
        "title": f"{party} {verb} {topic}",
        "summary": f"{party} {verb} {topic}.",
        "description": description,
        "messages": [{"$ref": f"#/channels/{topic}/messages/{message_id(e)}"} for e in carried_by(topic)],
        "tags": [{"$ref": f"#/components/tags/{party}"}],
    }


def operations() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for service, spec in SERVICES.items():
        for topic in spec.consumes:
            key, op = _operation(service, "receive", topic, f"Consumer group `clave-{service}`.")
            out[key] = op
        for topic in writes(service):
            if topic.endswith(t.DLQ_SUFFIX):
                note = f"What {service} cannot process from `{topic.removesuffix(t.DLQ_SUFFIX)}`."
            elif topic == t.AUDIT_EVENTS:
                note = f"Its audit events, in its own hash chain (key `{service}`)."
            else:
                note = "Through its outbox: in the same transaction as the state change that caused it."
            key, op = _operation(service, "send", topic, note)
            out[key] = op
    for client, spec in CLIENTS.items():
        for topic in spec.produces:
            key, op = _operation(client, "send", topic, f"With the `{client}` principal.")
            out[key] = op
        for topic in spec.consumes:
            key, op = _operation(client, "receive", topic, f"With the `{client}` principal, in its own group.")
            out[key] = op
    for topic in ADMIN_ONLY:
        note = "With the `admin` principal only: a super user; no ACL lets anyone else write it."
        key, op = _operation("admin", "send", topic, note)
        out[key] = op
    return out


# ---- the document ------------------------------------------------------------------------------

INTRO = f"""\
Every Kafka topic of Clave, the account-recovery backbone: the portal-facing ones
(`recovery.requests`, `recovery.resets`, `recovery.outcomes`), the ones between its
services, every `.dlq` twin and `audit.events`; who sends and who receives each.

**Envelope.** Every record value is a CloudEvents 1.0 event in structured JSON mode
(schema `CloudEvent`), its `data` the payload of its `type`; every record has the header
`content-type: {CONTENT_TYPE}`. `correlationid` is the recovery's `request_id` (for an
operator command, its command id; for a credential check, its `check_id`; for a contact update,
its `update_id`); `causationid` the `id` of the event that caused this one.
`source` is `/clave/<service>` for every event a service produces; a consumer dead-letters
(`wrong_source`) an event on a service's topic whose `source` is not of a service that produces
that topic. The portal and the operator's command name themselves as they like: the broker's
ACLs are what prove them.

**Keys and order.** Each channel states its record key; order holds per key.

**Delivery.** At least once. Consumers drop an event `id` they already processed; the portal
should do the same on `recovery.outcomes`, `login.results` and `account.key_changed`.
Every request, reset and credential check gets an answer, even one that cannot be processed
(`request_invalid`, `reset_invalid`, `check_invalid`), keyed by the id read from it.

**Compatibility.** The portal-facing contract is only ever added to. Portal input and operator
commands refuse unknown fields; events between services ignore them, so a producer may add an
optional field first. A breaking change gets a new type (`.v2`).

**Dead letters.** A record that can never be processed goes to `<topic>.dlq` as an
`ec.clave.dead_letter.v1` event: the reason (`DeadLetterReason`) and origin in `data` and in the
`clave-dlq-*` / `clave-origin-*` headers, the original bytes sealed with `DLQ_KEYS`.

**Secrets.** What crosses an internal topic (link token and code, new or initial keys) is sealed
(Fernet: AES-128-CBC and HMAC-SHA256, with its time) for its one reader; audit events and DLQ
headers never hold one. Inside the ciphertext, with the secret, are a purpose label and the
identifiers of the event it was made for: the link and code are bound to `token_id`,
`account_id`, `request_id` and the SHA-256 of `recipient.email`; a new key to `token_id`,
`account_id` and `request_id`; an initial key to `account_id`. The reader checks them against
the event that carries the blob, and its age against its lifetime (`SEALED_SECRETS_TTL_S`,
`SEALED_NEW_KEY_TTL_S`, `SEALED_INITIAL_KEY_TTL_S`): a blob copied into another event is
dead-lettered as `sealed_context_mismatch`, an old one as `sealed_expired`, and neither has any
effect.

Generated from the code by `clave contract` (clave/asyncapi.py); do not edit by hand.
"""

PARTIES: dict[str, str] = {
    "portal": "The public portal: publishes requests, resets, credential checks and contact updates; reads "
    "outcomes, login results, key changes and contact results (the `clave_portal` client library, "
    "clients/python, does all of it).",
    "operator": "Operators, through the `clave` command: each command signed with the operator's own key.",
    "admin": "The Kafka super user: provisions topics and ACLs, and alone registers operator keys.",
    "auditor": "Auditors: read and verify the audit log.",
    "identity": "Checks IDs, answers, e-mail, captcha; lockout and limits; operator commands.",
    "tokens": "Issues and redeems link tokens and codes; answers the portal's resets.",
    "notifier": "Renders and sends the e-mails over SMTP.",
    "password": "Checks the key policy and history; stores argon2id hashes; answers credential checks; "
    "announces key changes.",
    "audit": "The auditors' read model of `audit.events`.",
}
CATEGORIES: dict[str, str] = {
    "portal-facing": "The public contract with the portal.",
    "internal": "Between Clave's services.",
    "dead-letters": "Records that could not be processed.",
    "audit": "The audit log.",
}


def build() -> dict[str, Any]:
    names = all_channels()
    defaults = PlatformSettings.model_fields
    return {
        "asyncapi": ASYNCAPI,
        "info": {
            "title": "Clave topic contract",
            "version": metadata.version("clave"),
            "description": INTRO,
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {
            "production": {
                "host": "{broker}",
                "protocol": "kafka-secure",
                "description": "A production cluster: SASL/SCRAM over TLS (`KAFKA_SECURITY_PROTOCOL=SASL_SSL`), "
                "one principal per service and per party, ACLs allowing each only the operations below.",
                "variables": {"broker": {"description": "One bootstrap broker, host:port (KAFKA_BOOTSTRAP_SERVERS)."}},
                "security": [{"$ref": "#/components/securitySchemes/scram"}],
            },
            "local": {
                "host": str(defaults["kafka_bootstrap_servers"].default),
                "protocol": "kafka",
                "description": "The development stack of `make up` (PLAINTEXT, no principals).",
            },
        },
        "channels": channels(names),
        "operations": operations(),
        "components": {
            "schemas": payload_schemas(),
            "messages": messages(names),
            "securitySchemes": {
                "scram": {
                    "type": "scramSha512",
                    "description": "SASL/SCRAM-SHA-512 (`KAFKA_SASL_MECHANISM`; SCRAM-SHA-256 also works) with "
                    "the party's user name and password (`KAFKA_SASL_USERNAME`, `KAFKA_SASL_PASSWORD`).",
                }
            },
            "correlationIds": {
                "correlationid": {
                    "location": "$message.payload#/correlationid",
                    "description": "The recovery's `request_id` (an operator command's id): every event of one "
                    "recovery, across every service, carries it.",
                }
            },
            "tags": {name: {"name": name, "description": text} for name, text in {**CATEGORIES, **PARTIES}.items()},
        },
    }


# ---- YAML --------------------------------------------------------------------------------------
# The image ships this module without a YAML library (ruamel.yaml is a dev extra), and the
# document needs only block mappings, sequences and scalars: a string is written plain when
# nothing in YAML could read it otherwise, as a literal block when it is a paragraph, and as
# a JSON string (a valid YAML double-quoted scalar) in every other case. The drift test
# reads the file back with ruamel.yaml and compares it with build().

HEADER = "# Generated by `clave contract` from the code (clave/asyncapi.py): do not edit. `make docs` renders it.\n"
_PLAIN = re.compile(r"^[A-Za-z_$][A-Za-z0-9_.$/-]*$")
_YAML11_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        plain = _PLAIN.match(value) and value.lower() not in _YAML11_WORDS
        return value if plain else json.dumps(value, ensure_ascii=False)
    return json.dumps(value)  # int, bool, None


def _is_block(value: Any) -> bool:
    """A paragraph: ends with one newline, no line starts with a blank or ends with one."""
    if not isinstance(value, str) or not value.endswith("\n") or value.endswith("\n\n"):
        return False
    return all(line == line.strip() and line.isprintable() for line in value[:-1].split("\n"))


def _lines(node: Any, pad: str) -> list[str]:
    out: list[str] = []
    items = node.items() if isinstance(node, dict) else (("-", v) for v in node)
    for key, value in items:
        head = f"{pad}{_scalar(key)}:" if isinstance(node, dict) else f"{pad}-"
        if isinstance(value, dict | list) and value:
            inner = _lines(value, pad + "  ")
            if isinstance(node, dict):
                out += [head, *inner]
            else:  # the item's first line goes after the dash
                out += [f"{head} {inner[0][len(pad) + 2 :]}", *inner[1:]]
        elif _is_block(value):
            out += [f"{head} |", *(f"{pad}  {line}" if line else "" for line in value[:-1].split("\n"))]
        elif isinstance(value, dict | list):
            out.append(f"{head} {{}}" if isinstance(value, dict) else f"{head} []")
        else:
            out.append(f"{head} {_scalar(value)}")
    return out


def render(document: dict[str, Any]) -> str:
    return HEADER + "\n".join(_lines(document, "")) + "\n"


def main(path: Path = DOCUMENT, *, check: bool = False) -> int:
    """Write the document, or (check) compare it with the file: 0 when equal, 1 otherwise."""
    text = render(build())
    if not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"written {path}")
        return 0
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if current == text:
        print(f"{path} matches the code")
        return 0
    diff = difflib.unified_diff(current.splitlines(), text.splitlines(), str(path), "the code", lineterm="", n=1)
    print("\n".join(list(diff)[:60]))
    print(f"{path} differs from the code: run `{REGENERATE}` and commit it")
    return 1
