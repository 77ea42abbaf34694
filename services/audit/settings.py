"""The audit read model's settings: the platform's alone (it checks the audit chain)."""

from __future__ import annotations

from shared.settings import PlatformSettings


class AuditSettings(PlatformSettings):
    pass
