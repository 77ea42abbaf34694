"""Password handlers: the initial key of a new account, the key change itself, and the
credential checks (login) with their throttling.

The portal's reset outcome is published by the tokens service once it has
spent or released the token, so "rejected" always means "the link works again".

`KeyChecker.check` is the one way to ask "is this the citizen's key?": it applies every
protection of a login (decoy hash for unknown IDs, throttling per account, per address block
and per address, audit without the key, transparent rehash) and commits in one transaction
whatever the caller stages for the verdict (a login result, a contact update...).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from services.password import domain
from services.password.domain import KeyDecision, KeyFacts
from services.password.policy import PasswordPolicy, Reason
from services.password.settings import PasswordSettings
from services.password.store import CounterKeys, Credential, CredentialStore, StaleCounters
from shared.consumer import HandlerContext, open_sealed
from shared.crypto import Purpose, SecretBox, initial_key_context, keyed_hash, new_key_context
from shared.envelope import BadInput, DeadLetterReason
from shared.hashing import SecretHasher
from shared.metrics import ServiceMetrics
from shared.portal_input import InputRefused, PortalInput
from shared.schemas import (
    AccountKeyChanged,
    AccountRegistered,
    ContactResult,
    ContactUpdateAuthorized,
    ContactUpdateRequested,
    LoginCheckRequested,
    LoginResult,
    PasswordRejected,
    PasswordUpdated,
    TokensRedeemed,
)
from shared.store import Write
from shared.throttle import ThrottleState, address_block
from shared.topics import (
    ACCOUNT_KEY_CHANGED,
    CONTACT_RESULTS,
    CONTACT_UPDATES,
    LOGIN_CHECKS,
    LOGIN_RESULTS,
    PASSWORD_CONTACT_AUTHORIZED,
    PASSWORD_REJECTED,
    PASSWORD_UPDATED,
    EventType,
)

log = logging.getLogger(__name__)

# A concurrent check for the same account changed its counters between our read and our write:
# read again and decide again (each retry means another check got through).
STALE_RETRIES = 20


@dataclass(frozen=True)
class KeyVerdict:
    """The answer to "is this the citizen's key?", for the caller to act on."""

    valid: bool
    reasons: tuple[str, ...]  # domain.LoginReason codes when not valid
    national_id: str | None  # normalised; None when it fails its check digits
    account_id: str | None  # the account the ID names, when it has a key
    subject_ref: str  # keyed hash of the national ID (audit)
    # A right key the import took against the policy (--legacy-keys): the portal must have the
    # citizen change it. Only ever True with `valid`, so it says nothing about a wrong key.
    must_change: bool = False


# What a caller stages for a verdict (events on ctx; returned writes join the one bulk write).
StageVerdict = Callable[[KeyVerdict], Sequence[Write] | None]


class KeyChecker:
    def __init__(
        self, store: CredentialStore, hasher: SecretHasher, settings: PasswordSettings, metrics: ServiceMetrics
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.settings = settings
        self.limits = settings.login_limits()
        self.checks = metrics.counter("clave_password_key_checks_total", "Credential checks by result", ["result"])
        self.lockouts = metrics.counter(
            "clave_password_key_check_lockouts_total", "Address blocks locked out of an account's credential checks"
        )

    def ref(self, value: str) -> str:
        return keyed_hash(self.settings.pseudonym_key, value)

    async def check(
        self,
        ctx: HandlerContext,
        national_id: str,
        key: str,
        client_ip: str,
        *,
        purpose: str,
        reference: str,
        stage: StageVerdict | None = None,
    ) -> KeyVerdict:
        """Is `key` the key of the account `national_id` names? Load, decide, stage the audit
        (never the key) and what `stage` adds, and commit it all at once. `purpose` and
        `reference` (e.g. "login" and the check_id) name the check in the audit log."""
        now = datetime.now(UTC)
        # The credential and the counters in parallel: one round trip less on a login's path.
        (normalized, credential, keys), throttle = await asyncio.gather(
            self._load(national_id, client_ip), self._counters(national_id, client_ip)
        )
        stored = credential.history.current if credential else None
        facts = KeyFacts(id_valid=normalized is not None, throttle=throttle, has_key=stored is not None)
        new_hash: str | None = None
        for attempt in range(1, STALE_RETRIES + 1):
            if attempt > 1:  # a concurrent check changed them: read again
                facts = replace(facts, throttle=await self.store.key_counters(keys))
            if domain.needs_key_check(facts, self.limits, now):
                facts = await self._hashed(facts, stored, key)
            decision = domain.decide_key(facts, self.limits, now)
            if decision.rehash and new_hash is None:
                new_hash = await self.hasher.hash(domain.hashable(key))
            verdict = KeyVerdict(
                valid=decision.valid,
                reasons=decision.reasons,
                national_id=normalized,
                account_id=credential.account_id if credential and stored else None,
                subject_ref=self.ref(normalized or national_id),
                must_change=decision.valid and credential is not None and credential.must_change,
            )
            self._audit(ctx, verdict, decision, credential, purpose, reference)
            extra = stage(verdict) if stage is not None else None
            writes = self._writes(keys, facts.throttle, decision, credential, stored, new_hash, extra, now)
            try:
                await ctx.commit(*writes)
                break
            except StaleCounters:
                if attempt == STALE_RETRIES:
                    raise
                log.info("key-check counters changed under a decision (attempt %d): deciding again", attempt)
                ctx.unstage()
        self.checks.labels("valid" if verdict.valid else verdict.reasons[0]).inc()
        if decision.locked:
            self.lockouts.inc()
        return verdict

    async def _load(self, national_id: str, client_ip: str) -> tuple[str | None, Credential | None, CounterKeys]:
        """The credential and the counters' keys. Counters are keyed by the ID's keyed hash,
        whether or not it names an account (the same documents, the same writes either way),
        so the handler can read them together with the credential."""
        normalized = domain.login_name(national_id)
        credential = await self.store.by_national_id(normalized) if normalized else None
        return normalized, credential, self.counter_keys(normalized or national_id, client_ip)

    async def _counters(self, national_id: str, client_ip: str) -> ThrottleState:
        key_id = domain.login_name(national_id) or national_id
        return await self.store.key_counters(self.counter_keys(key_id, client_ip))

    def principal(self, national_id: str) -> str:
        """Whose counters: the ID's keyed hash (normalised ID, or as typed when it is invalid)."""
        return f"s:{self.ref(national_id)}"

    def counter_keys(self, national_id: str, client_ip: str) -> CounterKeys:
        return CounterKeys(self.principal(national_id), self.ref(address_block(client_ip)))

    async def _hashed(self, facts: KeyFacts, stored: str | None, key: str) -> KeyFacts:
        """The argon2 result, against the stored hash or a decoy (equal work either way)."""
        matches = await self.hasher.verify(stored or self.hasher.decoy_hash, domain.hashable(key))
        outdated = stored is not None and self.hasher.needs_rehash(stored)
        return replace(facts, key_matches=matches, outdated=outdated)

    def _audit(
        self,
        ctx: HandlerContext,
        verdict: KeyVerdict,
        decision: KeyDecision,
        credential: Credential | None,
        purpose: str,
        reference: str,
    ) -> None:
        account_id = credential.account_id if credential else None
        subject_ref = None if account_id else verdict.subject_ref
        details: dict[str, str | bool | None] = {"purpose": purpose, "reference": reference}
        if decision.rehash:
            details["rehashed"] = True
        ctx.audit(
            "key_checked",
            "success" if verdict.valid else "rejected",
            account_id=account_id,
            subject_ref=subject_ref,
            reasons=list(verdict.reasons),
            details=details,
        )
        if decision.locked:
            locked_until = decision.record.lock_until
            ctx.audit(
                "key_checks_locked",
                "info",
                account_id=account_id,
                subject_ref=subject_ref,
                details={
                    "scope": "address_block",
                    "locked_until": locked_until.isoformat() if locked_until else None,
                    "reference": reference,
                },
            )
        if decision.slowed:
            ctx.audit(
                "key_checks_slowed",
                "info",
                account_id=account_id,
                subject_ref=subject_ref,
                details={
                    "failures": self.limits.account_max_failures,
                    "interval_s": int(self.limits.slowed_interval.total_seconds()),
                    "reference": reference,
                },
            )

    def _writes(
        self,
        keys: CounterKeys,
        seen: ThrottleState,
        decision: KeyDecision,
        credential: Credential | None,
        stored: str | None,
        new_hash: str | None,
        extra: Sequence[Write] | None,
        now: datetime,
    ) -> list[Write]:
        # The principal's counter first: a lost race refuses the commit before anything else.
        writes = self.store.record_key_check(keys, seen, decision.record, now)
        if decision.rehash and credential is not None and stored and new_hash:
            writes.append(self.store.rehash(credential.account_id, stored, new_hash))
        if extra is not None:
            writes.extend(extra)
        return writes


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
        self.keys = KeyChecker(store, hasher, settings, metrics)
        self.policy = policy
        self.depth = settings.password_history
        self.box = SecretBox(settings.password_keys)
        self.portal_input = PortalInput(settings.portal_input_mode(settings.production), settings.portal_sealing_key)
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
        """The account's login name (its national ID) and, for a new account, its initial key.
        An existing key is never overwritten; a re-import only records the login name."""
        now = datetime.now(UTC)
        # First of all: a key must be sealed for this account (a forged event is dead-lettered).
        key = (
            None
            if evt.sealed_initial_key is None
            else self._open(
                evt.sealed_initial_key,
                "password",
                Purpose.INITIAL_KEY,
                initial_key_context(account_id=evt.account_id),
                self.initial_key_ttl_s,
            )
        )
        if key is None or await self.store.exists(evt.account_id):
            if key is not None:
                ctx.audit("initial_key_skipped", "info", account_id=evt.account_id, reasons=["credential_exists"])
            if evt.national_id is None:
                return
            await ctx.commit(self.store.set_national_id(evt.account_id, evt.national_id))
            return
        breaks = domain.assess(self.policy, key, reused=False)
        if breaks and not evt.legacy_key:
            # An initial key must meet the policy like any other; only the import's explicit
            # migration option takes one that does not (and marks it to be changed).
            ctx.audit("initial_key_refused", "rejected", account_id=evt.account_id, reasons=breaks)
            if evt.national_id is not None:
                await ctx.commit(self.store.set_national_id(evt.account_id, evt.national_id))
            return
        history = domain.KeyHistory().rotate(await self.hasher.hash(domain.hashable(key)), self.depth)
        details = {"must_change": True, "meets_policy": not breaks} if evt.legacy_key else {}
        ctx.audit("initial_key_set", "success", account_id=evt.account_id, details=details)
        self._key_changed(ctx, evt.national_id, now, "initial", None)

        await ctx.commit(
            *self.store.save(evt.account_id, history, now, national_id=evt.national_id, must_change=evt.legacy_key)
        )

    def _key_changed(
        self, ctx: HandlerContext, national_id: str | None, now: datetime, cause: str, request_id: str | None
    ) -> None:
        """Tell the portal (account.key_changed, keyed by national ID) so it ends other sessions."""
        if national_id is None:
            # Only accounts imported before login names existed: re-run the import to backfill.
            ctx.audit("key_change_unannounced", "info", request_id=request_id, reasons=["national_id_unknown"])
            return
        ctx.emit(
            ACCOUNT_KEY_CHANGED,
            national_id,
            EventType.ACCOUNT_KEY_CHANGED,
            AccountKeyChanged(national_id=national_id, changed_at=now, cause=cause, request_id=request_id),  # type: ignore[arg-type]
        )

    # ---- login.checks --------------------------------------------------------------------------

    async def login_checked(self, ctx: HandlerContext, evt: LoginCheckRequested) -> None:
        """A credential check: answer `valid` or `invalid` on login.results, keyed by check_id."""

        def answer(verdict: KeyVerdict) -> None:
            result = LoginResult(
                check_id=evt.check_id,
                status="valid" if verdict.valid else "invalid",
                reasons=list(verdict.reasons),
                must_change=verdict.must_change,
            )
            ctx.reply(LOGIN_RESULTS, evt.check_id, EventType.LOGIN_RESULT, result)  # sent at once after the commit

        key = self._typed_key(
            ctx,
            evt.key,
            evt.sealed_key,
            topic=LOGIN_CHECKS,
            ref=evt.check_id,
            refuse=lambda reason: answer(KeyVerdict(False, (reason,), None, None, "")),
        )
        await self.keys.check(
            ctx, evt.national_id, key, evt.client_ip, purpose="login", reference=evt.check_id, stage=answer
        )

    def _typed_key(
        self,
        ctx: HandlerContext,
        plain: str | None,
        sealed: str | None,
        *,
        topic: str,
        ref: str,
        refuse: Callable[[str], None],
    ) -> str:
        """The key as typed, opened when sealed. Input refused for how it came is dead-lettered
        before any check (nothing counted, nothing hashed), and `refuse` stages the answer."""
        try:
            return self.portal_input.secret(plain, sealed, topic=topic, field="key", ref=ref)
        except InputRefused as refused:
            refuse(refused.portal_reason)
            ctx.refuse(refused)
            raise

    # ---- account.contact_updates: a logged-in citizen's new contact data ----------------------

    async def contact_update_requested(self, ctx: HandlerContext, evt: ContactUpdateRequested) -> None:
        """The key is checked exactly as a login's (same throttling, decoy, audit); a valid one
        passes the change, without the key, to identity, which applies it and answers the
        portal. A wrong one is answered here: `rejected`, nothing changed."""

        def reject(reasons: tuple[str, ...]) -> None:
            result = ContactResult(update_id=evt.update_id, status="rejected", reasons=list(reasons))
            ctx.emit(CONTACT_RESULTS, evt.update_id, EventType.CONTACT_RESULT, result)

        def authorise(verdict: KeyVerdict) -> None:
            if not verdict.valid or verdict.account_id is None:
                reject(verdict.reasons)
                return
            ctx.emit(
                PASSWORD_CONTACT_AUTHORIZED,
                verdict.account_id,
                EventType.CONTACT_AUTHORIZED,
                ContactUpdateAuthorized(
                    update_id=evt.update_id,
                    account_id=verdict.account_id,
                    email=evt.email,
                    backup_email=evt.backup_email,
                    phone=evt.phone,
                    client_ip=evt.client_ip,
                ),
            )

        key = self._typed_key(
            ctx,
            evt.key,
            evt.sealed_key,
            topic=CONTACT_UPDATES,
            ref=evt.update_id,
            refuse=lambda reason: reject((reason,)),
        )
        await self.keys.check(
            ctx,
            evt.national_id,
            key,
            evt.client_ip,
            purpose="contact_update",
            reference=evt.update_id,
            stage=authorise,
        )

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
        credential = await self.store.credential(evt.account_id)
        history = credential.history if credential else domain.KeyHistory()
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
        self._key_changed(ctx, credential.national_id if credential else None, now, "recovery", evt.request_id)

        writes = self.store.save(evt.account_id, new_history, now, token_id=evt.token_id)
        if credential is not None and credential.national_id is not None:
            # Wrong guesses at the old key no longer matter.
            writes += self.store.clear_key_failures(self.keys.principal(credential.national_id))
        await ctx.commit(*writes)
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


__all__ = ["KeyChecker", "KeyVerdict", "PasswordHandlers", "Reason", "StageVerdict"]
