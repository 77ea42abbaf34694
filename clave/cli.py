"""`clave`: the command line for operators and auditors.

    clave accounts import FILE           load citizen accounts (JSON lines)
    clave accounts update-email ID NEW   after an in-person check at an office
    clave accounts update-contact ID [--backup-email E] [--phone P]
    clave accounts unlock ID             lift a lockout
    clave accounts send-recovery ID      send a recovery e-mail to the registered address
    clave accounts approve COMMAND_ID    second operator's approval of an e-mail change
    clave accounts cancel COMMAND_ID     stop a pending e-mail change (any operator)
    clave operators keygen|register|revoke  operator keys (register/revoke: admin only)
    clave audit replay|verify|timeline   read the audit log (public keys only, no secret)
    clave audit heads|keygen|rebuild     signed chain heads, signing keys, read-model check

Every operator action needs `--operator` and `--reason`, is signed with the operator's
private key (`--key-file`, OPERATOR_KEY_FILE) and is audited; its result is read from
identity.command_results.
An error is one line saying what was wrong and what to do, with an exit code a script can
act on (clave/errors.py: 1 not found or a failed check, 2 usage, 3 unreachable); `--debug`
shows the traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from clave import auditlog, operators
from clave.errors import (
    EXIT_FAILED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ClickException,
    CliError,
    Failed,
    NoArgsIsHelpError,
    Unreachable,
    Usage,
    UsageError,
    classify,
    usage_line,
)
from services.audit.settings import AuditorSettings
from shared.audit import ACTIONS, ChainVerifier, check_seal
from shared.auditkeys import AuditKeyError, KeyRing, PublicKeyEntry, kid_of, load_signing_key, private_pem
from shared.kafka import connection
from shared.schemas import OperatorApproval, OperatorCancel, OperatorCommand
from shared.settings import ClientSettings, PlatformSettings, load
from shared.topics import EventType

# No pretty tracebacks: `main` turns every error into one line (the traceback with --debug).
app = typer.Typer(help="Clave operator and auditor tools.", no_args_is_help=True, pretty_exceptions_enable=False)
accounts = typer.Typer(help="Citizen accounts (identity service).", no_args_is_help=True)
audit = typer.Typer(help="The audit log: replay, verify, timeline.", no_args_is_help=True)
app.add_typer(accounts, name="accounts")
app.add_typer(audit, name="audit")
ops = typer.Typer(help="Operator keys (admin): keygen, register, revoke.", no_args_is_help=True)
app.add_typer(ops, name="operators")
# Piped output (files, tests, grep) gets full-width tables instead of truncated columns.
console = Console(width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 240)


@app.callback()
def root(
    debug: Annotated[
        bool, typer.Option("--debug", help="On an error, show the full traceback (anywhere on the line).")
    ] = False,
) -> None:
    """Clave operator and auditor tools."""


# Where this run connects, for the one-line message when it cannot (set by `_load`).
_REACH = {"kafka": "127.0.0.1:9092", "store": ""}
P = TypeVar("P", bound=PlatformSettings)


def _load(cls: type[P], process: str) -> P:
    """Settings of `cls`: a bad value is a usage error naming the variable; unsafe settings in
    production exit 78 naming each problem (shared/settings.py)."""
    try:
        settings = load(cls)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = "_".join(str(part) for part in first["loc"]).upper()
        raise Usage(f"setting {name}: {first['msg']}", "fix it in the environment") from None
    try:
        _REACH["kafka"] = connection(settings).kafka_bootstrap_servers
    except (OSError, ValueError) as exc:
        raise Usage(
            f"KAFKA_CLIENT_PROPERTIES={settings.kafka_client_properties}: {exc}",
            "give the client settings file of your principal (the local stack writes var/secrets/kafka/*.properties)",
        ) from None
    _REACH["store"] = settings.mongodb_uri
    settings.ensure_safe(process)
    return settings


def cli_settings() -> PlatformSettings:
    """The platform settings, refused (exit 78, naming each problem) when unsafe in production."""
    return _load(ClientSettings, "clave")


def auditor_settings() -> AuditorSettings:
    """What the audit commands need: Kafka, the audit store and the producers' public keys.
    No secret: an auditor can check the log, never sign into it."""
    return _load(AuditorSettings, "clave audit")


def _not_empty(value: str, option: str, example: str) -> str:
    if not value.strip():
        raise Usage(f"{option} is empty", f"give it, e.g. {option} {example}")
    return value.strip()


def _national_id(value: str) -> str:
    """A cédula (10 digits) or RUC (13 digits) as people type them, normalised; else a usage error."""
    from services.identity.domain import InvalidId, normalize_national_id

    profile = "employer" if len(re.sub(r"\D", "", value)) == 13 else "affiliate"
    try:
        return normalize_national_id(profile, value)
    except InvalidId as exc:
        raise Usage(f"{value!r} is not a valid cédula or RUC ({exc})", "check the digits") from None


Operator = Annotated[str, typer.Option("--operator", "-o", help="Your operator id (audited).")]
Reason = Annotated[str, typer.Option("--reason", "-r", help="Why (audited), e.g. the office case number.")]


KeyFile = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        "-k",
        envvar="OPERATOR_KEY_FILE",
        help="Your Ed25519 private key (PEM): every command is signed with it.",
        dir_okay=False,
    ),
]
Wait = Annotated[float, typer.Option(help="Seconds to wait for the result on identity.command_results (0: don't).")]


def _signer(settings: operators.OperatorSettings, operator: str, key_file: Path | None) -> operators.Signer:
    try:
        return operators.signer(settings, operator, key_file)
    except operators.CommandError as exc:
        raise Usage(str(exc), "give --key-file (or OPERATOR_KEY_FILE / OPERATOR_KEYS_DIR)") from None


@accounts.command("import")
def import_accounts(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    operator: Annotated[str, typer.Option("--operator", "-o", envvar="OPERATOR_ID")],
    key_file: KeyFile = None,
    reason: Annotated[str, typer.Option("--reason", "-r")] = "registry import",
    legacy_keys: Annotated[
        bool,
        typer.Option(
            "--legacy-keys",
            help="Migration only: take initial keys that break the key policy, marked must-change.",
        ),
    ] = False,
    wait: Wait = 120,
) -> None:
    """Import or update accounts from a JSON-lines file, one signed command per line. Bad lines
    are reported by number; an unchanged record is a no-op; a changed e-mail needs a second
    operator's approval (clave accounts approve)."""
    operator = _not_empty(operator, "--operator", "op-17")
    settings = _load(operators.ImportSettings, "clave accounts import")
    sign = _signer(settings, operator, key_file)
    report = operators.run_import(settings, file, sign, reason, legacy_keys=legacy_keys, wait=wait)
    counts = ", ".join(
        f"{effect} {report.count(effect)}" for effect in ("created", "updated", "unchanged", "approval_needed")
    )
    console.print(f"sent {report.sent}: {counts}; rejected {len(report.errors)}")
    for number, message in report.errors:
        err.print(f"line {number}: {message}")
    if report.unanswered:
        raise Unreachable(
            f"no result yet for lines {', '.join(map(str, report.unanswered))}",
            "is the identity service running? (`make status`)",
        )
    raise typer.Exit(EXIT_FAILED if report.errors else 0)


