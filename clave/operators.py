"""The operator side of the `clave` command: signed commands, their results, the import, and
the `admin`'s registry of operator keys.

- Every command is signed with the operator's own Ed25519 private key (a PEM file:
  `--key-file`, or OPERATOR_KEY_FILE; or OPERATOR_KEYS_DIR/<operator>.pem) and published on
  identity.commands with the operator's Kafka principal.
- The result is read from identity.command_results (the operator's principal reads that topic
  and nothing else): positions are taken before publishing, so no result is missed.
- `clave operators keygen|register|revoke` make a key pair and, as `admin`, register or revoke
  a public key on identity.operator_keys (the broker lets no one else write it).

Nothing here chooses or shows a citizen's key, link or code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import BaseModel, ValidationError

from shared import operator_keys
from shared.crypto import SecretBox
from shared.envelope import CONTENT_TYPE, CloudEvent, describe_errors, new_event, parse_event
from shared.kafka import client_kwargs
from shared.producer import Message, kafka_producer
from shared.schemas import (
    AccountImport,
    CommandResult,
    OperatorKeyRegistered,
    OperatorKeyRevoked,
)
from shared.settings import DEV_IMPORT_KEY, ClientSettings, PlatformSettings
from shared.topics import IDENTITY_COMMAND_RESULTS, IDENTITY_COMMANDS, IDENTITY_OPERATOR_KEYS, EventType

SOURCE = "/clave/cli"


class OperatorSettings(ClientSettings):
    """What an operator's `clave` needs besides Kafka: where its private key is."""

    operator_key_file: str = ""  # the operator's Ed25519 private key (PEM)
    operator_keys_dir: str = ""  # or a folder of <operator>.pem (the local stack's development keys)


class ImportSettings(OperatorSettings):
    """The import also seals each line's answers and initial key for identity (IMPORT_KEYS) and
    checks the initial key against the key policy before sending it."""

    import_keys: str = DEV_IMPORT_KEY
    password_policy: Literal["seed", "nist"] = "seed"
    security_questions: str = "birth_date,fingerprint_code,mother_surname"  # as identity's

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "IMPORT_KEYS": self.import_keys}


class CommandError(Exception):
    """Something the operator must fix (no key, unreadable key...): the message says what."""


@dataclass(frozen=True)
class Signer:
    operator_id: str
    key: Ed25519PrivateKey

    @property
    def key_id(self) -> str:
        return operator_keys.key_id(self.key.public_key())

    def event(self, event_type: str, data: BaseModel, key_field: str = "national_id") -> tuple[str, CloudEvent]:
        """The signed event and its record key. Signed over the JSON as it will be sent."""
        body = data.model_dump(mode="json")
        body.update(issued_at=datetime.now(UTC).isoformat(), key_id=self.key_id, signature=None)
        body["signature"] = operator_keys.sign(self.key, event_type, body)
        event = new_event(
            type=event_type, source=SOURCE, data=body, correlationid=body["command_id"], subject=self.operator_id
        )
        return str(body[key_field]), event


def signer(settings: OperatorSettings, operator_id: str, key_file: Path | None) -> Signer:
    """The operator's signing key: --key-file, OPERATOR_KEY_FILE, or OPERATOR_KEYS_DIR/<operator>.pem."""
    path: Path | None = key_file
    if path is None and settings.operator_key_file:
        path = Path(settings.operator_key_file)
    if path is None and settings.operator_keys_dir:
        path = Path(settings.operator_keys_dir) / f"{operator_id}.pem"
    if path is None:
        raise CommandError("no operator key: give --key-file (or set OPERATOR_KEY_FILE): every command is signed")
    try:
        return Signer(operator_id, operator_keys.load_private(path))
    except operator_keys.OperatorKeyError as exc:
        raise CommandError(f"operator key: {exc}") from None


def new_command_id() -> str:
    return uuid.uuid4().hex


# ---- publishing and results ---------------------------------------------------------------------


async def publish_all(settings: PlatformSettings, topic: str, events: Iterable[tuple[str, CloudEvent]]) -> None:
    producer = kafka_producer(settings, name="clave")
    await producer.start()
    try:
        headers = [("content-type", CONTENT_TYPE.encode())]
        await producer.send_many(Message(topic, e.to_bytes(), k.encode(), headers) for k, e in events)
    finally:
        await producer.stop()


