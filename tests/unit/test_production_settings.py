"""Fail closed: production (the default) refuses every unsafe setting, naming it, before
anything connects; development keeps working; each process loads only its own keys."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from services.audit.settings import AuditorSettings, AuditSettings
from services.identity.settings import IdentitySettings
from services.notifier.settings import NotifierSettings
from services.password.settings import PasswordSettings
from services.tokens.settings import TokensSettings
from shared.auditkeys import PublicKeyEntry, dev_signing_key, private_pem
from shared.settings import EXIT_UNSAFE_SETTINGS, ClientSettings, PlatformSettings, key_problems

ALL_CLASSES = (PlatformSettings, IdentitySettings, TokensSettings, NotifierSettings, PasswordSettings, AuditSettings)


def fernet() -> str:
    return Fernet.generate_key().decode()


def hmac_key() -> str:
    return secrets.token_urlsafe(32)


# These name files (a private key readable by its service alone; public keys): the path is
# printed to help, the key itself never.
FILE_SETTINGS = ("AUDIT_SIGNING_KEY", "AUDIT_PUBLIC_KEYS", "DKIM_PRIVATE_KEY", "PORTAL_SEALING_KEY")
KEY_DIR = Path(tempfile.mkdtemp(prefix="clave-audit-keys-"))
DKIM_KEY = KEY_DIR / "dkim.pem"
DKIM_KEY.write_bytes(
    rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
)


def signing_key_file(name: str, key: Ed25519PrivateKey | None = None) -> str:
    """An audit signing key as production gives it: a PEM file."""
    key = key or Ed25519PrivateKey.generate()
    path = KEY_DIR / f"{name}.pem"
    path.write_bytes(private_pem(key))
    (KEY_DIR / f"{name}.json").write_text(PublicKeyEntry.of(name, key.public_key()).model_dump_json(exclude_none=True))
    return str(path)


def sealing_key_file() -> str:
    """Clave's X25519 key for sealed portal input, as production gives it: a PEM file."""
    path = KEY_DIR / "portal-sealing.pem"
    path.write_bytes(X25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return str(path)


SAFE = {
    "CLAVE_ENV": "production",
    "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "MONGODB_URI": "mongodb://db1,db2,db3/?replicaSet=rs0&tls=true",
    "SMTP_STARTTLS": "true",
    "PORTAL_BASE_URL": "https://portal.example.org",
    "DLQ_KEYS": fernet(),
    "AUDIT_SIGNING_KEY": signing_key_file("service"),
    "AUDIT_PUBLIC_KEYS": str(KEY_DIR / "service.json"),
    "PSEUDONYM_KEY": hmac_key(),
    "CODE_HMAC_KEY": hmac_key(),
    "NOTIFIER_KEYS": fernet(),
    "PASSWORD_KEYS": f"{fernet()},{fernet()}",
    "PORTAL_SEALING_KEY": sealing_key_file(),
    "DKIM_PRIVATE_KEY": str(DKIM_KEY),
    "IMPORT_KEYS": fernet(),
}


# Every variable any settings class reads: the shell running the tests may set some (`make test`
# sets EMAIL_CHANGE_COOLING_OFF_S=10 for the stack), and a safe configuration must not
# depend on which.
SETTINGS_VARIABLES = {
    name.upper() for cls in (*ALL_CLASSES, AuditorSettings, ClientSettings) for name in cls.model_fields
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.upper() in SAFE or name.upper() in SETTINGS_VARIABLES:
            monkeypatch.delenv(name, raising=False)
    for name, value in SAFE.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_production_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAVE_ENV", raising=False)
    assert PlatformSettings().production


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_a_safe_production_configuration_passes(env: pytest.MonkeyPatch, cls: type[PlatformSettings]) -> None:
    assert cls().problems() == []


@pytest.mark.parametrize("cls", ALL_CLASSES)
def test_development_defaults_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, cls: type[PlatformSettings]) -> None:
    for name in list(os.environ):
        if name.upper() in SAFE:
            monkeypatch.delenv(name)
    problems = "\n".join(cls().problems())
    for name in {**cls().fernet_keys(), **cls().hmac_keys()}:
        assert f"{name}: a development key" in problems
    if cls.signs_audit:
        assert "AUDIT_SIGNING_KEY: not set (the development signing key is public" in problems
    assert "KAFKA_SECURITY_PROTOCOL" in problems
    assert "MONGODB_URI" in problems


@pytest.mark.parametrize(
    ("cls", "variable", "value", "named"),
    [
        (PlatformSettings, "KAFKA_SECURITY_PROTOCOL", "PLAINTEXT", "KAFKA_SECURITY_PROTOCOL"),
        (PlatformSettings, "KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT", "KAFKA_SECURITY_PROTOCOL"),
        (PlatformSettings, "MONGODB_URI", "mongodb://db1/?replicaSet=rs0", "MONGODB_URI"),
        (PlatformSettings, "MONGODB_URI", "mongodb+srv://cluster.example.org/?tls=false", "MONGODB_URI"),
        (PlatformSettings, "DLQ_KEYS", "c2hvcnQ=", "DLQ_KEYS"),
        (PlatformSettings, "AUDIT_SIGNING_KEY", signing_key_file("dev", dev_signing_key()), "AUDIT_SIGNING_KEY"),
        (PlatformSettings, "AUDIT_SIGNING_KEY", "/nonexistent/audit.pem", "AUDIT_SIGNING_KEY: cannot read"),
        (AuditSettings, "AUDIT_PUBLIC_KEYS", "", "AUDIT_PUBLIC_KEYS: not set"),
        (AuditorSettings, "AUDIT_PUBLIC_KEYS", "/nonexistent", "AUDIT_PUBLIC_KEYS"),
        (AuditSettings, "AUDIT_HMAC_KEY", "correct-horse-battery-staple-correct-horse", "AUDIT_HMAC_KEY"),
        (IdentitySettings, "PSEUDONYM_KEY", secrets.token_urlsafe(16), "PSEUDONYM_KEY"),
        (TokensSettings, "CODE_HMAC_KEY", "not base64 !", "CODE_HMAC_KEY"),
        (TokensSettings, "PASSWORD_KEYS", f"{Fernet.generate_key().decode()},c2hvcnQ=", "PASSWORD_KEYS: key 2 of 2"),
        (NotifierSettings, "SMTP_STARTTLS", "false", "SMTP_STARTTLS"),
        (NotifierSettings, "PORTAL_BASE_URL", "http://portal.example.org", "PORTAL_BASE_URL"),
        (NotifierSettings, "DKIM_PRIVATE_KEY", "", "DKIM_PRIVATE_KEY: not set"),
        (NotifierSettings, "DKIM_PRIVATE_KEY", "/nonexistent/dkim.pem", "DKIM_PRIVATE_KEY: cannot read"),
        (NotifierSettings, "DKIM_PRIVATE_KEY", signing_key_file("not-rsa"), "DKIM_PRIVATE_KEY"),
        (IdentitySettings, "ARGON2_MEMORY_KIB", "8192", "ARGON2_MEMORY_KIB"),
        (PasswordSettings, "ARGON2_TIME_COST", "1", "ARGON2_MEMORY_KIB/ARGON2_TIME_COST"),
        (IdentitySettings, "PORTAL_INPUT", "any", "PORTAL_INPUT: any accepts"),
        (TokensSettings, "PORTAL_SEALING_KEY", "", "PORTAL_SEALING_KEY: not set"),
        (PasswordSettings, "PORTAL_SEALING_KEY", "/nonexistent/sealing.pem", "PORTAL_SEALING_KEY: cannot read"),
        (IdentitySettings, "PORTAL_SEALING_KEY", signing_key_file("ed"), "PORTAL_SEALING_KEY: not an X25519 key"),
        (
            TokensSettings,
            "PORTAL_SEALING_KEY",
            f"{SAFE['PORTAL_SEALING_KEY']},/nonexistent",
            "PORTAL_SEALING_KEY: key 2",
        ),
    ],
)
def test_each_unsafe_setting_is_named(
    env: pytest.MonkeyPatch, cls: type[PlatformSettings], variable: str, value: str, named: str
) -> None:
    env.setenv(variable, value)
    problems = cls().problems()
    assert any(p.startswith(named) for p in problems), problems
    if "KEY" in variable and variable not in FILE_SETTINGS and value:
        assert all(value not in p for p in problems), "a key's value must never be printed"


def test_implicit_tls_satisfies_the_smtp_rule(env: pytest.MonkeyPatch) -> None:
    env.setenv("SMTP_STARTTLS", "false")
    env.setenv("SMTP_IMPLICIT_TLS", "true")
    assert NotifierSettings().problems() == []


def test_equal_strength_argon2_rows_are_accepted(env: pytest.MonkeyPatch) -> None:
    env.setenv("ARGON2_MEMORY_KIB", "47104")
    env.setenv("ARGON2_TIME_COST", "1")
    assert PasswordSettings().problems() == []


def test_random_hex_and_base64_keys_of_32_bytes_pass() -> None:
    assert key_problems(secrets.token_hex(32), fernet=False) == []
    assert key_problems(secrets.token_urlsafe(32), fernet=False) == []
    assert key_problems(secrets.token_urlsafe(31), fernet=False) != []


def test_development_starttls_is_opportunistic_never_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMTP_STARTTLS", raising=False)
    assert NotifierSettings().smtp_tls_mode() is None  # aiosmtplib: upgrade when offered
    monkeypatch.setenv("SMTP_STARTTLS", "true")
    assert NotifierSettings().smtp_tls_mode() is True


def test_portal_input_is_sealed_in_production_and_open_in_development(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PORTAL_INPUT", raising=False)
    assert IdentitySettings().portal_input_mode(production=True) == "sealed"
    assert IdentitySettings().portal_input_mode(production=False) == "any"
    monkeypatch.setenv("PORTAL_INPUT", "sealed")
    assert TokensSettings().portal_input_mode(production=False) == "sealed"
    monkeypatch.setenv("PORTAL_INPUT", "clear")
    with pytest.raises(ValueError, match="portal_input"):
        PasswordSettings()


def test_development_mode_is_not_gated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAVE_ENV", "development")
    PlatformSettings().ensure_safe("test")  # does not exit


def key_fields(cls: type[PlatformSettings]) -> set[str]:
    return {name for name in cls.model_fields if name.endswith(("_keys", "_key"))}


def test_each_process_loads_only_the_keys_it_uses() -> None:
    platform = {"dlq_keys", "audit_signing_key"}
    portal = {"portal_sealing_key"}  # the readers of sealed portal input: answers, new keys, login keys
    assert key_fields(IdentitySettings) == platform | portal | {"pseudonym_key", "password_keys", "import_keys"}
    assert key_fields(TokensSettings) == platform | portal | {"notifier_keys", "password_keys", "code_hmac_key"}
    assert key_fields(NotifierSettings) == platform | {"notifier_keys", "dkim_private_key"}
    assert key_fields(PasswordSettings) == platform | portal | {"password_keys", "pseudonym_key"}
    # Verifiers: public keys, and the old HMAC key only for a log that still has legacy events.
    assert key_fields(AuditSettings) == platform | {"audit_public_keys", "audit_hmac_key"}


def test_auditors_and_operators_need_no_signing_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """`clave audit ...` runs with public keys and Kafka/store settings alone: no secret."""
    for name in list(os.environ):
        if name.upper() in SAFE:
            monkeypatch.delenv(name)
    for name in ("CLAVE_ENV", "KAFKA_SECURITY_PROTOCOL", "MONGODB_URI", "AUDIT_PUBLIC_KEYS"):
        monkeypatch.setenv(name, SAFE[name])
    assert AuditorSettings().problems() == []
    assert not any(p.startswith("AUDIT_SIGNING_KEY") for p in ClientSettings().problems())
    assert any(p.startswith("AUDIT_SIGNING_KEY") for p in PlatformSettings().problems())


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, env=env, check=False)


@pytest.mark.parametrize(
    "args",
    [
        [sys.executable, "-m", "services.identity"],
        [sys.executable, "-m", "services.tokens"],
        [sys.executable, "-m", "services.notifier"],
        [sys.executable, "-m", "services.password"],
        [sys.executable, "-m", "services.audit"],
        [sys.executable, "-m", "clave.cli", "audit", "verify"],
    ],
    ids=["identity", "tokens", "notifier", "password", "audit", "cli"],
)
def test_processes_refuse_to_start_before_connecting(args: list[str]) -> None:
    # Pointed at ports where nothing listens: a process that tried to connect would hang or
    # fail differently; the gate must stop it first, with the EX_CONFIG code and each name.
    env = {k: v for k, v in os.environ.items() if k.upper() not in SAFE}
    env.update(
        CLAVE_ENV="production",
        KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1",
        MONGODB_URI="mongodb://127.0.0.1:1/?replicaSet=none",
    )
    result = run(args, env)
    assert result.returncode == EXIT_UNSAFE_SETTINGS, result.stderr[-2000:]
    assert "refusing to start in production" in result.stderr
    assert "KAFKA_SECURITY_PROTOCOL" in result.stderr and "MONGODB_URI" in result.stderr
    if "clave.cli" in args:  # the auditor holds no secret: it is asked for public keys only
        assert "AUDIT_PUBLIC_KEYS" in result.stderr
        assert "DLQ_KEYS" not in result.stderr and "AUDIT_SIGNING_KEY" not in result.stderr
    else:
        assert "DLQ_KEYS: a development key" in result.stderr
        assert "AUDIT_SIGNING_KEY: not set" in result.stderr
    assert "Traceback" not in result.stderr
