"""Notifier handlers queue e-mails (one document per mail, in the event's transaction);
`MailSender` delivers them over SMTP with retries, outside the consumer, so an SMTP
outage never blocks a partition and a queued mail survives a crash."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import aiosmtplib

from services.notifier import domain
from services.notifier.domain import RetryPolicy, State
from services.notifier.rendering import KINDS, MailRenderer, build_message, mask_email
from services.notifier.settings import NotifierSettings
from services.notifier.signing import DkimSigner, Envelope, envelope
from services.notifier.store import ACCEPTED, NotificationStore, new_notification
from shared.audit import audit_event
from shared.consumer import HandlerContext, open_sealed
from shared.crypto import Purpose, SealError, SecretBox, recovery_secrets_context
from shared.envelope import new_event
from shared.loops import describe, is_outage
from shared.metrics import ServiceMetrics
from shared.schemas import (
    AuditRecord,
    ContactChanged,
    EmailChangeCancelled,
    EmailChanged,
    EmailChangeRequested,
    IdentityLocked,
    NotificationResult,
    PasswordUpdated,
    Recipient,
    TokensIssued,
)
from shared.store import Outgoing, StoreError
from shared.topics import NOTIFIER_FAILED, NOTIFIER_SENT, EventType

log = logging.getLogger(__name__)
SOURCE = "/clave/notifier"


def secrets_context(token_id: str, account_id: str, request_id: str, email: str) -> dict[str, str]:
    return recovery_secrets_context(token_id=token_id, account_id=account_id, request_id=request_id, email=email)


class NotifierHandlers:
    def __init__(self, store: NotificationStore, settings: NotifierSettings, wake_sender: Any) -> None:
        self.store = store
        self.settings = settings
        self.box = SecretBox(settings.notifier_keys)
        self.wake_sender = wake_sender

    def _doc(
        self,
        ctx: HandlerContext,
        kind: str,
        to: Recipient,
        *,
        account_id: str,
        request_id: str | None,
        context: dict[str, Any],
        sealed: str | None = None,
        token_id: str | None = None,
        started_at: datetime | None = None,
        id_kind: str | None = None,
    ) -> dict[str, Any]:
        """One mail for this event; `id_kind` names it when the event sends one kind to several
        addresses (the id is per event and kind otherwise)."""
        return new_notification(
            domain.notification_id(ctx.event.id, id_kind or kind),
            kind,
            to,
            account_id=account_id,
            request_id=request_id,
            context=context,
            sealed=sealed,
            token_id=token_id,
            correlationid=ctx.event.correlationid,
            causationid=ctx.event.id,
            # End-to-end latency counts from the portal's request when the chain carried it.
            event_time=started_at or ctx.event.time,
            now=datetime.now(UTC),
        )

    async def _queue(self, ctx: HandlerContext, docs: list[dict[str, Any]]) -> None:
        await ctx.commit(*self.store.add(docs))
        self.wake_sender()

    async def tokens_issued(self, ctx: HandlerContext, evt: TokensIssued) -> None:
        # Fail now (DLQ, no mail) rather than at send time: secrets sealed for another token,
        # account, request or address (copied into a forged event), or too old.
        open_sealed(
            self.box,
            evt.sealed_secrets,
            purpose=Purpose.RECOVERY_SECRETS,
            context=secrets_context(evt.token_id, evt.account_id, evt.request_id, evt.recipient.email),
            ttl_s=self.settings.sealed_secrets_ttl_s,
            what="sealed secrets",
        )
        elsewhere = []
        if evt.primary_recipient is not None:
            # The recovery went to the backup address: the registered address is told.
            elsewhere.append(
                self._doc(
                    ctx,
                    "recovery_elsewhere",
                    evt.primary_recipient,
                    account_id=evt.account_id,
                    request_id=evt.request_id,
                    context={
                        "sent_to_masked": mask_email(evt.recipient.email),
                        "sent_at": domain.mail_time(ctx.event.time),
                    },
                )
            )
        await self._queue(
            ctx,
            elsewhere
            + [
                self._doc(
                    ctx,
                    "recovery_link",
                    evt.recipient,
                    account_id=evt.account_id,
                    request_id=evt.request_id,
                    context={
                        # The lifetimes tokens chose, as the event states them.
                        "link_minutes": domain.minutes_between(ctx.event.time, evt.link_expires_at),
                        "code_minutes": domain.minutes_between(ctx.event.time, evt.code_expires_at),
                    },
                    sealed=evt.sealed_secrets,
                    token_id=evt.token_id,
                    started_at=evt.requested_at,
                )
            ],
        )

    async def password_updated(self, ctx: HandlerContext, evt: PasswordUpdated) -> None:
        await self._queue(
            ctx,
            [
                self._doc(
                    ctx,
                    "password_changed",
                    evt.recipient,
                    account_id=evt.account_id,
                    request_id=evt.request_id,
                    context={"changed_at": domain.mail_time(evt.changed_at)},
                )
            ],
        )

    async def identity_locked(self, ctx: HandlerContext, evt: IdentityLocked) -> None:
        minutes = domain.unlock_minutes(datetime.now(UTC), evt.locked_until)
        await self._queue(
            ctx,
            [
                self._doc(
                    ctx,
                    "account_locked",
                    evt.recipient,
                    account_id=evt.account_id,
                    request_id=evt.request_id,
                    context={"unlock_minutes": minutes},
                )
            ],
        )

    async def contact_changed(self, ctx: HandlerContext, evt: ContactChanged) -> None:
        """Every address on file before the change is told (new values masked)."""
        when = domain.mail_time(ctx.event.time)
        changes = [(c.field, c.masked) for c in evt.changes]
        await self._queue(
            ctx,
            [
                self._doc(
                    ctx,
                    "contact_changed",
                    to,
                    account_id=evt.account_id,
                    request_id=None,
                    context={"changed_at": when, "changes": domain.describe_changes(changes, to.locale)},
                    id_kind=f"contact_changed:{n}",  # one notification per old address
                )
                for n, to in enumerate(evt.old_recipients)
            ],
        )

    async def email_change_requested(self, ctx: HandlerContext, evt: EmailChangeRequested) -> None:
        """Both addresses are told as soon as a change is requested, before it can take effect."""
        context = {
            "requested_at": domain.mail_time(ctx.event.time),
            "not_before": domain.mail_time(evt.not_before),
        }
        await self._tell_both_addresses(ctx, "email_change_requested", evt, context)

    async def email_change_cancelled(self, ctx: HandlerContext, evt: EmailChangeCancelled) -> None:
        """Both addresses are told that a pending change was cancelled and will not take effect."""
        context = {"cancelled_at": domain.mail_time(ctx.event.time)}
        await self._tell_both_addresses(ctx, "email_change_cancelled", evt, context)

    async def email_changed(self, ctx: HandlerContext, evt: EmailChanged) -> None:
        context = {"changed_at": domain.mail_time(ctx.event.time)}
        await self._tell_both_addresses(ctx, "email_changed", evt, context)

    async def _tell_both_addresses(
        self,
        ctx: HandlerContext,
        kind: str,
        evt: EmailChangeRequested | EmailChangeCancelled | EmailChanged,
        context: dict[str, str],
    ) -> None:
        """An e-mail change's notice to both addresses (`<kind>_old`, `<kind>_new`); the old
        address sees the new one masked."""
        await self._queue(
            ctx,
            [
                self._doc(
                    ctx,
                    f"{kind}_old",
                    evt.old_recipient,
                    account_id=evt.account_id,
                    request_id=None,
                    context={**context, "new_email_masked": mask_email(evt.new_recipient.email)},
                ),
                self._doc(
                    ctx, f"{kind}_new", evt.new_recipient, account_id=evt.account_id, request_id=None, context=context
                ),
            ],
        )


# How long a sender keeps trying to record that the SMTP server accepted a mail.
RECORD_PATIENCE_S = 300.0
# The sender sleeps until the next notification is due, at most this long: the bound is only
# for what another notifier instance scheduled (its retries, its claims) and then died.
SAFETY_POLL_S = 30.0
MIN_SLEEP_S = 0.05
# Why a notification failed without SMTP having refused it (audit reasons, next to
# `smtp_gave_up`): its mail could not be rendered (a template error, sealed secrets without a
# field the mail needs), or sending it raised something unexpected for this one mail.
RENDER_FAILED = "render_failed"
SEND_ERROR = "send_error"
SMTP_GAVE_UP = "smtp_gave_up"


class LostClaim(Exception):
    """Another sender took this notification over (this one stalled past its lease)."""


class MailSender:
    """Delivers queued notifications. Several instances may run: each claims atomically.

    Exactly-once is not possible over SMTP: between the final "." of DATA and the
    recording of the server's 250 reply, a crash leaves the outcome unknown (RFC 1047).
    That window is kept as small as it can be: the 250 is recorded at once, in one small
    write (`accepted`), before QUIT and before the `sent` transaction; an accepted mail
    is never sent again.  A notification whose sender died inside the window is sent
    again after its lease, with the same Message-ID and link (a recovery e-mail must not
    be lost; an identical copy is the lesser harm), and audited as `in_doubt_resend`.
    """

    def __init__(
        self, store: NotificationStore, settings: NotifierSettings, metrics: ServiceMetrics, on_outbox: Any
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.on_outbox = on_outbox
        self.box = SecretBox(settings.notifier_keys)
        self.renderer = MailRenderer(settings.templates_dir or None)
        # Read (and tried) at start: a key that cannot sign stops the service, not each mail.
        self.signer = (
            DkimSigner.from_file(settings.dkim_private_key, settings.dkim_selector, settings.signing_domain())
            if settings.dkim_private_key
            else None
        )
        if self.signer is None:
            log.warning("DKIM_PRIVATE_KEY not set: mail leaves unsigned (development only)")
        self.retry = RetryPolicy(
            settings.smtp_max_attempts, settings.smtp_backoff_initial_s, settings.smtp_backoff_max_s
        )
        # One SMTP conversation may take at most `smtp_deadline`; the claim outlives it by a
        # margin for recording the result, so a live sender never loses its claim, and a
        # dead sender's mail waits at most `lease` before another attempt.
        self.smtp_deadline = max(2 * settings.smtp_timeout_s, 5.0)
        self.lease = timedelta(seconds=self.smtp_deadline + 10)
        self.wake = asyncio.Event()
        # When a claim (another sender's, or one of a sender that died) runs out, as last seen:
        # only then can an orphan be there to take over. None: no claim was seen.
        self._orphans_at: datetime | None = datetime.min.replace(tzinfo=UTC)  # look at start-up
        self.sent = metrics.counter("clave_mails_sent_total", "E-mails accepted by SMTP", ["kind"])
        self.failed = metrics.counter("clave_mails_failed_total", "E-mails given up", ["kind"])
        self.retried = metrics.counter("clave_mails_retried_total", "Temporary SMTP failures", ["kind"])
        self.latency = metrics.histogram(
            "clave_event_to_mail_seconds", "From the triggering event to the mail accepted by SMTP", ["kind"]
        )

    async def run_forever(self) -> None:
        """Deliver what is due, then sleep until the next notification falls due (a retry's
        `next_attempt_at`, the end of a claim's lease) or a handler queues one (`wake`); not
        a poll. SAFETY_POLL_S bounds the sleep, for what another instance scheduled."""
        look_at_claims = True
        looked = 0.0
        loop = asyncio.get_running_loop()
        while True:
            # Cleared before looking: a mail queued meanwhile makes the wait return at once.
            self.wake.clear()
            await self.deliver_due()
            if look_at_claims or loop.time() - looked > SAFETY_POLL_S:
                looked = loop.time()
                pending, self._orphans_at = await self.store.due_times()
            else:
                # Woken by a handler: the claims seen at the last look still stand (this sender
                # settled its own); what another instance claimed since is seen after a timeout.
                pending, _ = await self.store.due_times(claims=False)
            due = min((t for t in (pending, self._orphans_at) if t is not None), default=None)
            delay = SAFETY_POLL_S
            if due is not None:
                # Not below MIN_SLEEP_S: a due time that has just passed is claimed on the next turn.
                delay = min(max((due - datetime.now(UTC)).total_seconds(), MIN_SLEEP_S), SAFETY_POLL_S)
            try:
                await asyncio.wait_for(self.wake.wait(), timeout=delay)
                look_at_claims = False
            except TimeoutError:
                # Also for what another instance claimed since: it is only seen by looking.
                self._orphans_at = datetime.min.replace(tzinfo=UTC)
                look_at_claims = True

    def _orphans_due(self, now: datetime) -> bool:
        return self._orphans_at is not None and self._orphans_at <= now

    async def deliver_due(self) -> int:
        count = 0
        while True:
            now = datetime.now(UTC)
            doc = await self.store.claim_due(now, self.lease, orphans=self._orphans_due(now))
            if doc is None:
                break
            try:
                if doc["state"] == ACCEPTED:
                    # Its sender died after the SMTP server accepted it: record it, never resend.
                    log.warning("mail %s: accepted before its sender stopped; recording it as sent", doc["_id"])
                    await self._settle(doc, State.SENT, None, datetime.now(UTC))
                    self.sent.labels(doc["kind"]).inc()
                else:
                    await self._deliver(doc)
            except LostClaim:
                log.warning("mail %s: claim taken over by another sender", doc["_id"])
            except Exception as exc:
                if is_outage(exc):
                    raise  # the store is away: the loop backs off; the claim runs out meanwhile
                # This one mail, not the store: fail it (announced), never retry it, go on.
                await self._give_up(doc, SEND_ERROR, f"unexpected {exc.__class__.__name__}", exc)
            count += 1
        return count

    async def _give_up(self, doc: dict[str, Any], reason: str, error: str, exc: BaseException) -> None:
        """Fail one notification for good, as a refused mail is failed: `notifier.failed` and
        `mail_failed` (with `reason`) through the outbox, counted, logged without its values.
        A document too broken even for that is marked failed in place."""
        kind = str(doc["kind"]) if doc.get("kind") in KINDS else "unknown"
        self.failed.labels(kind).inc()
        self.metrics.items_parked.labels("mail-sender", reason).inc()
        log.error("mail %s: %s (%s); failed, not retried", doc.get("_id"), reason, describe(exc))
        try:
            await self._settle(doc, State.FAILED, error, datetime.now(UTC), reason=reason)
        except LostClaim:
            log.warning("mail %s: claim taken over by another sender", doc.get("_id"))
        except Exception as settle_exc:
            if is_outage(settle_exc):
                raise
            log.error(
                "mail %s: announcing the failure failed (%s); failing it in place", doc.get("_id"), describe(settle_exc)
            )
            broken = self.store.fail_in_place(doc.get("_id"), doc.get("claim"), error, datetime.now(UTC))
            await self.store.commit(consumer=None, event_id=None, writes=broken, outgoing=[])

    def _render_context(self, doc: dict[str, Any]) -> dict[str, Any]:
        context = {"name": doc["name"], **doc["context"]}
        if doc.get("sealed"):
            # Checked again against the queued mail itself: the secrets open only for its own
            # token, account, request and address. No lifetime here: retries may take minutes.
            bound = secrets_context(doc.get("token_id") or "", doc["account_id"], doc["request_id"], doc["to"])
            secrets = self.box.open(doc["sealed"], purpose=Purpose.RECOVERY_SECRETS, context=bound, ttl_s=None)
            context["link"] = domain.recovery_link(self.settings.portal_base_url, doc["request_id"], secrets["token"])
            context["code"] = secrets["code"]
        return context

    async def _smtp_send(self, mail: Envelope) -> aiosmtplib.SMTP:
        """Connect and send the signed bytes; returns the open connection once the server
        accepted the message."""
        smtp = aiosmtplib.SMTP(
            hostname=self.settings.smtp_host,
            port=self.settings.smtp_port,
            username=self.settings.smtp_username or None,
            password=self.settings.smtp_password or None,
            start_tls=self.settings.smtp_tls_mode(),
            use_tls=self.settings.smtp_implicit_tls,
            timeout=self.settings.smtp_timeout_s,
        )
        try:
            async with asyncio.timeout(self.smtp_deadline):
                await smtp.connect()
                await smtp.sendmail(
                    mail.sender, mail.recipients, mail.data, mail_options=["SMTPUTF8"] if mail.utf8 else None
                )
        except BaseException:
            smtp.close()
            raise
        return smtp

    async def _deliver(self, doc: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        code: int | None = None
        error: str | None = None
        smtp: aiosmtplib.SMTP | None = None
        if doc.get("in_doubt"):
            log.warning("mail %s: its sender stopped during the SMTP conversation; sending it again", doc["_id"])
        stage = RENDER_FAILED
        try:
            rendered = self.renderer.render(doc["kind"], doc["locale"], **self._render_context(doc))
            message = build_message(
                rendered,
                to=doc["to"],
                mail_from=self.settings.mail_from,
                reply_to=self.settings.mail_reply_to,
                message_id=domain.message_id(doc["_id"]),
                date=doc.get("created_at") or now,  # stable: a resend is the same message
            )
            stage = SEND_ERROR
            smtp = await self._smtp_send(envelope(message, self.signer))
        except aiosmtplib.SMTPRecipientsRefused as exc:
            code = min(r.code for r in exc.recipients)
            error = f"recipient refused ({code})"
        except aiosmtplib.SMTPResponseException as exc:
            code, error = exc.code, f"SMTP {exc.code}"
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            error = exc.__class__.__name__
        except SealError:
            code, error = 554, "sealed secrets do not open"
        except Exception as exc:
            # Not the SMTP server's answer: this mail cannot be rendered (a template error, a
            # value missing) or sent (a library error on it). The same every time: fail it now.
            what = "render failed" if stage == RENDER_FAILED else "send failed"
            await self._give_up(doc, stage, f"{what}: {exc.__class__.__name__}", exc)
            return
        if error is None:
            assert smtp is not None
            try:
                await self._record_accepted(doc, now)
                await self._settle(doc, State.SENT, None, now)
            finally:
                await self._quit(smtp)
            self.sent.labels(doc["kind"]).inc()
            self.latency.labels(doc["kind"]).observe((datetime.now(UTC) - doc["event_time"]).total_seconds())
            return
        # The backoff counts from the failure, not from the start of the attempt: an attempt
        # that took longer than the backoff (a slow server, a timeout) still waits it out.
        state, next_at = self.retry.after_failure(doc["attempts"], domain.is_permanent(code), datetime.now(UTC))
        log.warning("mail %s attempt %d: %s -> %s", doc["_id"], doc["attempts"], error, state)
        if state == State.PENDING:
            self.retried.labels(doc["kind"]).inc()

            if not await self.store.retry_later(doc["_id"], doc["claim"], next_at, error):
                raise LostClaim(doc["_id"])
        else:
            await self._settle(doc, State.FAILED, error, now)
            self.failed.labels(doc["kind"]).inc()

    async def _record_accepted(self, doc: dict[str, Any], now: datetime) -> None:
        """Record the server's acceptance at once. The store may be away (failover, restart):
        keep trying, even past the lease. The write is fenced by our claim: if another sender
        took the mail over meanwhile it fails (LostClaim) and that sender's resend is the
        in-doubt copy; otherwise the late record still prevents a resend. While the store is
        away this sender could not do anything else anyway."""
        deadline = asyncio.get_running_loop().time() + RECORD_PATIENCE_S
        delay = 0.05
        while True:
            try:
                if not await self.store.mark_accepted(doc["_id"], doc["claim"], now):
                    raise LostClaim(doc["_id"])
                return
            except StoreError as exc:
                if asyncio.get_running_loop().time() + delay > deadline:
                    log.error("mail %s: accepted by SMTP but not recorded (%s)", doc["_id"], exc.__class__.__name__)
                    raise
                log.warning("mail %s: recording acceptance failed (%s), retrying", doc["_id"], exc.__class__.__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    @staticmethod
    async def _quit(smtp: aiosmtplib.SMTP) -> None:
        # The message is accepted and recorded: QUIT is a courtesy, bounded, errors ignored.
        try:
            async with asyncio.timeout(2.0):
                await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            smtp.close()

    async def _settle(
        self, doc: dict[str, Any], state: str, error: str | None, now: datetime, *, reason: str = SMTP_GAVE_UP
    ) -> None:
        """Record the final state, drop the sealed secrets, and announce it (event + audit).
        Exactly once per notification: the transaction aborts unless this sender still holds
        the claim, so a retried commit or a second sender cannot announce it twice."""
        result = NotificationResult(
            notification_id=doc["_id"],
            kind=doc["kind"],
            account_id=doc["account_id"],
            request_id=doc["request_id"],
            attempts=doc["attempts"],
            error=error,
        )
        sent = state == State.SENT
        event = new_event(
            type=EventType.NOTIFIER_SENT if sent else EventType.NOTIFIER_FAILED,
            source=SOURCE,
            data=result.model_dump(mode="json"),
            correlationid=doc["correlationid"],
            causationid=doc["causationid"],
        )
        details: dict[str, str | int | float | bool | None] = {
            "kind": doc["kind"],
            "attempts": doc["attempts"],
            "notification_id": doc["_id"],
        }
        if doc.get("in_doubt"):
            # Sent again after its sender stopped mid-conversation: a copy may exist.
            details["in_doubt_resend"] = True
        record = AuditRecord(
            service="notifier",
            action="mail_sent" if sent else "mail_failed",
            outcome="success" if sent else "failed",
            account_id=doc["account_id"],
            request_id=doc["request_id"],
            reasons=[] if sent else [reason],
            details=details,
        )
        outgoing = [
            Outgoing(NOTIFIER_SENT if sent else NOTIFIER_FAILED, doc["account_id"], event),
            audit_event(record, correlationid=doc["correlationid"], causationid=doc["causationid"], source=SOURCE),
        ]

        lost = self.store.settle(doc["_id"], doc["claim"], state, error, now, lambda: LostClaim(doc["_id"]))
        await self.store.commit(consumer=None, event_id=None, writes=[lost], outgoing=outgoing)
        self.on_outbox()
