"""Identity's operator side: the registry of operator keys (identity.operator_keys, written by
`admin` alone), the signed operator commands (identity.commands) and the timer that applies
approved e-mail changes once their cooling-off period has passed (never a cancelled one).

Every command is verified first (operator_domain.check_signed): a refusal is dead-lettered
with its reason, audited (`operator_command_refused`) and reported on
identity.command_results, all in one transaction. A verified command is recorded by its id
in the transaction of its effect, so the same command again is refused as replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from services.identity import domain, operator_domain
from services.identity.domain import Account, Reason
from services.identity.handlers import recipient, stage_contact_changed
from services.identity.operator_domain import CommandReason, EmailChange, RegisteredKey
from services.identity.registry import AccountRecord, open_secrets, validate_record
from services.identity.settings import IdentitySettings
from services.identity.store import AccountStore, CounterKeys, StaleChange
from shared.audit import audit_event
from shared.consumer import HandlerContext
from shared.crypto import Purpose, SecretBox, initial_key_context, keyed_hash
from shared.envelope import BadInput, DeadLetterReason, describe_errors, new_event
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.schemas import (
    AccountImport,
    AccountRegistered,
    AuditRecord,
    CommandResult,
    EmailChangeCancelled,
    EmailChanged,
    EmailChangeRequested,
    IdentityVerified,
    OperatorApproval,
    OperatorCancel,
    OperatorCommand,
    OperatorKeyRegistered,
    OperatorKeyRevoked,
)
from shared.store import Outgoing, Write
from shared.topics import (
    IDENTITY_ACCOUNT_REGISTERED,
    IDENTITY_COMMAND_RESULTS,
    IDENTITY_EMAIL_CHANGE_REQUESTED,
    IDENTITY_EMAIL_CHANGED,
    IDENTITY_VERIFIED,
    EventType,
)

log = logging.getLogger(__name__)
SOURCE = "/clave/identity"
Signed = OperatorCommand | OperatorApproval | OperatorCancel | AccountImport


class OperatorHandlers:
    def __init__(
        self,
        store: AccountStore,
        hasher: SecretHasher,
        settings: IdentitySettings,
        metrics: ServiceMetrics,
        wake_applier: Callable[[], None],
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.settings = settings
        self.questions = settings.question_ids()
        self.limits = settings.limits()
        self.ttl = timedelta(seconds=settings.operator_command_ttl_s)
        self.cooling_off = timedelta(seconds=settings.email_change_cooling_off_s)
        self.import_box = SecretBox(settings.import_keys)
        self.password_box = SecretBox(settings.password_keys)
        self.wake_applier = wake_applier
        self.operator_commands = metrics.counter(
            "clave_identity_operator_commands_total", "Operator commands", ["command", "result"]
        )

    def ref(self, value: str) -> str:
        return keyed_hash(self.settings.pseudonym_key, value)

    # ---- identity.operator_keys: the registry (only `admin` may write the topic) -------------

    async def key_registered(self, ctx: HandlerContext, evt: OperatorKeyRegistered) -> None:
        key = RegisteredKey(evt.key_id, evt.operator_id, evt.public_key)
        problem = operator_domain.registration_problem(await self.store.operator_key(evt.key_id), key)
        if problem in ("public_key_invalid", "key_id_mismatch"):
            raise BadInput(DeadLetterReason.SCHEMA_INVALID, f"{problem}: public_key is not the key key_id names")
        details = {"operator_id": evt.operator_id, "key_id": evt.key_id, "reason": evt.reason}
        if problem is not None:
            outcome = "info" if problem == "already_registered" else "rejected"
            ctx.audit("operator_key_registered", outcome, actor=evt.registered_by, reasons=[problem], details=details)
            return
        ctx.audit("operator_key_registered", "success", actor=evt.registered_by, details=details)
        await ctx.commit(self.store.register_operator_key(key, datetime.now(UTC)))

    async def key_revoked(self, ctx: HandlerContext, evt: OperatorKeyRevoked) -> None:
        details = {"operator_id": evt.operator_id, "key_id": evt.key_id, "reason": evt.reason}
        existing = await self.store.operator_key(evt.key_id)
        if existing is None or existing.operator_id != evt.operator_id:
            ctx.audit(
                "operator_key_revoked", "rejected", actor=evt.revoked_by, reasons=["key_unknown"], details=details
            )
            return
        ctx.audit("operator_key_revoked", "success", actor=evt.revoked_by, details=details)
        await ctx.commit(self.store.revoke_operator_key(evt.key_id, datetime.now(UTC)))

    # ---- verification, results, commit --------------------------------------------------------

    async def _verify(self, ctx: HandlerContext, cmd: Signed) -> None:
        """Refuse (dead-letter, audit, report) a command that is not signed by a live key of its
        operator, is out of its lifetime, or was seen before."""
        keys = await self.store.operator_keys(cmd.operator_id)
        refusal = operator_domain.check_signed(
            ctx.event.type,
            ctx.event.data,  # the bytes as they arrived, not a re-serialisation
            keys,
            seen_before=await self.store.command_seen(cmd.command_id),
            now=datetime.now(UTC),
            ttl=self.ttl,
        )
        if refusal is None:
            return
        # Not the operator's word: the claimed id is recorded as claimed, the actor is unknown.
        ctx.audit(
            "operator_command_refused",
            "rejected",
            actor="unverified",
            reasons=[refusal.reason],
            details={
                "command": ctx.event.type,
                "command_id": cmd.command_id,
                "claimed_operator": cmd.operator_id,
                "problem": refusal.detail,
            },
        )
        self._result(ctx, cmd, "rejected", reasons=[refusal.reason])
        self.operator_commands.labels(ctx.event.type.split(".")[-2], "refused").inc()
        raise ctx.refuse(BadInput(refusal.reason, refusal.detail))

    def _result(
        self,
        ctx: HandlerContext,
        cmd: Signed,
        status: str,
        *,
        reasons: list[str] | None = None,
        effect: str | None = None,
        change_id: str | None = None,
        effective_at: datetime | None = None,
        detail: str | None = None,
    ) -> None:
        ctx.emit(
            IDENTITY_COMMAND_RESULTS,
            cmd.command_id,
            EventType.OPERATOR_COMMAND_RESULT,
            CommandResult(
                command_id=cmd.command_id,
                operator_id=cmd.operator_id,
                command=ctx.event.type,
                status=status,  # type: ignore[arg-type]
                reasons=reasons or [],
                effect=effect,
                change_id=change_id,
                effective_at=effective_at,
                line=cmd.line if isinstance(cmd, AccountImport) else None,
                detail=detail,
            ),
        )

    def _done(
        self,
        ctx: HandlerContext,
        cmd: Signed,
        action: str,
        outcome: str,
        *,
        account_id: str | None = None,
        subject_ref: str | None = None,
        request_id: str | None = None,
        reasons: list[str] | None = None,
        status: str | None = None,
        effect: str | None = None,
        change_id: str | None = None,
        effective_at: datetime | None = None,
        detail: str | None = None,
        report: bool = True,
        **details: Any,
    ) -> None:
        """Audit a verified command's result with who, why and which command; report it to the
        operator (one result per command: `report=False` for a part of it); count it."""
        ctx.audit(
            action,
            outcome,
            actor=cmd.operator_id,
            account_id=account_id,
            subject_ref=subject_ref,
            request_id=request_id,
            reasons=reasons,
            details={"reason": cmd.reason, "command_id": cmd.command_id, **details},
        )
        self.operator_commands.labels(action, outcome).inc()
        if not report:
            return
        status = status or ("rejected" if outcome == "rejected" else "succeeded")
        self._result(
            ctx,
            cmd,
            status,
            reasons=reasons,
            effect=effect,
            change_id=change_id,
            effective_at=effective_at,
            detail=detail,
        )

    async def _commit(self, ctx: HandlerContext, cmd: Signed, *writes: Write) -> None:
        """Commit the effect together with the record of the command id (replays are refused)."""
        await ctx.commit(self.store.record_command(cmd.command_id, cmd.operator_id, datetime.now(UTC)), *writes)

    async def _command_account(self, ctx: HandlerContext, cmd: OperatorCommand, action: str) -> Account | None:
        digits = "".join(c for c in cmd.national_id if c.isdigit())
        try:
            national_id = domain.normalize_national_id(
                "employer" if len(digits) == 13 else "affiliate", cmd.national_id
            )
        except domain.InvalidId:
            self._done(ctx, cmd, action, "rejected", subject_ref=self.ref(cmd.national_id), reasons=[Reason.ID_INVALID])
            return None
        account = await self.store.by_national_id(national_id)
        if account is None:
            self._done(
                ctx, cmd, action, "rejected", subject_ref=self.ref(national_id), reasons=[Reason.ACCOUNT_UNKNOWN]
            )
        return account

    # ---- identity.commands --------------------------------------------------------------------

    async def unlock(self, ctx: HandlerContext, cmd: OperatorCommand) -> None:
        await self._verify(ctx, cmd)
        account = await self._command_account(ctx, cmd, "operator_unlock")
        if account is None:
            return await self._commit(ctx, cmd)
        self._done(ctx, cmd, "operator_unlock", "success", account_id=account.account_id)
        await self._commit(ctx, cmd, *self.store.clear_lockout(CounterKeys.for_account(account.account_id)))

    async def send_recovery(self, ctx: HandlerContext, cmd: OperatorCommand) -> None:
        await self._verify(ctx, cmd)
        action = "operator_send_recovery"
        account = await self._command_account(ctx, cmd, action)
        if account is None:
            return await self._commit(ctx, cmd)
        now = datetime.now(UTC)
        request_id = f"op-{cmd.command_id}"
        keys = CounterKeys.for_account(account.account_id)
        if not domain.mailbox_allows((await self.store.counters(keys)).principal, self.limits, now):
            self._done(
                ctx, cmd, action, "rejected", account_id=account.account_id, request_id=request_id,
                reasons=[Reason.RATE_LIMITED],
            )  # fmt: skip
            return await self._commit(ctx, cmd)
        # The mail goes to the registered address only; the operator never sees the link.
        ctx.emit(
            IDENTITY_VERIFIED,
            account.account_id,
            EventType.IDENTITY_VERIFIED,
            IdentityVerified(
                request_id=request_id,
                account_id=account.account_id,
                recipient=recipient(account),
                actor=cmd.operator_id,
            ),
        )
        self._done(ctx, cmd, action, "success", account_id=account.account_id, request_id=request_id)
        await self._commit(ctx, cmd, self.store.record_mail(keys, now))

    async def contact_update(self, ctx: HandlerContext, cmd: OperatorCommand) -> None:
        """The backup e-mail and the phone, changed at an office (the registered e-mail has its
        own command, update-email, with a second operator and the cooling-off period). Every
        address on file before is told and live links are revoked, as for the citizen's change."""
        await self._verify(ctx, cmd)
        action = "operator_contact_update"
        account = await self._command_account(ctx, cmd, action)
        if account is None:
            return await self._commit(ctx, cmd)
        if cmd.new_email is not None:
            self._done(
                ctx, cmd, action, "rejected", account_id=account.account_id,
                reasons=[CommandReason.EMAIL_NEEDS_APPROVAL],
            )  # fmt: skip
            return await self._commit(ctx, cmd)
        before = account.contact
        try:
            after = domain.new_contact(before, None, cmd.new_backup_email, cmd.new_phone)
        except domain.ContactRefused as refused:
            self._done(ctx, cmd, action, "rejected", account_id=account.account_id, reasons=list(refused.reasons))
            return await self._commit(ctx, cmd)
        changes = stage_contact_changed(ctx, account, after, change_id=cmd.command_id, actor=cmd.operator_id)
        self._done(
            ctx, cmd, action, "success", account_id=account.account_id, effect="updated",
            fields=",".join(f for f, _ in changes),
        )  # fmt: skip
        # A concurrent change (StaleContact) makes the command fail and be redelivered: it is
        # then decided again on what that change left.
        await self._commit(ctx, cmd, self.store.set_contact(account.account_id, after, before))

    async def email_update(self, ctx: HandlerContext, cmd: OperatorCommand) -> None:
        """Only a request: a second operator approves it, and it takes effect after the
        cooling-off period. Both addresses are told now."""
        await self._verify(ctx, cmd)
        action = "operator_email_update"
        account = await self._command_account(ctx, cmd, action)
        if account is None:
            return await self._commit(ctx, cmd)
        try:
            new_email = domain.normalize_email(cmd.new_email or "")
        except ValueError:
            self._done(
                ctx, cmd, action, "rejected", account_id=account.account_id, reasons=[CommandReason.EMAIL_INVALID]
            )
            return await self._commit(ctx, cmd)
        await self._commit(ctx, cmd, *await self._request_change(ctx, cmd, account, new_email))

    async def _request_change(
        self, ctx: HandlerContext, cmd: OperatorCommand | AccountImport, account: Account, new_email: str
    ) -> list[Write]:
        """Stage a pending e-mail change (or its refusal); the writes that store it."""
        now = datetime.now(UTC)
        pending = await self.store.pending_change(account.account_id)
        change = operator_domain.request_email_change(
            cmd.command_id, account.account_id, account.email, new_email, cmd.operator_id, pending, now,
            self.cooling_off,
        )  # fmt: skip
        if isinstance(change, str):
            self._done(ctx, cmd, "email_change_requested", "rejected", account_id=account.account_id, reasons=[change])
            return []
        ctx.emit(
            IDENTITY_EMAIL_CHANGE_REQUESTED,
            account.account_id,
            EventType.IDENTITY_EMAIL_CHANGE_REQUESTED,
            EmailChangeRequested(
                change_id=change.change_id,
                account_id=account.account_id,
                old_recipient=recipient(account),
                new_recipient=recipient(account, new_email),
                operator_id=cmd.operator_id,
                not_before=change.not_before,
            ),
        )
        self._done(
            ctx,
            cmd,
            "email_change_requested",
            "success",
            account_id=account.account_id,
            status="pending",
            effect="approval_needed",
            change_id=change.change_id,
            effective_at=change.not_before,
            new_email_masked=domain.mask_email(new_email),
            not_before=change.not_before.isoformat(),
        )
        return [self.store.add_email_change(change)]

    async def approve(self, ctx: HandlerContext, cmd: OperatorApproval) -> None:
        await self._verify(ctx, cmd)
        action = "email_change_approved"
        change = await self.store.email_change(cmd.approves)
        decision = operator_domain.approve(change, cmd.operator_id, datetime.now(UTC))
        account_id = change.account_id if change else None
        if isinstance(decision, str):
            self._done(ctx, cmd, action, "rejected", account_id=account_id, reasons=[decision], change_id=cmd.approves)
            return await self._commit(ctx, cmd)
        effective = operator_domain.effective_at(decision)
        self._done(
            ctx,
            cmd,
            action,
            "success",
            account_id=account_id,
            effect="approved",
            change_id=decision.change_id,
            effective_at=effective,
            requested_by=decision.requested_by,
            effective_at_time=effective.isoformat(),
        )
        await self._commit(ctx, cmd, self.store.approve_email_change(decision, effective))
        self.wake_applier()

    async def cancel(self, ctx: HandlerContext, cmd: OperatorCancel) -> None:
        """Any registered operator stops a pending e-mail change (the requester too): it never
        takes effect, and both addresses are told. An unknown, applied or already cancelled
        change is refused with its reason."""
        await self._verify(ctx, cmd)
        action = "email_change_cancelled"
        change = await self.store.email_change(cmd.cancels)
        decision = operator_domain.cancel(change, cmd.operator_id, datetime.now(UTC))
        if isinstance(decision, str):
            self._done(
                ctx, cmd, action, "rejected", account_id=change.account_id if change else None,
                reasons=[decision], change_id=cmd.cancels, cancelled_change=cmd.cancels,
            )  # fmt: skip
            return await self._commit(ctx, cmd)
        assert change is not None  # the rule refuses an unknown change
        account = await self.store.by_id(decision.account_id)
        if account is not None:
            ctx.emit(
                IDENTITY_EMAIL_CHANGE_REQUESTED,  # after the request's notice: same topic and key
                account.account_id,
                EventType.IDENTITY_EMAIL_CHANGE_CANCELLED,
                EmailChangeCancelled(
                    change_id=decision.change_id,
                    account_id=account.account_id,
                    old_recipient=recipient(account),
                    new_recipient=recipient(account, decision.new_email),
                    operator_id=cmd.operator_id,
                ),
            )
        else:
            log.warning("e-mail change %s cancelled: its account is gone, no one to tell", decision.change_id)
        self._done(
            ctx, cmd, action, "success", account_id=decision.account_id, effect="cancelled",
            change_id=decision.change_id, cancelled_change=decision.change_id, requested_by=decision.requested_by,
            approved_by=decision.approved_by, was=change.status, new_email_masked=domain.mask_email(decision.new_email),
        )  # fmt: skip
        # Only on the state decided on: a change applied meanwhile (StaleChange) makes the command
        # fail and be redelivered, then refused as applied.
        await self._commit(ctx, cmd, self.store.cancel_email_change(decision, change.status))

    async def account_import(self, ctx: HandlerContext, cmd: AccountImport) -> None:
        """One registry line: create the account, update what changed (an e-mail change needs
        an approval, like update-email), or nothing at all when nothing changed."""
        await self._verify(ctx, cmd)
        try:
            secrets = open_secrets(self.import_box, cmd.sealed_secrets, cmd.command_id, cmd.national_id)
        except ValueError as exc:
            raise BadInput(DeadLetterReason.UNDECRYPTABLE, str(exc)) from None
        try:
            record = AccountRecord(
                national_id=cmd.national_id,
                profile=cmd.profile,
                name=cmd.name,
                email=cmd.email,
                locale=cmd.locale,
                answers=secrets.answers,
                representative_id=cmd.representative_id,
                password=secrets.password,
                backup_email=cmd.backup_email,
                phone=cmd.phone,
            )
            clean = validate_record(record, self.questions)
        except ValidationError as exc:
            return await self._import_refused(ctx, cmd, describe_errors(exc))
        except ValueError as exc:
            return await self._import_refused(ctx, cmd, str(exc))
        account = await self.store.by_national_id(clean["national_id"])
        subject_ref = self.ref(clean["national_id"])
        if account is None:
            return await self._import_new(ctx, cmd, record, clean, subject_ref)
        await self._import_existing(ctx, cmd, record, clean, account, subject_ref)

    async def _import_refused(self, ctx: HandlerContext, cmd: AccountImport, problem: str) -> None:
        self._done(
            ctx, cmd, "account_import_refused", "rejected", reasons=[CommandReason.RECORD_INVALID],
            detail=problem[:300], line=cmd.line or 0,
        )  # fmt: skip
        await self._commit(ctx, cmd)

    async def _hashes(self, answers: dict[str, str]) -> dict[str, str]:
        return {q: await self.hasher.hash(domain.normalize_answer(a)) for q, a in sorted(answers.items())}

    async def _import_new(
        self, ctx: HandlerContext, cmd: AccountImport, record: AccountRecord, clean: dict[str, Any], subject_ref: str
    ) -> None:
        account_id = uuid.uuid4().hex
        now = datetime.now(UTC)
        doc = {
            "_id": account_id,
            "national_id": clean["national_id"],
            "profile": record.profile,
            "representative_id": clean["representative_id"],
            "name": record.name,
            "email": clean["email"],
            "locale": record.locale,
            "answer_hashes": await self._hashes(record.answers),
            "created_at": now,
            "updated_at": now,
            **clean["contact"],  # backup_email, phone, when the line gives them
        }
        # The password service learns the account's login name (its national ID) and, with one,
        # its initial key sealed for it.
        sealed_key = (
            None
            if record.password is None
            else self.password_box.seal(
                {"password": record.password},
                purpose=Purpose.INITIAL_KEY,
                context=initial_key_context(account_id=account_id),
            )
        )
        ctx.emit(
            IDENTITY_ACCOUNT_REGISTERED,
            account_id,
            EventType.ACCOUNT_REGISTERED,
            AccountRegistered(
                account_id=account_id,
                national_id=clean["national_id"],
                sealed_initial_key=sealed_key,
                legacy_key=cmd.legacy_key and sealed_key is not None,
            ),
        )
        self._done(
            ctx, cmd, "account_imported", "success", account_id=account_id, subject_ref=subject_ref, effect="created",
            profile=record.profile, line=cmd.line or 0, legacy_key=cmd.legacy_key,
        )  # fmt: skip
        await self._commit(ctx, cmd, self.store.create_account(doc))

    async def _answers_same(self, account: Account, answers: dict[str, str]) -> bool:
        if set(account.answer_hashes) != set(answers):
            return False
        checks = [self.hasher.verify(account.answer_hashes[q], domain.normalize_answer(a)) for q, a in answers.items()]
        return all(await asyncio.gather(*checks))

    async def _import_existing(
        self,
        ctx: HandlerContext,
        cmd: AccountImport,
        record: AccountRecord,
        clean: dict[str, Any],
        account: Account,
        subject_ref: str,
    ) -> None:
        # A re-import tells the password service the login name again (backfills accounts imported
        # before it knew them; never a key: an existing account's key is never overwritten).
        ctx.emit(
            IDENTITY_ACCOUNT_REGISTERED,
            account.account_id,
            EventType.ACCOUNT_REGISTERED,
            AccountRegistered(account_id=account.account_id, national_id=account.national_id),
        )
        current = {
            "profile": account.profile,
            "name": account.name,
            "locale": account.locale,
            "representative_id": account.representative_id,
        }
        incoming = {
            "profile": record.profile,
            "name": record.name,
            "locale": record.locale,
            "representative_id": clean["representative_id"],
        }
        changed = operator_domain.changed_fields(current, incoming, await self._answers_same(account, record.answers))
        email_changes = clean["email"].casefold() != account.email.casefold()
        # A line that gives a backup e-mail or a phone sets it (one that gives none keeps what the
        # citizen set on the portal); every address on file is told, as for any contact change.
        contact = domain.Contact(
            account.email,
            clean["contact"].get("backup_email", account.backup_email),
            clean["contact"].get("phone", account.phone),
        )
        if contact != account.contact:
            stage_contact_changed(ctx, account, contact, change_id=cmd.command_id, actor=cmd.operator_id)
            changed = [*changed, "contact"]
        if not changed and not email_changes:
            self._done(
                ctx, cmd, "account_import_unchanged", "info", account_id=account.account_id, effect="unchanged",
                line=cmd.line or 0,
            )  # fmt: skip
            return await self._commit(ctx, cmd)
        fields: dict[str, Any] = {f: incoming[f] for f in changed if f not in ("answers", "contact")}
        if "contact" in changed:
            fields.update(backup_email=contact.backup_email, phone=contact.phone)
        if "answers" in changed:
            fields["answer_hashes"] = await self._hashes(record.answers)
        writes: list[Write] = []
        if changed:
            fields["updated_at"] = datetime.now(UTC)
            writes.append(self.store.update_account(account.account_id, fields))
            self._done(
                ctx, cmd, "account_updated", "success", account_id=account.account_id, subject_ref=subject_ref,
                effect="updated", changed=",".join(changed), line=cmd.line or 0, report=not email_changes,
            )  # fmt: skip
        if email_changes:
            # The same rule as update-email: a second operator and the cooling-off period.
            writes.extend(await self._request_change(ctx, cmd, account, clean["email"]))
        await self._commit(ctx, cmd, *writes)


