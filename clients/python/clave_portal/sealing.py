"""The seam for sealed input: every payload the client sends passes through its `InputSealer`
before it is wrapped in an event. `PlainInput` (the default) sends the fields as typed, which
Clave accepts with `PORTAL_INPUT=any` (development). A sealer for production replaces the
secret fields (`answers`, `new_password`, `key`) with their sealed forms (`sealed_answers`,
`sealed_new_password`, `sealed_key`) for Clave's public key."""

from __future__ import annotations

from typing import Any, Protocol


class InputSealer(Protocol):
    def seal(self, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        """`data` as it should travel: its secret fields sealed (a new dict; never mutate)."""
        ...


class PlainInput:
    """No sealing: the secret fields travel as typed (development, `PORTAL_INPUT=any`)."""

    def seal(self, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
        return dict(data)
