"""Identity handlers: one per consumed event type. Load, decide, store, publish."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.client_session import AsyncClientSession

from services.identity import domain
from services.identity.domain import Account, Evidence, LockoutPolicy, MailboxLimit, Reason
from services.identity.settings import IdentitySettings
from services.identity.store import AccountStore
from shared.consumer import HandlerContext
from shared.crypto import keyed_hash
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.schemas import (
    EmailChanged,
    IdentityLocked,
    IdentityVerified,
    OperatorCommand,
    PasswordUpdated,
    Recipient,
    RecoveryOutcome,
    RecoveryRequested,
)
from shared.topics import (
    IDENTITY_EMAIL_CHANGED,
    IDENTITY_LOCKED,
    IDENTITY_VERIFIED,
    RECOVERY_OUTCOMES,
    EventType,
)


def recipient(account: Account, email: str | None = None) -> Recipient:
    return Recipient(email=email or account.email, name=account.name, locale=account.locale)  # type: ignore[arg-type]


class IdentityHandlers:
    def __init__(
        self, store: AccountStore, hasher: SecretHasher, settings: IdentitySettings, metrics: ServiceMetrics
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.settings = settings
        self.questions = settings.question_ids()
        self.lockout = LockoutPolicy(
            settings.lockout_max_failures,
            timedelta(seconds=settings.lockout_window_s),
            timedelta(seconds=settings.lockout_duration_s),
        )
        self.mailbox = MailboxLimit(settings.recovery_mails_per_hour)
        self.requests = metrics.counter(
            "clave_identity_requests_total", "Recovery requests by audited result", ["result"]
        )
        self.lockouts = metrics.counter("clave_identity_lockouts_total", "Accounts locked")
        self.operator_commands = metrics.counter(
            "clave_identity_operator_commands_total", "Operator commands", ["command", "result"]
        )

    def ref(self, value: str) -> str:
        return keyed_hash(self.settings.pseudonym_key, value)

    # ---- recovery.requests -------------------------------------------------------------------

    async def recovery_requested(self, ctx: HandlerContext, req: RecoveryRequested) -> None:
        started = time.perf_counter()
        now = datetime.now(UTC)
        if await self.store.request_seen(req.request_id):
            # Same request_id under a new event id: the first copy already had its effect.
            ctx.audit("recovery_requested", "rejected", request_id=req.request_id, reasons=[Reason.DUPLICATE_REQUEST])
            return
        # Whatever happens next, the portal sees the same answer (no account enumeration).
        ctx.emit(
            RECOVERY_OUTCOMES,
            req.request_id,
            EventType.RECOVERY_OUTCOME,
            RecoveryOutcome(request_id=req.request_id, stage="request", status="accepted"),
        )
        ip_ref = self.ref(req.client_ip)
        ip_limited = (
            await self.store.ip_failures(ip_ref, now - timedelta(seconds=self.settings.ip_window_s))
            >= self.settings.ip_max_requests
        )
        national_id, id_valid = req.national_id, True
        try:
            national_id = domain.normalize_national_id(req.profile, req.national_id)
        except domain.InvalidId:
            id_valid = False
        account = await self.store.by_national_id(national_id) if id_valid else None
        if account is not None and account.profile != req.profile:
            account = None
        answers_ok = await self._check_answers(account, req.answers)
        email_ok = account is not None and domain.same_mailbox(req.email, account.email)
        representative_ok = self._representative_ok(account, req.representative_id)

        decision = domain.decide(
            Evidence(req.captcha_passed, id_valid, account, answers_ok, email_ok, representative_ok, ip_limited),
            now,
            self.lockout,
            self.mailbox,
        )
        subject_ref = self.ref(national_id)
        account_id = account.account_id if account else None
        locked_until = now + self.lockout.duration if decision.lock else None
        rehashed = await self._rehashed_answers(account, req.answers) if decision.verified else {}
        # Audited so the equal cost of known and unknown accounts can be measured, not assumed.
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        details: dict[str, str | float | int] = {"profile": req.profile, "elapsed_ms": elapsed_ms}
        if decision.verified:
            assert account is not None
            ctx.emit(
                IDENTITY_VERIFIED,
                account.account_id,
                EventType.IDENTITY_VERIFIED,
                IdentityVerified(
                    request_id=req.request_id,
                    account_id=account.account_id,
                    recipient=recipient(account),
                    requested_at=ctx.event.time,
                ),
            )
            details["answers_rehashed"] = len(rehashed)
        ctx.audit(
            "recovery_requested",
            "success" if decision.verified else "rejected",
            account_id=account_id,
            subject_ref=None if account_id else subject_ref,
            request_id=req.request_id,
            reasons=decision.reasons,
            details=details,
        )
        if decision.lock:
            ctx.audit(
                "account_locked",
                "info",
                account_id=account_id,
                request_id=req.request_id,
                reasons=decision.reasons,
                details={"locked_until": locked_until.isoformat() if locked_until else None},
            )
        if decision.send_locked_notice and account is not None:
            until = locked_until or account.locked_until or now
            ctx.emit(
                IDENTITY_LOCKED,
                account.account_id,
                EventType.IDENTITY_LOCKED,
                IdentityLocked(
                    request_id=req.request_id,
                    account_id=account.account_id,
                    recipient=recipient(account),
                    locked_until=until,
                ),
            )

        async def writes(s: AsyncClientSession) -> None:
            await self.store.record_request(req.request_id, now, s)
            if not decision.verified and Reason.RATE_LIMITED not in decision.reasons:
                await self.store.record_ip_failure(ip_ref, now, s)
            if account is None:
                if id_valid and decision.reasons == [Reason.ACCOUNT_UNKNOWN]:
                    # The same write as a known account's failure: equal cost, and guesses at
                    # IDs that do not exist are on record too.
                    await self.store.record_subject_failure(subject_ref, now, s)
                return
            if rehashed:
                await self.store.set_answer_hashes(account.account_id, rehashed, s)
            if decision.count_failure:
                await self.store.record_failure(account.account_id, now, locked_until, s)
            if decision.verified or decision.send_locked_notice:
                await self.store.record_mail(account.account_id, now, s)

        await ctx.commit(writes)
        self.requests.labels(decision.reasons[0] if decision.reasons else "verified").inc()
        if decision.lock:
            self.lockouts.inc()

    async def _check_answers(self, account: Account | None, answers: dict[str, str]) -> bool:
        """Verify every configured question, always, against real or decoy hashes: an unknown
        account and a wrong answer cost the same argon2 work (no timing oracle)."""
        checks = []
        for question in self.questions:
            stored = account.answer_hashes.get(question) if account else None
            given = domain.normalize_answer(answers.get(question, ""))
            checks.append(self.hasher.verify(stored or self.hasher.decoy_hash, given))
        results = await asyncio.gather(*checks)
        complete = account is not None and all(q in account.answer_hashes for q in self.questions)
        return complete and all(results) and set(self.questions) <= answers.keys()

    async def _rehashed_answers(self, account: Account | None, answers: dict[str, str]) -> dict[str, str]:
        """New hashes for answers stored with outdated argon2 parameters (we hold the plain
        answer only now, after it verified)."""
        if account is None:
            return {}
        return {
            q: await self.hasher.hash(domain.normalize_answer(answers[q]))
            for q in self.questions
            if self.hasher.needs_rehash(account.answer_hashes[q])
        }

    @staticmethod
    def _representative_ok(account: Account | None, given: str | None) -> bool:
        if account is None or account.profile != "employer":
            return True
        if given is None or account.representative_id is None:
            return False
        try:
            return domain.normalize_cedula(given) == account.representative_id
        except domain.InvalidId:
            return False

    # ---- password.updated: a successful key change unlocks -----------------------------------

    async def password_updated(self, ctx: HandlerContext, evt: PasswordUpdated) -> None:
        account = await self.store.by_id(evt.account_id)
        if account is None:
            return
        was_locked = account.is_locked(datetime.now(UTC)) or bool(account.failures)

        async def writes(s: AsyncClientSession) -> None:
            await self.store.unlock(evt.account_id, s)

        if was_locked:
            ctx.audit(
                "account_unlocked",
                "success",
                account_id=evt.account_id,
                request_id=evt.request_id,
                details={"by": "key_change"},
            )
        await ctx.commit(writes)

    # ---- identity.commands: operator actions --------------------------------------------------

    def _operator_result(
        self,
        ctx: HandlerContext,
        cmd: OperatorCommand,
        action: str,
        outcome: str,
        *,
        account_id: str | None = None,
        subject_ref: str | None = None,
        request_id: str | None = None,
        reasons: list[str] | None = None,
        **details: str,
    ) -> None:
        """Audit an operator command's result with who, why and which command; count it."""
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

    async def _command_account(self, ctx: HandlerContext, cmd: OperatorCommand, action: str) -> Account | None:
        digits = "".join(c for c in cmd.national_id if c.isdigit())
        try:
            national_id = domain.normalize_national_id(
                "employer" if len(digits) == 13 else "affiliate", cmd.national_id
            )
        except domain.InvalidId:
            self._operator_result(
                ctx, cmd, action, "rejected", subject_ref=self.ref(cmd.national_id), reasons=[Reason.ID_INVALID]
            )
            return None
        account = await self.store.by_national_id(national_id)
        if account is None:
            self._operator_result(
                ctx, cmd, action, "rejected", subject_ref=self.ref(national_id), reasons=[Reason.ACCOUNT_UNKNOWN]
            )
        return account

    async def operator_unlock(self, ctx: HandlerContext, cmd: OperatorCommand) -> None:
        account = await self._command_account(ctx, cmd, "operator_unlock")
        if account is None:
            return

        async def writes(s: AsyncClientSession) -> None:
            await self.store.unlock(account.account_id, s)

        self._operator_result(ctx, cmd, "operator_unlock", "success", account_id=account.account_id)
        await ctx.commit(writes)

    async def operator_email_update(self, ctx: HandlerContext, cmd: OperatorCommand) -> None:
        action = "operator_email_update"
        account = await self._command_account(ctx, cmd, action)
        if account is None:
            return
        try:
            new_email = domain.normalize_email(cmd.new_email or "")
        except ValueError:
            self._operator_result(
                ctx, cmd, action, "rejected", account_id=account.account_id, reasons=["email_invalid"]
            )
            return
        ctx.emit(
            IDENTITY_EMAIL_CHANGED,
            account.account_id,
            EventType.IDENTITY_EMAIL_CHANGED,
            EmailChanged(
                command_id=cmd.command_id,
                account_id=account.account_id,
                old_recipient=recipient(account),
                new_recipient=recipient(account, new_email),
                operator_id=cmd.operator_id,
            ),
        )
        self._operator_result(
            ctx, cmd, action, "success", account_id=account.account_id, new_email_masked=domain.mask_email(new_email)
        )

        async def writes(s: AsyncClientSession) -> None:
            await self.store.set_email(account.account_id, new_email, s)

        await ctx.commit(writes)

    async def operator_send_recovery(self, ctx: HandlerContext, cmd: OperatorCommand) -> None:
        action = "operator_send_recovery"
        account = await self._command_account(ctx, cmd, action)
        if account is None:
            return
        now = datetime.now(UTC)
        request_id = f"op-{cmd.command_id}"
        if not self.mailbox.allows(account.mails_sent, now):
            self._operator_result(
                ctx,
                cmd,
                action,
                "rejected",
                account_id=account.account_id,
                request_id=request_id,
                reasons=[Reason.RATE_LIMITED],
            )
            return
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
        self._operator_result(ctx, cmd, action, "success", account_id=account.account_id, request_id=request_id)

        async def writes(s: AsyncClientSession) -> None:
            await self.store.record_mail(account.account_id, now, s)

        await ctx.commit(writes)
