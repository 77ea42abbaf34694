"""Settings of the development workbench (portal stand-in, demo, bench, tests).

The workbench plays every part on a development machine, so it reads every service's
section; it never ships to production and no service imports it."""

from __future__ import annotations

from services.identity.settings import IdentitySettings
from services.notifier.settings import NotifierSettings
from services.password.settings import PasswordSettings
from services.tokens.settings import TokensSettings
from shared.settings import load


class WorkbenchSettings(IdentitySettings, TokensSettings, NotifierSettings, PasswordSettings):
    mail_dir: str = "var/mail"  # where the local mail catcher writes .eml files


def workbench_settings() -> WorkbenchSettings:
    return load(WorkbenchSettings)
