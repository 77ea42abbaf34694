"""Waiting on a condition with a deadline, woken when what it looks at changes.

The mail reader and the topic watcher both call `Changes.notify()` when they have taken in
something new; a waiter re-checks its condition then (and at least every `poll_s`), never
sleeps a guessed time, and fails with what it waited for when the deadline passes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable


def deadline_of(timeout: float | None, deadline: float | None) -> float:
    """A monotonic deadline from `deadline` itself, else `timeout` seconds from now."""
    if deadline is not None:
        return deadline
    if timeout is None:
        raise ValueError("a wait needs a timeout or a deadline")
    return time.monotonic() + timeout


class Changes:
    """A wake-up for every waiter at once: each `notify` ends the current round of waits."""

    def __init__(self) -> None:
        self._event: asyncio.Event | None = None

    def notify(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None  # the next waiter waits for the next change

    async def wait(self, timeout: float) -> None:
        """Until the next `notify`, or `timeout` seconds."""
        if self._event is None:
            self._event = asyncio.Event()
        event = self._event
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=max(0.0, timeout))


async def until(
    condition: Callable[[], bool],
    changes: Changes,
    deadline: float,
    what: str,
    *,
    refresh: Callable[[], None] | None = None,
    poll_s: float = 1.0,
) -> None:
    """Return once `condition()` holds; `refresh` (called before each check) takes in news or
    raises what broke; TimeoutError naming `what` at `deadline` (monotonic)."""
    while True:
        if refresh is not None:
            refresh()
        if condition():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out waiting for {what}")
        await changes.wait(min(remaining, poll_s))
