"""Settings of the development workbench (portal stand-in, demo, bench, tests).

The workbench plays every part on a development machine, so it reads every service's
section; it never ships to production and no service imports it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

from services.identity.settings import IdentitySettings
from services.notifier.settings import NotifierSettings
from services.password.settings import PasswordSettings
from services.tokens.settings import TokensSettings
from shared import contract
from shared.settings import PlatformSettings, load

S = TypeVar("S", bound=PlatformSettings)

# The service list is the contract table's (shared/contract.py), never written out again.
SERVICES: tuple[str, ...] = tuple(contract.SERVICES)
# The services a recovery passes through (the audit service only reads their audit events).
RECOVERY_SERVICES: tuple[str, ...] = tuple(s for s in SERVICES if s != "audit")


class WorkbenchSettings(IdentitySettings, TokensSettings, NotifierSettings, PasswordSettings):
    mail_dir: str = "var/mail"  # where the local mail catcher writes .eml files


def workbench_settings() -> WorkbenchSettings:
    return load(WorkbenchSettings)


def metrics_url(settings: PlatformSettings, service: str, path: str = "/metrics") -> str:
    """A service's metrics (or /healthz, /readyz) endpoint on the local stack."""
    return f"http://{settings.metrics_host}:{settings.metrics_port(service)}{path}"


def principal_properties(principal: str) -> Path:
    """The local stack's client settings for a Kafka principal (written by `make up`)."""
    return Path(os.environ.get("VAR_DIR", "var")) / "secrets" / "kafka" / f"{principal}.properties"


def as_principal(settings: S, principal: str) -> S:
    """`settings` connecting to Kafka as `principal` (see shared/acl.py) on the local stack.
    Fails when its properties file is missing rather than falling back to another principal."""
    path = principal_properties(principal)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no Kafka client settings for {principal!r} (the local stack writes them)")
    return settings.model_copy(update={"kafka_client_properties": str(path.resolve())})
