"""What the client raises."""

from __future__ import annotations


class ClaveError(Exception):
    """A request the client could not make (bad arguments, client not started)."""


class ClaveTimeout(ClaveError, TimeoutError):
    """No answer within the deadline. The request may still be processed: ask again with the
    same id (a reset or a check with a new one) rather than assuming it failed."""