class ResultWatcher:
    """identity.command_results from the positions it had when opened (before the commands are
    sent), read by assignment: the operator's principal has no consumer group."""

    def __init__(self, settings: PlatformSettings) -> None:
        self.settings = settings
        self.consumer: AIOKafkaConsumer | None = None

    async def __aenter__(self) -> ResultWatcher:
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), enable_auto_commit=False)
        await consumer.start()
        self.consumer = consumer
        partitions = consumer.partitions_for_topic(IDENTITY_COMMAND_RESULTS)
        if not partitions:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - aiokafka has no public call
            partitions = consumer.partitions_for_topic(IDENTITY_COMMAND_RESULTS) or set()
        tps = [TopicPartition(IDENTITY_COMMAND_RESULTS, p) for p in sorted(partitions)]
        consumer.assign(tps)
        for tp, end in (await consumer.end_offsets(tps)).items():
            consumer.seek(tp, end)  # now, eagerly: a lazy seek_to_end could skip our results
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.stop()

    async def wait(self, wanted: set[str], timeout: float) -> dict[str, CommandResult]:
        """The first result of each wanted command id, until all came or the time is up."""
        assert self.consumer is not None
        found: dict[str, CommandResult] = {}
        deadline = time.monotonic() + timeout
        while wanted - found.keys() and (left := deadline - time.monotonic()) > 0:
            batch = await self.consumer.getmany(timeout_ms=int(min(left, 1.0) * 1000), max_records=500)
            for records in batch.values():
                for record in records:
                    result = _result(record.value or b"")
                    if result is not None and result.command_id in wanted and result.command_id not in found:
                        found[result.command_id] = result
        return found


def _result(raw: bytes) -> CommandResult | None:
    try:
        event = parse_event(raw, max_bytes=1 << 20, known_types={EventType.OPERATOR_COMMAND_RESULT})
        return CommandResult.model_validate(event.data)
    except Exception:  # not a result we can read: not ours to judge here
        return None


async def send_and_wait(
    settings: PlatformSettings, events: list[tuple[str, CloudEvent]], timeout: float
) -> dict[str, CommandResult]:
    async with ResultWatcher(settings) as watcher:
        await publish_all(settings, IDENTITY_COMMANDS, events)
        if timeout <= 0:
            return {}
        return await watcher.wait({e.correlationid for _, e in events}, timeout)


# What to do about a refused approval or cancellation (the reason code alone says what).
_REFUSAL_HINTS = {
    "change_unknown": "no e-mail change has this id: give the command id that update-email printed",
    "change_already_applied": "the change already took effect: a new update-email (and its approval) reverts it",
    "change_already_cancelled": "the change was already cancelled: nothing left to do",
}


def describe(result: CommandResult) -> str:
    parts: list[str] = [result.status]
    if result.effect:
        parts.append(result.effect)
    if result.reasons:
        parts.append("(" + ", ".join(result.reasons) + ")")
    if result.detail:
        parts.append(f"- {result.detail}")
    if result.status == "pending" and result.change_id:
        when = f" and not before {result.effective_at:%Y-%m-%d %H:%M} UTC" if result.effective_at else ""
        parts.append(
            f"- takes effect once another operator approves it (clave accounts approve {result.change_id}){when}; "
            f"both addresses have been told; any operator can stop it (clave accounts cancel {result.change_id})"
        )
    if result.status != "rejected" and result.effect == "cancelled":
        parts.append(f"- e-mail change {result.change_id} will not take effect; both addresses are being told")
    hint = _REFUSAL_HINTS.get(result.reasons[0]) if result.status == "rejected" and result.reasons else None
    if hint:
        parts.append(f"- {hint}")
    return " ".join(parts)


# ---- the import ----------------------------------------------------------------------------------


@dataclass
class ImportReport:
    sent: int = 0
    results: dict[int, CommandResult] = field(default_factory=dict)  # by line
    errors: list[tuple[int, str]] = field(default_factory=list)  # refused before sending, or by identity
    unanswered: list[int] = field(default_factory=list)

    def count(self, effect: str) -> int:
        return sum(1 for r in self.results.values() if r.effect == effect and r.status != "rejected")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if line.strip():
                yield number, line