def _run(event_type: str, sign: operators.Signer, data: Any, settings: PlatformSettings, wait: float) -> None:
    # An approval or a cancellation is keyed by the change it concerns: one partition, in order.
    key_field = {EventType.OPERATOR_APPROVE: "approves", EventType.OPERATOR_CANCEL: "cancels"}.get(
        event_type, "national_id"
    )
    event = sign.event(event_type, data, key_field)
    results = asyncio.run(operators.send_and_wait(settings, [event], wait))
    command_id = event[1].correlationid
    console.print(f"command {command_id} sent")
    if wait <= 0:
        return
    result = results.get(command_id)
    if result is None:
        raise Unreachable(
            f"command {command_id} sent, but no result on identity.command_results within {wait:g} s",
            "is the identity service running? (`make status`); its result will still be reported and audited",
        )
    console.print(f"{command_id}: {operators.describe(result)}")
    raise typer.Exit(EXIT_FAILED if result.status == "rejected" else 0)


def _command(
    event_type: str,
    national_id: str,
    operator: str,
    reason: str,
    new_email: str | None,
    wait: float,
    key_file: Path | None = None,
    **contact: str | None,
) -> None:
    operator = _not_empty(operator, "--operator", "op-17")
    reason = _not_empty(reason, "--reason", '"case 4411"')
    national_id = _national_id(national_id)
    try:
        data = OperatorCommand(
            command_id=operators.new_command_id(),
            operator_id=operator,
            reason=reason,
            national_id=national_id,
            new_email=new_email,
            **contact,  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        option = {
            "operator_id": "--operator",
            "reason": "--reason",
            "new_email": "NEW_EMAIL",
            "new_backup_email": "--backup-email",
            "new_phone": "--phone",
        }.get(field, field)
        raise Usage(f"{option}: {first['msg']}", "see `clave accounts --help`") from None
    settings = _load(operators.OperatorSettings, "clave")
    _run(event_type, _signer(settings, operator, key_file), data, settings, wait)


@accounts.command("update-email")
def update_email(
    national_id: str, new_email: str, operator: Operator, reason: Reason, key_file: KeyFile = None, wait: Wait = 30
) -> None:
    """Request a change of a citizen's registered e-mail after checking their ID in person.
    It takes effect once another operator approves it (clave accounts approve) and the
    cooling-off period has passed; both addresses are told now and then; live tokens are revoked."""
    _command(EventType.OPERATOR_EMAIL_UPDATE, national_id, operator, reason, new_email, wait, key_file)


@accounts.command("approve")
def approve(command_id: str, operator: Operator, reason: Reason, key_file: KeyFile = None, wait: Wait = 30) -> None:
    """Approve another operator's pending command (an e-mail change) by its id, as the second
    person. It takes effect when its cooling-off period has passed."""
    operator = _not_empty(operator, "--operator", "op-17")
    reason = _not_empty(reason, "--reason", '"case 4411"')
    settings = _load(operators.OperatorSettings, "clave")
    sign = _signer(settings, operator, key_file)
    try:
        data = OperatorApproval(
            command_id=operators.new_command_id(), operator_id=operator, reason=reason, approves=command_id
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise Usage(
            f"{first['loc'][0] if first['loc'] else ''}: {first['msg']}", "see `clave accounts --help`"
        ) from None
    _run(EventType.OPERATOR_APPROVE, sign, data, settings, wait)


@accounts.command("cancel")
def cancel(
    command_id: str,
    operator: Operator,
    reason: Annotated[
        str, typer.Option("--reason", "-r", help="Why (audited), e.g. the citizen's call or the office case.")
    ] = "no reason given",
    key_file: KeyFile = None,
    wait: Wait = 30,
) -> None:
    """Cancel a pending e-mail change by its id (the id update-email printed), approved or not,
    until it takes effect. Any operator may, the requester too. It never takes effect then, and
    both addresses are told. Exit 1 if it is unknown, already applied or already cancelled."""
    operator = _not_empty(operator, "--operator", "op-17")
    reason = _not_empty(reason, "--reason", '"citizen called: not theirs"')
    try:
        data = OperatorCancel(
            command_id=operators.new_command_id(), operator_id=operator, reason=reason, cancels=command_id
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        option = {"operator_id": "--operator", "reason": "--reason", "cancels": "COMMAND_ID"}.get(field, field)
        raise Usage(f"{option}: {first['msg']}", "see `clave accounts cancel --help`") from None
    settings = _load(operators.OperatorSettings, "clave")
    _run(EventType.OPERATOR_CANCEL, _signer(settings, operator, key_file), data, settings, wait)


@accounts.command("update-contact")
def update_contact(
    national_id: str,
    operator: Operator,
    reason: Reason,
    backup_email: Annotated[str | None, typer.Option(help='New backup e-mail ("" removes it).')] = None,
    phone: Annotated[str | None, typer.Option(help='New phone, E.164 or Ecuadorian ("" removes it).')] = None,
    key_file: KeyFile = None,
    wait: Wait = 30,
) -> None:
    """Change a citizen's backup e-mail or phone after checking their ID in person (the
    registered e-mail: update-email). Revokes live tokens and tells every address on file before."""
    if backup_email is None and phone is None:
        raise Usage("nothing to change", "give --backup-email or --phone (or both)")
    _command(
        EventType.OPERATOR_CONTACT_UPDATE,
        national_id,
        operator,
        reason,
        None,
        wait,
        key_file,
        new_backup_email=backup_email,
        new_phone=phone,
    )


@accounts.command("unlock")
def unlock(national_id: str, operator: Operator, reason: Reason, key_file: KeyFile = None, wait: Wait = 30) -> None:
    """Lift a lockout (failed attempts are cleared)."""
    _command(EventType.OPERATOR_UNLOCK, national_id, operator, reason, None, wait, key_file)


@accounts.command("send-recovery")
def send_recovery(
    national_id: str, operator: Operator, reason: Reason, key_file: KeyFile = None, wait: Wait = 30
) -> None:
    """Send a recovery e-mail to the registered address on the citizen's behalf.
    The operator never sees the link, the code or the key."""
    _command(EventType.OPERATOR_SEND_RECOVERY, national_id, operator, reason, None, wait, key_file)


@ops.command("keygen")
def operator_keygen(
    operator: Annotated[str, typer.Argument(help="The operator id the key is for, e.g. op-17")],
    key_file: Annotated[Path, typer.Option("--key-file", "-k", help="Where the private key goes (0600)")],
) -> None:
    """Make an operator's Ed25519 key pair (an existing private key is kept). The public part,
    KEY_FILE.pub.json, is what admin registers; the private key never leaves the operator."""
    entry = operators.keygen(operator, key_file)
    console.print(f"{operator}: key {entry['key_id']}, private {key_file}, public {key_file}.pub.json")


@ops.command("register")
def operator_register(
    public_file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="KEY_FILE.pub.json from keygen")],
    reason: Reason,
    by: Annotated[str, typer.Option("--by", help="Who registers it (audited), e.g. your name")],
) -> None:
    """As admin (KAFKA_CLIENT_PROPERTIES of the admin principal): register an operator's public
    key. Identity audits the change; no other principal can write the registry."""
    settings = cli_settings()
    try:
        entry = operators.read_entry(public_file)
    except (ValueError, KeyError, operators.CommandError) as exc:
        raise Usage(f"{public_file}: not a public key entry ({exc})", "give the .pub.json that keygen wrote") from None
    operators.publish_registry(settings, [operators.registration(entry, reason, by)])
    console.print(f"registration of {entry['operator_id']} key {entry['key_id']} sent")


@ops.command("revoke")
def operator_revoke(
    operator: Annotated[str, typer.Argument(help="The operator id")],
    key_id: Annotated[str, typer.Argument(help="The key id to revoke")],
    reason: Reason,
    by: Annotated[str, typer.Option("--by", help="Who revokes it (audited)")],
) -> None:
    """As admin: revoke an operator's key; its commands are refused (operator_unknown) from then on."""
    settings = cli_settings()
    operators.publish_registry(settings, [operators.revocation(operator, key_id, reason, by)])
    console.print(f"revocation of {operator} key {key_id} sent")


_AGO = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def _when(value: str | None, option: str = "--since") -> datetime | None:
    """An ISO time (UTC unless it has an offset), or a duration ago: 30m, 24h, 7d."""
    if value is None:
        return None
    text = value.strip()
    if ago := _AGO.fullmatch(text):
        return datetime.now(UTC) - timedelta(**{_UNITS[ago.group(2)]: int(ago.group(1))})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise Usage(
            f"{option} {value!r} is not a time",
            "give an ISO time such as 2026-11-25 or 2026-11-25T10:00 (UTC unless it has an offset), "
            "or a duration ago such as 30m, 24h or 7d",
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _action(value: str | None) -> str | None:
    """An audit action the services emit (shared/audit.py ACTIONS); anything else is a usage error."""
    if value is None or value in ACTIONS:
        return value
    import difflib

    close = difflib.get_close_matches(value, sorted(ACTIONS), n=3)
    hint = f"did you mean {' or '.join(close)}?" if close else "`clave audit replay --help` lists every action"
    raise Usage(f"--type {value!r} is not an audit action", hint)


def _account(settings: PlatformSettings, value: str | None) -> str | None:
    """An account id (32 hex digits, or at least its first 8) or a citizen's national ID, which is
    looked up in the identity store."""
    if value is None:
        return None
    text = value.strip().lower()
    if re.fullmatch(r"[0-9a-f]{8,32}", text) and not text.isdigit():
        return text
    national_id = _national_id(value)
    found = asyncio.run(auditlog.account_of(settings, national_id))
    if found is None:
        raise Failed(f"no account with national ID {national_id}", "check the number, or give the account id")
    return found


@audit.command("replay")
def replay(
    since: Annotated[str | None, typer.Option(help="ISO time to start from")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time to stop at")] = None,
    request: Annotated[str | None, typer.Option(help="Only this request_id")] = None,
    account: Annotated[
        str | None, typer.Option(help="Only this account: its id (or its first 8+ digits) or the national ID")
    ] = None,
    action: Annotated[
        str | None, typer.Option("--type", help=f"Only this action: {', '.join(sorted(ACTIONS))}")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """Replay audit.events from the start (or --since), filtered, in time order.
    Exit 1 when the filters matched nothing."""
    start, end, action = _when(since), _when(until, "--until"), _action(action)
    settings = auditor_settings()
    account_id = _account(settings, account)
    filters = (request, account_id, action)
    if as_json:  # streamed in time order: an export of the whole log needs no memory for it

        async def export() -> int:
            n = 0
            async for e in auditlog.iter_events_in_time_order(settings, since=start, until=end):
                if auditlog.matches(e, *filters, None):
                    sys.stdout.write(json.dumps(e, ensure_ascii=False) + "\n")
                    n += 1
            return n

        if not asyncio.run(export()) and any(filters):
            raise Failed("no audit event matches these filters", "check the ids, or widen --since/--until")
        return
    events = asyncio.run(
        auditlog.collect(
            settings,
            since=start,
            until=end,
            request_id=request,
            account_id=account_id,
            action=action,
            progress=True,
        )
    )
    if not events and any(filters):
        raise Failed("no audit event matches these filters", "check the ids, or widen --since/--until")
    console.print(auditlog.table(events))


EXIT_BROKEN = EXIT_FAILED  # a break: a forged, altered, missing, inserted or reordered event, or a cut-off tail
EXIT_UNVERIFIED = 4  # intact, but legacy HMAC-sealed events could not be checked (no AUDIT_HMAC_KEY)


def _keyring(settings: AuditorSettings) -> KeyRing:
    """The producers' public keys; none readable is a usage error (exit 2): nothing is verified."""
    try:
        return KeyRing.load(settings.audit_public_keys)
    except AuditKeyError as exc:
        raise Usage(
            f"cannot verify: AUDIT_PUBLIC_KEYS: {exc}",
            "give the producers' public keys (the local stack's are in var/secrets/audit/public)",
        ) from None


def _recorded_heads(settings: AuditorSettings) -> list[Any]:
    try:
        return asyncio.run(auditlog.recorded_heads(settings))
    except Exception as exc:  # the store is away (exit 3) or refuses us (exit 2): verify nothing
        known = classify(exc, _REACH["kafka"], _REACH["store"])
        kind = Unreachable if known is not None and known.code == EXIT_UNREACHABLE else Usage
        raise kind(
            f"cannot read the chain heads the audit service recorded ({exc.__class__.__name__})",
            "is the stack running? (`make status`); --no-heads verifies without the cut-off tail check",
        ) from None


def _export(path: Path) -> Iterator[dict[str, Any]]:
    """The events of an exported copy; an unreadable file is a one-line error, not a traceback."""
    try:
        yield from auditlog.file_events(path)
    except FileNotFoundError:
        raise Usage(f"--file {path}: no such file", "give a copy exported by `clave audit replay --json`") from None
    except IsADirectoryError:
        raise Usage(f"--file {path}: a folder, not a file", "give a JSON-lines export") from None
    except UnicodeDecodeError:
        raise Failed(
            f"--file {path}: not a JSON-lines audit export (not UTF-8 text)",
            "give a copy exported by `clave audit replay --json`",
        ) from None
    except OSError as exc:
        raise Usage(f"--file {path}: {exc.strerror}", "give a readable file") from None


@audit.command("verify")
def verify(
    since: Annotated[str | None, typer.Option(help="Verify from this ISO time (range check)")] = None,
    until: Annotated[str | None, typer.Option()] = None,
    file: Annotated[Path | None, typer.Option(help="Verify an exported JSON-lines copy instead")] = None,
    no_heads: Annotated[
        bool, typer.Option("--no-heads", help="Skip the comparison with the heads the audit service recorded")
    ] = False,
) -> None:
    """Check every audit event's signature (public keys only: AUDIT_PUBLIC_KEYS) and each
    producer's chain, and that each chain reaches the head the audit service recorded.
    Exit 1 naming the first break (an unknown producer or key fails too), 2 if nothing
    could be verified, 3 if the store or Kafka could not be reached, 4 if legacy HMAC-sealed
    events could not be checked."""
    start, end = _when(since), _when(until, "--until")
    if file is not None and not file.is_file():
        list(_export(file))  # the one-line reason: missing, a folder, unreadable
    settings = auditor_settings()
    keys = _keyring(settings)
    verifier = ChainVerifier(keys, legacy_key=settings.legacy_hmac_key(), from_start=since is None)
    heads = [] if no_heads else verifier.expect(_recorded_heads(settings))
    if file is not None:
        verifier.feed_all(_export(file))
        if verifier.count and verifier.break_count >= verifier.count:
            first = verifier.breaks[0]
            raise Failed(
                f"--file {file}: no authentic audit event in {verifier.count} line(s), the first: {first.problem}",
                "is it a copy exported by `clave audit replay --json`?",
            )
    else:
        asyncio.run(auditlog.verify_log(settings, verifier, since=start, until=end, progress=True))
    notes = verifier.check_tails(heads, since=start, until=end)
    for note in notes:
        err.print(f"note: {note}")
    redelivered = f" ({verifier.redeliveries} exact redeliveries counted once)" if verifier.redeliveries else ""
    if not verifier.ok:
        first = verifier.breaks[0]
        err.print(
            f"BROKEN at event {first.event_id} (position {first.position}, producer {first.producer}): "
            f"{first.problem}; {verifier.break_count} problem(s) in {verifier.count} events"
        )
        for b in verifier.breaks[1:10]:
            err.print(f"  also: event {b.event_id} (position {b.position}, producer {b.producer}): {b.problem}")
        raise typer.Exit(EXIT_BROKEN)
    tails = f"tails reach the recorded heads of {verifier.tails_compared} producers"
    if no_heads:
        tails = "tail check skipped (--no-heads)"
    if verifier.legacy_unverified:
        err.print(
            f"UNVERIFIED: {verifier.legacy_unverified} legacy HMAC-sealed event(s) cannot be checked without "
            f"AUDIT_HMAC_KEY; the other {verifier.count - verifier.legacy_unverified} events are verified, "
            f"chains intact, {tails}{redelivered}"
        )
        raise typer.Exit(EXIT_UNVERIFIED)
    legacy = f", {verifier.legacy_verified} of them legacy (HMAC)" if verifier.legacy_verified else ""
    console.print(f"OK: {verifier.count} audit events verified{legacy}, chains intact, {tails}{redelivered}")


@audit.command("heads")
def heads(as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False) -> None:
    """The chain heads the audit service recorded (the last authentic event of each
    producer), each checked against the producer's public key."""
    settings = auditor_settings()
    keys = _keyring(settings)
    rows = []
    for head in _recorded_heads(settings):
        authentic = bool(head.event) and check_seal(json.loads(head.event), keys, settings.legacy_hmac_key()).authentic
        rows.append(
            {
                "producer": head.producer,
                "seq": head.seq,
                "time": head.time,
                "event_id": head.event_id,
                "hash": head.hash,
                "authentic": authentic,
            }
        )
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table("producer", "seq", "time", "event", "signature", title="recorded chain heads")
    for row in rows:
        signature = "valid" if row["authentic"] else "NOT VERIFIED"
        table.add_row(str(row["producer"]), str(row["seq"]), str(row["time"]), str(row["event_id"]), signature)
    console.print(table)


def _write_private(path: Path, pem: bytes) -> None:
    """Write a private key readable by its owner alone (0600 from creation, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.replace(tmp, path)


@audit.command("keygen")
def keygen(
    producers: Annotated[list[str], typer.Argument(help="Services to make a signing key for, e.g. identity")],
    key_dir: Annotated[Path, typer.Option(help="Where each private key goes: KEY_DIR/<producer>.pem (0600)")],
    public_dir: Annotated[Path, typer.Option(help="Where verifiers read public keys (AUDIT_PUBLIC_KEYS)")],
    rotate: Annotated[bool, typer.Option(help="Replace an existing private key with a new one")] = False,
    not_before: Annotated[str | None, typer.Option(help="The new public key is valid from this ISO time")] = None,
) -> None:
    """Make each producer's Ed25519 signing key and publish its public key as
    PUBLIC_DIR/<producer>-<kid>.json. An existing private key is kept (its public entry
    written again if missing) unless --rotate. Give the service the private key only after
    its public key has reached every verifier."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_dir.mkdir(parents=True, exist_ok=True)
    for producer in producers:
        private = key_dir / f"{producer}.pem"
        if private.exists() and not rotate:
            key = load_signing_key(str(private))
        else:
            key = Ed25519PrivateKey.generate()
            _write_private(private, private_pem(key))
        public = key.public_key()
        entry_path = public_dir / f"{producer}-{kid_of(public)}.json"
        if not entry_path.exists():
            entry = PublicKeyEntry.of(producer, public, not_before=_when(not_before, "--not-before"))
            entry_path.write_text(entry.model_dump_json(indent=1, exclude_none=True) + "\n", encoding="utf-8")
        console.print(f"{producer}: key {kid_of(public)}, private {private}, public {entry_path}")


@audit.command("timeline")
def timeline(
    request_id: str,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a readable HTML page")] = None,
    from_log: Annotated[bool, typer.Option("--from-log", help="Scan audit.events instead of the read model")] = False,
) -> None:
    """Everything that happened to one recovery, across the four services, in order."""
    settings = auditor_settings()
    if from_log:
        events = asyncio.run(auditlog.collect(settings, request_id=request_id))
    else:
        events = asyncio.run(auditlog.from_read_model(settings, request_id))
    if not events:
        raise Failed(
            f"nothing in the audit log for {request_id}",
            "check the request id (`clave audit replay` lists them), or try --from-log",
        )
    console.print(auditlog.table(events, title=f"Recovery {request_id}"))
    if html is not None:
        html.write_text(auditlog.html_page(request_id, events), encoding="utf-8")
        console.print(f"written {html}")


@audit.command("rebuild")
def rebuild_read_model() -> None:
    """Rebuild the audit read model from offset 0 into a copy and compare it with the live one
    (events, chain heads and the breaks each found)."""
    from services.audit.rebuild import rebuild

    settings = auditor_settings()
    _keyring(settings)  # a clear message, not a traceback, when the keys are missing
    report = asyncio.run(rebuild(settings))
    console.print(
        f"rebuilt {report.events} events ({report.duplicates} exact redeliveries, {report.skipped} invalid skipped); "
        f"chain problems: {len(report.breaks)} (live model: {report.live_breaks})"
    )
    for problem in report.breaks[:10]:
        err.print(f"chain: {problem}")
    if not report.identical:
        err.print(
            f"DIFFERS from the live read model: {len(report.missing_live)} missing, "
            f"{len(report.different)} different, heads differ for {report.heads_differ}, "
            f"breaks differ for {report.breaks_differ[:10]}"
        )
        raise typer.Exit(1)
    console.print("identical to the live read model")


@app.command("contract")
def contract(
    check: Annotated[bool, typer.Option("--check", help="Only compare: exit 1 if the file differs.")] = False,
    output: Annotated[Path, typer.Option("--output", help="The document.")] = Path("docs/asyncapi.yaml"),
) -> None:
    """Write the topic contract as an AsyncAPI 3.0 document made from the code."""
    from clave import asyncapi

    raise typer.Exit(asyncapi.main(output, check=check))


def main(argv: list[str] | None = None) -> None:
    """Run the command line; every error ends as one line on stderr and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (after a subcommand too), or CLAVE_DEBUG=1.
    debug = "--debug" in args or os.environ.get("CLAVE_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    if not debug:  # the one-line message says it; the clients' own connection logs would repeat it
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        code = app(args, standalone_mode=False, prog_name="clave")
    except NoArgsIsHelpError:  # the help was printed: nothing was asked
        code = EXIT_USAGE
    except UsageError as exc:
        _say(usage_line(exc))
        code = EXIT_USAGE
    except ClickException as exc:
        _say(f"clave: {exc.format_message()}")
        code = exc.exit_code
    except CliError as exc:
        if debug:
            raise
        _say(f"clave: {exc.line()}")
        code = exc.code
    except (KeyboardInterrupt, typer.Abort):
        _say("clave: interrupted")
        code = 130
    except Exception as exc:
        if debug:
            raise
        known = classify(exc, _REACH["kafka"], _REACH["store"])
        if known is None:
            _say(f"clave: unexpected {exc.__class__.__name__}: {exc}; run it again with --debug for the traceback")
            code = EXIT_FAILED
        else:
            _say(f"clave: {known.line()}")
            code = known.code
    sys.exit(code or 0)


def _say(line: str) -> None:
    """One line on stderr, as is (no markup, no wrapping)."""
    sys.stderr.write(" ".join(line.split()) + "\n")


if __name__ == "__main__":
    main()
