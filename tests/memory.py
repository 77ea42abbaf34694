"""Helpers for in-memory stores in tests: the same intent operations as the real stores, staged
and applied at commit, as `shared.store.ServiceStore.commit` applies its `Write`s."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Thunk = Callable[[], Awaitable[None]]


def staged(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Thunk]:
    """Turn an in-memory write `async def op(self, *args)` into an intent operation: calling it
    stages the write (returns a thunk); the memory store's commit applies it."""

    @functools.wraps(fn)
    def stage(self: Any, *args: Any, **kwargs: Any) -> Thunk:
        async def apply() -> None:
            await fn(self, *args, **kwargs)

        return apply

    return stage


def staged_many(fn: Callable[..., Awaitable[Any]]) -> Callable[..., list[Thunk]]:
    """As `staged`, for an intent whose real counterpart returns a list of writes."""
    one = staged(fn)

    @functools.wraps(fn)
    def stage(self: Any, *args: Any, **kwargs: Any) -> list[Thunk]:
        return [one(self, *args, **kwargs)]

    return stage


async def apply_all(writes: Iterable[Thunk] | Callable[[Any], Awaitable[None]] | None) -> None:
    """Apply staged writes in order (a legacy session callable is called with no session)."""
    if writes is None:
        return
    if callable(writes):
        await writes(None)
        return
    for write in writes:
        await write()
