"""Password handlers: the initial key of a new account, and the key change itself.

The portal's reset outcome is published by the tokens service once it has
spent or released the token, so "rejected" always means "the link works again".
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from services.password import domain
from services.password.policy import PasswordPolicy, Reason
from services.password.settings import PasswordSettings
from services.password.store import CredentialStore
from shared.consumer import HandlerContext
from shared.crypto import SealError, SecretBox
from shared.envelope import BadInput, DeadLetterReason
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.schemas import (
    AccountRegistered,
    PasswordRejected,
    PasswordUpdated,
    TokensRedeemed,
)
from shared.topics import PASSWORD_REJECTED, PASSWORD_UPDATED, EventType


class PasswordHandlers:
    def __init__(
        self,
        store: CredentialStore,
        hasher: SecretHasher,
        policy: PasswordPolicy,
        settings: PasswordSettings,
        metrics: ServiceMetrics,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.policy = policy
        self.depth = settings.password_history
        self.box = SecretBox(settings.password_keys)
        self.changed = metrics.counter("clave_password_changed_total", "Keys changed")
        self.rejected = metrics.counter("clave_password_rejected_total", "Keys refused", ["reason"])
        self.latency = metrics.histogram(
            "clave_reset_to_key_changed_seconds", "From the portal's reset submission to the new key decided"
        )

    def _open(self, sealed: str, field: str) -> str:
        try:
            value = self.box.open(sealed).get(field)
        except SealError:
            raise BadInput(DeadLetterReason.UNDECRYPTABLE, "sealed key does not open with PASSWORD_KEYS") from None
        if not isinstance(value, str):
            raise BadInput(DeadLetterReason.SCHEMA_INVALID, f"sealed payload lacks {field}")
        return value

    async def account_registered(self, ctx: HandlerContext, evt: AccountRegistered) -> None:
        if await self.store.exists(evt.account_id):
            ctx.audit("initial_key_skipped", "info", account_id=evt.account_id, reasons=["credential_exists"])
            return
        key = self._open(evt.sealed_initial_key, "password")
        history = domain.KeyHistory().rotate(await self.hasher.hash(domain.hashable(key)), self.depth)
        ctx.audit("initial_key_set", "success", account_id=evt.account_id)

        await ctx.commit(*self.store.save(evt.account_id, history, datetime.now(UTC)))

    async def tokens_redeemed(self, ctx: HandlerContext, evt: TokensRedeemed) -> None:
        now = datetime.now(UTC)
        if await self.store.token_used(evt.token_id):
            self._reject(ctx, evt, ["token_used"])
            await ctx.commit()
            return
        candidate = self._open(evt.sealed_new_key, "new_password")
        history = await self.store.history(evt.account_id)
        reasons = self.policy.check(candidate)
        reused = False
        if not reasons:
            # Every past hash is checked, not stopping at the first match: constant work.
            normalized = domain.hashable(candidate)
            matches = await asyncio.gather(*(self.hasher.verify(h, normalized) for h in history.hashes(self.depth)))
            reused = any(matches)
        reasons = domain.assess(self.policy, candidate, reused)
        if reasons:
            self._reject(ctx, evt, reasons)
            await ctx.commit()
            for reason in reasons:
                self.rejected.labels(reason).inc()
            return
        new_history = history.rotate(await self.hasher.hash(domain.hashable(candidate)), self.depth)
        ctx.emit(
            PASSWORD_UPDATED,
            evt.account_id,
            EventType.PASSWORD_UPDATED,
            PasswordUpdated(
                request_id=evt.request_id,
                account_id=evt.account_id,
                token_id=evt.token_id,
                recipient=evt.recipient,
                changed_at=now,
            ),
        )
        ctx.audit(
            "key_changed",
            "success",
            account_id=evt.account_id,
            request_id=evt.request_id,
            details={"token_id": evt.token_id, "policy": self.policy.name},
        )

        await ctx.commit(*self.store.save(evt.account_id, new_history, now, token_id=evt.token_id))
        self.changed.inc()
        self.latency.observe((now - (evt.submitted_at or ctx.event.time)).total_seconds())

    def _reject(self, ctx: HandlerContext, evt: TokensRedeemed, reasons: list[str]) -> None:
        ctx.emit(
            PASSWORD_REJECTED,
            evt.account_id,
            EventType.PASSWORD_REJECTED,
            PasswordRejected(
                request_id=evt.request_id, account_id=evt.account_id, token_id=evt.token_id, reasons=reasons
            ),
        )
        ctx.audit(
            "key_rejected",
            "rejected",
            account_id=evt.account_id,
            request_id=evt.request_id,
            reasons=reasons,
            details={"token_id": evt.token_id, "policy": self.policy.name},
        )


__all__ = ["PasswordHandlers", "Reason"]
