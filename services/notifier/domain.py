"""Notifier rules: what to send for which event, and when to retry. No I/O.

Delivery is a small state machine per notification:
pending -> sending -> sent | pending (retry later) | failed.
Connection errors and SMTP 4xx are temporary (retry with exponential backoff);
5xx is permanent (no retry). After `max_attempts`, the notifier gives up.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlencode


class State:
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    initial: float = 0.5
    maximum: float = 30.0

    def next_delay(self, attempts: int) -> float:
        return min(self.initial * 2 ** min(max(attempts - 1, 0), 64), self.maximum)

    def after_failure(self, attempts: int, permanent: bool, now: datetime) -> tuple[str, datetime | None]:
        """New state and next attempt time after the `attempts`-th attempt failed."""
        if permanent or attempts >= self.max_attempts:
            return State.FAILED, None
        return State.PENDING, now + timedelta(seconds=self.next_delay(attempts))


def is_permanent(smtp_code: int | None) -> bool:
    return smtp_code is not None and 500 <= smtp_code < 600


def recovery_link(portal_base_url: str, request_id: str, token: str) -> str:
    query = urlencode({"request_id": request_id, "token": token})
    return f"{portal_base_url.rstrip('/')}/recuperar?{query}"


def notification_id(event_id: str, kind: str) -> str:
    return f"{event_id}:{kind}"


def message_id(notification_id: str) -> str:
    # Deterministic: a resend after a crash carries the same Message-ID, so mail systems
    # and auditors can recognise it as the same message.
    digest = hashlib.sha256(notification_id.encode()).hexdigest()[:32]
    return f"<{digest}@clave>"


def minutes_between(start: datetime, end: datetime) -> int:
    """Whole minutes a citizen is told a link or code lasts (a lifetime of 30 min reads 30)."""
    return max(0, round((end - start).total_seconds() / 60))


def mail_time(when: datetime) -> str:
    """A moment as every mail states it: '2026-05-01 14:03 UTC'."""
    return when.strftime("%Y-%m-%d %H:%M UTC")


def unlock_minutes(now: datetime, locked_until: datetime) -> int:
    """Whole minutes a locked-out owner is told to wait: never 0, a lock still holds."""
    return max(1, int((locked_until - now).total_seconds() // 60))


CONTACT_FIELDS = {
    "es": {"email": "correo principal", "backup_email": "correo alternativo", "phone": "teléfono", "": "eliminado"},
    "en": {"email": "primary e-mail", "backup_email": "backup e-mail", "phone": "phone", "": "removed"},
}


def describe_changes(changes: Sequence[tuple[str, str]], locale: str) -> str:
    """'correo principal n***@example.org; teléfono eliminado': (field, masked new value, "" when
    removed) in the citizen's language (Spanish unless English)."""
    words = CONTACT_FIELDS["en" if locale.lower().startswith("en") else "es"]
    return "; ".join(f"{words[field]} {value or words['']}" for field, value in changes)