def import_commands(
    settings: ImportSettings, path: Path, sign: Signer, reason: str, *, legacy_keys: bool
) -> tuple[list[tuple[str, CloudEvent]], dict[str, int], list[tuple[int, str]]]:
    """One signed command per good line; the lines refused here (format, rules, key policy)."""
    from services.identity.registry import AccountRecord, ImportSecrets, seal_secrets, validate_record
    from services.password.policy import policy_from_name

    questions = [q.strip() for q in settings.security_questions.split(",") if q.strip()]
    policy = policy_from_name(settings.password_policy)
    box = SecretBox(settings.import_keys)
    events: list[tuple[str, CloudEvent]] = []
    lines: dict[str, int] = {}
    errors: list[tuple[int, str]] = []
    for number, line in _lines(path):
        try:
            record = AccountRecord.model_validate(json.loads(line))
            clean = validate_record(record, questions)
        except json.JSONDecodeError as exc:
            errors.append((number, f"not JSON ({exc.msg})"))
            continue
        except ValidationError as exc:
            errors.append((number, describe_errors(exc)))
            continue
        except ValueError as exc:
            errors.append((number, str(exc)))
            continue
        if record.password is not None and not legacy_keys:
            breaks = policy.check(record.password)
            if breaks:
                errors.append(
                    (number, f"initial key breaks the key policy ({', '.join(breaks)}); --legacy-keys takes it "
                     "marked must-change")
                )  # fmt: skip
                continue
        command_id = new_command_id()
        secrets = ImportSecrets(
            command_id=command_id, national_id=record.national_id, answers=record.answers, password=record.password
        )
        command = AccountImport(
            command_id=command_id,
            operator_id=sign.operator_id,
            reason=reason,
            national_id=record.national_id,
            profile=record.profile,
            name=record.name,
            email=clean["email"],
            locale=record.locale,
            representative_id=record.representative_id,
            backup_email=record.backup_email,
            phone=record.phone,
            sealed_secrets=seal_secrets(box, secrets),
            legacy_key=legacy_keys and record.password is not None,
            line=number,
        )
        events.append(sign.event(EventType.OPERATOR_ACCOUNT_IMPORT, command))
        lines[command_id] = number
    return events, lines, errors


def run_import(
    settings: ImportSettings, path: Path, sign: Signer, reason: str, *, legacy_keys: bool, wait: float
) -> ImportReport:
    events, lines, errors = import_commands(settings, path, sign, reason, legacy_keys=legacy_keys)
    report = ImportReport(sent=len(events), errors=errors)
    if events:
        results = asyncio.run(send_and_wait(settings, events, wait))
        for command_id, number in lines.items():
            result = results.get(command_id)
            if result is None:
                report.unanswered.append(number)
                continue
            report.results[number] = result
            if result.status == "rejected":
                report.errors.append((number, describe(result)))
    report.errors.sort()
    return report


# ---- the registry (admin) ------------------------------------------------------------------------


def write_private(path: Path, key: Ed25519PrivateKey) -> None:
    """Write a private key readable by its owner alone (0600 from creation, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(operator_keys.private_pem(key))
    os.replace(tmp, path)


def public_entry(operator_id: str, key: Ed25519PrivateKey) -> dict[str, str]:
    public = key.public_key()
    return {
        "operator_id": operator_id,
        "key_id": operator_keys.key_id(public),
        "public_key": operator_keys.public_b64(public),
    }


def keygen(operator_id: str, key_file: Path) -> dict[str, str]:
    """A new key pair (an existing private key is kept): KEY_FILE (0600) and KEY_FILE.pub.json,
    the public part that admin registers."""
    if key_file.exists():
        key = operator_keys.load_private(key_file)
    else:
        key = Ed25519PrivateKey.generate()
        write_private(key_file, key)
    entry = public_entry(operator_id, key)
    key_file.with_name(key_file.name + ".pub.json").write_text(json.dumps(entry, indent=1) + "\n", encoding="utf-8")
    return entry


def registration(entry: dict[str, str], reason: str, by: str) -> tuple[str, CloudEvent]:
    data = OperatorKeyRegistered(
        operator_id=entry["operator_id"],
        key_id=entry["key_id"],
        public_key=entry["public_key"],
        reason=reason,
        registered_by=by,
    )
    event = new_event(
        type=EventType.OPERATOR_KEY_REGISTERED,
        source=SOURCE,
        data=data.model_dump(mode="json"),
        correlationid=new_command_id(),
        subject=entry["operator_id"],
    )
    return entry["operator_id"], event


def revocation(operator_id: str, key_id: str, reason: str, by: str) -> tuple[str, CloudEvent]:
    data = OperatorKeyRevoked(operator_id=operator_id, key_id=key_id, reason=reason, revoked_by=by)
    event = new_event(
        type=EventType.OPERATOR_KEY_REVOKED,
        source=SOURCE,
        data=data.model_dump(mode="json"),
        correlationid=new_command_id(),
        subject=operator_id,
    )
    return operator_id, event


def publish_registry(settings: PlatformSettings, events: list[tuple[str, CloudEvent]]) -> None:
    asyncio.run(publish_all(settings, IDENTITY_OPERATOR_KEYS, events))


def read_entry(path: Path) -> dict[str, Any]:
    entry = json.loads(path.read_text(encoding="utf-8"))
    public = operator_keys.public_from_b64(entry["public_key"])
    if entry.get("key_id") not in (None, operator_keys.key_id(public)):
        raise CommandError(f"{path}: key_id is not the id of public_key")
    entry["key_id"] = operator_keys.key_id(public)
    return entry
