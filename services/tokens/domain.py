"""Token rules: issuing, redeeming and the single-use saga with the password service.

A link token is 256 random bits (URL-safe); a code is 6 random digits. Only
their hashes are stored: SHA-256 for the token (256 bits cannot be guessed),
HMAC-SHA256 with a server key for the code (a bare hash of a 6-digit code
could be reversed by trying all million).

The whole state machine (each move names the states it may start from):

    live ──reserve──▶ reserved ──spend──▶ spent        (tokens.redeemed; password.updated)
     ▲                   │
     └─────release───────┘                             (password.rejected, reservation timeout)
    live | reserved ──revoke──▶ revoked                 (newer token, e-mail changed)
    live ──kill──▶ dead                                 (too many wrong codes)
    live | revoked | dead ──spend──▶ spent              (a key change authorised while reserved
                                                         lands late: the change stands)

A revoked or dead token never comes back: `release` starts only from `reserved`.

A request that identity did not verify gets a *decoy*: a token no one knows (its
hashes are of values drawn and thrown away here), with the same lifetimes and
counters, so its code path answers exactly as a real token's would. A decoy is
never mailed and never revokes anything.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from shared.crypto import constant_time_equal, mac, sha256_hex


class Reason:
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    CODE_ATTEMPTS_EXCEEDED = "code_attempts_exceeded"
    RESET_INVALID = "reset_invalid"  # the reset could not be processed at all (its dead letter says why)


class State:
    LIVE = "live"
    RESERVED = "reserved"
    SPENT = "spent"
    REVOKED = "revoked"
    DEAD = "dead"


@dataclass(frozen=True)
class Move:
    """One edge set of the state machine: from any of `sources` to `target`."""

    name: str
    sources: frozenset[str]
    target: str

    def allows(self, state: str) -> bool:
        return state in self.sources


RESERVE = Move("reserve", frozenset({State.LIVE}), State.RESERVED)
RELEASE = Move("release", frozenset({State.RESERVED}), State.LIVE)
SPEND = Move("spend", frozenset({State.LIVE, State.RESERVED, State.REVOKED, State.DEAD}), State.SPENT)
REVOKE = Move("revoke", frozenset({State.LIVE, State.RESERVED}), State.REVOKED)
KILL = Move("kill", frozenset({State.LIVE}), State.DEAD)
MOVES = (RESERVE, RELEASE, SPEND, REVOKE, KILL)

By = Literal["token", "code"]


# ---- secrets and hashes --------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedSecrets:
    token: str
    code: str


def new_secrets() -> IssuedSecrets:
    return IssuedSecrets(token=secrets.token_urlsafe(32), code=f"{secrets.randbelow(1_000_000):06d}")


def token_hash(token: str) -> str:
    return sha256_hex(token)


def code_hash(key: str, token_id: str, code: str) -> str:
    # Bound to the token id, so the same code on two tokens hashes differently.
    return mac(key, f"{token_id}:{code}".encode())


def expiries(now: datetime, link_ttl_s: int, code_ttl_s: int) -> tuple[datetime, datetime]:
    return now + timedelta(seconds=link_ttl_s), now + timedelta(seconds=code_ttl_s)


# ---- new tokens ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NewToken:
    token_id: str
    request_id: str
    account_id: str | None
    subject_ref: str | None
    token_hash: str
    code_hash: str
    issued_at: datetime
    link_expires_at: datetime
    code_expires_at: datetime
    decoy: bool
    recipient: dict[str, Any] | None


@dataclass(frozen=True)
class Lifetimes:
    link_ttl_s: int
    code_ttl_s: int


def issue(
    *, request_id: str, account_id: str, recipient: dict[str, Any], now: datetime, ttl: Lifetimes, code_key: str
) -> tuple[NewToken, IssuedSecrets]:
    """A real token: its secrets go to the citizen (sealed for the notifier), its hashes are kept."""
    drawn = new_secrets()
    token_id = secrets.token_hex(16)
    link_exp, code_exp = expiries(now, ttl.link_ttl_s, ttl.code_ttl_s)
    token = NewToken(
        token_id=token_id,
        request_id=request_id,
        account_id=account_id,
        subject_ref=None,
        token_hash=token_hash(drawn.token),
        code_hash=code_hash(code_key, token_id, drawn.code),
        issued_at=now,
        link_expires_at=link_exp,
        code_expires_at=code_exp,
        decoy=False,
        recipient=recipient,
    )
    return token, drawn


def decoy(
    *, request_id: str, account_id: str | None, subject_ref: str, now: datetime, ttl: Lifetimes, code_key: str
) -> NewToken:
    """A token for a request that was not verified: drawn like a real one, secrets discarded.

    Nobody ever knows its link or code, so it can never be redeemed; it only makes the
    code path answer (wrong code, attempts exceeded, expired) as a real token would."""
    drawn = new_secrets()
    token_id = secrets.token_hex(16)
    link_exp, code_exp = expiries(now, ttl.link_ttl_s, ttl.code_ttl_s)
    return NewToken(
        token_id=token_id,
        request_id=request_id,
        account_id=account_id,
        subject_ref=subject_ref,
        token_hash=token_hash(drawn.token),
        # Keyed with a key drawn here and dropped: not even the server could recompute it.
        code_hash=code_hash(secrets.token_hex(32), token_id, drawn.code),
        issued_at=now,
        link_expires_at=link_exp,
        code_expires_at=code_exp,
        decoy=True,
        recipient=None,
    )


# ---- redeeming -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenView:
    token_id: str
    state: str
    link_expires_at: datetime
    code_expires_at: datetime
    code_hash: str
    code_attempts: int
    request_id: str = ""
    account_id: str | None = None
    subject_ref: str | None = None
    decoy: bool = False
    reserved_by: str | None = None
    recipient: dict[str, Any] | None = None  # where its mail went (None: a decoy)

    @property
    def guard_key(self) -> str | None:
        """Whose wrong codes these are: the account, or (a decoy of an unknown ID) the ID's keyed hash."""
        return self.account_id or self.subject_ref


