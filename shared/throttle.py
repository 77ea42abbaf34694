"""Throttling guesses without handing a stranger a lock-out: the design identity's recovery
lockout introduced (issue 8), as pure rules other services reuse (the password service's
credential checks). No I/O.

Failures count three ways: per principal (an account, or an ID with no account) across all
addresses, per (principal, address block), and per address block across all principals.

- block lock: `block_max_failures` from one block against one principal within
  `block_window` lock that block out of that principal for `block_lock`. Other blocks, the
  owner's among them, are not affected;
- slowed mode: `account_max_failures` against one principal within `account_window`, all
  blocks together, cap guessing from many addresses: each block may then fail once per
  `slowed_interval` (a block's first try in the interval is still evaluated, so the owner
  from their own address gets in at once);
- address limit: `address_max_failures` from one block within `address_window`, whatever the
  principals, refuse that block before any hashing (it is the requester's own address: the
  refusal tells them nothing they do not know).

An address block is what one subscriber controls: an IPv4 address, or an IPv6 /64.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum


def address_block(client_ip: str) -> str:
    """The unit that address limits count: an IPv4 address, or an IPv6 /64.

    One subscriber gets a whole /64 (RFC 6177), so counting /128s would give an attacker
    2**64 fresh buckets; an IPv4-mapped IPv6 address (::ffff:a.b.c.d) is the IPv4 address
    it maps, and a zone index (fe80::1%eth0) names the interface, not another host.
    Raises ValueError for anything that is not an IP address."""
    address = ipaddress.ip_address(client_ip)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))  # int() drops the zone
    return str(address)


def address_block_or_none(client_ip: str | None) -> str | None:
    """For internal events, where the address is optional and only shape-checked."""
    if client_ip is None:
        return None
    try:
        return address_block(client_ip)
    except ValueError:
        return None


def within(times: Iterable[datetime], now: datetime, window: timedelta) -> int:
    """How many of `times` fall in the window that ends now (the start excluded)."""
    return sum(1 for t in times if t > now - window)


@dataclass(frozen=True)
class ThrottleLimits:
    block_max_failures: int = 5
    block_window: timedelta = timedelta(minutes=15)
    block_lock: timedelta = timedelta(minutes=30)
    account_max_failures: int = 20
    account_window: timedelta = timedelta(hours=24)
    slowed_interval: timedelta = timedelta(hours=1)
    address_max_failures: int = 30
    address_window: timedelta = timedelta(minutes=15)

    def keep(self) -> int:
        """How many failure times a counter must keep to apply these limits."""
        return max(self.block_max_failures, self.account_max_failures, self.address_max_failures) + 1

    def retention(self) -> timedelta:
        """How long a counter must outlive its last change."""
        return max(self.block_window, self.block_lock, self.account_window, self.slowed_interval, self.address_window)


@dataclass(frozen=True)
class ThrottleState:
    """The counters one attempt touches, as read before deciding."""

    rev: int = 0  # the principal's revision: a decision is applied only to the state it saw
    principal_failures: tuple[datetime, ...] = ()
    block_failures: tuple[datetime, ...] = ()
    locked_until: datetime | None = None
    address_failures: tuple[datetime, ...] = ()


class Gate(StrEnum):
    OPEN = "open"  # evaluate the attempt
    ADDRESS_LIMITED = "address_limited"  # the block failed too often, any principal: refuse before any work
    BLOCK_LOCKED = "block_locked"  # this block is locked out of this principal
    SLOWED = "slowed"  # slowed mode, and this block already failed in this interval


def address_limited(state: ThrottleState, limits: ThrottleLimits, now: datetime) -> bool:
    return within(state.address_failures, now, limits.address_window) >= limits.address_max_failures


def block_locked(locked_until: datetime | None, now: datetime) -> bool:
    return locked_until is not None and locked_until > now


def slowed(principal_failures: Iterable[datetime], limits: ThrottleLimits, now: datetime) -> bool:
    return within(principal_failures, now, limits.account_window) >= limits.account_max_failures


def gate(state: ThrottleState, limits: ThrottleLimits, now: datetime) -> Gate:
    """May this attempt be evaluated? Refusals never depend on whether the principal exists."""
    if address_limited(state, limits, now):
        return Gate.ADDRESS_LIMITED
    if block_locked(state.locked_until, now):
        return Gate.BLOCK_LOCKED
    if slowed(state.principal_failures, limits, now) and within(state.block_failures, now, limits.slowed_interval):
        return Gate.SLOWED
    return Gate.OPEN


@dataclass(frozen=True)
class FailureEffect:
    """What one more counted failure does."""

    lock_until: datetime | None  # this block is now locked out of the principal until then
    slows: bool  # this failure puts the principal in slowed mode


def failure_effect(state: ThrottleState, limits: ThrottleLimits, now: datetime) -> FailureEffect:
    locks = within(state.block_failures, now, limits.block_window) + 1 >= limits.block_max_failures
    slows = within(state.principal_failures, now, limits.account_window) + 1 == limits.account_max_failures
    return FailureEffect(now + limits.block_lock if locks else None, slows)
