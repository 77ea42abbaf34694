"""Notifier's settings: the SMTP relay, the sender identity, templates, the link's base
and the keys that open the link and code sealed for it."""

from __future__ import annotations

import email.utils

from pydantic import PositiveInt

from services.notifier.signing import key_problems
from shared.settings import DEV_NOTIFIER_KEY, PlatformSettings


class NotifierSettings(PlatformSettings):
    notifier_keys: str = DEV_NOTIFIER_KEY
    # A sealed link and code older than this is dead-lettered (`sealed_expired`), not mailed:
    # the link's own lifetime (LINK_TTL_S), after which the mail would carry a dead link.
    sealed_secrets_ttl_s: PositiveInt = 30 * 60

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 1025
    smtp_username: str = ""
    smtp_password: str = ""
    # STARTTLS required (true) or opportunistic (false: used when the server offers it).
    smtp_starttls: bool = False
    smtp_implicit_tls: bool = False  # TLS from the first byte (port 465)
    smtp_timeout_s: float = 10.0
    smtp_max_attempts: int = 8
    smtp_backoff_initial_s: float = 0.5
    smtp_backoff_max_s: float = 30.0
    mail_from: str = "Clave <no-reply@clave.example.org>"
    mail_reply_to: str = "soporte@clave.example.org"
    templates_dir: str = ""  # overrides shipped templates, file by file
    portal_base_url: str = "http://127.0.0.1:8000"  # the reference page (`make portal`)
    # DKIM (services/notifier/signing.py): every mail is signed with this private key (a PEM
    # file, RSA 2048); receivers find its public key at <selector>._domainkey.<domain> in DNS.
    # Rotation by selector: publish the new record, switch selector and key, drop the old record.
    dkim_private_key: str = ""
    dkim_selector: str = "clave1"
    dkim_domain: str = ""  # default: the domain of MAIL_FROM (DMARC alignment wants the same)

    def signing_domain(self) -> str:
        return self.dkim_domain or email.utils.parseaddr(self.mail_from)[1].rpartition("@")[2]

    def fernet_keys(self) -> dict[str, str]:
        return {**super().fernet_keys(), "NOTIFIER_KEYS": self.notifier_keys}

    def smtp_tls_mode(self) -> bool | None:
        """aiosmtplib's `start_tls`: True requires STARTTLS, None upgrades when offered."""
        return True if self.smtp_starttls else None

    def problems(self) -> list[str]:
        found = super().problems()
        if not (self.smtp_starttls or self.smtp_implicit_tls):
            found.append("SMTP_STARTTLS/SMTP_IMPLICIT_TLS: mail would leave without required TLS")
        if not self.signing_domain():
            found.append("DKIM_DOMAIN: no signing domain (and MAIL_FROM names none)")
        elif not self.dkim_private_key:
            found.append("DKIM_PRIVATE_KEY: not set: mail would leave unsigned (receivers file it as spam)")
        else:
            found += key_problems(self.dkim_private_key, self.dkim_selector, self.signing_domain())
        if not self.portal_base_url.lower().startswith("https://"):
            found.append("PORTAL_BASE_URL: the recovery link must be https://")
        return found