@dataclass(frozen=True)
class Redemption:
    ok: bool
    reason: str | None = None
    count_wrong_code: bool = False
    kill: bool = False


@dataclass(frozen=True)
class CodeLimits:
    per_token: int  # wrong codes before the token dies (link included)
    per_account: int  # wrong codes per account in the window before no code is accepted


def redeem_by_token(token: TokenView | None, now: datetime, request_id: str | None = None) -> Redemption:
    """The link. A token answers only for the request it was issued for: every reset of one
    token then lands on that request's partition, in order."""
    if token is None or token.state in (State.REVOKED, State.DEAD):
        return Redemption(False, Reason.TOKEN_INVALID)
    if request_id is not None and not constant_time_equal(token.request_id, request_id):
        return Redemption(False, Reason.TOKEN_INVALID)
    if token.state in (State.SPENT, State.RESERVED):
        return Redemption(False, Reason.TOKEN_USED)
    if now >= token.link_expires_at:
        return Redemption(False, Reason.TOKEN_EXPIRED)
    return Redemption(True)


def redeem_by_code(
    token: TokenView | None,
    code: str,
    now: datetime,
    key: str,
    max_attempts: int,
    account_failures: int = 0,
    account_limit: int | None = None,
) -> Redemption:
    """The code. `account_failures` are the wrong codes of the token's account (or, for a decoy
    of an unknown ID, of that ID) in the window; at `account_limit` no code is accepted, but the
    link still works (it clears the count)."""
    if token is None or token.state == State.REVOKED:
        return Redemption(False, Reason.TOKEN_INVALID)
    if token.state == State.DEAD or token.code_attempts >= max_attempts:
        return Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    if token.state in (State.SPENT, State.RESERVED):
        return Redemption(False, Reason.TOKEN_USED)
    if now >= token.code_expires_at:
        return Redemption(False, Reason.TOKEN_EXPIRED)
    account_blocked = account_limit is not None and account_failures >= account_limit
    if account_blocked:  # not even compared, so not counted: the guess tells nothing
        return Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    if not constant_time_equal(code_hash(key, token.token_id, code), token.code_hash):
        exhausted = token.code_attempts + 1 >= max_attempts
        account_exhausted = account_limit is not None and account_failures + 1 >= account_limit
        return Redemption(
            False,
            Reason.CODE_ATTEMPTS_EXCEEDED if exhausted or account_exhausted else Reason.TOKEN_INVALID,
            count_wrong_code=True,
            kill=exhausted,  # the account limit leaves the link alive: using it clears the count
        )
    return Redemption(True)


# ---- settling the saga ---------------------------------------------------------------------


@dataclass(frozen=True)
class Settlement:
    """What a password-service answer (or a timeout) does to a token, and what the portal hears."""

    move: Move | None  # None: the token stays as it is
    action: str  # audit action
    status: Literal["completed", "rejected"]
    reasons: tuple[str, ...] = ()  # to the portal
    note: str | None = None  # audit reason, when the token was not where the saga left it


def settle_key_changed(state: str | None) -> Settlement:
    """password.updated: the key was changed with this token. The change was authorised when
    the token was reserved, so it stands whatever happened to the token since; it is spent."""
    if state is None:
        return Settlement(None, "token_spent", "completed", note="token_unknown")
    if state == State.SPENT:
        return Settlement(None, "token_spent", "completed", note="already_spent")
    note = None if state == State.RESERVED else f"{state}_while_reserved"
    return Settlement(SPEND, "token_spent", "completed", note=note)


def forgiven_code_failures(token: TokenView | None) -> str | None:
    """Whose wrong codes a key change with this token forgives (the guard key), or None. A
    change by link proves the mailbox; one by code proves nothing more than the code did."""
    if token is None or token.reserved_by != "token":
        return None
    return token.guard_key


def settle_key_refused(state: str | None, reasons: list[str]) -> Settlement:
    """password.rejected: the key was refused. A reserved token is released (the portal's
    "rejected" means "the same link works again"), unless it was revoked or killed meanwhile:
    then it stays dead and the portal hears token_invalid."""
    if Reason.TOKEN_USED in reasons:
        # The password service had already changed the key with this token: it is used.
        move = SPEND if state is not None and SPEND.allows(state) else None
        return Settlement(move, "token_spent", "rejected", tuple(reasons))
    if state == State.RESERVED:
        return Settlement(RELEASE, "token_released", "rejected", tuple(reasons))
    if state == State.LIVE:  # released already (the reservation timed out): it does work again
        return Settlement(None, "token_released", "rejected", tuple(reasons), note="released_earlier")
    if state == State.SPENT:
        return Settlement(None, "token_release_refused", "rejected", (Reason.TOKEN_USED,), note="spent")
    return Settlement(
        None, "token_release_refused", "rejected", (Reason.TOKEN_INVALID,), note=f"{state or 'unknown'}_while_reserved"
    )


def settle_timeout(state: str) -> Move | None:
    """A reservation nobody answered: released, if it is still a reservation."""
    return RELEASE if RELEASE.allows(state) else None
