"""The captcha hook: the page asks a `Captcha` whether a form came from a person.

Clave itself only reads `captcha_passed` (identity refuses a request without it, before
any other work). Which captcha a portal runs is its own choice, so the page takes one as
a parameter of `create_app`; the stand-in below is a checkbox for development only, and
production settings refuse it (PageSettings.problems).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


class Captcha(Protocol):
    def fields(self) -> str:
        """HTML to put in the form (a widget, or a checkbox for the stand-in)."""
        ...

    async def passed(self, form: Mapping[str, str], client_ip: str) -> bool:
        """Whether the submitted form proves a person (e.g. a provider's token checked server-side)."""
        ...


class StandInCaptcha:
    """A checkbox: enough to exercise the flow locally, worthless against a robot."""

    FIELD = "captcha_stand_in"

    def fields(self) -> str:
        return ""  # the template draws the checkbox with a label in the page's language

    async def passed(self, form: Mapping[str, str], client_ip: str) -> bool:
        return form.get(self.FIELD) == "yes"
