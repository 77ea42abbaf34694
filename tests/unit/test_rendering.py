"""Notifier e-mail rendering: templates, escaping, overrides, MIME structure."""

from __future__ import annotations

import html
from datetime import UTC, datetime, timedelta, timezone
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any

import pytest
from jinja2 import UndefinedError

from services.notifier.rendering import (
    KINDS,
    LANGUAGES,
    MailRenderer,
    RenderedMail,
    build_message,
    language_for,
    mask_email,
)

LINK = "https://portal.example.org/recuperar?token=AbC_123-xyz&r=42"
CODE = "482913"

CONTEXT: dict[str, dict[str, Any]] = {
    "recovery_link": {"name": "María Pérez", "link": LINK, "code": CODE,
                      "link_minutes": 30, "code_minutes": 10},
    "password_changed": {"name": "María Pérez", "changed_at": "25/11/2026 13:14 (ECT)"},
    "account_locked": {"name": "María Pérez", "unlock_minutes": 15},
    "email_changed_old": {"name": "María Pérez", "new_email_masked": "m***z@example.org",
                          "changed_at": "25/11/2026 13:14 (ECT)"},
    "email_changed_new": {"name": "María Pérez"},
    "recovery_elsewhere": {"name": "María Pérez", "sent_to_masked": "m***@example.net", "sent_at": "25/11/2026 13:14"},
    "contact_changed": {
        "name": "María Pérez",
        "changes": "correo principal n***@example.org; teléfono eliminado",
        "changed_at": "25/11/2026 13:14 (ECT)",
    },
    "email_change_requested_old": {"name": "María Pérez", "new_email_masked": "m***z@example.org",
                                   "requested_at": "2026-11-25 13:14 UTC", "not_before": "2026-11-26 13:14 UTC"},
    "email_change_requested_new": {"name": "María Pérez", "requested_at": "2026-11-25 13:14 UTC",
                                   "not_before": "2026-11-26 13:14 UTC"},
    "email_change_cancelled_old": {"name": "María Pérez", "new_email_masked": "m***z@example.org",
                                   "cancelled_at": "2026-11-25 18:02 UTC"},
    "email_change_cancelled_new": {"name": "María Pérez", "cancelled_at": "2026-11-25 18:02 UTC"},
}

RENDERER = MailRenderer()


def test_context_table_covers_every_kind() -> None:
    assert set(CONTEXT) == set(KINDS)
    for kind, needed in KINDS.items():
        assert set(CONTEXT[kind]) == needed


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_renders_in_both_languages(kind: str, lang: str) -> None:
    mail = RENDERER.render(kind, lang, **CONTEXT[kind])
    assert mail.language == lang
    assert mail.subject and "\n" not in mail.subject
    assert "Clave" in mail.subject
    assert "María Pérez" in mail.text
    assert "María Pérez" in mail.html
    assert f'<html lang="{lang}">' in mail.html
    assert "<title>" in mail.html
    # Self-contained HTML: no external images, style sheets or scripts.
    for forbidden in ("<img", "<link", "<script", "src="):
        assert forbidden not in mail.html
    # Every variable the caller passed shows up in both parts.
    for value in CONTEXT[kind].values():
        assert str(value) in mail.text
        assert html.escape(str(value)) in mail.html


def test_spanish_is_formal_and_english_is_english() -> None:
    es = RENDERER.render("recovery_link", "es", **CONTEXT["recovery_link"])
    en = RENDERER.render("recovery_link", "en", **CONTEXT["recovery_link"])
    assert "usted" in es.text and "Estimado/a" in es.text
    assert "tú" not in es.text.split()
    assert "Dear" in en.text and "password" in en.text


@pytest.mark.parametrize("lang", LANGUAGES)
def test_recovery_link_content(lang: str) -> None:
    mail = RENDERER.render("recovery_link", lang, **CONTEXT["recovery_link"])
    # The link in both parts; in HTML it is a clickable, visibly labelled link.
    assert LINK in mail.text
    escaped = html.escape(LINK)
    assert f'href="{escaped}"' in mail.html
    assert f">{escaped}</a>" in mail.html
    assert CODE in mail.text and CODE in mail.html
    assert "30" in mail.text and "10" in mail.text
    # Neither secret in the subject.
    assert CODE not in mail.subject
    assert LINK not in mail.subject and "http" not in mail.subject


