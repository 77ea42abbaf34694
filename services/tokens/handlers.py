"""Tokens handlers: issue on identity.verified, keep a decoy on identity.declined, redeem on
recovery.resets, and the spend/release half of the saga on password.updated / password.rejected.

Each handler loads the token, lets the domain decide, stages the events and commits the
intent-named store operation. A store operation refuses to apply a move from a state the
token has left meanwhile (`StaleToken`); the handler then drops what it staged and decides
again on fresh state, so two racing resets never both reserve one token."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from services.tokens import domain
from services.tokens.domain import By, Reason, State, TokenView
from services.tokens.settings import TokensSettings
from services.tokens.store import StaleToken, TokenStore
from shared.audit import audit_event
from shared.consumer import HandlerContext
from shared.crypto import Purpose, SecretBox, new_key_context, recovery_secrets_context
from shared.loops import describe, is_outage
from shared.metrics import ServiceMetrics
from shared.portal_input import InputRefused, PortalInput
from shared.schemas import (
    AuditRecord,
    CodeRejected,
    ContactChanged,
    EmailChanged,
    IdentityDeclined,
    IdentityVerified,
    PasswordRejected,
    PasswordUpdated,
    Recipient,
    RecoveryOutcome,
    ResetSubmitted,
    TokensIssued,
    TokensRedeemed,
)
from shared.topics import (
    RECOVERY_OUTCOMES,
    RECOVERY_RESETS,
    TOKENS_CODE_REJECTED,
    TOKENS_ISSUED,
    TOKENS_REDEEMED,
    EventType,
)

log = logging.getLogger(__name__)
# A decision is retried on fresh state this many times when the token moved under it; more
# than that is not a race but a loop, and the failure goes to the consumer's redelivery.
DECIDE_ATTEMPTS = 5
# The reservation sweeper sleeps until the earliest reservation ends (plus a margin, so the
# store's clock has passed it too), at most SWEEP_SAFETY_S.
SWEEP_SAFETY_S = 60.0
SWEEP_MARGIN_S = 0.05
# After a sweep that could neither release nor park a reservation, it is still the earliest
# end: the sweeper waits this long before trying again instead of waking at once.
SWEEP_STUCK_S = 5.0


async def decide_on_fresh_state(ctx: HandlerContext, attempt: Callable[[], Awaitable[None]]) -> None:
    for n in range(1, DECIDE_ATTEMPTS + 1):
        try:
            await attempt()
            return
        except StaleToken:
            if n == DECIDE_ATTEMPTS:
                raise
            ctx.unstage()  # staged for a state that no longer holds


class TokenHandlers:
    def __init__(self, store: TokenStore, settings: TokensSettings, metrics: ServiceMetrics) -> None:
        self.store = store
        self.settings = settings
        self.ttl = domain.Lifetimes(settings.link_ttl_s, settings.code_ttl_s)
        self.limits = domain.CodeLimits(settings.code_max_attempts, settings.code_account_max_failures)
        self.account_window = timedelta(seconds=settings.code_account_window_s)
        self.notifier_box = SecretBox(settings.notifier_keys)
        self.password_box = SecretBox(settings.password_keys)
        self.portal_input = PortalInput(settings.portal_input_mode(settings.production), settings.portal_sealing_key)
        self.issued = metrics.counter("clave_tokens_issued_total", "Tokens issued")
        self.redeemed = metrics.counter("clave_tokens_redeemed_total", "Tokens reserved for a key change")
        self.rejected = metrics.counter("clave_tokens_rejected_total", "Reset submissions refused", ["reason"])
        self.settled = metrics.counter("clave_tokens_settled_total", "Reservations settled", ["result"])
        self.metrics = metrics
        self.reserved = asyncio.Event()  # a reservation was made: the sweeper looks at its end
        self.sweep_stuck = False  # the last sweep left a reservation neither released nor parked

    # ---- identity.verified -> tokens.issued ----------------------------------------------------

    async def identity_verified(self, ctx: HandlerContext, evt: IdentityVerified) -> None:
        """Issue a token and revoke the account's earlier real ones (live or reserved).

        Decoys are not revoked: they end by their lifetime or their attempts, so what a decoy
        answers never depends on later requests. Were they revoked, a stranger could make a
        request with wrong answers on purpose (a known decoy), then one with guessed answers,
        then type wrong codes on the first: `token_invalid` for ever would mean the guess was
        verified, `code_attempts_exceeded` at the 5th that it was not. What stays is that an
        earlier request that *was* verified has its real token revoked by a later verified
        one; telling that apart needs the earlier request to have been verified (the right
        answers and e-mail; it mailed the owner) and a later verified one (the same again, or
        the owner's own)."""
        seen, earlier = await self.store.issue_facts(evt.request_id, evt.account_id)
        if seen:
            ctx.audit(
                "token_issue_skipped",
                "info",
                account_id=evt.account_id,
                request_id=evt.request_id,
                reasons=["duplicate_request"],
            )
            return
        token, drawn = domain.issue(
            request_id=evt.request_id,
            account_id=evt.account_id,
            recipient=evt.recipient.model_dump(),
            now=datetime.now(UTC),
            ttl=self.ttl,
            code_key=self.settings.code_hmac_key,
        )
        ctx.emit(
            TOKENS_ISSUED,
            evt.account_id,
            EventType.TOKENS_ISSUED,
            TokensIssued(
                request_id=evt.request_id,
                account_id=evt.account_id,
                token_id=token.token_id,
                recipient=evt.recipient,
                link_expires_at=token.link_expires_at,
                code_expires_at=token.code_expires_at,
                sealed_secrets=self.notifier_box.seal(
                    {"token": drawn.token, "code": drawn.code},
                    purpose=Purpose.RECOVERY_SECRETS,
                    context=recovery_secrets_context(
                        token_id=token.token_id,
                        account_id=evt.account_id,
                        request_id=evt.request_id,
                        email=evt.recipient.email,
                    ),
                ),
                requested_at=evt.requested_at,
                primary_recipient=evt.primary_recipient,
            ),
        )
        ctx.audit(
            "token_issued",
            "success",
            account_id=evt.account_id,
            request_id=evt.request_id,
            actor=evt.actor,
            details={"token_id": token.token_id, "revoked_earlier": earlier},
        )

        # The account's earlier real tokens only, never its decoys (see `revoke_earlier_tokens`).
        await ctx.commit(self.store.revoke_earlier_tokens(evt.account_id), self.store.insert_token(token))
        self.issued.inc()

    # ---- identity.declined -> a decoy, so the code path is no oracle ---------------------------

    async def identity_declined(self, ctx: HandlerContext, evt: IdentityDeclined) -> None:
        if await self.store.by_request(evt.request_id) is not None:
            ctx.audit(
                "decoy_skipped",
                "info",
                account_id=evt.account_id,
                subject_ref=None if evt.account_id else evt.subject_ref,
                request_id=evt.request_id,
                reasons=["duplicate_request"],
            )
            return
        decoy = domain.decoy(
            request_id=evt.request_id,
            account_id=evt.account_id,
            subject_ref=evt.subject_ref,
            now=datetime.now(UTC),
            ttl=self.ttl,
            code_key=self.settings.code_hmac_key,
        )
        ctx.audit(
            "decoy_stored",
            "info",
            account_id=evt.account_id,
            subject_ref=None if evt.account_id else evt.subject_ref,
            request_id=evt.request_id,
            details={"token_id": decoy.token_id},
        )

        # Never mailed, never revokes anything. No metric of its own: identity's
        # clave_identity_requests_total{result} counts these.
        await ctx.commit(self.store.insert_token(decoy))

    # ---- recovery.resets -> tokens.redeemed | outcome rejected ------------------------------

    async def reset_submitted(self, ctx: HandlerContext, reset: ResetSubmitted) -> None:
        new_password = self._typed_key(ctx, reset)
        await decide_on_fresh_state(ctx, lambda: self._redeem(ctx, reset, new_password))

    def _typed_key(self, ctx: HandlerContext, reset: ResetSubmitted) -> str:
        """The new key as typed, opened when sealed. Input refused for how it came is
        dead-lettered before any token is looked at, and the portal gets `rejected` with the
        reason (nothing about the token: it is untouched and still works)."""
        try:
            return self.portal_input.secret(
                reset.new_password,
                reset.sealed_new_password,
                topic=RECOVERY_RESETS,
                field="new_password",
                ref=reset.request_id,
            )
        except InputRefused as refused:
            ctx.emit(
                RECOVERY_OUTCOMES,
                reset.request_id,
                EventType.RECOVERY_OUTCOME,
                RecoveryOutcome(
                    request_id=reset.request_id, stage="reset", status="rejected", reasons=[refused.portal_reason]
                ),
            )
            ctx.refuse(refused)
            raise

    async def _redeem(self, ctx: HandlerContext, reset: ResetSubmitted, new_password: str) -> None:
        now = datetime.now(UTC)
        by: By = "token" if reset.token is not None else "code"
        failures = 0
        if reset.token is not None:
            token = await self.store.by_hash(domain.token_hash(reset.token))
            verdict = domain.redeem_by_token(token, now, reset.request_id)
        else:
            token = await self.store.by_request(reset.request_id)
            guard = domain.code_guard(token, reset.client_ip)
            if guard is not None:
                counts = await self.store.code_failures(guard.limiting, now - self.account_window)
                failures = guard.failures(counts)
            verdict = domain.redeem_by_code(
                token,
                reset.code or "",
                now,
                self.settings.code_hmac_key,
                self.limits.per_token,
                failures,
                self.limits.per_account,
            )
        if not verdict.ok:
            await self._refuse(ctx, reset, token, verdict, by, now)
            return
        # A real token (the domain redeems no decoy) always names its account and recipient.
        assert token is not None and not token.decoy and token.account_id is not None
        account_id = token.account_id
        ctx.emit(
            TOKENS_REDEEMED,
            account_id,
            EventType.TOKENS_REDEEMED,
            TokensRedeemed(
                request_id=reset.request_id,
                account_id=account_id,
                token_id=token.token_id,
                recipient=Recipient.model_validate(token.recipient),
                sealed_new_key=self.password_box.seal(
                    {"new_password": new_password},
                    purpose=Purpose.NEW_KEY,
                    context=new_key_context(
                        token_id=token.token_id, account_id=account_id, request_id=reset.request_id
                    ),
                ),
                submitted_at=ctx.event.time,
            ),
        )
        ctx.audit(
            "token_reserved",
            "success",
            account_id=account_id,
            request_id=reset.request_id,
            details={"token_id": token.token_id, "by": by},
        )
        until = now + timedelta(seconds=self.settings.reservation_timeout_s)

        await ctx.commit(self.store.reserve(token.token_id, by, until))
        self.reserved.set()
        self.redeemed.inc()

    async def _refuse(
        self,
        ctx: HandlerContext,
        reset: ResetSubmitted,
        token: TokenView | None,
        verdict: domain.Redemption,
        by: By,
        now: datetime,
    ) -> None:
        assert verdict.reason is not None
        # Decoys take exactly this path (same reads, writes and events): no oracle in content or time.
        account_id = token.account_id if token else None
        subject_ref = token.subject_ref if token and not account_id else None
        self._reject(
            ctx,
            reset.request_id,
            [verdict.reason],
            account_id,
            subject_ref,
            details={"by": by, "decoy": bool(token and token.decoy)},
        )
        guard = domain.code_guard(token, reset.client_ip) if verdict.count_wrong_code else None
        if guard is not None:
            assert token is not None  # a guard is drawn only for a token
            ctx.emit(
                TOKENS_CODE_REJECTED,
                guard.subject,
                EventType.TOKENS_CODE_REJECTED,
                CodeRejected(
                    request_id=reset.request_id,
                    account_id=account_id,
                    subject_ref=subject_ref,
                    client_ip=reset.client_ip,
                ),
            )
            await ctx.commit(
                self.store.count_wrong_code(token.token_id, token.code_attempts, verdict.kill),
                self.store.record_code_failure(guard, now, now + self.account_window),
            )
        else:
            await ctx.commit()
        self.rejected.labels(verdict.reason).inc()

    def _reject(
        self,
        ctx: HandlerContext,
        request_id: str,
        reasons: list[str],
        account_id: str | None,
        subject_ref: str | None = None,
        details: dict[str, str | bool] | None = None,
    ) -> None:
        ctx.emit(
            RECOVERY_OUTCOMES,
            request_id,
            EventType.RECOVERY_OUTCOME,
            RecoveryOutcome(request_id=request_id, stage="reset", status="rejected", reasons=reasons),
        )
        ctx.audit(
            "reset_rejected",
            "rejected",
            account_id=account_id,
            subject_ref=subject_ref,
            request_id=request_id,
            reasons=reasons,
            details=details,
        )

    # ---- saga: password.updated spends, password.rejected releases ----------------------------

    async def password_updated(self, ctx: HandlerContext, evt: PasswordUpdated) -> None:
        await decide_on_fresh_state(ctx, lambda: self._key_changed(ctx, evt))

    async def _key_changed(self, ctx: HandlerContext, evt: PasswordUpdated) -> None:
        token = await self.store.by_id(evt.token_id)
        settlement = domain.settle_key_changed(token.state if token else None)
        forgiven = domain.forgiven_code_failures(token)
        ctx.audit(
            settlement.action,
            "success",
            account_id=evt.account_id,
            request_id=evt.request_id,
            reasons=[settlement.note] if settlement.note else None,
            details={"token_id": evt.token_id, "code_failures_cleared": forgiven is not None},
        )
        ctx.emit(
            RECOVERY_OUTCOMES,
            evt.request_id,
            EventType.RECOVERY_OUTCOME,
            RecoveryOutcome(request_id=evt.request_id, stage="reset", status=settlement.status),
        )

        writes = []
        if settlement.move is not None and token is not None:
            writes.append(self.store.spend(evt.token_id, token.state, datetime.now(UTC)))
        if forgiven is not None:
            writes.append(self.store.clear_code_failures(forgiven))
        await ctx.commit(*writes)
        self.settled.labels("spent").inc()

    async def password_rejected(self, ctx: HandlerContext, evt: PasswordRejected) -> None:
        await decide_on_fresh_state(ctx, lambda: self._key_refused(ctx, evt))

    async def _key_refused(self, ctx: HandlerContext, evt: PasswordRejected) -> None:
        # The portal hears "rejected" only now, with the token live again; or token_invalid if it
        # was revoked meanwhile (it never comes back); or spent, if the password service had
        # already used it (a late answer after a timed-out reservation).
        token = await self.store.by_id(evt.token_id)
        settlement = domain.settle_key_refused(token.state if token else None, evt.reasons)
        ctx.audit(
            settlement.action,
            "info",
            account_id=evt.account_id,
            request_id=evt.request_id,
            reasons=[*evt.reasons, *([settlement.note] if settlement.note else [])],
            details={"token_id": evt.token_id},
        )
        ctx.emit(
            RECOVERY_OUTCOMES,
            evt.request_id,
            EventType.RECOVERY_OUTCOME,
            RecoveryOutcome(
                request_id=evt.request_id, stage="reset", status=settlement.status, reasons=list(settlement.reasons)
            ),
        )

        if settlement.move is domain.RELEASE:
            await ctx.commit(self.store.release(evt.token_id))
        elif settlement.move is domain.SPEND and token is not None:
            await ctx.commit(self.store.spend(evt.token_id, token.state, datetime.now(UTC)))
        else:
            await ctx.commit()
        moved = settlement.move
        result = "released" if moved is domain.RELEASE else "spent" if moved is domain.SPEND else "kept"
        self.settled.labels(result).inc()

    async def contact_changed(self, ctx: HandlerContext, evt: ContactChanged) -> None:
        """A contact change moves where recoveries go: no link sent before it may still work."""
        await self._revoke_all(ctx, evt.account_id, {"cause": "contact_changed", "change_id": evt.change_id})

    async def email_changed(self, ctx: HandlerContext, evt: EmailChanged) -> None:
        await self._revoke_all(ctx, evt.account_id, {"cause": "email_changed", "command_id": evt.command_id})

    async def _revoke_all(self, ctx: HandlerContext, account_id: str, cause: dict[str, str]) -> None:
        """Revoke every live token of the account, decoys included, audited with how many and
        why. No oracle on answers: the change comes from the key holder or an operator, whatever
        any request's answers were, and a guess cannot make it happen."""
        count = await self.store.revocable_count(account_id)
        ctx.audit("tokens_revoked", "info", account_id=account_id, details={"count": count, **cause})
        await ctx.commit(self.store.revoke_account(account_id))

    # ---- a reservation nobody answered is released ---------------------------------------------

    async def sweep_forever(self, on_outbox: Callable[[], None]) -> None:
        """Release overdue reservations, then sleep until the earliest reservation runs out or a
        new one is made; not a poll. SWEEP_SAFETY_S bounds the sleep, for reservations another
        instance made and then died."""
        look = True
        while True:
            self.reserved.clear()  # before looking: a reservation made meanwhile wakes the wait
            if look and await self.release_overdue():
                on_outbox()
            end = await self.store.next_reservation_end()
            delay = SWEEP_SAFETY_S
            if end is not None:
                delay = min(max((end - datetime.now(UTC)).total_seconds(), 0.0) + SWEEP_MARGIN_S, SWEEP_SAFETY_S)
                if self.sweep_stuck:
                    delay = max(delay, SWEEP_STUCK_S)
            try:
                await asyncio.wait_for(self.reserved.wait(), timeout=delay)
                # Woken by a new reservation: it ends later than any seen, so nothing is overdue
                # yet; only the length of the sleep is read again.
                look = False
            except TimeoutError:
                look = True

    async def release_overdue(self) -> int:
        """Release each overdue reservation on its own (how many were released): one that
        cannot be released (a document that does not decode, an unexpected error on it) is
        parked with its reason and the others are still released; a store outage stops the
        sweep until the next run."""
        released = 0
        self.sweep_stuck = False
        now = datetime.now(UTC)
        for doc in await self.store.overdue_reservations(now):
            try:
                released += await self._release_overdue(doc)
            except Exception as exc:
                if is_outage(exc):
                    raise
                await self._park_reservation(doc, exc, now)
        return released

    async def _release_overdue(self, doc: dict[str, Any]) -> int:
        if domain.settle_timeout(doc["state"]) is None:
            return 0
        record = AuditRecord(
            service="tokens",
            action="reservation_expired",
            outcome="info",
            account_id=doc["account_id"],
            request_id=doc["request_id"],
            details={"token_id": doc["_id"]},
        )
        try:
            await self.store.commit(
                consumer=None,
                event_id=None,
                writes=[self.store.release(doc["_id"])],
                outgoing=[
                    audit_event(record, correlationid=doc["request_id"], causationid=None, source="/clave/tokens")
                ],
            )
        except StaleToken:  # settled, or revoked, meanwhile: nothing to release
            return 0
        self.settled.labels("timed_out").inc()
        return 1

    async def _park_reservation(self, doc: dict[str, Any], exc: Exception, now: datetime) -> None:
        """Set the reservation aside (it stays reserved: fail closed), counted and logged by id
        and error class only, so it no longer stands in front of the others every sweep."""
        self.metrics.items_parked.labels("release-overdue-reservations", "release_failed").inc()
        log.error("reservation %s: cannot be released (%s); parked", doc.get("_id"), describe(exc))
        park = self.store.park_reservation(doc.get("_id"), f"release failed: {exc.__class__.__name__}", now)
        try:
            await self.store.commit(consumer=None, event_id=None, writes=[park], outgoing=[])
        except Exception as park_exc:
            if is_outage(park_exc):
                raise
            log.error("reservation %s: parking failed too (%s)", doc.get("_id"), describe(park_exc))
            self.sweep_stuck = True


__all__ = ["Reason", "State", "TokenHandlers"]
