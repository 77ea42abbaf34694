"""Render the notifier's e-mails from jinja2 templates and wrap them as MIME.

Pure: the only I/O is reading template files. Each kind has, per language, three
plain files (``<kind>.<lang>.subject.txt``, ``<kind>.<lang>.txt``,
``<kind>.<lang>.html``) plus the shared ``_layout.html``, so an operator can
replace any single file by dropping one with the same name into the override
folder (``TEMPLATES_DIR``) — no code change, no redeploy of the package.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    PackageLoader,
    StrictUndefined,
    select_autoescape,
)

LANGUAGES: Final = ("es", "en")
DEFAULT_LANGUAGE: Final = "es"

# Variables each kind needs from the caller (``institution`` and ``lang`` are
# supplied by the renderer). email_changed_new also shows ``changed_at`` if given.
KINDS: Final[Mapping[str, frozenset[str]]] = {
    "recovery_link": frozenset({"name", "link", "code", "link_minutes", "code_minutes"}),
    "password_changed": frozenset({"name", "changed_at"}),
    "account_locked": frozenset({"name", "unlock_minutes"}),
    "email_changed_old": frozenset({"name", "new_email_masked", "changed_at"}),
    "email_changed_new": frozenset({"name"}),
    "email_change_requested_old": frozenset({"name", "new_email_masked", "requested_at", "not_before"}),
    "email_change_requested_new": frozenset({"name", "requested_at", "not_before"}),
    # A pending change an operator cancelled: both addresses are told it will not take effect.
    "email_change_cancelled_old": frozenset({"name", "new_email_masked", "cancelled_at"}),
    "email_change_cancelled_new": frozenset({"name", "cancelled_at"}),
    # A recovery sent to the backup address, told to the registered one.
    "recovery_elsewhere": frozenset({"name", "sent_to_masked", "sent_at"}),
    # Contact data changed (after a login): told to every address on file before the change.
    # `changes`: what changed, new values masked, in the citizen's language (domain.describe_changes).
    "contact_changed": frozenset({"name", "changes", "changed_at"}),
}

# Values that must never reach a subject line: subjects show up in lock-screen
# previews, mailbox listings and relay logs, where a code or link would leak.
_SECRET_VARS: Final = ("code", "link")

_SHIPPED_PACKAGE: Final = "services.notifier"
_SHIPPED_FOLDER: Final = "templates"


@dataclass(frozen=True)
class RenderedMail:
    subject: str
    text: str
    html: str
    # Carried along so the MIME message can declare Content-Language.
    language: str = DEFAULT_LANGUAGE


def language_for(locale: str | None) -> str:
    """``es``/``en`` from a locale such as ``en``, ``en-US`` or ``es_EC``; else ``es``.

    Unknown locales fall back to Spanish, the institution's language, rather
    than failing: a citizen must still get the e-mail.
    """
    primary = re.split(r"[-_]", (locale or "").strip(), maxsplit=1)[0].lower()
    return primary if primary in LANGUAGES else DEFAULT_LANGUAGE


class MailRenderer:
    def __init__(self, override_dir: str | None = None, institution: str = "Clave") -> None:
        loaders: list[BaseLoader] = []
        # "" is the settings default for "no override", so treat it like None.
        if override_dir:
            if not Path(override_dir).is_dir():
                # Fail at start-up: a typo would otherwise silently ship defaults.
                raise NotADirectoryError(f"template override folder not found: {override_dir}")
            loaders.append(FileSystemLoader(override_dir))
        loaders.append(PackageLoader(_SHIPPED_PACKAGE, _SHIPPED_FOLDER))
        self.institution = institution
        self._env = Environment(
            loader=ChoiceLoader(loaders),
            # Escape in .html only; the text parts and subjects are not markup.
            autoescape=select_autoescape(["html"]),
            # A missing variable must fail loudly, never send "Dear ,".
            undefined=StrictUndefined,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )

    def render(self, kind: str, locale: str | None, **context: Any) -> RenderedMail:
        """Render one e-mail; unknown ``kind`` -> ValueError, unknown locale -> es.

        A variable the templates need but ``context`` lacks raises
        ``jinja2.UndefinedError``.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown mail kind {kind!r}; expected one of {sorted(KINDS)}")
        if "link" in context:
            _require_web_link(str(context["link"]))
        lang = language_for(locale)
        variables = {"institution": self.institution, **context, "lang": lang}

        subject = self._env.get_template(f"{kind}.{lang}.subject.txt").render(variables)
        # One line, whatever the template's layout: a newline in a header is
        # either an error or a header-injection attempt.
        subject = " ".join(subject.split())
        for var in _SECRET_VARS:
            secret = str(context.get(var, ""))
            if secret and secret in subject:
                raise ValueError(f"the subject of {kind!r} must not contain the {var}")

        text = self._env.get_template(f"{kind}.{lang}.txt").render(variables)
        html = self._env.get_template(f"{kind}.{lang}.html").render(variables)
        return RenderedMail(subject=subject, text=text, html=html, language=lang)


def _require_web_link(link: str) -> None:
    # Autoescaping keeps markup out of href but not a "javascript:" or "data:"
    # URL; the link is built from PORTAL_BASE_URL, so anything else is a bug.
    parts = urlsplit(link)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("link must be an absolute http(s) URL")


def mask_email(address: str) -> str:
    """``maria.perez@example.org`` -> ``m***z@example.org``.

    Enough for the citizen to recognise the address, not enough to hand a
    stranger who reads the old mailbox the new one.
    """
    local, sep, domain = address.strip().rpartition("@")
    if not sep or not local or not domain:
        raise ValueError("not an e-mail address")
    masked = local[0] + "***" + (local[-1] if len(local) > 2 else "")
    return f"{masked}@{domain}"


def build_message(
    rendered: RenderedMail,
    *,
    to: str,
    mail_from: str,
    reply_to: str,
    message_id: str,
    date: datetime,
) -> EmailMessage:
    """A multipart/alternative message (text first, HTML preferred by clients).

    ``message_id`` comes from the caller, derived from the event id, so a
    retried send carries the same Message-ID and receiving systems can
    de-duplicate it.
    """
    if date.tzinfo is None or date.utcoffset() is None:
        raise ValueError("date must be timezone-aware")
    if not (message_id.startswith("<") and message_id.endswith(">") and "@" in message_id):
        raise ValueError("message_id must look like <unique@domain>")

    msg = EmailMessage()
    msg["Subject"] = rendered.subject
    msg["From"] = mail_from
    msg["To"] = to
    msg["Reply-To"] = reply_to
    msg["Date"] = email.utils.format_datetime(date)
    msg["Message-ID"] = message_id
    # RFC 3834: marks the mail as machine-sent so auto-responders stay quiet;
    # the X- header does the same for Exchange / Outlook.
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Auto-Response-Suppress"] = "All"
    msg.set_content(rendered.text)
    msg.add_alternative(rendered.html, subtype="html")
    # After the body: add_alternative moves every Content-* header that is
    # already present down into the text part.
    msg["Content-Language"] = rendered.language
    return msg
