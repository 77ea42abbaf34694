"""What the page needs from Clave, as the `clave_portal` client offers it.

The routes depend on this protocol, not on Kafka, so they are tested in milliseconds with
an in-memory backend (tests/unit/test_page.py) and in a real browser against the real stack
with the client (tests/e2e/test_page_browser.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class ResetAnswer:
    status: Literal["completed", "rejected"]
    reasons: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RequestAnswer:
    """Clave's answer to a recovery request: `accepted` whatever the account, or `rejected` for
    the request itself (`request_invalid`, `duplicate_request`, `plaintext_refused`, ...)."""

    status: Literal["accepted", "rejected"]
    reasons: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class LoginAnswer:
    """Clave's answer to a key check: `valid`, and for a right key the import took with
    `--legacy-keys` also `must_change` (never with a wrong key or an unknown ID, which are alike)."""

    valid: bool
    must_change: bool = False


class RecoveryBackend(Protocol):
    async def request_recovery(
        self,
        *,
        profile: Literal["affiliate", "employer"],
        national_id: str,
        representative_id: str | None,
        email: str,
        answers: dict[str, str],
        captcha_passed: bool,
        locale: Literal["es", "en"],
        client_ip: str,
    ) -> str:
        """Publish the request; returns its request_id (the answer is always "check your e-mail")."""
        ...

    async def request_answer(self, request_id: str) -> RequestAnswer:
        """Wait for Clave's answer to a request (TimeoutError when none comes in time)."""
        ...

    async def submit_reset(
        self, request_id: str, *, token: str | None, code: str | None, new_password: str, client_ip: str
    ) -> ResetAnswer:
        """Publish the reset and wait for its outcome (TimeoutError when none comes in time)."""
        ...

    async def login(self, national_id: str, key: str, client_ip: str) -> LoginAnswer:
        """Whether the key opens the account, and whether it must be changed before use
        (TimeoutError when no answer comes in time)."""
        ...
