"""DKIM: every mail leaves signed, and dkimpy's verifier accepts it against the published key
(the e2e twin checks a mail captured from the running stack)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from services.notifier.rendering import MailRenderer, build_message
from services.notifier.signing import DkimKeyError, DkimSigner, envelope, key_problems


def rsa_pem() -> bytes:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def record(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    der = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)


def dns(published: dict[str, bytes]):  # type: ignore[no-untyped-def]
    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return published.get(name.decode().rstrip("."))

    return lookup


def mail(to: str = "maría.pérez@example.org") -> object:
    rendered = MailRenderer().render(
        "recovery_link", "es", name="María", link="https://portal/x", code="123456", link_minutes=30, code_minutes=15
    )
    return build_message(
        rendered,
        to=to,
        mail_from="Clave <no-reply@clave.example.org>",
        reply_to="soporte@clave.example.org",
        message_id="<abc@clave.example.org>",
        date=datetime.now(UTC),
    )


@pytest.fixture(scope="module")
def pem() -> bytes:
    return rsa_pem()


def test_a_signed_mail_verifies_against_the_published_record(pem: bytes) -> None:
    signer = DkimSigner("clave1", "clave.example.org", pem)
    sent = envelope(mail("maria.perez@example.org"), signer)  # type: ignore[arg-type]
    assert sent.data.startswith(b"DKIM-Signature:")
    assert sent.sender == "no-reply@clave.example.org" and sent.recipients == ["maria.perez@example.org"]
    assert not sent.utf8
    published = {"clave1._domainkey.clave.example.org": record(pem)}
    assert dkim.verify(sent.data, dnsfunc=dns(published))
    # Signed: From, To, Subject, the date and the body; a changed link or sender fails.
    assert b"h=from:to:subject:date:message-id" in sent.data.replace(b"\r\n ", b"").replace(b" ", b"")
    assert not dkim.verify(sent.data.replace(b"portal", b"p0rtal"), dnsfunc=dns(published))
    assert not dkim.verify(sent.data.replace(b"no-reply@", b"no-repIy@", 1), dnsfunc=dns(published))
    # Another key under the same name (a forger's) does not verify.
    assert not dkim.verify(sent.data, dnsfunc=dns({"clave1._domainkey.clave.example.org": record(rsa_pem())}))


def test_rotation_by_selector_keeps_mail_in_transit_verifiable(pem: bytes) -> None:
    old = envelope(mail(), DkimSigner("clave1", "clave.example.org", pem))  # type: ignore[arg-type]
    new_pem = rsa_pem()
    new = envelope(mail(), DkimSigner("clave2", "clave.example.org", new_pem))  # type: ignore[arg-type]
    both = {"clave1._domainkey.clave.example.org": record(pem), "clave2._domainkey.clave.example.org": record(new_pem)}
    assert dkim.verify(old.data, dnsfunc=dns(both)) and dkim.verify(new.data, dnsfunc=dns(both))
    assert old.utf8 and new.utf8  # an internationalised address goes out with SMTPUTF8


def test_an_unusable_key_is_refused_at_start(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DkimKeyError, match="DKIM_PRIVATE_KEY: cannot read"):
        DkimSigner.from_file(str(tmp_path / "missing.pem"), "clave1", "clave.example.org")
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN RSA PRIVATE KEY-----\nbm90IGEga2V5\n-----END RSA PRIVATE KEY-----\n")
    assert key_problems(str(bad), "clave1", "clave.example.org")
    good = tmp_path / "good.pem"
    good.write_bytes(rsa_pem())
    assert key_problems(str(good), "clave1", "clave.example.org") == []


def test_without_a_key_the_same_bytes_leave_unsigned() -> None:
    sent = envelope(mail("maria.perez@example.org"), None)  # type: ignore[arg-type]
    assert b"DKIM-Signature" not in sent.data and sent.data.startswith(b"Subject:")
