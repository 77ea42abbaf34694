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
from shared.consumer import HandlerContext, open_sealed
from shared.crypto import Purpose, SecretBox, initial_key_context, new_key_context
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
        self.new_key_ttl_s = settings.sealed_new_key_ttl_s
        self.initial_key_ttl_s = settings.sealed_initial_key_ttl_s
        self.changed = metrics.counter("clave_password_changed_total", "Keys changed")
        self.rejected = metrics.counter("clave_password_rejected_total", "Keys refused", ["reason"])
        self.latency = metrics.histogram(
            "clave_reset_to_key_changed_seconds", "From the portal's reset submission to the new key decided"
        )

    def _open(self, sealed: str, field: str, purpose: Purpose, context: dict[str, str], ttl_s: int) -> str:
        """The key sealed for this very event (else the event is dead-lettered, changing nothing)."""
        opened = open_sealed(self.box, sealed, purpose=purpose, context=context, ttl_s=ttl_s, what="sealed key")
        value = opened.get(field)
        if not isinstance(value, str):
            raise BadInput(DeadLetterReason.SCHEMA_INVALID, f"sealed payload lacks {field}")
        return value

    async def account_registered(self, ctx: HandlerContext, evt: AccountRegistered) -> None:
        key = self._open(
            evt.sealed_initial_key,
            "password",
            Purpose.INITIAL_KEY,
            initial_key_context(account_id=evt.account_id),
            self.initial_key_ttl_s,
        )
        if await self.store.exists(evt.account_id):
            ctx.audit("initial_key_skipped", "info", account_id=evt.account_id, reasons=["credential_exists"])
            return
        breaks = domain.assess(self.policy, key, reused=False)
        if breaks and not evt.legacy_key:
            # An initial key must meet the policy like any other; only the import's explicit
            # migration option takes one that does not (and marks it to be changed).
            ctx.audit("initial_key_refused", "rejected", account_id=evt.account_id, reasons=breaks)
            return
        history = domain.KeyHistory().rotate(await self.hasher.hash(domain.hashable(key)), self.depth)
        details = {"must_change": True, "meets_policy": not breaks} if evt.legacy_key else {}
        ctx.audit("initial_key_set", "success", account_id=evt.account_id, details=details)

        await ctx.commit(*self.store.save(evt.account_id, history, datetime.now(UTC), must_change=evt.legacy_key))

    async def tokens_redeemed(self, ctx: HandlerContext, evt: TokensRedeemed) -> None:
        now = datetime.now(UTC)
        # First of all: is the key sealed for this token, account and request? A key copied
        # from another reset into a forged event is dead-lettered before anything is decided.
        candidate = self._open(
            evt.sealed_new_key,
            "new_password",
            Purpose.NEW_KEY,
            new_key_context(token_id=evt.token_id, account_id=evt.account_id, request_id=evt.request_id),
            self.new_key_ttl_s,
        )
        if await self.store.token_used(evt.token_id):
            self._reject(ctx, evt, ["token_used"])
            await ctx.commit()
            return
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
