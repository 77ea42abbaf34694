"""DKIM: every mail leaves signed, and dkimpy's verifier accepts it against the published key
(the e2e twin checks a mail captured from the running stack)."""

from __future__ import annotations

import base64
import importlib.metadata
import time
import types
from datetime import UTC, datetime

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.notifier import signing
from services.notifier.rendering import MailRenderer, build_message
from services.notifier.signing import SIGNED_HEADERS, DkimKeyError, DkimSigner, envelope, key_problems


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


# --- The RSA step by OpenSSL (signing.py's adapter over dkimpy 1.1.8) ----------------------


class PurePythonRsaRan(Exception):
    pass


def dkimpy_alone(data: bytes, pem: bytes) -> bytes:
    """What the notifier sent before: dkimpy end to end, its pure-Python RSA included."""
    headers = [h for h in SIGNED_HEADERS if h + b":" in data.lower()]
    return bytes(
        dkim.sign(
            data, b"clave1", b"clave.example.org", pem, canonicalize=(b"relaxed", b"relaxed"), include_headers=headers
        )
    )


def test_the_openssl_signature_is_byte_for_byte_dkimpys_own_and_verifies(pem: bytes, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    now = int(time.time())
    monkeypatch.setattr(dkim, "time", types.SimpleNamespace(time=lambda: now))  # one t= tag for both
    for to in ("maria.perez@example.org", "maría.pérez@example.org"):
        data = envelope(mail(to), None).data  # type: ignore[arg-type]
        signed = DkimSigner("clave1", "clave.example.org", pem).sign(data)
        # RSASSA-PKCS1-v1_5 is deterministic: same key, same header hash, same signature.
        assert signed == dkimpy_alone(data, pem) + data
        assert b"a=rsa-sha256" in signed and b"c=relaxed/relaxed" in signed
        published = {"clave1._domainkey.clave.example.org": record(pem)}
        assert dkim.verify(signed, dnsfunc=dns(published))
        assert not dkim.verify(signed.replace(b"portal", b"p0rtal"), dnsfunc=dns(published))


def test_the_pure_python_rsa_never_runs_and_dkim_is_left_as_it_was(pem: bytes, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Importing signing.py replaced nothing in dkim's namespace (dkim.verify, ARC, other users).
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkim.crypto.RSASSA_PKCS1_v1_5_sign

    def refuse(*_: object) -> bytes:
        raise PurePythonRsaRan

    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", refuse)
    monkeypatch.setattr(dkim.crypto, "rsa_decrypt", refuse)
    data = envelope(mail("maria.perez@example.org"), None).data  # type: ignore[arg-type]
    with pytest.raises(PurePythonRsaRan):  # the trap is live: dkimpy alone falls into it
        dkimpy_alone(data, pem)
    signed = DkimSigner("clave1", "clave.example.org", pem).sign(data)
    assert dkim.verify(signed, dnsfunc=dns({"clave1._domainkey.clave.example.org": record(pem)}))


def test_the_seam_is_where_the_pinned_dkimpy_has_it() -> None:
    # Fails on a dkimpy upgrade that moves the RSA step: re-read dkim/__init__.py gen_header,
    # then adjust signing.py's adapter (and this pin, also in pyproject.toml).
    assert importlib.metadata.version("dkimpy") == "1.1.8"
    assert signing.SEAM in dkim.DomainSigner.gen_header.__code__.co_names
    assert "gen_header" in dkim.DKIM.sign.__code__.co_names
    # And the adapter refuses, at import, a function that no longer calls it.
    with pytest.raises(ImportError, match="dkimpy changed"):
        signing._with_openssl_rsa(dkim.DomainSigner.verify_sig)


def test_the_key_is_loaded_once_per_signer_and_kept_out_of_its_repr(pem: bytes, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    signer = DkimSigner("clave1", "clave.example.org", pem)
    published = {"clave1._domainkey.clave.example.org": record(pem)}

    def no_more_loading(*_: object, **__: object) -> None:
        raise AssertionError("the key was loaded again")

    monkeypatch.setattr(signing.serialization, "load_pem_private_key", no_more_loading)
    data = envelope(mail("maria.perez@example.org"), None).data  # type: ignore[arg-type]
    assert all(dkim.verify(signer.sign(data), dnsfunc=dns(published)) for _ in range(3))
    assert "PRIVATE" not in repr(signer) and "clave1" in repr(signer)


def small_rsa_pem() -> bytes:
    """A 512-bit RSA key (two fixed 256-bit primes): `cryptography` no longer makes keys this short."""
    p = 94631882234905537146642160300130558588113280809199935902442893843258688602137
    q = 94865155303109769734879373083994094803275626002184369845792468302483834213953
    d = rsa.rsa_recover_private_exponent(65537, p, q)
    numbers = rsa.RSAPrivateNumbers(
        p,
        q,
        d,
        rsa.rsa_crt_dmp1(d, p),
        rsa.rsa_crt_dmq1(d, q),
        rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(65537, p * q),
    )
    return numbers.private_key().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def test_keys_that_cannot_sign_for_receivers_are_refused() -> None:
    ec_pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(DkimKeyError, match="not an RSA key"):
        DkimSigner("clave1", "clave.example.org", ec_pem)
    with pytest.raises(DkimKeyError, match="512 bits"):
        DkimSigner("clave1", "clave.example.org", small_rsa_pem())
    locked = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    with pytest.raises(DkimKeyError, match="cannot load it"):
        DkimSigner("clave1", "clave.example.org", locked)


def test_a_pkcs8_key_signs_as_well(pem: bytes) -> None:
    key = serialization.load_pem_private_key(pem, password=None)
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    sent = envelope(mail("maria.perez@example.org"), DkimSigner("clave1", "clave.example.org", pkcs8))  # type: ignore[arg-type]
    assert dkim.verify(sent.data, dnsfunc=dns({"clave1._domainkey.clave.example.org": record(pem)}))