# ---- applying approved e-mail changes ----------------------------------------------------------

# The applier sleeps until the next approved change falls due, or until an approval wakes it;
# at most this long, for a change another identity instance approved.
SAFETY_POLL_S = 30.0
MIN_SLEEP_S = 0.05


class EmailChangeApplier:
    """Applies approved e-mail changes once due: the new address, the old and the new address
    told (identity.email_changed: the notifier mails both, tokens revokes live tokens), audited,
    and the requesting operator's result. Not a poll: it sleeps until the next due time."""

    def __init__(self, store: AccountStore, on_outbox: Callable[[], None]) -> None:
        self.store = store
        self.on_outbox = on_outbox
        self.wake = asyncio.Event()

    async def run_forever(self) -> None:
        while True:
            self.wake.clear()  # before looking: an approval meanwhile makes the wait return at once
            await self.apply_due()
            due = await self.store.next_change_due_at()
            delay = SAFETY_POLL_S
            if due is not None:
                delay = min(max((due - datetime.now(UTC)).total_seconds(), MIN_SLEEP_S), SAFETY_POLL_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=delay)

    async def apply_due(self) -> int:
        applied = 0
        for change in await self.store.due_changes(datetime.now(UTC)):
            if await self.apply(change):
                applied += 1
        if applied:
            self.on_outbox()
        return applied

    async def apply(self, change: EmailChange) -> bool:
        now = datetime.now(UTC)
        if not operator_domain.is_due(change, now):
            return False  # not approved (cancelled, say) or not yet due: never applied
        account = await self.store.by_id(change.account_id)
        if account is None:
            log.warning("e-mail change %s: its account is gone", change.change_id)
            return False
        outgoing = self._outgoing(change, account)
        writes = [
            self.store.mark_change_applied(change.change_id, now),
            self.store.set_email(account.account_id, change.new_email),
        ]
        try:
            await self.store.commit(consumer=None, event_id=None, writes=writes, outgoing=outgoing)
        except StaleChange:
            return False  # another instance applied it, or an operator cancelled it meanwhile
        return True

    def _outgoing(self, change: EmailChange, account: Account) -> list[Outgoing]:
        def event(event_type: str, data: Any) -> Any:
            return new_event(
                type=event_type, source=SOURCE, data=data.model_dump(mode="json"), correlationid=change.change_id
            )

        changed = EmailChanged(
            command_id=change.change_id,
            account_id=account.account_id,
            old_recipient=recipient(account),
            new_recipient=recipient(account, change.new_email),
            operator_id=change.requested_by,
        )
        result = CommandResult(
            command_id=change.change_id,
            operator_id=change.requested_by,
            command=EventType.OPERATOR_EMAIL_UPDATE,
            status="applied",
            effect="email_changed",
            change_id=change.change_id,
            effective_at=datetime.now(UTC),
        )
        record = AuditRecord(
            service="identity",
            action="email_change_applied",
            outcome="success",
            account_id=account.account_id,
            details={
                "change_id": change.change_id,
                "requested_by": change.requested_by,
                "approved_by": change.approved_by,
                "new_email_masked": domain.mask_email(change.new_email),
            },
        )
        return [
            Outgoing(IDENTITY_EMAIL_CHANGED, account.account_id, event(EventType.IDENTITY_EMAIL_CHANGED, changed)),
            Outgoing(IDENTITY_COMMAND_RESULTS, change.change_id, event(EventType.OPERATOR_COMMAND_RESULT, result)),
            audit_event(record, correlationid=change.change_id, causationid=None, source=SOURCE),
        ]
