"""Identity handlers: one per consumed event type. Load the facts, decide once, stage, commit."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime

from services.identity import domain
from services.identity.domain import Account, AnswerChecks, Audit, Decision, Emit, Reason, RequestFacts
from services.identity.settings import IdentitySettings
from services.identity.store import AccountStore, CounterKeys, StaleContact, StaleCounters
from shared.consumer import HandlerContext
from shared.crypto import keyed_hash
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.portal_input import InputRefused, PortalInput, check_opened_answers
from shared.schemas import (
    CodeRejected,
    ContactChange,
    ContactChanged,
    ContactResult,
    ContactUpdateAuthorized,
    IdentityDeclined,
    IdentityLocked,
    IdentityVerified,
    PasswordUpdated,
    Recipient,
    RecoveryOutcome,
    RecoveryRequested,
)
from shared.store import Write
from shared.topics import (
    CONTACT_RESULTS,
    IDENTITY_CONTACT_CHANGED,
    IDENTITY_DECLINED,
    IDENTITY_LOCKED,
    IDENTITY_VERIFIED,
    RECOVERY_OUTCOMES,
    RECOVERY_REQUESTS,
    EventType,
)

log = logging.getLogger(__name__)

# A concurrent request for the same account changed its counters between our read and our
# write: read again and decide again. Each retry means another request got through, so a
# long run of them is a flood on one account; the last one goes back to the consumer.
STALE_RETRIES = 20


def recipient(account: Account, email: str | None = None) -> Recipient:
    return Recipient(email=email or account.email, name=account.name, locale=account.locale)  # type: ignore[arg-type]


def stage_contact_changed(
    ctx: HandlerContext, account: Account, after: domain.Contact, *, change_id: str, actor: str
) -> list[tuple[str, str]]:
    """Stage identity.contact_changed for a change of `account`'s contact data to `after`: the
    tokens service revokes the account's live links, the notifier tells every address on file
    before. Returns the changed fields with their new values masked."""
    before = account.contact
    changes = domain.changed_fields(before, after)
    ctx.emit(
        IDENTITY_CONTACT_CHANGED,
        account.account_id,
        EventType.IDENTITY_CONTACT_CHANGED,
        ContactChanged(
            change_id=change_id,
            account_id=account.account_id,
            old_recipients=[recipient(account, address) for address in domain.old_addresses(before)],
            changes=[ContactChange(field=f, masked=m) for f, m in changes],  # type: ignore[arg-type]
            actor=actor,
        ),
    )
    return changes


class IdentityHandlers:
    def __init__(
        self, store: AccountStore, hasher: SecretHasher, settings: IdentitySettings, metrics: ServiceMetrics
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.settings = settings
        self.questions = settings.question_ids()
        self.portal_input = PortalInput(settings.portal_input_mode(settings.production), settings.portal_sealing_key)
        self.limits = settings.limits()
        self.requests = metrics.counter(
            "clave_identity_requests_total", "Recovery requests by audited result", ["result"]
        )
        self.lockouts = metrics.counter("clave_identity_lockouts_total", "Address blocks locked out of an account")

    def ref(self, value: str) -> str:
        return keyed_hash(self.settings.pseudonym_key, value)

    # ---- recovery.requests -------------------------------------------------------------------

    async def recovery_requested(self, ctx: HandlerContext, req: RecoveryRequested) -> None:
        now = datetime.now(UTC)
        answers = self._typed_answers(ctx, req)
        facts, keys, subject_ref = await self._request_facts(req)
        for attempt in range(1, STALE_RETRIES + 1):
            facts = replace(facts, counters=await self.store.counters(keys))
            if domain.needs_answer_checks(facts, self.limits, now):
                facts = replace(facts, answers=await self._check_answers(facts.account, answers))
            decision = domain.decide_request(facts, self.limits, now)
            rehashed = await self._rehashed(decision, answers)
            self._stage_request(ctx, req, decision, subject_ref, rehashed)
            writes = self._request_writes(req.request_id, keys, facts.counters, decision, rehashed, now)
            if await self._committed(ctx, writes, attempt):
                break
        self.requests.labels(decision.reasons[0] if decision.reasons else "verified").inc()
        if Audit.LOCKED in decision.audits:
            self.lockouts.inc()

    def _typed_answers(self, ctx: HandlerContext, req: RecoveryRequested) -> dict[str, str]:
        """The answers as typed, opened when sealed. Input refused for how it came (in the clear
        under PORTAL_INPUT=sealed, or sealed but not opening) is dead-lettered, and the portal
        gets `rejected` with the reason, which says nothing about the account."""
        try:
            return check_opened_answers(
                self.portal_input.answers(req.answers, req.sealed_answers, topic=RECOVERY_REQUESTS, ref=req.request_id)
            )
        except InputRefused as refused:
            ctx.emit(
                RECOVERY_OUTCOMES,
                req.request_id,
                EventType.RECOVERY_OUTCOME,
                RecoveryOutcome(
                    request_id=req.request_id, stage="request", status="rejected", reasons=[refused.portal_reason]
                ),
            )
            ctx.refuse(refused)
            raise

    async def _request_facts(self, req: RecoveryRequested) -> tuple[RequestFacts, CounterKeys, str]:
        """What the store knows about the request (its counters are read apart, again after a
        race); the keys of its counters; the keyed hash of the ID."""
        seen = await self.store.request_seen(req.request_id)
        try:
            national_id: str | None = domain.normalize_national_id(req.profile, req.national_id)
        except domain.InvalidId:
            national_id = None
        account = await self.store.by_national_id(national_id) if national_id else None
        subject_ref = self.ref(national_id or req.national_id)
        block_ref = self.ref(domain.address_block(req.client_ip))
        keys = (
            CounterKeys.for_account(account.account_id, block_ref)
            if account
            else CounterKeys.for_subject(subject_ref, block_ref)
        )
        facts = RequestFacts(
            seen_before=seen,
            profile=req.profile,
            captcha_passed=req.captcha_passed,
            national_id=national_id,
            account=account,
            typed_email=req.email,
            typed_representative=req.representative_id,
            counters=domain.Counters(),
        )
        return facts, keys, subject_ref

    def _request_writes(
        self,
        request_id: str,
        keys: CounterKeys,
        seen: domain.Counters,
        decision: Decision,
        rehashed: dict[str, str],
        now: datetime,
    ) -> list[Write]:
        if decision.record is None:
            return []
        writes = []
        if decision.record.request:
            writes.append(self.store.record_request(request_id, now))
        writes.extend(self.store.record_counters(keys, seen, decision.record, now))
        if rehashed and decision.account is not None:
            writes.append(self.store.set_answer_hashes(decision.account.account_id, rehashed))
        return writes

    async def _committed(self, ctx: HandlerContext, writes: list[Write], attempt: int) -> bool:
        """Commit what was staged; on a race for the same counters, unstage and say so."""
        try:
            await ctx.commit(*writes)
            return True
        except StaleCounters:
            if attempt == STALE_RETRIES:
                raise
            log.info("counters changed under a decision (attempt %d): deciding again", attempt)
            ctx.unstage()
            return False

    def _stage_request(
        self,
        ctx: HandlerContext,
        req: RecoveryRequested,
        decision: Decision,
        subject_ref: str,
        rehashed: dict[str, str],
    ) -> None:
        self._answer_request(ctx, req.request_id, decision)
        self._stage_onward(ctx, req, decision, subject_ref)
        self._audit_request(ctx, req, decision, subject_ref, rehashed)
        self._stage_lockout(ctx, decision, req.request_id)

    @staticmethod
    def _answer_request(ctx: HandlerContext, request_id: str, decision: Decision) -> None:
        """The portal's answer, a reply: sent as soon as it is committed, before the relay
        publishes what follows (the token and the mail of a verified request must not run
        while the answer is still on its way: no enumeration in timing either)."""
        if Emit.ACCEPTED in decision.emit:
            # Whatever happened, the portal sees the same answer (no account enumeration).
            ctx.reply(
                RECOVERY_OUTCOMES,
                request_id,
                EventType.RECOVERY_OUTCOME,
                RecoveryOutcome(request_id=request_id, stage="request", status="accepted"),
            )
        if Emit.DUPLICATE in decision.emit:
            # Its own reason: the portal knows the first copy's answer stands (no account is named).
            ctx.reply(
                RECOVERY_OUTCOMES,
                request_id,
                EventType.RECOVERY_OUTCOME,
                RecoveryOutcome(
                    request_id=request_id, stage="request", status="rejected", reasons=[Reason.DUPLICATE_REQUEST]
                ),
            )

    @staticmethod
    def _stage_onward(ctx: HandlerContext, req: RecoveryRequested, decision: Decision, subject_ref: str) -> None:
        """What tokens acts on: a verified request's recipient, or a declined one for its decoy."""
        account = decision.account
        if Emit.VERIFIED in decision.emit and account is not None:
            # To the registered address, or to the backup address when the citizen typed that:
            # then the registered address is told that a recovery went elsewhere.
            ctx.emit(
                IDENTITY_VERIFIED,
                account.account_id,
                EventType.IDENTITY_VERIFIED,
                IdentityVerified(
                    request_id=req.request_id,
                    account_id=account.account_id,
                    recipient=recipient(account, decision.mail_to),
                    requested_at=ctx.event.time,
                    primary_recipient=recipient(account) if decision.to_backup else None,
                ),
            )
        if Emit.DECLINED in decision.emit:
            # The tokens service keeps a decoy for it: the code path answers as for a real request.
            account_id = account.account_id if account else None
            ctx.emit(
                IDENTITY_DECLINED,
                account_id or subject_ref,
                EventType.IDENTITY_DECLINED,
                IdentityDeclined(
                    request_id=req.request_id,
                    account_id=account_id,
                    subject_ref=subject_ref,
                    client_ip=req.client_ip,
                    requested_at=ctx.event.time,
                ),
            )

    @staticmethod
    def _audit_request(
        ctx: HandlerContext, req: RecoveryRequested, decision: Decision, subject_ref: str, rehashed: dict[str, str]
    ) -> None:
        account_id = decision.account.account_id if decision.account else None
        details: dict[str, str | int] = {"profile": req.profile}
        if decision.verified:
            details["answers_rehashed"] = len(rehashed)
            details["mail_to"] = "backup" if decision.to_backup else "registered"
        if decision.reasons == (Reason.DUPLICATE_REQUEST,):
            account_id = None  # as before: a duplicate names nobody
        ctx.audit(
            "recovery_requested",
            "success" if decision.verified else "rejected",
            account_id=account_id,
            subject_ref=None if account_id else subject_ref,
            request_id=req.request_id,
            reasons=list(decision.reasons),
            details=details,
        )

    def _stage_lockout(self, ctx: HandlerContext, decision: Decision, request_id: str) -> None:
        """The audits and the owner's notice that a lock or slowed mode brings."""
        account = decision.account
        if account is None:
            return
        if Audit.LOCKED in decision.audits:
            ctx.audit(
                "account_locked",
                "info",
                account_id=account.account_id,
                request_id=request_id,
                reasons=list(decision.reasons),
                details={
                    "scope": "address_block",
                    "locked_until": decision.locked_until.isoformat() if decision.locked_until else None,
                },
            )
        if Audit.SLOWED in decision.audits:
            ctx.audit(
                "account_slowed",
                "info",
                account_id=account.account_id,
                request_id=request_id,
                details={
                    "failures": self.limits.account_max_failures,
                    "attempt_interval_s": int(self.limits.slowed_interval.total_seconds()),
                },
            )
        if Emit.LOCK_NOTICE in decision.emit:
            ctx.emit(
                IDENTITY_LOCKED,
                account.account_id,
                EventType.IDENTITY_LOCKED,
                IdentityLocked(
                    request_id=request_id,
                    account_id=account.account_id,
                    recipient=recipient(account),
                    locked_until=decision.locked_until or datetime.now(UTC),
                ),
            )

    async def _check_answers(self, account: Account | None, answers: dict[str, str]) -> AnswerChecks:
        """Verify every configured question, always, against real or decoy hashes: an unknown
        account and a wrong answer cost the same argon2 work (no timing oracle)."""
        checks = []
        for question in self.questions:
            stored = account.answer_hashes.get(question) if account else None
            given = domain.normalize_answer(answers.get(question, ""))
            checks.append(self.hasher.verify(stored or self.hasher.decoy_hash, given))
        results = await asyncio.gather(*checks)
        stored_hashes = account.answer_hashes if account else {}
        return AnswerChecks(
            verified=dict(zip(self.questions, results, strict=True)),
            answered=frozenset(answers),
            outdated=frozenset(q for q, h in stored_hashes.items() if self.hasher.needs_rehash(h)),
        )

    async def _rehashed(self, decision: Decision, answers: dict[str, str]) -> dict[str, str]:
        """New hashes for answers stored with outdated argon2 parameters (we hold the plain
        answer only now, after it verified)."""
        wanted = decision.record.rehash if decision.record else frozenset()
        return {q: await self.hasher.hash(domain.normalize_answer(answers[q])) for q in sorted(wanted)}

    # ---- tokens.code_rejected: a wrong code counts like a failed request ---------------------

    async def code_rejected(self, ctx: HandlerContext, evt: CodeRejected) -> None:
        now = datetime.now(UTC)
        block = domain.address_block_or_none(evt.client_ip)
        block_ref = self.ref(block) if block else None
        if evt.account_id:
            keys = CounterKeys.for_account(evt.account_id, block_ref)
        elif evt.subject_ref:
            keys = CounterKeys.for_subject(evt.subject_ref, block_ref)
        else:
            ctx.audit("code_rejected", "rejected", request_id=evt.request_id, reasons=["principal_missing"])
            return
        account = await self.store.by_id(evt.account_id) if evt.account_id else None
        for attempt in range(1, STALE_RETRIES + 1):
            counters = await self.store.counters(keys)
            decision = domain.decide_code_rejected(account, counters, block is not None, self.limits, now)
            ctx.audit(
                "code_rejected",
                "info",
                account_id=evt.account_id,
                subject_ref=None if evt.account_id else evt.subject_ref,
                request_id=evt.request_id,
                details={"counted": "account_and_block" if block else "account"},
            )
            self._stage_lockout(ctx, decision, evt.request_id)
            writes = self._request_writes(evt.request_id, keys, counters, decision, {}, now)
            if await self._committed(ctx, writes, attempt):
                break
        if Audit.LOCKED in decision.audits:
            self.lockouts.inc()

    # ---- password.updated: a successful key change unlocks -----------------------------------

    async def password_updated(self, ctx: HandlerContext, evt: PasswordUpdated) -> None:
        if await self.store.by_id(evt.account_id) is None:
            return
        keys = CounterKeys.for_account(evt.account_id)
        if await self.store.has_lockout_state(keys):
            ctx.audit(
                "account_unlocked",
                "success",
                account_id=evt.account_id,
                request_id=evt.request_id,
                details={"by": "key_change"},
            )

        await ctx.commit(*self.store.clear_lockout(keys))

    # ---- contact data: the citizen's own change (key checked by password), or an operator's --

    async def contact_authorized(self, ctx: HandlerContext, evt: ContactUpdateAuthorized) -> None:
        """Apply a contact update whose key the password service checked, and answer the portal."""
        await self._apply_contact(
            ctx,
            evt.account_id,
            (evt.email, evt.backup_email, evt.phone),
            change_id=evt.update_id,
            actor="citizen",
            action="contact_updated",
            answer=evt.update_id,
        )

    def _answer_contact(self, ctx: HandlerContext, update_id: str | None, reasons: tuple[str, ...]) -> None:
        """The portal's answer on account.contact_results (operator commands get none)."""
        if update_id is None:
            return
        status = "rejected" if reasons else "updated"
        ctx.emit(
            CONTACT_RESULTS,
            update_id,
            EventType.CONTACT_RESULT,
            ContactResult(update_id=update_id, status=status, reasons=list(reasons)),  # type: ignore[arg-type]
        )

    async def _apply_contact(
        self,
        ctx: HandlerContext,
        account_id: str,
        wanted: tuple[str | None, str | None, str | None],
        *,
        change_id: str,
        actor: str,
        action: str,
        details: dict[str, str] | None = None,
        answer: str | None = None,
    ) -> tuple[str, ...]:
        """Decide and stage a contact change: () when applied (committed), else the reasons
        (audited, nothing changed). Every address on file before is told; live tokens are
        revoked (tokens consumes identity.contact_changed)."""
        for attempt in range(1, STALE_RETRIES + 1):
            account = await self.store.by_id(account_id)
            if account is None:
                reasons: tuple[str, ...] = (domain.ContactReason.ACCOUNT_UNKNOWN,)
                ctx.audit(action, "rejected", actor=actor, reasons=list(reasons), details={**(details or {})})
                self._answer_contact(ctx, answer, reasons)
                return reasons
            before = account.contact
            try:
                after = domain.new_contact(before, *wanted)
            except domain.ContactRefused as refused:
                ctx.audit(
                    action,
                    "rejected",
                    actor=actor,
                    account_id=account_id,
                    reasons=list(refused.reasons),
                    details={**(details or {}), "change_id": change_id},
                )
                self._answer_contact(ctx, answer, refused.reasons)
                return refused.reasons
            changes = stage_contact_changed(ctx, account, after, change_id=change_id, actor=actor)
            ctx.audit(
                action,
                "success",
                actor=actor,
                account_id=account_id,
                details={**(details or {}), "change_id": change_id, "fields": ",".join(f for f, _ in changes)},
            )
            self._answer_contact(ctx, answer, ())
            try:
                await ctx.commit(self.store.set_contact(account_id, after, before))
                return ()
            except StaleContact:
                if attempt == STALE_RETRIES:
                    raise
                ctx.unstage()  # another change came first: decide again on what it left
        raise AssertionError("unreachable")
