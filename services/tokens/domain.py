"""Token rules: issuing, redeeming and the single-use saga with the password service.

A link token is 256 random bits (URL-safe); a code is 6 random digits. Only
their hashes are stored: SHA-256 for the token (256 bits cannot be guessed),
HMAC-SHA256 with a server key for the code (a bare hash of a 6-digit code
could be reversed by trying all million).

States: live -> reserved (tokens.redeemed sent) -> spent (password.updated)
                      \\-> live again (password.rejected or reservation timeout)
        live -> revoked (newer token, e-mail changed) | dead (too many wrong codes)
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from shared.crypto import constant_time_equal, mac, sha256_hex


class Reason:
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_USED = "token_used"
    CODE_ATTEMPTS_EXCEEDED = "code_attempts_exceeded"


class State:
    LIVE = "live"
    RESERVED = "reserved"
    SPENT = "spent"
    REVOKED = "revoked"
    DEAD = "dead"


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


@dataclass(frozen=True)
class TokenView:
    token_id: str
    state: str
    link_expires_at: datetime
    code_expires_at: datetime
    code_hash: str
    code_attempts: int


@dataclass(frozen=True)
class Redemption:
    ok: bool
    reason: str | None = None
    count_wrong_code: bool = False
    kill: bool = False


def redeem_by_token(token: TokenView | None, now: datetime) -> Redemption:
    if token is None or token.state in (State.REVOKED, State.DEAD):
        return Redemption(False, Reason.TOKEN_INVALID)
    if token.state in (State.SPENT, State.RESERVED):
        return Redemption(False, Reason.TOKEN_USED)
    if now >= token.link_expires_at:
        return Redemption(False, Reason.TOKEN_EXPIRED)
    return Redemption(True)


def redeem_by_code(token: TokenView | None, code: str, now: datetime, key: str, max_attempts: int) -> Redemption:
    if token is None or token.state == State.REVOKED:
        return Redemption(False, Reason.TOKEN_INVALID)
    if token.state == State.DEAD or token.code_attempts >= max_attempts:
        return Redemption(False, Reason.CODE_ATTEMPTS_EXCEEDED)
    if token.state in (State.SPENT, State.RESERVED):
        return Redemption(False, Reason.TOKEN_USED)
    if now >= token.code_expires_at:
        return Redemption(False, Reason.TOKEN_EXPIRED)
    if not constant_time_equal(code_hash(key, token.token_id, code), token.code_hash):
        exhausted = token.code_attempts + 1 >= max_attempts
        return Redemption(
            False,
            Reason.CODE_ATTEMPTS_EXCEEDED if exhausted else Reason.TOKEN_INVALID,
            count_wrong_code=True,
            kill=exhausted,
        )
    return Redemption(True)


def expiries(now: datetime, link_ttl_s: int, code_ttl_s: int) -> tuple[datetime, datetime]:
    return now + timedelta(seconds=link_ttl_s), now + timedelta(seconds=code_ttl_s)
