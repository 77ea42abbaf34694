"""`clave`: the command line for operators and auditors.

    clave accounts import FILE           load citizen accounts (JSON lines)
    clave accounts update-email ID NEW   after an in-person check at an office
    clave accounts update-contact ID [--email E] [--backup-email E] [--phone P]
    clave accounts unlock ID             lift a lockout
    clave accounts send-recovery ID      send a recovery e-mail to the registered address
    clave audit replay|verify|timeline   read the audit log (public keys only, no secret)
    clave audit heads|keygen|rebuild     signed chain heads, signing keys, read-model check

Every operator action needs `--operator` and `--reason` and is audited.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from clave import auditlog
from clave.kafkaio import publish
from services.audit.settings import AuditorSettings
from shared.audit import ChainVerifier, check_seal
from shared.auditkeys import AuditKeyError, KeyRing, PublicKeyEntry, kid_of, load_signing_key, private_pem
from shared.envelope import new_event
from shared.schemas import OperatorCommand
from shared.settings import ClientSettings, PlatformSettings, load
from shared.topics import IDENTITY_COMMANDS, EventType

app = typer.Typer(help="Clave operator and auditor tools.", no_args_is_help=True)
accounts = typer.Typer(help="Citizen accounts (identity service).", no_args_is_help=True)
audit = typer.Typer(help="The audit log: replay, verify, timeline.", no_args_is_help=True)
app.add_typer(accounts, name="accounts")
app.add_typer(audit, name="audit")
# Piped output (files, tests, grep) gets full-width tables instead of truncated columns.
console = Console(width=None if sys.stdout.isatty() else 240)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 240)

def cli_settings() -> PlatformSettings:
    """The platform settings, refused (exit 78, naming each problem) when unsafe in production."""
    settings = load(ClientSettings)
    settings.ensure_safe("clave")
    return settings


def auditor_settings() -> AuditorSettings:
    """What the audit commands need: Kafka, the audit store and the producers' public keys.
    No secret: an auditor can check the log, never sign into it."""
    settings = load(AuditorSettings)
    settings.ensure_safe("clave audit")
    return settings


Operator = Annotated[str, typer.Option("--operator", "-o", help="Your operator id (audited).")]
Reason = Annotated[str, typer.Option("--reason", "-r", help="Why (audited), e.g. the office case number.")]


@accounts.command("import")
def import_accounts(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True)],
    operator: Annotated[str, typer.Option("--operator", "-o")] = "registry-import",
) -> None:
    """Import or update accounts from a JSON-lines file; bad lines are reported by number."""
    from services.identity.app import make_store
    from services.identity.registry import import_accounts as run_import
    from services.identity.settings import IdentitySettings
    from shared.hashing import SecretHasher

    settings = load(IdentitySettings)
    settings.ensure_safe("clave accounts import")

    async def main() -> Any:
        store = make_store(settings)
        hasher = SecretHasher(settings)
        try:
            await store.ensure_indexes()
            with file.open(encoding="utf-8") as fh:
                return await run_import(store, hasher, settings, fh, operator)
        finally:
            hasher.close()
            await store.close()

    report = asyncio.run(main())
    console.print(f"created {report.created}, updated {report.updated}, rejected {len(report.errors)}")
    for number, message in report.errors:
        err.print(f"line {number}: {message}")
    raise typer.Exit(1 if report.errors else 0)


def _command(
    event_type: str,
    national_id: str,
    operator: str,
    reason: str,
    new_email: str | None,
    wait: float,
    **contact: str | None,
) -> None:
    settings = cli_settings()
    command_id = uuid.uuid4().hex
    data = OperatorCommand(
        command_id=command_id,
        operator_id=operator,
        reason=reason,
        national_id=national_id,
        new_email=new_email,
        **contact,  # type: ignore[arg-type]
    )
    event = new_event(
        type=event_type,
        source="/clave/cli",
        data=data.model_dump(mode="json"),
        correlationid=command_id,
        subject=operator,
    )
    started = datetime.now(UTC) - timedelta(seconds=5)
    asyncio.run(publish(settings, IDENTITY_COMMANDS, national_id, event))
    console.print(f"command {command_id} sent")
    if wait <= 0:
        return
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        found = asyncio.run(auditlog.collect(settings, since=started, correlationid=command_id))
        mine = [e for e in found if e["data"]["action"].startswith("operator_")]
        if mine:
            result = mine[0]["data"]
            console.print(f"{result['action']}: {result['outcome']} {' '.join(result.get('reasons', []))}")
            raise typer.Exit(0 if result["outcome"] == "success" else 1)
        time.sleep(0.5)  # polling the log for the audit record, within the deadline
    err.print("no result in the audit log yet (is the identity service running?)")
    raise typer.Exit(2)


Wait = Annotated[float, typer.Option(help="Seconds to wait for the audited result (0: don't).")]


@accounts.command("update-email")
def update_email(national_id: str, new_email: str, operator: Operator, reason: Reason, wait: Wait = 30) -> None:
    """Change a citizen's registered e-mail after checking their ID in person.
    Revokes live tokens and notifies both the old and the new address."""
    _command(EventType.OPERATOR_EMAIL_UPDATE, national_id, operator, reason, new_email, wait)


@accounts.command("update-contact")
def update_contact(
    national_id: str,
    operator: Operator,
    reason: Reason,
    email: Annotated[str | None, typer.Option(help="New registered e-mail.")] = None,
    backup_email: Annotated[str | None, typer.Option(help='New backup e-mail ("" removes it).')] = None,
    phone: Annotated[str | None, typer.Option(help='New phone, E.164 or Ecuadorian ("" removes it).')] = None,
    wait: Wait = 30,
) -> None:
    """Change a citizen's contact data (registered e-mail, backup e-mail, phone) after checking
    their ID in person. Revokes live tokens and tells every address on file before."""
    if email is None and backup_email is None and phone is None:
        err.print("give at least one of --email, --backup-email, --phone")
        raise typer.Exit(2)
    _command(
        EventType.OPERATOR_CONTACT_UPDATE,
        national_id,
        operator,
        reason,
        email,
        wait,
        new_backup_email=backup_email,
        new_phone=phone,
    )


@accounts.command("unlock")
def unlock(national_id: str, operator: Operator, reason: Reason, wait: Wait = 30) -> None:
    """Lift a lockout (failed attempts are cleared)."""
    _command(EventType.OPERATOR_UNLOCK, national_id, operator, reason, None, wait)


@accounts.command("send-recovery")
def send_recovery(national_id: str, operator: Operator, reason: Reason, wait: Wait = 30) -> None:
    """Send a recovery e-mail to the registered address on the citizen's behalf.
    The operator never sees the link, the code or the key."""
    _command(EventType.OPERATOR_SEND_RECOVERY, national_id, operator, reason, None, wait)


def _when(value: str | None) -> datetime | None:
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@audit.command("replay")
def replay(
    since: Annotated[str | None, typer.Option(help="ISO time to start from")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time to stop at")] = None,
    request: Annotated[str | None, typer.Option(help="Only this request_id")] = None,
    account: Annotated[str | None, typer.Option(help="Only this account_id")] = None,
    action: Annotated[str | None, typer.Option("--type", help="Only this action, e.g. key_changed")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
) -> None:
    """Replay audit.events from the start (or --since), filtered."""
    settings = auditor_settings()
    if as_json:  # streamed: an export of the whole log needs no memory for it

        async def export() -> None:
            async for e in auditlog.iter_events(settings, since=_when(since), until=_when(until)):
                if auditlog.matches(e, request, account, action, None):
                    sys.stdout.write(json.dumps(e, ensure_ascii=False) + "\n")

        asyncio.run(export())
        return
    events = asyncio.run(
        auditlog.collect(
            settings,
            since=_when(since),
            until=_when(until),
            request_id=request,
            account_id=account,
            action=action,
            progress=True,
        )
    )
    console.print(auditlog.table(events))


EXIT_BROKEN = 1  # a break: a forged, altered, missing, inserted or reordered event, or a cut-off tail
EXIT_CANNOT_VERIFY = 2  # the keys or the recorded heads could not be read: nothing was verified
EXIT_UNVERIFIED = 3  # intact, but legacy HMAC-sealed events could not be checked (no AUDIT_HMAC_KEY)


def _keyring(settings: AuditorSettings) -> KeyRing:
    try:
        return KeyRing.load(settings.audit_public_keys)
    except AuditKeyError as exc:
        err.print(f"cannot verify: AUDIT_PUBLIC_KEYS: {exc}")
        raise typer.Exit(EXIT_CANNOT_VERIFY) from None


def _recorded_heads(settings: AuditorSettings) -> list[Any]:
    try:
        return asyncio.run(auditlog.recorded_heads(settings))
    except Exception as exc:  # the store is away or refuses us: say so, verify nothing
        err.print(
            f"cannot read the chain heads the audit service recorded ({exc.__class__.__name__}); "
            "--no-heads verifies without the cut-off tail check"
        )
        raise typer.Exit(EXIT_CANNOT_VERIFY) from None


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
    could be verified, 3 if legacy HMAC-sealed events could not be checked."""
    settings = auditor_settings()
    keys = _keyring(settings)
    verifier = ChainVerifier(keys, legacy_key=settings.legacy_hmac_key(), from_start=since is None)
    heads = [] if no_heads else verifier.expect(_recorded_heads(settings))
    if file is not None:
        verifier.feed_all(auditlog.file_events(file))
    else:
        asyncio.run(auditlog.verify_log(settings, verifier, since=_when(since), until=_when(until), progress=True))
    notes = verifier.check_tails(heads, since=_when(since), until=_when(until))
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
            entry = PublicKeyEntry.of(producer, public, not_before=_when(not_before))
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
        err.print(f"nothing in the audit log for {request_id}")
        raise typer.Exit(1)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