@pytest.mark.parametrize("lang", LANGUAGES)
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_html_escapes_a_malicious_name(kind: str, lang: str) -> None:
    evil = "<script>alert(1)</script>"
    mail = RENDERER.render(kind, lang, **{**CONTEXT[kind], "name": evil})
    assert evil not in mail.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in mail.html
    # The text part is not markup, so it carries the name verbatim.
    assert evil in mail.text


@pytest.mark.parametrize("locale", ["qu", "fr-FR", "", None, "xx_YY", "  "])
def test_unknown_locale_falls_back_to_spanish(locale: str | None) -> None:
    mail = RENDERER.render("account_locked", locale, **CONTEXT["account_locked"])
    assert mail.language == "es"
    assert "Estimado/a" in mail.text


@pytest.mark.parametrize(("locale", "lang"),
                         [("en", "en"), ("EN", "en"), ("en-US", "en"), ("en_GB", "en"),
                          ("es", "es"), ("es-EC", "es"), ("es_EC", "es")])
def test_locale_tags_map_to_languages(locale: str, lang: str) -> None:
    assert language_for(locale) == lang


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown mail kind"):
        RENDERER.render("welcome", "es", name="x")
    with pytest.raises(ValueError):
        RENDERER.render("_layout", "es", name="x")


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_missing_variable_raises(kind: str) -> None:
    for var in KINDS[kind]:
        partial = {k: v for k, v in CONTEXT[kind].items() if k != var}
        with pytest.raises(UndefinedError):
            RENDERER.render(kind, "es", **partial)


def test_email_changed_new_shows_optional_date() -> None:
    mail = RENDERER.render("email_changed_new", "es", name="Ana", changed_at="hoy 10:00")
    assert "hoy 10:00" in mail.text and "hoy 10:00" in mail.html


def test_institution_is_configurable() -> None:
    renderer = MailRenderer(institution="Instituto de Seguridad Social")
    mail = renderer.render("password_changed", "es", **CONTEXT["password_changed"])
    assert mail.subject.startswith("Instituto de Seguridad Social:")
    assert "Instituto de Seguridad Social" in mail.text
    assert "Instituto de Seguridad Social" in mail.html


@pytest.mark.parametrize("bad", ["javascript:alert(1)", "data:text/html,hi", "/relative/path",
                                 "ftp://example.org/x", "https://"])
def test_link_must_be_an_absolute_web_url(bad: str) -> None:
    with pytest.raises(ValueError, match="link"):
        RENDERER.render("recovery_link", "es", **{**CONTEXT["recovery_link"], "link": bad})


# ------------------------------------------------------------------ overrides


def test_override_dir_replaces_one_template(tmp_path: Path) -> None:
    (tmp_path / "password_changed.es.txt").write_text(
        "Hola {{ name }}, cambio registrado el {{ changed_at }}.\n", encoding="utf-8"
    )
    renderer = MailRenderer(override_dir=str(tmp_path))
    mail = renderer.render("password_changed", "es", **CONTEXT["password_changed"])
    assert mail.text == "Hola María Pérez, cambio registrado el 25/11/2026 13:14 (ECT).\n"
    # Everything else still comes from the shipped files.
    shipped = RENDERER.render("password_changed", "es", **CONTEXT["password_changed"])
    assert mail.subject == shipped.subject
    assert mail.html == shipped.html


def test_override_of_the_layout_restyles_every_html_part(tmp_path: Path) -> None:
    (tmp_path / "_layout.html").write_text(
        '<html lang="{{ lang }}"><body class="custom">{% block body %}{% endblock %}'
        "</body></html>",
        encoding="utf-8",
    )
    renderer = MailRenderer(override_dir=str(tmp_path))
    for kind in KINDS:
        assert 'class="custom"' in renderer.render(kind, "en", **CONTEXT[kind]).html


def test_override_html_is_still_autoescaped(tmp_path: Path) -> None:
    (tmp_path / "account_locked.en.html").write_text("<p>{{ name }}</p>", encoding="utf-8")
    renderer = MailRenderer(override_dir=str(tmp_path))
    mail = renderer.render("account_locked", "en", name="<b>x</b>", unlock_minutes=5)
    assert mail.html == "<p>&lt;b&gt;x&lt;/b&gt;</p>"


