"""`clave`: the command line for operators and auditors.

    clave accounts import FILE           load citizen accounts (JSON lines)
    clave accounts update-email ID NEW   after an in-person check at an office
    clave accounts unlock ID             lift a lockout
    clave accounts send-recovery ID      send a recovery e-mail to the registered address
    clave audit replay|verify|timeline   read the audit log

Every operator action needs `--operator` and `--reason` and is audited.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from clave import auditlog
from clave.kafkaio import publish
from shared.envelope import new_event
from shared.schemas import OperatorCommand
from shared.settings import PlatformSettings, load
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
    settings = load(PlatformSettings)
    settings.ensure_safe("clave")
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


def _command(event_type: str, national_id: str, operator: str, reason: str, new_email: str | None, wait: float) -> None:
    settings = cli_settings()
    command_id = uuid.uuid4().hex
    data = OperatorCommand(
        command_id=command_id, operator_id=operator, reason=reason, national_id=national_id, new_email=new_email
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
    events = asyncio.run(
        auditlog.collect(
            cli_settings(),
            since=_when(since),
            until=_when(until),
            request_id=request,
            account_id=account,
            action=action,
            progress=not as_json,
        )
    )
    if as_json:
        for e in events:
            sys.stdout.write(json.dumps(e, ensure_ascii=False) + "\n")
        return
    console.print(auditlog.table(events))


@audit.command("verify")
def verify(
    since: Annotated[str | None, typer.Option(help="Verify from this ISO time (range check)")] = None,
    until: Annotated[str | None, typer.Option()] = None,
    file: Annotated[Path | None, typer.Option(help="Verify an exported JSON-lines copy instead")] = None,
) -> None:
    """Check every audit event's MAC and each producer's chain; exit 1 naming the first break."""
    settings = cli_settings()
    if file is not None:
        events = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        events = asyncio.run(auditlog.collect(settings, since=_when(since), until=_when(until)))
    count, breaks = auditlog.verify(events, settings.audit_hmac_key, from_start=since is None)
    if breaks:
        first = breaks[0]
        err.print(
            f"BROKEN at event {first.event_id} (position {first.position}, producer {first.producer}): "
            f"{first.problem}; {len(breaks)} problem(s) in {count} events"
        )
        raise typer.Exit(1)
    console.print(f"OK: {count} audit events verified, chains intact")


@audit.command("timeline")
def timeline(
    request_id: str,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a readable HTML page")] = None,
    from_log: Annotated[bool, typer.Option("--from-log", help="Scan audit.events instead of the read model")] = False,
) -> None:
    """Everything that happened to one recovery, across the four services, in order."""
    settings = cli_settings()
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
    """Rebuild the audit read model from offset 0 into a copy and compare it with the live one."""
    from services.audit.rebuild import rebuild

    report = asyncio.run(rebuild(cli_settings()))
    console.print(
        f"rebuilt {report.events} events ({report.duplicates} exact redeliveries, {report.skipped} invalid skipped); "
        f"chain problems: {len(report.breaks)}"
    )
    for problem in report.breaks[:10]:
        err.print(f"chain: {problem}")
    if not report.identical:
        err.print(
            f"DIFFERS from the live read model: {len(report.missing_live)} missing, "
            f"{len(report.different)} different, heads differ for {report.heads_differ}"
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
