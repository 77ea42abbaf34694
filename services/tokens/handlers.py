"""Tokens handlers: issue on identity.verified, redeem on recovery.resets, and the
spend/release half of the saga on password.updated / password.rejected."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.client_session import AsyncClientSession

from services.tokens import domain
from services.tokens.domain import Reason, State
from services.tokens.settings import TokensSettings
from services.tokens.store import TokenStore, to_view
from shared.audit import audit_event
from shared.consumer import HandlerContext
from shared.crypto import SecretBox
from shared.metrics import ServiceMetrics
from shared.schemas import (
    AuditRecord,
    EmailChanged,
    IdentityVerified,
    PasswordRejected,
    PasswordUpdated,
    Recipient,
    RecoveryOutcome,
    ResetSubmitted,
    TokensIssued,
    TokensRedeemed,
)
from shared.topics import RECOVERY_OUTCOMES, TOKENS_ISSUED, TOKENS_REDEEMED, EventType


class TokenHandlers:
    def __init__(self, store: TokenStore, settings: TokensSettings, metrics: ServiceMetrics) -> None:
        self.store = store
        self.settings = settings
        self.notifier_box = SecretBox(settings.notifier_keys)
        self.password_box = SecretBox(settings.password_keys)
        self.issued = metrics.counter("clave_tokens_issued_total", "Tokens issued")
        self.redeemed = metrics.counter("clave_tokens_redeemed_total", "Tokens reserved for a key change")
        self.rejected = metrics.counter("clave_tokens_rejected_total", "Reset submissions refused", ["reason"])
        self.settled = metrics.counter("clave_tokens_settled_total", "Reservations settled", ["result"])

    # ---- identity.verified -> tokens.issued ----------------------------------------------------

    async def identity_verified(self, ctx: HandlerContext, evt: IdentityVerified) -> None:
        if await self.store.by_request(evt.request_id) is not None:
            ctx.audit(
                "token_issue_skipped",
                "info",
                account_id=evt.account_id,
                request_id=evt.request_id,
                reasons=["duplicate_request"],
            )
            return
        now = datetime.now(UTC)
        secrets = domain.new_secrets()
        token_id = uuid.uuid4().hex
        link_exp, code_exp = domain.expiries(now, self.settings.link_ttl_s, self.settings.code_ttl_s)
        earlier = await self.store.live_ids(evt.account_id)
        doc = {
            "_id": token_id,
            "account_id": evt.account_id,
            "request_id": evt.request_id,
            "token_hash": domain.token_hash(secrets.token),
            "code_hash": domain.code_hash(self.settings.code_hmac_key, token_id, secrets.code),
            "code_attempts": 0,
            "state": State.LIVE,
            "issued_at": now,
            "link_expires_at": link_exp,
            "code_expires_at": code_exp,
            "recipient": evt.recipient.model_dump(),
        }
        ctx.emit(
            TOKENS_ISSUED,
            evt.account_id,
            EventType.TOKENS_ISSUED,
            TokensIssued(
                request_id=evt.request_id,
                account_id=evt.account_id,
                token_id=token_id,
                recipient=evt.recipient,
                link_expires_at=link_exp,
                code_expires_at=code_exp,
                sealed_secrets=self.notifier_box.seal({"token": secrets.token, "code": secrets.code}),
                requested_at=evt.requested_at,
            ),
        )
        ctx.audit(
            "token_issued",
            "success",
            account_id=evt.account_id,
            request_id=evt.request_id,
            actor=evt.actor,
            details={"token_id": token_id, "revoked_earlier": len(earlier)},
        )

        async def writes(s: AsyncClientSession) -> None:
            await self.store.revoke(earlier, s)
            await self.store.insert(doc, s)

        await ctx.commit(writes)
        self.issued.inc()

    # ---- recovery.resets -> tokens.redeemed | outcome rejected ------------------------------

    async def reset_submitted(self, ctx: HandlerContext, reset: ResetSubmitted) -> None:
        now = datetime.now(UTC)
        if reset.token is not None:
            doc = await self.store.by_hash(domain.token_hash(reset.token))
            verdict = domain.redeem_by_token(to_view(doc) if doc else None, now)
        else:
            doc = await self.store.by_request(reset.request_id)
            verdict = domain.redeem_by_code(
                to_view(doc) if doc else None,
                reset.code or "",
                now,
                self.settings.code_hmac_key,
                self.settings.code_max_attempts,
            )
        account_id = doc["account_id"] if doc else None
        # Everything downstream is labelled with the request_id the portal sent (from its link).
        request_id = reset.request_id
        if not verdict.ok:
            assert verdict.reason is not None
            self._reject(ctx, reset.request_id, [verdict.reason], account_id)

            async def count(s: AsyncClientSession) -> None:
                if doc is not None and verdict.count_wrong_code:
                    update: dict[str, Any] = {"$inc": {"code_attempts": 1}}
                    if verdict.kill:
                        update["$set"] = {"state": State.DEAD}
                    await self.store.transition(doc["_id"], [State.LIVE], update, s)

            await ctx.commit(count)
            self.rejected.labels(verdict.reason).inc()
            return
        assert doc is not None
        ctx.emit(
            TOKENS_REDEEMED,
            doc["account_id"],
            EventType.TOKENS_REDEEMED,
            TokensRedeemed(
                request_id=request_id,
                account_id=doc["account_id"],
                token_id=doc["_id"],
                recipient=Recipient.model_validate(doc["recipient"]),
                sealed_new_key=self.password_box.seal({"new_password": reset.new_password}),
                submitted_at=ctx.event.time,
            ),
        )
        ctx.audit(
            "token_reserved",
            "success",
            account_id=doc["account_id"],
            request_id=request_id,
            details={"token_id": doc["_id"], "by": "token" if reset.token else "code"},
        )
        until = now + timedelta(seconds=self.settings.reservation_timeout_s)

        async def reserve(s: AsyncClientSession) -> None:
            ok = await self.store.transition(
                doc["_id"],
                [State.LIVE],
                {"$set": {"state": State.RESERVED, "reserved_until": until}},
                s,
            )
            if not ok:  # raced with another redemption: let redelivery decide again
                raise RuntimeError("token changed state during redemption")

        await ctx.commit(reserve)
        self.redeemed.inc()

    def _reject(self, ctx: HandlerContext, request_id: str, reasons: list[str], account_id: str | None) -> None:
        ctx.emit(
            RECOVERY_OUTCOMES,
            request_id,
            EventType.RECOVERY_OUTCOME,
            RecoveryOutcome(request_id=request_id, stage="reset", status="rejected", reasons=reasons),
        )
        ctx.audit("reset_rejected", "rejected", account_id=account_id, request_id=request_id, reasons=reasons)

    # ---- saga: password.updated spends, password.rejected releases ----------------------------

    async def password_updated(self, ctx: HandlerContext, evt: PasswordUpdated) -> None:
        ctx.audit(
            "token_spent",
            "success",
            account_id=evt.account_id,
            request_id=evt.request_id,
            details={"token_id": evt.token_id},
        )
        ctx.emit(
            RECOVERY_OUTCOMES,
            evt.request_id,
            EventType.RECOVERY_OUTCOME,
            RecoveryOutcome(request_id=evt.request_id, stage="reset", status="completed"),
        )

        async def spend(s: AsyncClientSession) -> None:
            await self._spend(evt.token_id, s)

        await ctx.commit(spend)
        self.settled.labels("spent").inc()

    async def _spend(self, token_id: str, s: AsyncClientSession) -> None:
        await self.store.transition(
            token_id,
            [State.RESERVED, State.LIVE],
            {"$set": {"state": State.SPENT, "spent_at": datetime.now(UTC)}, "$unset": {"reserved_until": ""}},
            s,
        )

    async def password_rejected(self, ctx: HandlerContext, evt: PasswordRejected) -> None:
        # The portal hears "rejected" only now, with the token live again (or spent, if the
        # password service had already used it: a late answer after a timed-out reservation).
        already_used = Reason.TOKEN_USED in evt.reasons
        ctx.audit(
            "token_spent" if already_used else "token_released",
            "info",
            account_id=evt.account_id,
            request_id=evt.request_id,
            reasons=evt.reasons,
            details={"token_id": evt.token_id},
        )
        ctx.emit(
            RECOVERY_OUTCOMES,
            evt.request_id,
            EventType.RECOVERY_OUTCOME,
            RecoveryOutcome(request_id=evt.request_id, stage="reset", status="rejected", reasons=evt.reasons),
        )

        async def release(s: AsyncClientSession) -> None:
            if already_used:
                await self._spend(evt.token_id, s)
            else:
                await self.store.transition(
                    evt.token_id,
                    [State.RESERVED],
                    {"$set": {"state": State.LIVE}, "$unset": {"reserved_until": ""}},
                    s,
                )

        await ctx.commit(release)
        self.settled.labels("spent" if already_used else "released").inc()

    async def email_changed(self, ctx: HandlerContext, evt: EmailChanged) -> None:
        live = await self.store.live_ids(evt.account_id)
        ctx.audit(
            "tokens_revoked",
            "info",
            account_id=evt.account_id,
            details={"count": len(live), "cause": "email_changed", "command_id": evt.command_id},
        )

        async def revoke(s: AsyncClientSession) -> None:
            await self.store.revoke(live, s)

        await ctx.commit(revoke)

    # ---- periodic: a reservation nobody answered is released -----------------------------------

    async def release_overdue(self) -> None:
        now = datetime.now(UTC)
        for doc in await self.store.overdue_reservations(now):
            record = AuditRecord(
                service="tokens",
                action="reservation_expired",
                outcome="info",
                account_id=doc["account_id"],
                request_id=doc["request_id"],
                details={"token_id": doc["_id"]},
            )

            async def release(s: AsyncClientSession, token_id: str = doc["_id"]) -> None:
                await self.store.transition(
                    token_id, [State.RESERVED], {"$set": {"state": State.LIVE}, "$unset": {"reserved_until": ""}}, s
                )

            await self.store.commit(
                consumer=None,
                event_id=None,
                writes=release,
                outgoing=[
                    audit_event(record, correlationid=doc["request_id"], causationid=None, source="/clave/tokens")
                ],
            )
            self.settled.labels("timed_out").inc()