def test_override_subject_with_the_code_is_refused(tmp_path: Path) -> None:
    (tmp_path / "recovery_link.es.subject.txt").write_text("Su código: {{ code }}",
                                                           encoding="utf-8")
    renderer = MailRenderer(override_dir=str(tmp_path))
    with pytest.raises(ValueError, match="subject"):
        renderer.render("recovery_link", "es", **CONTEXT["recovery_link"])


def test_subject_is_collapsed_to_one_line(tmp_path: Path) -> None:
    (tmp_path / "account_locked.es.subject.txt").write_text("Cuenta\n  bloqueada\r\n",
                                                            encoding="utf-8")
    renderer = MailRenderer(override_dir=str(tmp_path))
    mail = renderer.render("account_locked", "es", **CONTEXT["account_locked"])
    assert mail.subject == "Cuenta bloqueada"


def test_missing_override_dir_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError):
        MailRenderer(override_dir=str(tmp_path / "nope"))


def test_empty_override_dir_means_none() -> None:
    mail = MailRenderer(override_dir="").render("email_changed_new", "en", name="Ana")
    assert "Ana" in mail.text


# ------------------------------------------------------------------ mask_email


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("maria.perez@example.org", "m***z@example.org"),
        ("ab@example.org", "a***@example.org"),
        ("a@example.org", "a***@example.org"),
        ("weird@local@example.org", "w***l@example.org"),
    ],
)
def test_mask_email(address: str, masked: str) -> None:
    assert mask_email(address) == masked


@pytest.mark.parametrize("bad", ["", "no-at-sign", "@example.org", "user@"])
def test_mask_email_refuses_non_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        mask_email(bad)


# ------------------------------------------------------------------ build_message

WHEN = datetime(2026, 11, 25, 13, 14, tzinfo=timezone(timedelta(hours=-5)))


def _message(rendered: RenderedMail | None = None) -> Any:
    rendered = rendered or RENDERER.render("recovery_link", "es", **CONTEXT["recovery_link"])
    return build_message(
        rendered,
        to="María Pérez <maria.perez@example.org>",
        mail_from="Clave <no-reply@clave.example.org>",
        reply_to="soporte@clave.example.org",
        message_id="<3f2a9c1e-0000-4000-8000-000000000001.recovery_link@clave>",
        date=WHEN,
    )


def test_build_message_headers() -> None:
    msg = _message()
    assert msg["Subject"] == "Clave: recuperación de su clave"
    assert msg["From"] == "Clave <no-reply@clave.example.org>"
    assert msg["To"] == "María Pérez <maria.perez@example.org>"
    assert msg["Reply-To"] == "soporte@clave.example.org"
    assert msg["Date"] == "Wed, 25 Nov 2026 13:14:00 -0500"
    assert msg["Message-ID"] == "<3f2a9c1e-0000-4000-8000-000000000001.recovery_link@clave>"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["Content-Language"] == "es"


def test_build_message_is_multipart_alternative_with_text_and_html() -> None:
    msg = _message()
    assert msg.get_content_type() == "multipart/alternative"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "text/html"]
    assert LINK in parts[0].get_content()
    assert html.escape(LINK) in parts[1].get_content()


def test_build_message_survives_serialisation() -> None:
    # What the SMTP client will send: bytes, non-ASCII headers encoded, and the
    # parsed result equal to what went in.
    raw = _message().as_bytes(policy=policy.SMTP)
    raw.decode("ascii")  # every byte is 7-bit safe or properly encoded
    parsed = message_from_bytes(raw, policy=policy.default)
    assert parsed["Subject"] == "Clave: recuperación de su clave"
    assert parsed["To"] == "María Pérez <maria.perez@example.org>"
    body = parsed.get_body(preferencelist=("plain",))
    assert body is not None and CODE in body.get_content()


def test_build_message_content_language_follows_the_mail() -> None:
    rendered = RENDERER.render("email_changed_new", "en-US", name="Ana")
    assert _message(rendered)["Content-Language"] == "en"


def test_build_message_refuses_naive_date_and_bad_message_id() -> None:
    rendered = RenderedMail(subject="s", text="t", html="<p>h</p>")
    common: dict[str, Any] = {"to": "a@example.org", "mail_from": "b@example.org",
                              "reply_to": "c@example.org"}
    with pytest.raises(ValueError, match="timezone"):
        build_message(rendered, message_id="<x@clave>", date=datetime(2026, 1, 1), **common)
    with pytest.raises(ValueError, match="message_id"):
        build_message(rendered, message_id="x@clave", date=datetime.now(UTC), **common)
